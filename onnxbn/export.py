"""`export_onnx`: walk the graph, apply the lowering rules, validate, write atomically."""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import onnx
from onnx import helper

import onnxbn.lowering  # noqa: F401 - registers every lowering rule
from onnxbn.contract import INITIAL_STATE_KEY, STATE_SUFFIX, encode_initial_state
from onnxbn.layers.input_layer import InputLayer
from onnxbn.layers.layer import Layer
from onnxbn.lowering.context import CallRecord, LoweringContext, Value, onnx_dtype
from onnxbn.lowering.folding import fold_batchnorm_nodes
from onnxbn.lowering.input_layer import declare_input, input_dims
from onnxbn.lowering.readable import annotate
from onnxbn.lowering.registry import lookup_lowering
from onnxbn.lowering.transposes import cancel_transposes
from onnxbn.model_files import _ONNX_ERRORS, validate, write_atomic
from onnxbn.node import Node
from onnxbn.operation import Operation
from onnxbn.tensor import SymbolicTensor
from onnxbn.tree import flatten, map_structure

DEFAULT_OPSET = 18
MIN_OPSET = 15
# The newest opset the lowering rules were checked against (their ops keep their
# meaning up to it); a newer onnx may redefine an op, so raising it is a review.
MAX_OPSET = 28
PRODUCER_NAME = "onnxbn"
METADATA_LAYER_PREFIX = "onnxbn:layer:"


def export_onnx(
    model_or_layer: Any,
    path: str | os.PathLike | None = None,
    *,
    training: bool | None = None,
    opset: int | None = None,
    fold_batchnorm: bool = True,
    train_step: bool = False,
) -> onnx.ModelProto:
    """Exports a model (or a called layer) to ONNX.

    Graph inputs are the model's inputs in order and under their names; graph
    outputs its outputs in order. Every `None` dim is dynamic (a `dim_param`;
    axis 0 is `batch`). A training export adds, for every trainable
    BatchNormalization called in training mode, in graph order, the plain
    inputs `<layer>/moving_mean`, `<layer>/moving_variance` after the model's
    inputs, and the outputs `<layer>/moving_mean/new`, `<layer>/moving_variance/new`
    after the model's outputs; their starting values (the layer's current
    ones) are in the model's metadata (`onnxbn.initial_state` reads them, the
    format is in `onnxbn/contract.py`). Feeding the starting values, then each
    `/new` output back as the next input, carries the state, from any language.

    Args:
        model_or_layer: an `onnxbn.Model`, or a layer that was called on
            symbolic tensors (exported from its first call's inputs to its output).
        path: optional file to write; written atomically (a temp file in the same
            folder, flushed and fsynced, then renamed over `path`).
        training: True/False applies to every layer call (Keras's
            `model(x, training=...)`); None keeps what each call recorded, and a
            call that recorded nothing runs in inference mode.
        opset: default-domain opset, 18 when None; any from 15 to `newest_opset()`.
        fold_batchnorm: fold an inference-mode BatchNormalization into the
            Conv/Dense that is its only producer (False keeps it separate); the
            rules are in `onnxbn/lowering/folding.py`.
        train_step: export the compiled model's whole train step instead
            (forward, loss, gradients, optimizer update; `model.compile` first):
            inputs are the model's inputs, the targets (`y_true`, or `y_true_<i>`
            per output), then the state (trainable weights, BatchNormalization
            statistics, optimizer variables); outputs are `loss` and each state's
            `/new`. See `onnxbn/lowering/train_step.py`.

    Returns:
        The `onnx.ModelProto`; it passes `onnx.checker.check_model(full_check=True)`
        and strict shape inference.

    Raises:
        TypeError: `model_or_layer` is not a model or layer, or a flag is not a bool.
        ValueError: an unsupported opset, a layer that was never called, a
            dynamic channel axis, duplicate names, or a model onnx rejects.
        OSError: writing `path` failed (the previous file is left intact).
    """
    opset = check_opset(opset)
    if training is not None and not isinstance(training, (bool, np.bool_)):
        raise TypeError(f"training must be True, False or None, received {training!r}.")
    if not isinstance(fold_batchnorm, (bool, np.bool_)):
        raise TypeError(f"fold_batchnorm must be a bool, received {fold_batchnorm!r}.")
    if not isinstance(train_step, (bool, np.bool_)):
        raise TypeError(f"train_step must be a bool, received {train_step!r}.")
    if train_step:
        model = _export_train_step(model_or_layer, training, opset)
    else:
        model = _export(model_or_layer, training, opset, fold=bool(fold_batchnorm))
    validate(model)
    if path is not None:
        write_atomic(model, path)
    return model


