"""Batch moments as ONNX (semantics: `layers/moments.py`): shifted sums, Keras's masked finish.

Sums are taken of the data shifted per channel by a sample of itself,
`d = x - s`, so that float32 accumulation keeps its digits on data such as
`1e4 + N(0, 1)` (`x - s` is exact by Sterbenz when `x` and `s` are within a
factor of two). The shift is the mean of a few leading elements of each
channel (valid ones only when masked), which also keeps `Σd² / n - mean_d²`
free of cancellation.

Masked moments (the shift and sums over valid positions only, with NaN or
Inf at masked-out positions never reaching a sum) are built in
`masked_moments.py`; the small node builders both use live in `moment_nodes.py`.

Accumulation is float32 in onnxruntime's MatMul/ReduceSum kernels, whose long
sums stagnate: beyond ~10^7 elements per channel the variance loses digits
(about 1e-3 relative at 2^25 elements in one channel of a rank-2 input).

Only what every runtime implements alike (onnxruntime, OpenVINO, tract,
onnx.reference, onnxbn.reference): no If, no Slice end past a dynamic dim (ends
are clamped by the dim), no window whose length depends on data (the masked
head is a fixed window of clamped indices), no reliance on Max/Min with NaN.
The formulations were chosen by paired measurements on onnxruntime; the
numbers are in `docs/lowering.md`.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from onnxbn.layers.moments import MASK_EPSILON
from onnxbn.lowering import emit
from onnxbn.lowering.context import LoweringContext, Value
from onnxbn.lowering.masked_moments import (
    gathered_row_sums,
    masked_inner_shift,
    masked_rows_shift,
)
from onnxbn.lowering.moment_nodes import (
    SHIFT_SAMPLES,
    channel_vector,
    clamped_ends,
    has_elements,
    safe_mean,
    zeroed,
)

# ReduceSumSquare's first level (channel not last, unmasked) runs over the last
# axis only when it has at least this many elements, else over every axis after
# the channel, as ReduceSum does: onnxruntime's ReduceSumSquare is a scalar
# loop, faster over short rows (NCHW 32x64x56x56: 1.35x memcpy over W then
# ReduceSum over (N, H), 1.71x over H*W; rows of 16: 1.5x, of 8: 2.2x, of 4: 3.9x).
SQUARES_LAST_AXIS_MIN = 32
# Channels last: `x - shift` on rows of at least this many elements (see
# `_shifted_rows`); 1 subtracts on the (M, C) view.
SUB_ROW = 1024


class Moments(NamedTuple):
    """Batch statistics of one call; per-channel values have shape `(C,)`."""

    shifted: Value  # d = x - shift, x's shape
    shift: Value  # (C,)
    mean_shifted: Value  # batch mean - shift (Keras's shrunken mean when masked)
    var: Value  # batch (population) variance
    nonempty: Value | None  # bool, None when the batch has data for sure (or is masked)
    count: Value  # the count the moments divide by ((1,) or (C,); masked: before the + 1e-7)


def valid_positions(ctx: LoweringContext, mask: Value, x: Value) -> Value:
    """Boolean mask broadcast to `x.shape[:-1]` (Keras: non-zero = valid)."""
    valid = mask if mask.dtype == "bool" else emit.cast(ctx, mask, "bool", label="valid")
    target = x.shape[:-1]
    if mask.shape == target and all(d is not None for d in target):
        return valid
    return ctx.op(
        "Expand",
        [valid, emit.shape_of(ctx, x, 0, x.rank - 1)],
        dtype="bool",
        label="valid",
        shape=target,
    )


def surely_nonempty(x: Value) -> bool:
    return all(d is not None and d > 0 for d in x.shape)


def batch_moments(
    ctx: LoweringContext, x: Value, axis: int, valid: Value | None, synchronized: bool = False
) -> Moments:
    """Shifted sums of `x` over every axis but `axis`, finished into mean and variance.

    Args:
        ctx: the lowering context.
        x: the data in the compute dtype.
        axis: the channel axis (non-negative).
        valid: optional boolean mask of `x.shape[:-1]` (see `valid_positions`).
        synchronized: publish the partial moments and take the global ones
            (see `onnxbn/lowering/synchronized.py`).
    """
    if axis == x.rank - 1:
        d, shift, s1, s2, n, head = _sums_channel_last(ctx, x, valid)
    else:
        d, shift, s1, s2, n, head = _sums_channel_inner(ctx, x, axis, valid)
    channels = x.shape[axis]
    if synchronized:
        from onnxbn.lowering.synchronized import exchanged_moments

        flat_shift = channel_vector(ctx, shift, channels)
        mean_d, var, n = exchanged_moments(
            ctx, flat_shift, s1, s2, n, channels, masked=valid is not None
        )
    else:
        mean_d, var = _finish(ctx, shift, s1, s2, n, channels, masked=valid is not None)
    nonempty = None
    if valid is None and (synchronized or not surely_nonempty(x)):
        if synchronized:  # the global batch decides
            zero = emit.scalar(ctx, 0.0, x.dtype, "zero")
            nonempty = ctx.op("Greater", [n, zero], dtype="bool", label="nonempty")
        else:
            # The head is empty exactly when x is, and small; a Slice of x or
            # d itself costs onnxruntime a reorder of a blocked Conv output.
            nonempty = has_elements(ctx, head)
    return Moments(d, channel_vector(ctx, shift, x.shape[axis]), mean_d, var, nonempty, n)


def _sums_channel_last(ctx: LoweringContext, x: Value, valid: Value | None):
    """Channel on the last axis: everything on the free `(M, C)` view, sums by MatMul.

    onnxruntime's ReduceSum over the leading axes of a channels-last tensor runs
    several times slower than a MatMul by a ones vector (or a weights vector).
    """
    dtype, channels = x.dtype, x.shape[-1]
    rows = emit.static_product(x.shape[:-1])
    head = None
    x2 = x if x.rank == 2 else emit.reshape(ctx, x, [rows, channels], "rows")
    row_count = emit.ints(ctx, [rows], "rows") if rows is not None else None
    if row_count is None:
        row_count = emit.shape_of(ctx, x2, 0, 1)
    axis0 = emit.ints(ctx, [0], "axes")
    if valid is None:
        n = emit.cast(ctx, row_count, dtype, label="count")
        end = clamped_ends(ctx, [SHIFT_SAMPLES], [rows], row_count)
        if rows is None:
            samples = ctx.constant(np.arange(SHIFT_SAMPLES), "window", "int64")
            window = ctx.op("Slice", [samples, emit.ints(ctx, [0], "start"), end, axis0])
            head = ctx.op("Gather", [x2, window], axis=0, label="head", shape=(None, channels))
        else:
            head = ctx.op(
                "Slice",
                [x2, emit.ints(ctx, [0], "start"), end, axis0],
                label="head",
                shape=(min(rows, SHIFT_SAMPLES), channels),
            )
        shift = _head_mean(ctx, head, rows, channels)
    else:
        n, shift, rows_taken = masked_rows_shift(ctx, x2, valid, rows, row_count)
    d2 = _shifted_rows(ctx, x, x2, shift)
    if x.rank == 2:
        d = d2
    elif sum(dim is None for dim in x.shape) == 1 and 0 not in x.shape:
        # No Shape of x: onnxruntime then reorders a blocked Conv output twice.
        d = emit.reshape(ctx, d2, list(x.shape), "shifted")
    else:
        d = emit.reshape_like(ctx, d2, x, "shifted")
    if valid is None:
        ones = emit.constant_of_shape(ctx, row_count, 1.0, dtype)
        squares = ctx.op("Mul", [d2, d2], label="squares", shape=d2.shape)
        s1 = ctx.op("MatMul", [ones, d2], label="sum", shape=(channels,))
        s2 = ctx.op("MatMul", [ones, squares], label="sum_sq", shape=(channels,))
    else:
        s1, s2 = gathered_row_sums(ctx, d2, *rows_taken)
    return d, shift, s1, s2, n, head


def _shifted_rows(ctx, x: Value, x2: Value, shift: Value) -> Value:
    """`x - shift` as `(M, C)`, subtracted on a wider view with the shift tiled.

    onnxruntime's Sub broadcasting a `(C,)` vector runs row by row: with a
    short row (C = 64) it costs 1.3x a memcpy, on `(M / k, k * C)` with the
    shift tiled k times 1.07x. k is the product of the fewest static dims just
    before the channel that makes a row of SUB_ROW or more elements.
    """
    channels, k = x.shape[-1], 1
    for dim in reversed(x.shape[1:-1]):
        if dim is None or k * channels >= SUB_ROW:
            break
        k *= dim
    if k == 1:
        return ctx.op("Sub", [x2, shift], label="shifted", shape=x2.shape)
    rows = x2.shape[0]
    wide = emit.reshape(ctx, x, [None if rows is None else rows // k, k * channels], "wide")
    tiled = ctx.op("Tile", [shift, emit.ints(ctx, [k], "repeats")], label="shift_tiled")
    d = ctx.op("Sub", [wide, tiled], label="shifted", shape=wide.shape)
    return emit.reshape(ctx, d, list(x2.shape), "shifted_rows")


def _head_mean(ctx, head: Value, rows: int | None, channels: int) -> Value:
    """Per-column mean of the leading rows `head` (`(k, C)`, k = min(rows, SHIFT_SAMPLES)).

    With a static row count, a MatMul by a `1/k` vector: onnxruntime's
    ReduceMean over the leading axis is about twice as slow. With a dynamic
    one, a sum divided by `max(k, 1)`: an empty batch gives a shift of 0 on
    every runtime, where ReduceMean of an empty set is undefined (synchronized
    layers still publish the moments of an empty replica). k is counted from
    the head's data (a Where of ones shaped like it): a k derived from the
    symbolic row count (`end`) makes tract's analysis of chained layers take
    minutes.
    """
    if rows is None:
        total = emit.reduce(ctx, "ReduceSum", head, [0], keepdims=False, shape=(channels,))
        one = emit.scalar(ctx, 1.0, head.dtype, "one")
        same = ctx.op("Equal", [head, head], dtype="bool", label="head_cells")
        ones = ctx.op("Where", [same, one, one], dtype=head.dtype, label="head_ones")
        taken = emit.reduce(ctx, "ReduceSum", ones, [0], keepdims=False, shape=(channels,))
        return safe_mean(ctx, total, taken)
    k = min(rows, SHIFT_SAMPLES)
    weights = emit.constant_of_shape(
        ctx, emit.ints(ctx, [k], "head_rows"), 1.0 / max(k, 1), head.dtype
    )
    return ctx.op("MatMul", [weights, head], label="shift", shape=(channels,))


def _sums_channel_inner(ctx: LoweringContext, x: Value, axis: int, valid: Value | None):
    """Channel before the last axis: ReduceSum(Square) over the other axes."""
    head = None
    if valid is not None:
        valid, shift, n = masked_inner_shift(ctx, x, axis, valid)
    else:
        shift, n, head = _inner_shift(ctx, x, axis)
    d = ctx.op("Sub", [x, shift], label="shifted", shape=x.shape)
    s1 = _inner_sum(ctx, "ReduceSum", d, axis, valid, "sum")
    s2 = _inner_sum(ctx, "ReduceSumSquare", d, axis, valid, "sum_sq")
    return d, shift, s1, s2, n, head


def _inner_shift(ctx, x: Value, axis: int) -> tuple[Value, Value, Value]:
    """Channel not last, unmasked: `(shift, count, head)`; the shift is the mean of
    the first SHIFT_SAMPLES elements of the last axis, at index 0 of the others."""
    dtype = x.dtype
    axes = [a for a in range(x.rank) if a != axis]
    n = emit.count(ctx, x, axes, dtype)
    k = len(axes)
    dims = [x.shape[a] for a in axes]
    dims_value = None
    if any(d is None for d in dims):
        dims_value = ctx.op("Gather", [emit.shape_of(ctx, x), emit.ints(ctx, axes, "axes")], axis=0)
    ends = [1] * (k - 1) + [SHIFT_SAMPLES]
    end = clamped_ends(ctx, ends, dims, dims_value)
    head_shape = list(x.shape)
    for a, e in zip(axes, ends):
        head_shape[a] = None if x.shape[a] is None else min(x.shape[a], e)
    head = ctx.op(
        "Slice",
        [x, emit.ints(ctx, [0] * k, "start"), end, emit.ints(ctx, axes, "axes")],
        label="head",
        shape=tuple(head_shape),
    )
    # A sum over a safe count, not ReduceMean: an empty batch's shift is 0. The
    # count is the product of the clamped ends: Size(head) or ReduceMean of a
    # head with dynamic dims makes tract's shape analysis take minutes.
    total = emit.reduce(ctx, "ReduceSum", head, axes, keepdims=True, label="head_total")
    count = emit.reduce(ctx, "ReduceProd", end, [0], keepdims=True, label="head_count")
    return safe_mean(ctx, total, emit.cast(ctx, count, dtype)), n, head


def _inner_sum(ctx, op_type: str, x: Value, axis: int, valid: Value | None, label: str) -> Value:
    """Σ over every axis but `axis` (channel not last), in two levels, to `(C,)`.

    The first level reduces the contiguous axes after the channel (only the
    last one when masked), onnxruntime's fastest reduction pattern, with short
    float32 partial sums. The mask is constant along the last axis, so it is
    applied with Where to those partial sums, a tensor `x.shape[-1]` times
    smaller than the data: NaN or Inf at masked-out positions is dropped there,
    and no Where runs over the whole data (onnxruntime's Where is slow).
    """
    width = x.shape[-1]
    last_only = (
        op_type == "ReduceSumSquare"
        and axis < x.rank - 2
        and width is not None
        and width >= SQUARES_LAST_AXIS_MIN
    )
    if valid is not None:
        partial = emit.reduce(ctx, op_type, x, [x.rank - 1], keepdims=True)
        partial = zeroed(ctx, valid, partial, "kept", x.rank)
        rest = [a for a in range(x.rank) if a != axis]
    elif last_only:
        partial = emit.reduce(ctx, op_type, x, [x.rank - 1], keepdims=False)
        rest = [a for a in range(x.rank - 1) if a != axis]
    else:
        partial = emit.reduce(ctx, op_type, x, list(range(axis + 1, x.rank)), keepdims=False)
        rest = list(range(axis))
    if not rest:
        return partial
    return emit.reduce(ctx, "ReduceSum", partial, rest, keepdims=False, label=label)


def _finish(ctx, shift: Value, s1: Value, s2: Value, n: Value, channels: int, masked: bool):
    """`(mean of the shifted data, batch variance)`; Keras's masked formula when masked."""
    dtype = s1.dtype
    if masked:
        eps = emit.scalar(ctx, MASK_EPSILON, dtype, "count_epsilon")
        den = ctx.op("Add", [n, eps], label="denominator")
        # Keras's mean S / (n + eps), relative to the shift: (S_d - eps * shift) / (n + eps).
        flat_shift = channel_vector(ctx, shift, channels)
        numerator = ctx.op("Sub", [s1, ctx.op("Mul", [flat_shift, eps])])
        mean_d = ctx.op("Div", [numerator, den], label="mean_shifted")
        # Σ (d - mean_d)² = Q - 2 mean_d S + n mean_d², around Keras's shrunken mean.
        two = emit.scalar(ctx, 2.0, dtype, "two")
        cross = ctx.op("Mul", [ctx.op("Mul", [mean_d, s1]), two])
        spread = ctx.op("Mul", [n, ctx.op("Mul", [mean_d, mean_d])])
        m2 = ctx.op("Add", [ctx.op("Sub", [s2, cross]), spread])
        var = ctx.op("Div", [m2, den])
    else:
        inv_n = ctx.op("Reciprocal", [n], label="inv_count")
        mean_d = ctx.op("Mul", [s1, inv_n], label="mean_shifted")
        mean_sq = ctx.op("Mul", [s2, inv_n])
        var = ctx.op("Sub", [mean_sq, ctx.op("Mul", [mean_d, mean_d])])
    # Rounding can leave a tiny negative where the variance is 0.
    return mean_d, emit.clamp_negative(ctx, var, "batch_var")
