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

Measured on onnxruntime 1.32 CPU, 1 thread, 2-core VM (paired interleaved runs,
median ratio of new to old time; whole exports unless said otherwise):

- masked channels last, Gather of rows + weighted MatMuls against Where over
  the data: 0.85 (NHWC 32x56x56x64), 0.82 (2-D 4096x1024); onnxruntime's Where
  with a row mask broadcast along the channels costs 2.3-3.9x a memcpy, its
  Gather of the same rows 0.95-1.7x (Compress would be 0.9x, NonZero + Gather
  1.2x, but the reference interpreter has neither);
- masked channels-last head (the shift's rows) by the same Gather of row
  indices and a weighted MatMul, against a Where over the sliced rows and
  ReduceSum: 0.91 on 2-D 4096x1024 (the head is a quarter of the data there),
  no change on NHWC;
- masked channel-inner shift from the first valid row (ArgMax of the mask,
  Gather of one row per channel) against a Slice of `x[..., 0]` (a strided
  read, 3 ms of 22 on NCHW 32x64x56x56): 0.83;
- Σd² on NCHW by ReduceSumSquare over W then ReduceSum over (N, H), against
  over H*W then N: 1.35x against 1.71x memcpy, whole training export 0.88-0.93
  (ReduceSum, vectorized, stays over H*W: 0.55x against 0.58x);
- channels last, `x - shift` on a `(M / k, k * C)` view with the shift tiled
  (rows of 1024+ elements) against the `(M, C)` view: 1.07x against 1.33x
  memcpy on NHWC (C = 64), whole export training 0.91, masked 0.95;
- head mean by MatMul with a `1/k` vector instead of ReduceMean over rows:
  0.50 against 0.87 ms on a 1024x1024 head (static row count only: with a
  dynamic one it would add four nodes to every graph);
- all of the above and the native node on the `(M, C)` view for channels last
  (`lowering/batch_normalization.py`), against the lowering before them, paired
  runs of the `scripts/bench.py` exports: NCHW training 0.88, masked 0.90; NHWC
  inference 0.86, training 0.93, masked 0.76; 2-D masked 0.71; unchanged graphs
  1.00-1.04 (the noise); 8x16 masked 1.06 (five more small nodes);
- not adopted: `x - shift` by the native node (scale 1, variance 1, epsilon 0;
  bit for bit a Sub) 0.95x a broadcasting Sub on (100352, 64), 1.05x on
  (4096, 1024), 1.07x on NCHW; Σd² on NCHW by ReduceSumSquare 1.65-1.8x
  memcpy (a scalar loop), Mul + ReduceSum 1.6-1.9x, ReduceL2 1.65x, batched
  MatMul of `(R, 1, HW)` by `(R, HW, 1)` row views 4.8-5.6x, Einsum 5.2-7.6x,
  GlobalLpPool(p=2) 27x, LayerNormalization's Mean/InvStdDev outputs 1.9x
  (opset 17+, and it writes a normalized copy), against ReduceSum's 0.57x for
  Σd; a `(2, M)` left operand in one MatMul 1.9-2.1x against 0.5-0.6x for a
  ones vector; the mean and variance finished by Div instead of Reciprocal +
  Mul (one node fewer): no difference measurable on 8x16.
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
# Masked channels-last sums: False = MASKED_ROWS below (portable, the default);
# True = mask weights in the MatMul with an If that recomputes with Where only
# when the sums are not finite (about one element-wise pass faster than Where
# on onnxruntime, but needs If, which not every runtime implements).
MASKED_IF_FAST_PATH = False
# How Σd² is reduced when the channel is not the last axis (see scripts/bench.py):
# onnxruntime's ReduceSumSquare over the inner block, or Mul then ReduceSum.
SQUARES_INNER = "ReduceSumSquare"  # or "Mul+ReduceSum"
# ReduceSumSquare's first level (channel not last, unmasked) runs over the last
# axis only when it has at least this many elements, else over every axis after
# the channel, as ReduceSum does: onnxruntime's ReduceSumSquare is a scalar
# loop, faster over short rows (NCHW 32x64x56x56: 1.35x memcpy over W then
# ReduceSum over (N, H), 1.71x over H*W; rows of 16: 1.5x, of 8: 2.2x, of 4: 3.9x).
SQUARES_LAST_AXIS_MIN = 32
# Masked channels-last sums: "Gather" (masked-out rows replaced by a valid one,
# then weighted MatMuls) or "Where" (masked-out rows zeroed).
MASKED_ROWS = "Gather"
# Masked shift, channel not last: "Gather" (the first valid row of each channel)
# or "Slice" (every valid element of x[..., 0]).
MASKED_HEAD = "Gather"
# Channels last: `x - shift` on rows of at least this many elements (see
# `_shifted_rows`); 1 subtracts on the (M, C) view.
SUB_ROW = 1024
# Mean of the head rows (channels last, static shape): "MatMul" or "ReduceMean".
HEAD_MEAN = "MatMul"


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
        zero = emit.scalar(ctx, 0.0, x.dtype, "zero")
        nonempty = ctx.op("Greater", [n, zero], dtype="bool", label="nonempty")
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
        head = ctx.op(
            "Slice",
            [x2, emit.ints(ctx, [0], "start"), emit.ints(ctx, [SHIFT_SAMPLES], "end"), axis0],
            label="head",
        )
        shift = _head_mean(ctx, head, rows, channels)
    else:
        flat = emit.reshape(ctx, valid, [rows], "valid_rows")
        weights = emit.cast(ctx, flat, dtype, label="weights")
        n = emit.reduce(ctx, "ReduceSum", weights, [0], keepdims=True, label="count")
        # SHIFT_SAMPLES rows from the first valid one; an extra 1 keeps ArgMax
        # defined on an empty batch (the slice is then empty and the shift 0).
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
        end = ctx.op("Add", [start, emit.ints(ctx, [SHIFT_SAMPLES], "samples")], label="end")
        gathered = MASKED_ROWS == "Gather" and not MASKED_IF_FAST_PATH
        if gathered:
            some, index = _valid_row_index(ctx, flat, start, row_count)
            # The head rows with masked-out ones replaced: weights 0 cannot meet NaN.
            head_index = ctx.op("Slice", [index, start, end, axis0], label="head_index")
            head = ctx.op("Gather", [x2, head_index], label="head", axis=0)
            head_weights = ctx.op("Slice", [weights, start, end, axis0], label="head_weights")
            total = ctx.op("MatMul", [head_weights, head], label="head_total", shape=(channels,))
            taken = emit.reduce(ctx, "ReduceSum", head_weights, [0], keepdims=False)
        else:
            head = ctx.op("Slice", [x2, start, end, axis0], label="head")
            valid_col = emit.reshape(ctx, valid, [rows, 1], "valid_col")
            head_valid = ctx.op("Slice", [valid_col, start, end, axis0], label="head_valid")
            total = emit.reduce(
                ctx, "ReduceSum", _zeroed(ctx, head_valid, head, "head", 2), [0], keepdims=False
            )
            taken = emit.reduce(
                ctx, "ReduceSum", emit.cast(ctx, head_valid, dtype), [0], keepdims=False
            )
        shift = _safe_mean(ctx, total, taken)
    d2 = _shifted_rows(ctx, x, x2, shift)
    d = d2 if x.rank == 2 else emit.reshape_like(ctx, d2, x, "shifted")
    if valid is None:
        ones = emit.constant_of_shape(ctx, row_count, 1.0, dtype)
        squares = ctx.op("Mul", [d2, d2], label="squares", shape=d2.shape)
        s1 = ctx.op("MatMul", [ones, d2], label="sum", shape=(channels,))
        s2 = ctx.op("MatMul", [ones, squares], label="sum_sq", shape=(channels,))
    elif MASKED_IF_FAST_PATH:
        ones = emit.constant_of_shape(ctx, row_count, 1.0, dtype)
        squares = ctx.op("Mul", [d2, d2], label="squares", shape=d2.shape)
        s1, s2 = _masked_row_sums(ctx, x, d, d2, squares, valid, flat, ones)
    elif gathered:
        s1, s2 = _gathered_row_sums(ctx, d2, weights, some, index)
    else:
        ones = emit.constant_of_shape(ctx, row_count, 1.0, dtype)
        s1, s2 = _where_row_sums(ctx, x, d, valid, ones)
    return d, shift, s1, s2, n


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
    ReduceMean over the leading axis is about twice as slow.
    An empty batch gives a NaN (ReduceMean) or 0 (MatMul) shift; its statistics
    are discarded anyway.
    """
    if rows is None or HEAD_MEAN != "MatMul":
        return emit.reduce(
            ctx, "ReduceMean", head, [0], keepdims=False, label="shift", shape=(channels,)
        )
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


def _where_row_sums(ctx, x: Value, d: Value, valid: Value, ones: Value) -> tuple[Value, Value]:
    """Σ valid d and Σ valid d² over rows, masked-out positions removed by Where."""
    channels = x.shape[-1]
    valid_e = ctx.op("Unsqueeze", [valid, emit.ints(ctx, [-1], "axes")], dtype="bool")
    kept = _zeroed(ctx, valid_e, d, "kept", x.rank)
    rows = emit.static_product(x.shape[:-1])
    kept2 = kept if x.rank == 2 else emit.reshape(ctx, kept, [rows, channels], "kept_rows")
    kept_sq = ctx.op("Mul", [kept2, kept2], label="kept_squares")
    s1 = ctx.op("MatMul", [ones, kept2], label="sum", shape=(channels,))
    s2 = ctx.op("MatMul", [ones, kept_sq], label="sum_sq", shape=(channels,))
    return s1, s2


def _masked_row_sums(ctx, x, d, d2, squares2, valid, flat, ones) -> tuple[Value, Value]:
    """Σ valid d and Σ valid d² over rows, without a Where over the data when possible.

    Fast path: the mask as a 0/1 row vector in the MatMul. Finite data at
    masked-out rows contributes exactly 0, but NaN or Inf there would leak
    (0 * NaN = NaN), and then the sums are not finite. Only in that case an If
    recomputes them from `Where(valid, d, 0)` (onnxruntime's Where over the whole
    data costs about two element-wise passes, so it is kept off the common path).
    """
    dtype, channels = x.dtype, x.shape[-1]
    weights = emit.cast(ctx, flat, dtype, label="weights")
    fast_s1 = ctx.op("MatMul", [weights, d2], label="sum_fast", shape=(channels,))
    fast_s2 = ctx.op("MatMul", [weights, squares2], label="sum_sq_fast", shape=(channels,))
    probe = emit.reduce(ctx, "ReduceSum", ctx.op("Add", [fast_s1, fast_s2]), [0], keepdims=True)
    # x - x is 0 for a finite x and NaN for NaN or ±Inf.
    finite = ctx.op(
        "Equal",
        [ctx.op("Sub", [probe, probe]), ctx.constant(np.zeros(1), "zero", dtype)],
        dtype="bool",
        label="finite",
    )
    with ctx.branch() as then_nodes:
        then_out = [
            ctx.op("Identity", [v], label=v.name.rsplit("/", 1)[-1], shape=(channels,))
            for v in (fast_s1, fast_s2)
        ]
    with ctx.branch() as else_nodes:
        valid_e = ctx.op("Unsqueeze", [valid, emit.ints(ctx, [-1], "axes")], dtype="bool")
        kept = _zeroed(ctx, valid_e, d, "kept", x.rank)
        kept2 = (
            kept
            if x.rank == 2
            else emit.reshape(ctx, kept, [emit.static_product(x.shape[:-1]), channels], "kept_rows")
        )
        kept_sq = ctx.op("Mul", [kept2, kept2], label="kept_squares")
        else_out = [
            ctx.op("MatMul", [ones, kept2], label="sum_kept", shape=(channels,)),
            ctx.op("MatMul", [ones, kept_sq], label="sum_sq_kept", shape=(channels,)),
        ]
    s1, s2 = ctx.op(
        "If",
        [finite],
        label="sum",
        outputs=2,
        dtype=dtype,
        shape=(channels,),
        then_branch=ctx.branch_graph(then_nodes, then_out, "fast_sums"),
        else_branch=ctx.branch_graph(else_nodes, else_out, "where_sums"),
    )
    return s1, s2


def _sums_channel_inner(ctx: LoweringContext, x: Value, axis: int, valid: Value | None):
    """Channel before the last axis: ReduceSum(Square) over the other axes."""
    dtype, last = x.dtype, x.rank - 1
    axes = [a for a in range(x.rank) if a != axis]
    if valid is not None:
        shift = _first_valid_row_mean(ctx, x, axis, valid) if MASKED_HEAD == "Gather" else None
        valid = ctx.op(
            "Unsqueeze", [valid, emit.ints(ctx, [-1], "axes")], dtype="bool", label="valid_e"
        )
        taken = emit.reduce(ctx, "ReduceSum", emit.cast(ctx, valid, dtype), axes, keepdims=True)
        if shift is None:
            # The mask is constant along the last axis, so its first slice holds a
            # valid element of every channel that has one.
            head = ctx.op(
                "Slice",
                [x, emit.ints(ctx, [0], "start"), emit.ints(ctx, [1], "end"),
                 emit.ints(ctx, [last], "axes")],
                label="head",
            )  # fmt: skip
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
    else:
        n = emit.count(ctx, x, axes, dtype)
        # The first SHIFT_SAMPLES elements of the last axis, at index 0 of the others.
        k = len(axes)
        head = ctx.op(
            "Slice",
            [x, emit.ints(ctx, [0] * k, "start"),
             emit.ints(ctx, [1] * (k - 1) + [SHIFT_SAMPLES], "end"), emit.ints(ctx, axes, "axes")],
            label="head",
        )  # fmt: skip
        # An empty batch gives a NaN shift; its statistics are discarded anyway.
        shift = emit.reduce(ctx, "ReduceMean", head, axes, keepdims=True, label="shift")
    d = ctx.op("Sub", [x, shift], label="shifted", shape=x.shape)
    s1 = _inner_sum(ctx, "ReduceSum", d, axis, valid, "sum")
    if SQUARES_INNER == "ReduceSumSquare":
        s2 = _inner_sum(ctx, "ReduceSumSquare", d, axis, valid, "sum_sq")
    else:
        squares = ctx.op("Mul", [d, d], label="squares", shape=x.shape)
        s2 = _inner_sum(ctx, "ReduceSum", squares, axis, valid, "sum_sq")
    return d, shift, s1, s2, n


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
    zero = emit.scalar(ctx, 0.0, dtype, "zero")
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
    return mean_d, ctx.op("Max", [var, zero], label="batch_var")
