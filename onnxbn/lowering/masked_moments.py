"""Masked batch moments as ONNX: the shift and the sums over valid positions only.

The entry points serve `moments.py`: `masked_rows_shift` and `gathered_row_sums`
with the channel on the last axis, `masked_inner_shift` with it before the last.

Masked-out positions never reach a sum through a multiplication by the mask
(0 * NaN = NaN): with the channel before the last axis, the mask is constant
along that axis, so each row is summed first and Where drops the rows of
masked-out positions from those partial sums (a tensor `x.shape[-1]` times
smaller, see `moments._inner_sum`); with the channel last, a Gather replaces
every masked-out row of the shifted data by a copy of the first valid row,
which the mask weights of the MatMuls then multiply by 0.

The shift is the mean of up to SHIFT_SAMPLES valid elements of each channel,
taken from a fixed window of clamped indices (no window whose length depends
on data: tract rejects it).
"""

from __future__ import annotations

import numpy as np

from onnxbn.lowering import emit
from onnxbn.lowering.context import Value
from onnxbn.lowering.moment_nodes import (
    SHIFT_SAMPLES,
    channel_vector,
    clamped_ends,
    safe_mean,
    scalar_index,
    zeroed,
)


def masked_rows_shift(ctx, x2: Value, valid: Value, rows: int | None, row_count: Value):
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
    return n, safe_mean(ctx, total, taken), (weights, some, index)


def _count_of(ctx, weights: Value, label: str) -> Value:
    """Σ of a 0/1 weight vector as `(1,)`, by a MatMul with itself (Σw² = Σw).

    tract panics on a ReduceSum over an empty axis (an empty batch); a MatMul
    with an empty inner dim is 0 there as everywhere.
    """
    column = ctx.op("Unsqueeze", [weights, emit.ints(ctx, [1], "axes")], label="weights_column")
    return ctx.op("MatMul", [weights, column], label=label, shape=(1,))


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
        end = clamped_ends(ctx, [SHIFT_SAMPLES], [rows], row_count)
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


def _valid_row_index(ctx, flat: Value, start: Value, row_count: Value) -> tuple[Value, Value]:
    """`(some_valid, index)`: each row's own index if valid, else the first valid row's.

    `start` (the first valid row) is M, out of range, when no row is valid:
    the rows then stay in place and `some_valid` is False.
    """
    positions = ctx.op(
        "Range",
        [scalar_index(ctx, 0), ctx.op("Squeeze", [row_count, emit.ints(ctx, [0], "axes")]),
         scalar_index(ctx, 1)],
        dtype="int64",
        label="positions",
    )  # fmt: skip
    some = ctx.op("Less", [start, row_count], dtype="bool", label="some_valid")
    first = ctx.op(
        "Where", [some, start, emit.ints(ctx, [0], "row")], dtype="int64", label="substitute"
    )
    index = ctx.op("Where", [flat, positions, first], dtype="int64", label="row_index")
    return some, index


def gathered_row_sums(
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


def masked_inner_shift(ctx, x: Value, axis: int, valid: Value) -> tuple[Value, Value, Value]:
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
        end = clamped_ends(ctx, [1], [x.shape[last]], emit.shape_of(ctx, x, last, last + 1))
        head = ctx.op(
            "Slice", [x, emit.ints(ctx, [0], "start"), end, emit.ints(ctx, [last], "axes")],
            label="head",
        )
        total = emit.reduce(
            ctx, "ReduceSum", zeroed(ctx, valid, head, "head", x.rank), axes, keepdims=True
        )
        shift = safe_mean(ctx, total, taken)
    width = x.shape[last]
    if width is None:
        width_v = emit.cast(ctx, emit.shape_of(ctx, x, last, last + 1), dtype)
    else:
        width_v = emit.scalar(ctx, float(width), dtype, "width")
    n = channel_vector(ctx, ctx.op("Mul", [taken, width_v], label="count"), x.shape[axis])
    return valid, shift, n


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
        blocks, count_b = emit.ints(ctx, [before], "blocks"), scalar_index(ctx, before)
    some = ctx.op("Less", [first_b, blocks], dtype="bool", label="some_valid")
    b_index = ctx.op("Range", [scalar_index(ctx, 0), count_b, scalar_index(ctx, 1)], label="b_index")
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
