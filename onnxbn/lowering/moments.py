"""Batch moments as ONNX (semantics: `layers/moments.py`): shifted sums, Keras's masked finish.

Sums are taken of the data shifted per channel by a sample of itself,
`d = x - s`, so that float32 accumulation keeps its digits on data such as
`1e4 + N(0, 1)` (`x - s` is exact by Sterbenz when `x` and `s` are within a
factor of two). The shift is the mean of a few leading elements of each
channel (valid ones only when masked), which also keeps `Σd² / n - mean_d²`
free of cancellation.

Masked-out positions never reach a sum through a multiplication by the mask
(0 * NaN = NaN): with the channel before the last axis, the mask is constant
along that axis, so each row is summed first and Where drops the rows of
masked-out positions from those partial sums (a tensor `x.shape[-1]` times
smaller); with the channel last, a Gather replaces every masked-out row of the
shifted data by a copy of the first valid row, which the mask weights of the
MatMuls then multiply by 0.

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
from onnx import numpy_helper

from onnxbn.layers.moments import MASK_EPSILON
from onnxbn.lowering import emit
from onnxbn.lowering.context import LoweringContext, Value

# Leading elements per channel averaged into the shift: the closer the shift is to
# the mean, the less float32 sums of the shifted data drift (2^25 elements in one
# channel: mean error 3e-6 relative with 16 samples, 3e-7 with 1024).
SHIFT_SAMPLES = 1024
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
        d, shift, s1, s2, n = _sums_channel_last(ctx, x, valid)
    else:
        d, shift, s1, s2, n = _sums_channel_inner(ctx, x, axis, valid)
    channels = x.shape[axis]
    if synchronized:
        from onnxbn.lowering.synchronized import exchanged_moments

        flat_shift = _flat(ctx, shift, channels)
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
            # From Size(x), not the count derived from Shape: tract evaluates a
            # comparison of that count wrongly in a shared layer's second call.
            size = ctx.op("Size", [x], dtype="int64", shape=(), label="size")
            zero = emit.ints(ctx, [0], "zero")
            nonempty = ctx.op("Greater", [size, zero], dtype="bool", label="nonempty")
    return Moments(d, _flat(ctx, shift, x.shape[axis]), mean_d, var, nonempty)


def _flat(ctx, value: Value, channels: int) -> Value:
    if value.shape == (channels,):
        return value
    shape = emit.ints(ctx, [channels], "channel_shape")
    return ctx.op("Reshape", [value, shape], label="flat", shape=(channels,), allowzero=0)


def _safe_mean(ctx, total: Value, count: Value) -> Value:
    """`total / max(count, 1)`: 0 where nothing was counted."""
    one = emit.scalar(ctx, 1.0, total.dtype, "one")
    return ctx.op("Div", [total, ctx.op("Max", [count, one])], label="shift")


def _zeroed(ctx, valid: Value, x: Value, label: str, rank: int) -> Value:
    # A zero of x's rank: onnxruntime's broadcast of a rank-0 operand against a
    # tensor whose last dim is 1 takes a per-element path, ~50x slower.
    zero = ctx.constant(np.zeros([1] * rank), "zero", x.dtype)
    return ctx.op("Where", [valid, x, zero], dtype=x.dtype, shape=x.shape, label=label)


def _sums_channel_last(ctx: LoweringContext, x: Value, valid: Value | None):
    """Channel on the last axis: everything on the free `(M, C)` view, sums by MatMul.

    onnxruntime's ReduceSum over the leading axes of a channels-last tensor runs
    several times slower than a MatMul by a ones vector (or a weights vector).
    """
    dtype, channels = x.dtype, x.shape[-1]
    rows = emit.static_product(x.shape[:-1])
    x2 = x if x.rank == 2 else emit.reshape(ctx, x, [rows, channels], "rows")
    row_count = emit.ints(ctx, [rows], "rows") if rows is not None else None
    if row_count is None:
        row_count = emit.shape_of(ctx, x2, 0, 1)
    axis0 = emit.ints(ctx, [0], "axes")
    if valid is None:
        n = emit.cast(ctx, row_count, dtype, label="count")
        end = _clamped_ends(ctx, [SHIFT_SAMPLES], [rows], row_count)
        if rows is None:
            samples = ctx.constant(np.arange(SHIFT_SAMPLES), "window", "int64")
            window = ctx.op("Slice", [samples, emit.ints(ctx, [0], "start"), end, axis0])
            head = ctx.op("Gather", [x2, window], axis=0, label="head")
        else:
            head = ctx.op("Slice", [x2, emit.ints(ctx, [0], "start"), end, axis0], label="head")
        shift = _head_mean(ctx, head, rows, channels)
    else:
        n, shift, rows_taken = _masked_rows_shift(ctx, x2, valid, rows, row_count)
    d2 = _shifted_rows(ctx, x, x2, shift)
    d = d2 if x.rank == 2 else emit.reshape_like(ctx, d2, x, "shifted")
    if valid is None:
        ones = emit.constant_of_shape(ctx, row_count, 1.0, dtype)
        squares = ctx.op("Mul", [d2, d2], label="squares", shape=d2.shape)
        s1 = ctx.op("MatMul", [ones, d2], label="sum", shape=(channels,))
        s2 = ctx.op("MatMul", [ones, squares], label="sum_sq", shape=(channels,))
    else:
        s1, s2 = _gathered_row_sums(ctx, d2, *rows_taken)
    return d, shift, s1, s2, n


def _masked_rows_shift(ctx, x2: Value, valid: Value, rows: int | None, row_count: Value):
    """Channel last, masked: `(count, shift, (weights, some, index))` of the `(M, C)` view.

    The shift is the mean of SHIFT_SAMPLES valid rows from the first valid one.
    """
    flat = emit.reshape(ctx, valid, [rows], "valid_rows")
    weights = emit.cast(ctx, flat, x2.dtype, label="weights")
    n = _count_of(ctx, weights, "count")
    # An extra 1 keeps ArgMax defined on an empty batch (the slice is then
    # empty and the shift 0).
    marks = ctx.op(
        "Concat",
        [emit.cast(ctx, flat, "int32"), ctx.constant(np.ones(1, np.int32), "sentinel")],
        label="marks",
        axis=0,
    )
    start = ctx.op(
        "ArgMax",
        [marks],
        dtype="int64",
        label="first_valid",
        axis=0,
        keepdims=1,
        select_last_index=0,
    )
    some, index = _valid_row_index(ctx, flat, start, row_count)
    total, taken = _masked_head_sums(ctx, x2, weights, some, index, start, rows, row_count)
    return n, _safe_mean(ctx, total, taken), (weights, some, index)


def _count_of(ctx, weights: Value, label: str) -> Value:
    """Σ of a 0/1 weight vector as `(1,)`, by a MatMul with itself (Σw² = Σw).

    tract panics on a ReduceSum over an empty axis (an empty batch); a MatMul
    with an empty inner dim is 0 there as everywhere.
    """
    column = ctx.op("Unsqueeze", [weights, emit.ints(ctx, [1], "axes")], label="weights_column")
    return ctx.op("MatMul", [weights, column], label=label, shape=(1,))


def _clamped_ends(
    ctx, ends: list[int], dims: list[int | None], dims_value: Value | None
) -> Value:
    """Slice `ends` no larger than the dims they index (`dims_value` at run time).

    ONNX clamps a Slice end past the dim, but tract does not for a dynamic dim:
    a static dim clamps at export, a dynamic one by `Min(end, dim)`.
    """
    if all(d is not None for d in dims):
        return emit.ints(ctx, [min(e, d) for e, d in zip(ends, dims)], "end")
    return ctx.op("Min", [emit.ints(ctx, ends, "end"), dims_value], label="end")


def _masked_head_sums(
    ctx, x2, weights, some, index, start, rows, row_count
) -> tuple[Value, Value]:
    """Σ and count of the valid rows among the SHIFT_SAMPLES rows from `start`.

    A fixed window of `min(SHIFT_SAMPLES, M)` row positions from the first valid
    row, clamped to the last row and weighted 0 past it: a Slice starting at
    `start` would have a length only known from the data, which tract rejects.
    The rows are taken through `index` (masked-out rows replaced by a valid one,
    see `_valid_row_index`), so a weight of 0 never meets a NaN; without any
    valid row (`some` False) the sum is 0.
    """
    channels = x2.shape[-1]
    axis0 = emit.ints(ctx, [0], "axes")
    if rows is not None:
        window = ctx.constant(np.arange(min(rows, SHIFT_SAMPLES)), "window", "int64")
    else:
        samples = ctx.constant(np.arange(SHIFT_SAMPLES), "window", "int64")
        end = _clamped_ends(ctx, [SHIFT_SAMPLES], [rows], row_count)
        window = ctx.op("Slice", [samples, emit.ints(ctx, [0], "start"), end, axis0])
    positions = ctx.op("Add", [start, window], label="head_positions")
    inside = emit.cast(ctx, ctx.op("Less", [positions, row_count], dtype="bool"), x2.dtype)
    last = ctx.op("Sub", [row_count, emit.ints(ctx, [1], "one")], label="last_row")
    clamped = ctx.op("Min", [positions, last], label="head_positions")
    head = ctx.op("Gather", [x2, ctx.op("Gather", [index, clamped], axis=0)], axis=0, label="head")
    head_weights = ctx.op(
        "Mul", [ctx.op("Gather", [weights, clamped], axis=0), inside], label="head_weights"
    )
    total = ctx.op("MatMul", [head_weights, head], label="head_total", shape=(channels,))
    zero = emit.scalar(ctx, 0.0, x2.dtype, "zero")
    total = ctx.op(
        "Where", [some, total, zero], dtype=x2.dtype, label="head_total", shape=(channels,)
    )
    taken = _count_of(ctx, head_weights, "head_count")
    return total, taken


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
        return _safe_mean(ctx, total, taken)
    k = min(rows, SHIFT_SAMPLES)
    weights = emit.constant_of_shape(
        ctx, emit.ints(ctx, [k], "head_rows"), 1.0 / max(k, 1), head.dtype
    )
    return ctx.op("MatMul", [weights, head], label="shift", shape=(channels,))


def _index(ctx, value: int) -> Value:
    """A rank-0 int64 constant (a Constant node: initializers here are at least 1-D)."""
    tensor = numpy_helper.from_array(np.asarray(value, np.int64), "value")
    return ctx.op("Constant", [], dtype="int64", shape=(), label="index", value=tensor)


def _valid_row_index(ctx, flat: Value, start: Value, row_count: Value) -> tuple[Value, Value]:
    """`(some_valid, index)`: each row's own index if valid, else the first valid row's.

    `start` (the first valid row) is M, out of range, when no row is valid:
    the rows then stay in place and `some_valid` is False.
    """
    positions = ctx.op(
        "Range",
        [_index(ctx, 0), ctx.op("Squeeze", [row_count, emit.ints(ctx, [0], "axes")]),
         _index(ctx, 1)],
        dtype="int64",
        label="positions",
    )  # fmt: skip
    some = ctx.op("Less", [start, row_count], dtype="bool", label="some_valid")
    first = ctx.op(
        "Where", [some, start, emit.ints(ctx, [0], "row")], dtype="int64", label="substitute"
    )
    index = ctx.op("Where", [flat, positions, first], dtype="int64", label="row_index")
    return some, index


def _gathered_row_sums(
    ctx, d2: Value, weights: Value, some: Value, index: Value
) -> tuple[Value, Value]:
    """Σ valid d and Σ valid d² over the rows of `d2` `(M, C)`, by Gather and weighted MatMuls.

    Every masked-out row is replaced by a copy of the first valid row (a Gather
    of `index`, see `_valid_row_index`), so the data the weights multiply holds
    no value of a masked-out position: NaN or Inf there cannot leak
    (0 * NaN = NaN). A batch without a valid row gives sums of 0, like Keras's.
    onnxruntime's Gather of rows costs about one copy, its Where over the data
    (row mask broadcast along the channels) two to four.
    """
    dtype, channels = d2.dtype, d2.shape[-1]
    kept = ctx.op("Gather", [d2, index], label="kept", shape=d2.shape, axis=0)
    kept_sq = ctx.op("Mul", [kept, kept], label="kept_squares", shape=d2.shape)
    zero = emit.scalar(ctx, 0.0, dtype, "zero")
    sums = []
    for data, label in ((kept, "sum"), (kept_sq, "sum_sq")):
        total = ctx.op("MatMul", [weights, data], label=label, shape=(channels,))
        sums.append(
            ctx.op("Where", [some, total, zero], dtype=dtype, label=label, shape=(channels,))
        )
    return sums[0], sums[1]


def _sums_channel_inner(ctx: LoweringContext, x: Value, axis: int, valid: Value | None):
    """Channel before the last axis: ReduceSum(Square) over the other axes."""
    if valid is not None:
        valid, shift, n = _masked_inner_shift(ctx, x, axis, valid)
    else:
        shift, n = _inner_shift(ctx, x, axis)
    d = ctx.op("Sub", [x, shift], label="shifted", shape=x.shape)
    s1 = _inner_sum(ctx, "ReduceSum", d, axis, valid, "sum")
    s2 = _inner_sum(ctx, "ReduceSumSquare", d, axis, valid, "sum_sq")
    return d, shift, s1, s2, n


def _masked_inner_shift(ctx, x: Value, axis: int, valid: Value) -> tuple[Value, Value, Value]:
    """Channel not last, masked: `(mask expanded at the last axis, shift, count)`."""
    dtype, last = x.dtype, x.rank - 1
    axes = [a for a in range(x.rank) if a != axis]
    # A Gather of one valid row per channel; with a dynamic dim after the
    # channel, the masked mean of x[..., 0:1] instead (a strided read).
    shift = _first_valid_row_mean(ctx, x, axis, valid)
    valid = ctx.op(
        "Unsqueeze", [valid, emit.ints(ctx, [-1], "axes")], dtype="bool", label="valid_e"
    )
    taken = emit.reduce(ctx, "ReduceSum", emit.cast(ctx, valid, dtype), axes, keepdims=True)
    if shift is None:
        # The mask is constant along the last axis, so its first slice holds a
        # valid element of every channel that has one.
        end = _clamped_ends(ctx, [1], [x.shape[last]], emit.shape_of(ctx, x, last, last + 1))
        head = ctx.op(
            "Slice", [x, emit.ints(ctx, [0], "start"), end, emit.ints(ctx, [last], "axes")],
            label="head",
        )
        total = emit.reduce(
            ctx, "ReduceSum", _zeroed(ctx, valid, head, "head", x.rank), axes, keepdims=True
        )
        shift = _safe_mean(ctx, total, taken)
    width = x.shape[last]
    if width is None:
        width_v = emit.cast(ctx, emit.shape_of(ctx, x, last, last + 1), dtype)
    else:
        width_v = emit.scalar(ctx, float(width), dtype, "width")
    n = _flat(ctx, ctx.op("Mul", [taken, width_v], label="count"), x.shape[axis])
    return valid, shift, n


def _inner_shift(ctx, x: Value, axis: int) -> tuple[Value, Value]:
    """Channel not last, unmasked: `(shift, count)`; the shift is the mean of the
    first SHIFT_SAMPLES elements of the last axis, at index 0 of the others."""
    dtype = x.dtype
    axes = [a for a in range(x.rank) if a != axis]
    n = emit.count(ctx, x, axes, dtype)
    k = len(axes)
    dims = [x.shape[a] for a in axes]
    dims_value = None
    if any(d is None for d in dims):
        dims_value = ctx.op("Gather", [emit.shape_of(ctx, x), emit.ints(ctx, axes, "axes")], axis=0)
    end = _clamped_ends(ctx, [1] * (k - 1) + [SHIFT_SAMPLES], dims, dims_value)
    head = ctx.op(
        "Slice", [x, emit.ints(ctx, [0] * k, "start"), end, emit.ints(ctx, axes, "axes")],
        label="head",
    )
    # A sum over a safe count, not ReduceMean: an empty batch's shift is 0. The
    # count is the product of the clamped ends: Size(head) or ReduceMean of a
    # head with dynamic dims makes tract's shape analysis take minutes.
    total = emit.reduce(ctx, "ReduceSum", head, axes, keepdims=True, label="head_total")
    count = emit.reduce(ctx, "ReduceProd", end, [0], keepdims=True, label="head_count")
    return _safe_mean(ctx, total, emit.cast(ctx, count, dtype)), n


def _first_valid_row_mean(ctx, x: Value, axis: int, valid: Value) -> Value | None:
    """Channel not last, masked: mean of the first valid last-axis row of each channel.

    `x` viewed as `(B, C, A, W)` (the mask is `(B, C, A)`, constant along `W`):
    per channel, the first `b` with a valid position and the first valid `a`
    there (ArgMax of the mask, two levels), then a Gather of that row of `W`
    elements (up to SHIFT_SAMPLES of them are averaged); 0 for a channel without
    valid data. A Slice of `x[..., 0]` instead reads a strided element of every
    row, about as slow as a pass over the data. None when a dim after the
    channel is dynamic or empty.
    """
    channels, width = x.shape[axis], x.shape[-1]
    before = emit.static_product(x.shape[:axis])
    inner = emit.static_product(x.shape[axis + 1 : -1])
    if not inner or not width:
        return None
    some, row = _first_valid_rows(ctx, valid, channels, before, inner)
    return _row_head_mean(ctx, x, axis, some, row)


def _first_valid_rows(ctx, valid: Value, channels: int, before: int | None, inner: int):
    """`(some, row)`: per channel, whether any position is valid, and the index of
    its first valid row in the `(B * C * A, W)` view (none on an empty batch)."""
    mask3 = emit.reshape(ctx, valid, [before, channels, inner], "valid_blocks")
    marks = emit.cast(ctx, mask3, "int32", label="marks")
    first_a = ctx.op("ArgMax", [marks], dtype="int64", label="first_a", axis=2, keepdims=1)
    has = emit.reduce(ctx, "ReduceMax", marks, [2], keepdims=True, label="has_valid")
    # A sentinel block keeps ArgMax defined on an empty batch: first_b = B means none.
    sentinel = ctx.constant(np.ones((1, channels, 1), np.int32), "sentinel")
    has = ctx.op("Concat", [has, sentinel], label="has_valid", axis=0)
    first_b = ctx.op("ArgMax", [has], dtype="int64", label="first_b", axis=0, keepdims=1)
    if before is None:
        blocks = emit.shape_of(ctx, mask3, 0, 1)
        count_b = ctx.op("Squeeze", [blocks, emit.ints(ctx, [0], "axes")], label="blocks")
    else:
        blocks, count_b = emit.ints(ctx, [before], "blocks"), _index(ctx, before)
    some = ctx.op("Less", [first_b, blocks], dtype="bool", label="some_valid")
    b_index = ctx.op("Range", [_index(ctx, 0), count_b, _index(ctx, 1)], label="b_index")
    b_index = emit.reshape(ctx, b_index, [before, 1, 1], "b_index")
    picked = ctx.op("Equal", [b_index, first_b], dtype="bool", label="picked")
    zero = ctx.constant(np.zeros((1, 1, 1), np.int64), "zero")
    a_at = emit.reduce(
        ctx, "ReduceSum", ctx.op("Where", [picked, first_a, zero], dtype="int64"), [0],
        keepdims=True, label="a_at",
    )  # fmt: skip
    # Row (b * C + c) * A + a of the (B * C * A, W) view; 0 where no row is valid,
    # and no row at all (an empty gather) on an empty batch.
    channel_rows = ctx.constant(np.arange(channels).reshape(1, channels, 1) * inner, "rows")
    row = ctx.op(
        "Add",
        [ctx.op("Mul", [first_b, emit.ints(ctx, [channels * inner], "stride")]),
         ctx.op("Add", [channel_rows, a_at])],
        label="row",
    )  # fmt: skip
    row = ctx.op("Where", [some, row, zero], dtype="int64", label="row")
    taken_rows = ctx.op(
        "Mul",
        [ctx.op("Min", [blocks, emit.ints(ctx, [1], "one")]), emit.ints(ctx, [channels], "c")],
    )
    row = ctx.op(
        "Slice",
        [emit.reshape(ctx, row, [channels], "row"), emit.ints(ctx, [0], "start"), taken_rows],
        label="row",
    )
    return some, row


def _row_head_mean(ctx, x: Value, axis: int, some: Value, row: Value) -> Value:
    """The mean of up to SHIFT_SAMPLES elements of each channel's `row`; 0 where none."""
    channels, width = x.shape[axis], x.shape[-1]
    rows_view = emit.reshape(ctx, x, [None, width], "rows")
    head = ctx.op("Gather", [rows_view, row], axis=0, label="head")
    if width > SHIFT_SAMPLES:
        head = ctx.op(
            "Slice",
            [head, emit.ints(ctx, [0], "start"), emit.ints(ctx, [SHIFT_SAMPLES], "end"),
             emit.ints(ctx, [1], "axes")],
            label="head",
        )  # fmt: skip
    mean = emit.reduce(ctx, "ReduceMean", head, [1], keepdims=False, label="head_mean")
    # (C,) in every case: the empty batch's (0,) mean is padded with zeros.
    padded = ctx.op("Concat", [mean, ctx.constant(np.zeros(channels), "zeros", x.dtype)], axis=0)
    mean = ctx.op(
        "Slice", [padded, emit.ints(ctx, [0], "start"), emit.ints(ctx, [channels], "end")]
    )
    zero_f = ctx.constant(np.zeros(1), "zero", x.dtype)
    shift = ctx.op(
        "Where",
        [emit.reshape(ctx, some, [channels], "some"), mean, zero_f],
        dtype=x.dtype,
        label="shift",
    )
    return emit.reshape(ctx, shift, [channels] + [1] * (x.rank - 1 - axis), "shift")


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
        partial = _zeroed(ctx, valid, partial, "kept", x.rank)
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
        flat_shift = _flat(ctx, shift, channels)
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