# -- opsets -------------------------------------------------------------------------
def newest_opset() -> int:
    """The newest opset onnxbn exports: `MAX_OPSET`, or the installed onnx's newest if older.

    A property of the exporter and of onnx's operator schemas, never of an
    installed runtime: what a runtime loads is checked by the tests.
    """
    return min(MAX_OPSET, onnx.defs.onnx_opset_version())


def check_opset(opset: Any) -> int:
    """`opset` (18 when None) if supported, else a ValueError naming it and the range."""
    if opset is None:
        return DEFAULT_OPSET
    if isinstance(opset, bool) or not isinstance(opset, (int, np.integer)):
        raise TypeError(f"opset must be an int, received {opset!r}.")
    newest = newest_opset()
    if not MIN_OPSET <= int(opset) <= newest:
        raise ValueError(
            f"Unsupported opset {opset}: onnxbn exports opsets {MIN_OPSET} to {newest} "
            f"(onnxbn's lowering rules are checked up to opset {MAX_OPSET}; onnx "
            f"{onnx.__version__} defines opsets up to {onnx.defs.onnx_opset_version()})."
        )
    return int(opset)


# -- graph walk ---------------------------------------------------------------------
def _graph_of(model_or_layer: Any) -> tuple[str, list, list, list[Node]]:
    """`(name, inputs, outputs, nodes)` of a Model, or of a layer's first call."""
    from onnxbn.model import Model

    if isinstance(model_or_layer, Model):
        m = model_or_layer
        return m.name, list(m.inputs), list(m.outputs), m.nodes
    if not isinstance(model_or_layer, Operation):
        raise TypeError(
            "export_onnx expects an onnxbn.Model or a called layer, received "
            f"{type(model_or_layer).__name__}."
        )
    op = model_or_layer
    if isinstance(op, InputLayer):
        raise ValueError(f"InputLayer {op.name!r} has nothing to export; export a model.")
    if not op._inbound_nodes:
        raise ValueError(
            f"{type(op).__name__} {op.name!r} was never called on symbolic tensors, so it "
            "has no graph to export. Call it on onnxbn.Input(...) first, or export a Model."
        )
    node = op._inbound_nodes[0]
    inputs: list[SymbolicTensor] = []
    for tensor in node.input_tensors:
        if all(tensor is not t for t in inputs):
            inputs.append(tensor)
    return op.name, inputs, list(node.outputs), [node]


def _resolve_trainings(nodes: list[Node], training: bool | None) -> dict[int, bool]:
    """`{id(node): training flag}` for every node whose op takes `training`."""
    flags = {}
    for node in nodes:
        if isinstance(node.operation, InputLayer) or not node.operation._call_has_training_arg:
            continue
        flag = training if training is not None else node.call_kwargs.get("training")
        flags[id(node)] = bool(flag) if flag is not None else False
    return flags


def _export(
    model_or_layer: Any, training: bool | None, opset: int, fold: bool = True
) -> onnx.ModelProto:
    name, inputs, outputs, nodes = _graph_of(model_or_layer)
    flags = _resolve_trainings(nodes, training)
    # Inference-mode BN after a Conv/Dense becomes that layer's weights; the
    # metadata still lists every layer of the model (the folded BN included).
    lowered = fold_batchnorm_nodes(nodes, flags, outputs) if fold else nodes
    ctx = LoweringContext(opset, trainings_per_op(nodes, flags))
    declare_inputs(ctx, inputs)
    values = lower_nodes(ctx, lowered, flags)
    graph_outputs = _graph_outputs(ctx, outputs, values)
    model = build_model(ctx, name, graph_outputs, nodes, training)
    _set_output_shapes(model, outputs)
    finish_model(model)
    return model


