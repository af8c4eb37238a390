"""The whole train step as one ONNX graph: forward, loss, backward, optimizer update.

The graph computes what `Model.train_on_batch` computes (`onnxbn/trainer.py`):

- inputs: the model's inputs; one target per output (`y_true`, or `y_true_<i>`
  for several outputs); then the state: every trainable weight
  (`<layer>/<weight>`, Keras order), every BatchNormalization state input of a
  training export, then the optimizer's variables (`optimizer/iterations`, an
  int64 scalar, and its slots `optimizer/<slot>/<layer>/<weight>`);
- outputs: `loss` (regularization included), then each state input's `/new`.

Each layer call is lowered by its own forward rule, which reads its weights
with `ctx.weight` (state inputs here) and saves what its gradient rule needs;
the backward pass applies each call's gradient rule (registered beside the
forward rule, `register_gradient`) in reverse order, summing the gradients
that reach a tensor or a weight from several uses.
"""

from __future__ import annotations

from typing import Any

import onnx
from onnx import helper

from onnxbn.contract import TRAIN_STEP_KEY
from onnxbn.dtypes import is_float
from onnxbn.lowering.context import CallRecord, LoweringContext, Value, onnx_dtype
from onnxbn.lowering.registry import lookup_gradient

LOSS_OUTPUT = "loss"


def target_names(count: int) -> list[str]:
    """`["y_true"]` for one output, `["y_true_0", "y_true_1", ...]` for several."""
    return ["y_true"] if count == 1 else [f"y_true_{i}" for i in range(count)]


def export_train_step(model: Any, opset: int) -> onnx.ModelProto:
    """Lowers `model`'s compiled train step (see the module docstring).

    Raises:
        ValueError: the model is not compiled, has no trainable weight, or a
            layer has no gradient rule.
    """
    from onnxbn import export
    from onnxbn.layers.input_layer import InputLayer
    from onnxbn.losses import SparseCategoricalCrossentropy
    from onnxbn.lowering.input_layer import input_dims
    from onnxbn.lowering.losses import lower_loss
    from onnxbn.lowering.optimizers import lower_update
    from onnxbn.lowering.regularizers import lower_regularizer

    if getattr(model, "optimizer", None) is None or getattr(model, "loss", None) is None:
        raise ValueError(
            f"Model {model.name!r} is not compiled: call model.compile(optimizer, loss) before "
            "export_onnx(model, train_step=True)."
        )
    variables = list(model.trainable_weights)
    if not variables:
        raise ValueError(f"Model {model.name!r} has no trainable weight: nothing to train.")
    nodes = model.nodes
    # Keras's train_step calls the model with training=True.
    flags = {
        id(n): True
        for n in nodes
        if not isinstance(n.operation, InputLayer) and n.operation._call_has_training_arg
    }
    ctx = LoweringContext(opset, export.trainings_per_op(nodes, flags))
    export.declare_inputs(ctx, list(model.inputs))
    targets = []
    for name, tensor, loss in zip(target_names(len(model.outputs)), model.outputs, model.loss):
        dims = input_dims(tensor)
        if isinstance(loss, SparseCategoricalCrossentropy):  # ids: no class axis
            targets.append(ctx.add_input(name, "int64", dims[:-1]))
        else:
            targets.append(ctx.add_input(name, tensor.dtype, dims))
    ctx.trainable_paths = {v.path for v in variables}
    weights = {v.path: ctx.read_state(v.path, v.value, v.dtype) for v in variables}
    records: list[CallRecord] = []
    values = export.lower_nodes(ctx, nodes, flags, records)

    grads: dict[str, Value] = {}  # by tensor name
    losses = []
    with ctx.scope("loss"):
        for tensor, loss, y_true in zip(model.outputs, model.loss, targets):
            y_pred = values[id(tensor)]
            mask = None if tensor.mask is None else values.get(id(tensor.mask))
            value, grad = lower_loss(ctx, loss, y_true, y_pred, mask)
            losses.append(value)
            _accumulate(ctx, grads, y_pred.name, grad)
    weight_grads: dict[str, Value] = {}
    with ctx.scope("gradient"):
        for record in reversed(records):
            dy = grads.get(record.output.name)
            if dy is None or not is_float(record.output.dtype):
                continue
            with ctx.scope(record.op.name):
                result = lookup_gradient(record.op)(ctx, record.op, record, dy)
            for operand, grad in zip(record.operands, result.inputs):
                if isinstance(operand, Value) and grad is not None:
                    _accumulate(ctx, grads, operand.name, grad)
                elif isinstance(operand, (list, tuple)) and grad is not None:
                    for item, g in zip(operand, grad):
                        if isinstance(item, Value) and g is not None:
                            _accumulate(ctx, grads, item.name, g)
            for path, grad in result.weights.items():
                _accumulate(ctx, weight_grads, path, grad)
    with ctx.scope("regularization"):
        for variable in variables:
            if variable.regularizer is None:
                continue
            value, grad = lower_regularizer(ctx, variable.regularizer, weights[variable.path])
            losses.append(value)
            _accumulate(ctx, weight_grads, variable.path, grad)
    total = _total_loss(ctx, losses)
    params = []
    for variable in variables:
        grad = weight_grads.get(variable.path)
        if grad is None:  # not reached by the loss: left alone, as the eager step does
            continue
        if grad.dtype != variable.dtype:
            grad = ctx.op(
                "Cast", [grad], label="grad", dtype=variable.dtype, to=onnx_dtype(variable.dtype)
            )
        params.append((variable, weights[variable.path], grad))
    with ctx.scope("optimizer"):
        lower_update(ctx, model.optimizer, params)
    info = helper.make_tensor_value_info(LOSS_OUTPUT, onnx_dtype(total.dtype), [])
    result = export.build_model(ctx, model.name, [info], nodes, True)
    result.metadata_props.add(key=TRAIN_STEP_KEY, value="true")
    _drop_unused(result.graph)
    export.finish_model(result)
    return result


