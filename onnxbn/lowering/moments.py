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
smaller); with the channel last, Where zeroes the shifted data itself.

Accumulation is float32 in onnxruntime's MatMul/ReduceSum kernels, whose long
sums stagnate: beyond ~10^7 elements per channel the variance loses digits
(about 1e-3 relative at 2^25 elements in one channel of a rank-2 input).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from onnxbn.layers.moments import MASK_EPSILON
from onnxbn.lowering import emit
from onnxbn.lowering.context import LoweringContext, Value

# Leading elements per channel averaged into the shift: the closer the shift is to
# the mean, the less float32 sums of the shifted data drift (2^25 elements in one
# channel: mean error 3e-6 relative with 16 samples, 3e-7 with 1024).
SHIFT_SAMPLES = 1024
# Masked channels-last sums: False = Where over the shifted data (portable,
# the default); True = mask weights in the MatMul with an If that recomputes
# with Where only when the sums are not finite (about one element-wise pass
# faster on onnxruntime, but needs If, which not every runtime implements).
MASKED_IF_FAST_PATH = False
# How Σd² is reduced when the channel is not the last axis (see scripts/bench.py):
# onnxruntime's ReduceSumSquare over the inner block, or Mul then ReduceSum.
SQUARES_INNER = "ReduceSumSquare"  # or "Mul+ReduceSum"


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
    """Channel on the last axis: element-wise work in `x`'s shape, sums by MatMul.

    The shifted data, viewed as `(M, C)` (a free Reshape), is reduced by a
    ones vector: onnxruntime's ReduceSum over the leading axes of a
    channels-last tensor runs several times slower than this MatMul.
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
        # An empty batch gives a NaN shift; its statistics are discarded anyway.
        shift = emit.reduce(
            ctx, "ReduceMean", head, [0], keepdims=False, label="shift", shape=(channels,)
        )
    else:
        flat = emit.reshape(ctx, valid, [rows], "valid_rows")
        n = emit.reduce(ctx, "ReduceSum", emit.cast(ctx, flat, dtype), [0], keepdims=True)
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
    d = ctx.op("Sub", [x, shift], label="shifted", shape=x.shape)
    ones = emit.constant_of_shape(ctx, row_count, 1.0, dtype)
    if valid is not None and not MASKED_IF_FAST_PATH:
        s1, s2 = _where_row_sums(ctx, x, d, valid, ones)
        return d, shift, s1, s2, n
    squares = ctx.op("Mul", [d, d], label="squares", shape=x.shape)
    d2 = d if x.rank == 2 else emit.reshape(ctx, d, [rows, channels], "shifted_rows")
    squares2 = squares if x.rank == 2 else emit.reshape(ctx, squares, [rows, channels], "sq_rows")
    if valid is None:
        s1 = ctx.op("MatMul", [ones, d2], label="sum", shape=(channels,))
        s2 = ctx.op("MatMul", [ones, squares2], label="sum_sq", shape=(channels,))
    else:
        s1, s2 = _masked_row_sums(ctx, x, d, d2, squares2, valid, flat, ones)
    return d, shift, s1, s2, n


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
        valid = ctx.op(
            "Unsqueeze", [valid, emit.ints(ctx, [-1], "axes")], dtype="bool", label="valid_e"
        )
        # The mask is constant along the last axis, so its first slice holds a
        # valid element of every channel that has one.
        head = ctx.op(
            "Slice",
            [x, emit.ints(ctx, [0], "start"), emit.ints(ctx, [1], "end"),
             emit.ints(ctx, [last], "axes")],
            label="head",
        )  # fmt: skip
        taken = emit.reduce(ctx, "ReduceSum", emit.cast(ctx, valid, dtype), axes, keepdims=True)
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


def _inner_sum(ctx, op_type: str, x: Value, axis: int, valid: Value | None, label: str) -> Value:
    """Σ over every axis but `axis` (channel not last), in two levels, to `(C,)`.

    The first level reduces the contiguous axes after the channel (only the
    last one when masked), onnxruntime's fastest reduction pattern, with short
    float32 partial sums. The mask is constant along the last axis, so it is
    applied with Where to those partial sums, a tensor `x.shape[-1]` times
    smaller than the data: NaN or Inf at masked-out positions is dropped there,
    and no Where runs over the whole data (onnxruntime's Where is slow).
    """
    first = [x.rank - 1] if valid is not None else list(range(axis + 1, x.rank))
    partial = emit.reduce(ctx, op_type, x, first, keepdims=valid is not None)
    if valid is not None:
        partial = _zeroed(ctx, valid, partial, "kept", x.rank)
        rest = [a for a in range(x.rank) if a != axis]
    else:
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