def _export_train_step(model: Any, training: bool | None, opset: int) -> onnx.ModelProto:
    from onnxbn.lowering.train_step import export_train_step
    from onnxbn.model import Model

    if not isinstance(model, Model):
        raise TypeError(
            f"export_onnx(..., train_step=True) needs a compiled onnxbn.Model, received "
            f"{type(model).__name__}."
        )
    if training is False:
        raise ValueError(
            "A train step runs the model with training=True; do not pass training=False."
        )
    return export_train_step(model, opset)


def trainings_per_op(nodes: list[Node], flags: dict[int, bool]) -> dict[int, list[bool]]:
    """`{id(op): [training flag of each call]}`, the context's view of `flags`."""
    per_op: dict[int, list[bool]] = {}
    for node in nodes:
        if id(node) in flags:
            per_op.setdefault(id(node.operation), []).append(flags[id(node)])
    return per_op


def declare_inputs(ctx: LoweringContext, inputs: list[SymbolicTensor]) -> dict[int, Value]:
    """Declares the graph inputs, in order; `ctx.values` maps each tensor to its value."""
    ctx.values = {}
    for tensor in inputs:
        op, _, _ = tensor.history
        if isinstance(op, InputLayer):
            with ctx.scope(op.name):
                ctx.values[id(tensor)] = lookup_lowering(op)(ctx, op)
        else:
            ctx.values[id(tensor)] = declare_input(ctx, tensor)
    return ctx.values


def lower_nodes(
    ctx: LoweringContext, nodes: list[Node], flags: dict[int, bool], records: list | None = None
) -> dict[int, Value]:
    """Applies each node's lowering rule in order; returns `{id(tensor): value}`.

    With `records` (a train step), each call's `CallRecord` is appended to it,
    holding what its forward rule saved for the gradient rule.
    """
    values = ctx.values
    for node in nodes:
        op = node.operation
        if isinstance(op, InputLayer) and all(id(t) in values for t in node.outputs):
            continue

        def resolve(item: Any) -> Any:
            return values[id(item)] if isinstance(item, SymbolicTensor) else item

        operands = map_structure(resolve, node.call_args)
        params = map_structure(resolve, node.call_kwargs)
        if id(node) in flags:
            params["training"] = flags[id(node)]
        scope = op.name if node.index == 0 else f"{op.name}/call_{node.index}"
        rule = lookup_lowering(op)
        record = CallRecord(op, tuple(operands), params) if records is not None else None
        ctx.current_call = record
        try:
            with ctx.scope(scope):
                result = rule(ctx, op, *operands, **params)
        finally:
            ctx.current_call = None
        outputs = []
        for tensor, value in zip(node.outputs, flatten(result)):
            values[id(tensor)] = _name_output(ctx, value, tensor)
            outputs.append(values[id(tensor)])
            if record is not None:  # what the rule saved under the old name
                for key, saved in record.saved.items():
                    if isinstance(saved, Value) and saved.name == value.name:
                        record.saved[key] = Value(values[id(tensor)].name, saved.dtype, saved.shape)
        if record is not None:
            record.output = outputs[0]
            records.append(record)
    return values


def build_model(
    ctx: LoweringContext, name: str, graph_outputs: list, nodes: list[Node], training: Any
) -> onnx.ModelProto:
    """The ModelProto of a lowered graph: outputs, then state and sync outputs; metadata."""
    graph_outputs = graph_outputs + ctx.state_outputs() + ctx.sync_outputs
    graph_inputs = ctx.inputs + ctx.sync_inputs
    used = _names_read(ctx.nodes) | {i.name for i in ctx.sync_inputs}
    ctx.initializers[:] = [t for t in ctx.initializers if t.name in used]
    graph = helper.make_graph(ctx.nodes, name, graph_inputs, graph_outputs, ctx.initializers)
    opset_ids = [helper.make_opsetid("", ctx.opset)]
    model = helper.make_model(
        graph,
        opset_imports=opset_ids,
        ir_version=helper.find_min_ir_version_for(opset_ids),
        producer_name=PRODUCER_NAME,
        producer_version=_version(),
        doc_string=f"Exported by onnxbn from {name!r}.",
    )
    _set_metadata(model, nodes, training, ctx)
    return model


