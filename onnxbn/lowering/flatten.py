"""Flatten: one Reshape to `(batch, -1)` (semantics: `layers/flatten.py`).

Float inputs are first autocast to the compute dtype; other dtypes pass as
they are. `channels_first` moves the channel axis last first (one Transpose),
so the element order is that of the channels-last layout, as in Keras.
"""

from __future__ import annotations

from onnxbn.dtypes import is_float
from onnxbn.gradients import Gradients
from onnxbn.layers.flatten import Flatten
from onnxbn.lowering import emit
from onnxbn.lowering.activation import autocast, operand_gradient
from onnxbn.lowering.context import CallRecord, LoweringContext, Value
from onnxbn.lowering.registry import register_gradient, register_lowering


@register_lowering(Flatten)
def lower_flatten(ctx: LoweringContext, op: Flatten, x: Value) -> Value:
    """Lowers one call of a Flatten layer.

    Args:
        ctx: the lowering context.
        op: the layer.
        x: its input, of rank >= 1.

    Returns:
        `(batch, prod(other dims))`, in the compute dtype for float inputs.
    """
    shape = op.compute_output_shape(x.shape)
    h = autocast(ctx, op, x)
    if op.data_format == "channels_first" and h.rank > 2:
        perm = [0] + list(range(2, h.rank)) + [1]
        h = ctx.op("Transpose", [h], label="channels_last", perm=perm)
    ctx.save("unflattened", h)
    flat = shape[1]
    if flat == 0:
        # An empty row: 0 must mean 0 (allowzero), so the batch dim comes from Shape.
        batch = emit.shape_of(ctx, h, 0, 1)
        target = emit.concat_ints(ctx, [batch, emit.ints(ctx, [0], "empty")], "shape")
        return ctx.op("Reshape", [h, target], label="Reshape", shape=shape, allowzero=1)
    # Reshape's 0 copies the batch dim, so a dynamic (even empty) batch needs no Shape op;
    # -1 cannot stand for the rest when the batch may be empty, so a static size is used.
    target = [0, flat] if flat is not None else [0, -1]
    return ctx.op(
        "Reshape", [h, emit.ints(ctx, target, "shape")], label="Reshape", shape=shape, allowzero=0
    )


@register_gradient(Flatten)
def flatten_gradient(ctx: LoweringContext, op: Flatten, call: CallRecord, dy: Value) -> Gradients:
    """`dy` reshaped back to the input's (run-time) shape and layout, in its dtype."""
    x = call.operands[0]
    if not is_float(x.dtype):
        return Gradients((None,))
    g = ctx.op("Reshape", [dy, emit.shape_of(ctx, call.saved["unflattened"])], label="dx",
               allowzero=1)  # fmt: skip
    if op.data_format == "channels_first" and x.rank > 2:
        perm = [0, x.rank - 1] + list(range(1, x.rank - 1))
        g = ctx.op("Transpose", [g], label="channels_first", perm=perm)
    return Gradients((operand_gradient(ctx, g, x),))