def _drop_unused(graph: onnx.GraphProto) -> None:
    """Removes the nodes and initializers no output depends on.

    The gradient rules compute every input gradient; the ones of the model's
    inputs (the first convolution's input gradient, say) reach no output.
    """
    needed = {o.name for o in graph.output}
    kept = []
    for node in reversed(graph.node):
        if any(name in needed for name in node.output):
            needed.update(node.input)
            copy = onnx.NodeProto()
            copy.CopyFrom(node)
            kept.append(copy)
    initializers = [t for t in graph.initializer if t.name in needed]
    del graph.node[:]
    graph.node.extend(reversed(kept))
    del graph.initializer[:]
    graph.initializer.extend(initializers)


def _accumulate(ctx: LoweringContext, table: dict[str, Value], key: str, grad: Value) -> None:
    """Adds `grad` to what `key` already received (a tensor used twice gets both)."""
    previous = table.get(key)
    table[key] = (
        grad
        if previous is None
        else ctx.op("Add", [previous, grad], label="grad_sum", shape=grad.shape)
    )


def _total_loss(ctx: LoweringContext, losses: list[Value]) -> Value:
    """The sum of every loss term, named `loss` (float32, float64 if a term is)."""
    dtype = "float64" if any(v.dtype == "float64" for v in losses) else "float32"
    total = None
    for value in losses:
        if value.dtype != dtype:
            value = ctx.op("Cast", [value], label="loss_term", dtype=dtype, to=onnx_dtype(dtype))
        total = value if total is None else ctx.op("Add", [total, value], label="loss_sum")
    ctx.reserve(LOSS_OUTPUT)
    ctx.nodes.append(helper.make_node("Identity", [total.name], [LOSS_OUTPUT], name=LOSS_OUTPUT))
    return Value(LOSS_OUTPUT, dtype, ())