def finish_model(model: onnx.ModelProto) -> None:
    """Cancels Transposes around element-wise ops, then adds doc_strings and shapes."""
    cancel_transposes(model.graph)
    annotate(model)


def _names_read(nodes) -> set[str]:
    """Every name a node reads, subgraphs (If branches) included."""
    names = set()
    for node in nodes:
        names.update(node.input)
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                names |= _names_read(attribute.g.node)
    return names


def _name_output(ctx: LoweringContext, value: Value, tensor: SymbolicTensor) -> Value:
    """Gives a call's output the symbolic tensor's name when that name is free."""
    if value.dtype != tensor.dtype:
        raise ValueError(
            f"Lowering of {tensor.history[0].name!r} produced {value.dtype}, but the layer "
            f"outputs {tensor.dtype}."
        )
    if not ctx.is_free(tensor.name):
        return Value(value.name, value.dtype, tensor.shape)
    ctx.reserve(tensor.name)
    if ctx.produced(value.name):
        ctx.rename(value.name, tensor.name)
    else:  # a graph input or initializer passed through unchanged
        ctx.nodes.append(
            helper.make_node(
                "Identity", [value.name], [tensor.name], name=f"{tensor.name}/Identity"
            )
        )
    return Value(tensor.name, value.dtype, tensor.shape)


def _graph_outputs(ctx, outputs: list[SymbolicTensor], values: dict) -> list:
    result, seen = [], set()
    for tensor in outputs:
        value = values[id(tensor)]
        if value.name != tensor.name or value.name in seen:
            raise ValueError(
                f"Model output {tensor.name!r} cannot keep its name in the graph (it is "
                "listed twice, or the name is taken by an input or another tensor)."
            )
        seen.add(value.name)
        result.append(helper.make_tensor_value_info(value.name, onnx_dtype(tensor.dtype), None))
    return result


def _set_output_shapes(model: onnx.ModelProto, outputs: list[SymbolicTensor]) -> None:
    """Output shapes: static dims from the graph, dynamic ones named by shape inference."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except _ONNX_ERRORS:
        inferred = None  # `validate` reports the problem
    types = {}
    if inferred is not None:
        for info in list(inferred.graph.value_info) + list(inferred.graph.output):
            types[info.name] = info.type.tensor_type
    for info, tensor in zip(model.graph.output, outputs):
        known = types.get(info.name)
        dims = input_dims(tensor)
        if known is not None and known.HasField("shape") and len(known.shape.dim) == len(dims):
            for i, dim in enumerate(known.shape.dim):
                if isinstance(dims[i], str) and dim.HasField("dim_param"):
                    dims[i] = dim.dim_param
        shape = helper.make_tensor_type_proto(onnx_dtype(tensor.dtype), dims)
        info.type.CopyFrom(shape)


def _set_metadata(model, nodes: list[Node], training: bool | None, ctx) -> None:
    from onnxbn.operation_registry import serialize

    entries = {"onnxbn:training": json.dumps(training)}
    state = [[slot.path, slot.path + STATE_SUFFIX] for slot in ctx.state.values()]
    entries["onnxbn:state"] = json.dumps(state)
    if ctx.state:
        entries[INITIAL_STATE_KEY] = encode_initial_state(ctx.initial_state())
    for node in nodes:
        op = node.operation
        key = METADATA_LAYER_PREFIX + op.name
        if isinstance(op, InputLayer) or not isinstance(op, Layer) or key in entries:
            continue
        entries[key] = json.dumps(serialize(op), default=_json_default, sort_keys=True)
    helper.set_model_props(model, entries)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return repr(value)


def _version() -> str:
    import onnxbn

    return str(getattr(onnxbn, "__version__", "0"))
