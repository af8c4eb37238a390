"""GlobalAveragePooling1D / 2D: means over the spatial axes (semantics: `layers/global_average_pooling.py`).

Unmasked, the mean is one ReduceMean over the spatial axes in the working
dtype. The 1D layer with a mask averages the valid steps only, as Keras does:
`ReduceSum(Where(valid, x, 0)) / ReduceSum(valid)`. Where, not a product with
the mask, so NaN or Inf at masked-out steps cannot reach the result; a row with
no valid step gives 0 / 0 = NaN, as in Keras.
"""

from __future__ import annotations

import numpy as np

from onnxbn.gradients import Gradients
from onnxbn.layers.global_average_pooling import (
    BaseGlobalPooling,
    GlobalAveragePooling1D,
    GlobalAveragePooling2D,
)
from onnxbn.lowering import emit
from onnxbn.lowering.activation import (
    gradient_input,
    layer_input,
    layer_output,
    operand_gradient,
)
from onnxbn.lowering.context import CallRecord, LoweringContext, Value
from onnxbn.lowering.registry import register_gradient, register_lowering


def _check_rank(op: BaseGlobalPooling, x: Value) -> None:
    expected = op.input_spec.ndim
    if x.shape is None or len(x.shape) != expected:
        raise ValueError(
            f"Layer {op.name!r} ({type(op).__name__}) expects an input of rank {expected}, "
            f"received shape {x.shape}."
        )


def _mean(ctx: LoweringContext, op: BaseGlobalPooling, x: Value) -> Value:
    _check_rank(op, x)
    h = ctx.save("input", layer_input(ctx, op, x))
    shape = op.compute_output_shape(x.shape)
    y = emit.reduce(
        ctx, "ReduceMean", h, op.spatial_axes, keepdims=op.keepdims, label="mean", shape=shape
    )
    return layer_output(ctx, op, y)


@register_lowering(GlobalAveragePooling2D)
def lower_global_average_pooling_2d(
    ctx: LoweringContext, op: GlobalAveragePooling2D, x: Value
) -> Value:
    """The mean over both spatial axes, in the compute dtype."""
    return _mean(ctx, op, x)


@register_lowering(GlobalAveragePooling1D)
def lower_global_average_pooling_1d(
    ctx: LoweringContext, op: GlobalAveragePooling1D, x: Value, *, mask: Value | None = None
) -> Value:
    """The mean over the steps, of the valid steps only when a mask is given.

    Args:
        ctx: the lowering context.
        op: the layer.
        x: `(batch, steps, features)` (or channels first).
        mask: optional `(batch, steps)` value; non-zero marks a valid step.

    Returns:
        `(batch, features)` (steps axis kept with `keepdims`), compute dtype.
    """
    if mask is None:
        return _mean(ctx, op, x)
    _check_rank(op, x)
    if mask.shape is not None and len(mask.shape) != 2:
        raise ValueError(
            f"Layer {op.name!r}: the mask must have shape (batch, steps), received a mask "
            f"of shape {mask.shape}."
        )
    axis = op.spatial_axes[0]
    feature_axis = 2 if axis == 1 else 1
    h = layer_input(ctx, op, x)
    valid = emit.cast(ctx, mask, "bool", label="valid")
    valid = ctx.op(
        "Unsqueeze", [valid, emit.ints(ctx, [feature_axis], "axes")], label="valid", dtype="bool"
    )
    ctx.save("valid", valid)
    zero = emit.scalar(ctx, 0.0, h.dtype, "zero")
    kept = ctx.op("Where", [valid, h, zero], label="kept", dtype=h.dtype, shape=h.shape)
    total = emit.reduce(ctx, "ReduceSum", kept, [axis], keepdims=op.keepdims, label="total")
    # The size-1 feature axis of `valid` makes the count broadcast over the features.
    count = emit.reduce(
        ctx, "ReduceSum", emit.cast(ctx, valid, h.dtype, "count"), [axis], keepdims=op.keepdims,
        label="count",
    )  # fmt: skip
    ctx.save("count", count)
    y = ctx.op("Div", [total, count], label="mean", shape=op.compute_output_shape(x.shape))
    return layer_output(ctx, op, y)


@register_gradient(BaseGlobalPooling)
def global_average_pooling_gradient(
    ctx: LoweringContext, op: BaseGlobalPooling, call: CallRecord, dy: Value
) -> Gradients:
    """`dy / count` spread over the pooled steps (the valid ones under a mask).

    Returns:
        The input gradient, in the input's dtype; None for the mask.
    """
    saved = call.saved
    axes = list(op.spatial_axes)
    masked = "valid" in saved
    count = saved["count"] if masked else _pooled_count(ctx, saved["input"], axes)
    g = ctx.op("Div", [gradient_input(ctx, op, dy), count], label="share")
    if not op.keepdims:
        g = ctx.op("Unsqueeze", [g, emit.ints(ctx, axes, "axes")], label="share_kept")
    if masked:  # Where, as the forward, so no gradient reaches a masked step
        zero = emit.scalar(ctx, 0.0, g.dtype, "zero")
        g = ctx.op("Where", [saved["valid"], g, zero], label="dx", dtype=g.dtype)
    else:
        h = saved["input"]
        g = ctx.op("Expand", [g, emit.shape_of(ctx, h)], label="dx", shape=h.shape)
    return Gradients((operand_gradient(ctx, g, call.operands[0]),))


def _pooled_count(ctx: LoweringContext, h: Value, axes: list[int]) -> Value:
    """The number of pooled elements per output, a scalar of `h`'s dtype."""
    dims = [h.shape[a] for a in axes]
    if all(d is not None for d in dims):
        return emit.scalar(ctx, float(np.prod(dims)), h.dtype, "count")
    sizes = ctx.op("Gather", [emit.shape_of(ctx, h), emit.ints(ctx, axes, "axes")],
                   label="pooled_dims", dtype="int64")  # fmt: skip
    count = emit.reduce(ctx, "ReduceProd", sizes, [0], keepdims=False, label="pooled")
    return emit.cast(ctx, count, h.dtype, "count")
