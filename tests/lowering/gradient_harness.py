"""One layer call and its gradient rule as a standalone ONNX graph, for per-layer gradient tests.

`gradient_model(op, args, params, dy)` lowers one call of `op` the way a train
step does (trainable weights as state inputs, `ctx.save` recording), feeds the
output gradient `dy` as a graph input, applies the op's gradient rule and
returns a model whose outputs are `y`, the input gradients and the weight
gradients. Tests run it on a runtime of `tests/runtimes.py` and compare the
gradients with central finite differences of the eager layer (the oracle).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import helper

import onnxbn.lowering  # noqa: F401 - registers every rule
from onnxbn.dtypes import standardize_dtype, to_numpy_dtype
from onnxbn.lowering.context import CallRecord, LoweringContext, Value, onnx_dtype
from onnxbn.lowering.registry import lookup_gradient, lookup_lowering


def _dims(array: np.ndarray, dynamic_batch: bool) -> list:
    dims: list = list(array.shape)
    if dynamic_batch and dims:
        dims[0] = "batch"
    return dims


def gradient_model(
    op: Any,
    args: list[Any],
    params: dict[str, Any] | None = None,
    *,
    dy: np.ndarray,
    opset: int = 18,
    dynamic_batch: bool = True,
) -> tuple[onnx.ModelProto, dict[str, np.ndarray], list[str]]:
    """The graph of one call of a built layer `op` and its gradient.

    Args:
        op: a built layer.
        args: the positional arguments as arrays (a list of arrays for a list
            argument, e.g. Add's).
        params: keyword arguments: `training` (bool) and `mask` (an array).
        dy: the output gradient, fed as the input `dy`.
        opset: the default-domain opset.
        dynamic_batch: declare axis 0 of every data input as dynamic.

    Returns:
        `(model, feeds, names)`: `names` are the output names in graph order:
        `y`, then `grad/arg<i>[_<j>]` for each input that has a gradient, then
        `grad/<weight path>` for each trainable weight, then state `/new` outputs.
    """
    params = dict(params or {})
    training = bool(params.get("training", False))
    ctx = LoweringContext(opset, {id(op): [training]})
    ctx.trainable_paths = {v.path for v in op.trainable_weights}
    feeds: dict[str, np.ndarray] = {}

    def declare(name: str, array: np.ndarray) -> Value:
        array = np.asarray(array)
        feeds[name] = array
        return ctx.add_input(name, standardize_dtype(array.dtype), _dims(array, dynamic_batch))

    operands = []
    for i, arg in enumerate(args):
        if isinstance(arg, (list, tuple)):
            operands.append([declare(f"arg{i}_{j}", a) for j, a in enumerate(arg)])
        else:
            operands.append(declare(f"arg{i}", arg))
    lowered_params: dict[str, Any] = {}
    if "training" in params:
        lowered_params["training"] = training
    if params.get("mask") is not None:
        lowered_params["mask"] = declare("mask", params["mask"])
    call = CallRecord(op, tuple(operands), lowered_params)
    ctx.current_call = call
    with ctx.scope(op.name):
        y = lookup_lowering(op)(ctx, op, *operands, **lowered_params)
    ctx.current_call = None
    call.output = y
    dy_value = declare("dy", np.asarray(dy, dtype=to_numpy_dtype(y.dtype)))
    with ctx.scope(op.name + "/grad"):
        grads = lookup_gradient(op)(ctx, op, call, dy_value)
    # Each output declares the shape of what it is a gradient of (the checker wants one).
    outputs = [(y, "y", _dims(feeds["dy"], dynamic_batch))]
    for i, g in enumerate(grads.inputs):
        if isinstance(g, (list, tuple)):
            outputs += [
                (gj, f"grad/arg{i}_{j}", _dims(feeds[f"arg{i}_{j}"], dynamic_batch))
                for j, gj in enumerate(g)
                if gj is not None
            ]
        elif g is not None:
            outputs.append((g, f"grad/arg{i}", _dims(feeds[f"arg{i}"], dynamic_batch)))
    shapes = {v.path: list(v.shape) for v in op.trainable_weights}
    for path in sorted(grads.weights):
        outputs.append((grads.weights[path], f"grad/{path}", shapes[path]))
    state_infos = ctx.state_outputs()  # may rename a state's last value: before reading names
    nodes = list(ctx.nodes)
    infos = []
    for value, name, dims in outputs:
        nodes.append(helper.make_node("Identity", [value.name], [name], name=name))
        infos.append(helper.make_tensor_value_info(name, onnx_dtype(value.dtype), dims))
    for path, value in ctx.initial_state().items():
        feeds[path] = value
    graph = helper.make_graph(nodes, "gradient", ctx.inputs, infos + state_infos, ctx.initializers)
    opsets = [helper.make_opsetid("", opset)]
    model = helper.make_model(
        graph, opset_imports=opsets, ir_version=helper.find_min_ir_version_for(opsets)
    )
    onnx.checker.check_model(model, full_check=True)
    names = [name for _, name, _ in outputs] + [i.name for i in state_infos]
    return model, feeds, names

