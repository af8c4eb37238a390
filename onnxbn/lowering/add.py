"""Add: the elementwise sum of a list of inputs (semantics: `layers/add.py`).

Each input is autocast, brought to the working dtype and, when its rank is
below the largest, given size-1 axes at position 1 as Keras's merge layers
expand them; a chain of Add nodes then broadcasts as NumPy does. The output
mask (Keras's LogicalOr of the input masks) is recorded as separate op nodes,
lowered by `lowering/numpy_ops.py`.

The gradient of each input is `dy` summed over the axes it was broadcast
along: every axis where its (expanded) static size is 1, which is exact
whatever the run-time size there, then the expanded axes squeezed. An axis of
unknown size is taken as not broadcast (Keras's merge rejects different batch
sizes; another dynamic axis that is 1 at run time against a longer one is not
supported).
"""

from __future__ import annotations

from onnxbn.gradients import Gradients
from onnxbn.layers.add import Add
from onnxbn.lowering import emit
from onnxbn.lowering.activation import (
    gradient_input,
    layer_input,
    layer_output,
    new_value,
    operand_gradient,
)
from onnxbn.lowering.context import CallRecord, LoweringContext, Value
from onnxbn.lowering.registry import register_gradient, register_lowering


@register_lowering(Add)
def lower_add(ctx: LoweringContext, op: Add, inputs: list[Value]) -> Value:
    """Lowers one call of an Add layer.

    Args:
        ctx: the lowering context.
        op: the layer.
        inputs: the list of input values (at least one).

    Returns:
        Their broadcast sum in the compute dtype.

    Raises:
        ValueError: an empty input list.
    """
    if not inputs:
        raise ValueError(f"Layer {op.name!r}: Add needs at least one input, received none.")
    rank = max(v.rank for v in inputs)
    total = None
    for v in inputs:
        h = layer_input(ctx, op, v)
        if h.rank < rank:
            missing = list(range(1, 1 + rank - h.rank))
            shape = h.shape[:1] + (1,) * len(missing) + h.shape[1:]
            h = ctx.op(
                "Unsqueeze", [h, emit.ints(ctx, missing, "axes")], label="expanded", shape=shape
            )
        total = h if total is None else ctx.op("Add", [total, h], label="sum")
    return new_value(ctx, layer_output(ctx, op, total), inputs[0])


@register_gradient(Add)
def add_gradient(ctx: LoweringContext, op: Add, call: CallRecord, dy: Value) -> Gradients:
    """`dy` summed back to each input's shape, in that input's dtype.

    Returns:
        `Gradients` whose one input entry is the list of the inputs' gradients.
    """
    inputs = call.operands[0]
    rank = max(v.rank for v in inputs)
    g = gradient_input(ctx, op, dy)
    grads = []
    for v in inputs:
        missing = list(range(1, 1 + rank - v.rank))
        expanded = v.shape[:1] + (1,) * len(missing) + v.shape[1:]
        axes = [i for i, d in enumerate(expanded) if d == 1]
        gv = g
        if axes:
            gv = emit.reduce(ctx, "ReduceSum", gv, axes, keepdims=True, label="summed")
        if missing:
            gv = ctx.op("Squeeze", [gv, emit.ints(ctx, missing, "axes")], label="squeezed")
        grads.append(operand_gradient(ctx, gv, v))
    return Gradients((grads,))
