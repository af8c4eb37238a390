"""Small node builders shared by the batch-moment lowerings (`moments.py`, `masked_moments.py`)."""

from __future__ import annotations

import numpy as np
from onnx import numpy_helper

from onnxbn.lowering import emit
from onnxbn.lowering.context import Value

# Leading elements per channel averaged into the shift: the closer the shift is to
# the mean, the less float32 sums of the shifted data drift (2^25 elements in one
# channel: mean error 3e-6 relative with 16 samples, 3e-7 with 1024).
SHIFT_SAMPLES = 1024


def channel_vector(ctx, value: Value, channels: int) -> Value:
    """`value` reshaped to `(C,)`, unless it already is."""
    if value.shape == (channels,):
        return value
    shape = emit.ints(ctx, [channels], "channel_shape")
    return ctx.op("Reshape", [value, shape], label="flat", shape=(channels,), allowzero=0)


def safe_mean(ctx, total: Value, count: Value) -> Value:
    """`total / max(count, 1)`: 0 where nothing was counted."""
    one = emit.scalar(ctx, 1.0, total.dtype, "one")
    return ctx.op("Div", [total, ctx.op("Max", [count, one])], label="shift")


def zeroed(ctx, valid: Value, x: Value, label: str, rank: int) -> Value:
    # A zero of x's rank: onnxruntime's broadcast of a rank-0 operand against a
    # tensor whose last dim is 1 takes a per-element path, ~50x slower.
    zero = ctx.constant(np.zeros([1] * rank), "zero", x.dtype)
    return ctx.op("Where", [valid, x, zero], dtype=x.dtype, shape=x.shape, label=label)


def clamped_ends(
    ctx, ends: list[int], dims: list[int | None], dims_value: Value | None
) -> Value:
    """Slice `ends` no larger than the dims they index (`dims_value` at run time).

    ONNX clamps a Slice end past the dim, but tract does not for a dynamic dim:
    a static dim clamps at export, a dynamic one by `Min(end, dim)`.
    """
    if all(d is not None for d in dims):
        return emit.ints(ctx, [min(e, d) for e, d in zip(ends, dims)], "end")
    return ctx.op("Min", [emit.ints(ctx, ends, "end"), dims_value], label="end")


def scalar_index(ctx, value: int) -> Value:
    """A rank-0 int64 constant (a Constant node: initializers here are at least 1-D)."""
    tensor = numpy_helper.from_array(np.asarray(value, np.int64), "value")
    return ctx.op("Constant", [], dtype="int64", shape=(), label="index", value=tensor)
