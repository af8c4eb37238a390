"""Masking: zero the timesteps whose features all equal `mask_value` (semantics: `layers/masking.py`).

The output is `x * any(x != mask_value, axis=-1, keepdims=True)`: a product, as
Keras computes it, so NaN or Inf at a masked timestep gives NaN there, exactly
as the eager layer. The layer's mask itself is not computed here: Keras records
it as `NotEqual` and `Any` op nodes on the layer's input, which the exporter
lowers like any other node (`lowering/numpy_ops.py`) into a bool value that
reaches every layer whose call took it.
"""

from __future__ import annotations

from onnxbn.gradients import Gradients
from onnxbn.layers.masking import Masking
from onnxbn.lowering import emit
from onnxbn.lowering.activation import (
    autocast,
    gradient_input,
    layer_output,
    operand_gradient,
    working_dtype,
)
from onnxbn.lowering.context import CallRecord, LoweringContext, Value
from onnxbn.lowering.numpy_ops import any_of, not_equal
from onnxbn.lowering.registry import register_gradient, register_lowering


@register_lowering(Masking)
def lower_masking(ctx: LoweringContext, op: Masking, x: Value) -> Value:
    """Lowers one call of a Masking layer.

    Args:
        ctx: the lowering context.
        op: the layer.
        x: its input, `(batch, timesteps, ..., features)`.

    Returns:
        The input with masked timesteps zeroed, in the compute dtype.
    """
    h = autocast(ctx, op, x)
    different = not_equal(ctx, h, op.mask_value, owner=f"Masking {op.name!r}")
    keep = any_of(ctx, different, (h.rank - 1,), keepdims=True, label="keep")
    work = working_dtype(op.compute_dtype)
    y = ctx.op(
        "Mul",
        [emit.cast(ctx, h, work, "input"), ctx.save("keep", emit.cast(ctx, keep, work, "keep"))],
        label="masked",
        shape=h.shape,
    )
    return layer_output(ctx, op, y)


@register_gradient(Masking)
def masking_gradient(ctx: LoweringContext, op: Masking, call: CallRecord, dy: Value) -> Gradients:
    """`dy` at the kept timesteps, 0 at the masked ones, in the input's dtype."""
    g = ctx.op("Mul", [gradient_input(ctx, op, dy), call.saved["keep"]], label="dx")
    return Gradients((operand_gradient(ctx, g, call.operands[0]),))
