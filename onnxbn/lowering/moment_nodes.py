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


def clamped_ends(ctx, ends: list[int], dims: list[int | None], dims_value: Value | None) -> Value:
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


def has_elements(ctx, x: Value) -> Value:
    """A `(1,)` bool: whether `x` holds any element, derived from its data.

    `x[:, :1, ..., :1]` flattened (`x[:, 0]` for a matrix), each element counted as 1
    (`Where(v == v, 1, 1)`: NaN-proof) by a MatMul of the ones with
    themselves (tract panics on a ReduceSum over an empty axis). Not
    `Size(x) > 0`: tract reasons about that comparison symbolically and takes
    minutes (or panics) on a graph with two such layers, and a comparison of
    the count derived from Shape it evaluates wrongly in a shared layer's
    second call.
    """
    if x.rank == 2 and x.shape[1]:
        # A Gather, not a Slice + Reshape: tract cannot group the reshape of a
        # `(min(1024, M), 1)` column.
        x = ctx.op("Gather", [x, scalar_index(ctx, 0)], axis=1, label="column")
    elif x.rank > 1:
        axes = list(range(1, x.rank))
        dims = list(x.shape[1:])
        dims_value = None if all(d is not None for d in dims) else emit.shape_of(ctx, x, 1)
        corner = ctx.op(
            "Slice",
            [x, emit.ints(ctx, [0] * len(axes), "start"),
             clamped_ends(ctx, [1] * len(axes), dims, dims_value), emit.ints(ctx, axes, "axes")],
            label="corner",
        )  # fmt: skip
        x = emit.reshape(ctx, corner, [None], "corner")
    one = emit.scalar(ctx, 1.0, x.dtype, "one")
    same = ctx.op("Equal", [x, x], dtype="bool", label="cells")
    ones = ctx.op("Where", [same, one, one], dtype=x.dtype, label="ones", shape=x.shape)
    column = ctx.op("Unsqueeze", [ones, emit.ints(ctx, [1], "axes")], label="ones_column")
    count = ctx.op("MatMul", [ones, column], label="rows", shape=(1,))
    zero = emit.scalar(ctx, 0.0, x.dtype, "zero")
    return ctx.op("Greater", [count, zero], dtype="bool", label="nonempty", shape=(1,))


def ones_like_rows(ctx, rows: Value) -> Value:
    """`(M,)` ones from the first column of an `(M, C)` value (`Where(c == c, 1, 1)`).

    For a MatMul that sums rows of other values: the ones carry the identity
    of `rows`, where a ConstantOfShape of the row count would be the same node
    for two layers fed the same gradient (the branches of a residual Add);
    tract merges the two identical sums and then evaluates a Dummy op.
    """
    column = ctx.op("Gather", [rows, scalar_index(ctx, 0)], axis=1, label="column")
    one = emit.scalar(ctx, 1.0, rows.dtype, "one")
    same = ctx.op("Equal", [column, column], dtype="bool", label="cells")
    return ctx.op("Where", [same, one, one], dtype=rows.dtype, label="ones", shape=column.shape)
