"""BatchNormalization: how a Keras call becomes ONNX (semantics: `layers/batch_normalization.py`).

Inference is one pass over the data: the per-channel scale and shift are folded
in float64 at export, then applied either by Mul+Add broadcasting a
`[C, 1, ..., 1]` initializer (channel on the last axis) or by the native
BatchNormalization node with mean 0, variance 1 and epsilon 0 behind a free
Reshape/Unsqueeze that puts the channel at position 1 (any other axis), which
onnxruntime runs as a single fused pass. The data is never transposed.

Training uses standard ops only (no `training_mode=1`, which onnxruntime's CUDA
provider rejects and whose CPU kernel can write into the caller's buffers):

1. shift the data by one sample per channel, `d = x - s` (exact by Sterbenz for
   data like `1e4 + N(0, 1)`): the first element of the channel, or with a mask
   the first valid row (channel last) / the masked mean of the first slice of
   the last axis (other axes), so masked-out NaN or garbage never becomes the shift;
2. sum `d` and `d²` in the compute dtype (float32 at least): MatMul by a ones
   row for a channel-last `(M, C)` view, ReduceSum/ReduceSumSquare otherwise;
3. mean and variance of the shifted data (never `E[x²] - E[x]²` of the raw data);
   masked, Keras's formulas with `count + 1e-7`, Where-based so NaN or Inf at
   masked-out positions cannot reach the statistics;
4. normalize the shifted data, `(d - mean_d) * inv + beta`;
5. the moving statistics `moving * momentum + batch * (1 - momentum)` become the
   `<layer>/moving_*/new` outputs; an empty unmasked batch leaves them unchanged.

Float16/bfloat16/integer/bool inputs are computed in float32, float64 in
float64, and the output is cast to the layer's compute dtype, exactly as the
eager `Layer.__call__` (autocast of float inputs) and `BatchNormalization.call` do.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from onnxbn.dtypes import is_float
from onnxbn.layers.batch_normalization import BatchNormalization, normalize_axis
from onnxbn.layers.moments import MASK_EPSILON
from onnxbn.lowering import emit
from onnxbn.lowering.context import LoweringContext, Value
from onnxbn.lowering.registry import register_lowering

# Normalize with the native node (one fused pass) when the channel is not the
# last axis; measured against Mul+Add in scripts/bench.py.
NATIVE_NORMALIZE = True


@register_lowering(BatchNormalization)
def lower_batch_normalization(
    ctx: LoweringContext,
    op: BatchNormalization,
    x: Value,
    *,
    training: bool = False,
    mask: Value | None = None,
) -> Value:
    """Lowers one call of `op` on `x`.

    Args:
        ctx: the lowering context.
        op: the layer.
        x: its input.
        training: the call's resolved training flag.
        mask: optional mask value (rank `x.rank - 1`, non-zero = valid).

    Returns:
        The normalized output, in the layer's compute dtype.

    Raises:
        ValueError: the channel axis is dynamic or empty, or the layer has no weights.
    """
    axis = normalize_axis(op.axis, x.rank, op.name)
    channels = x.shape[axis]
    if channels is None:
        raise ValueError(
            f"Layer {op.name!r}: the channel axis {op.axis} of input shape {x.shape} is "
            "dynamic; its weights need a fixed size."
        )
    if op.moving_mean is None:
        raise ValueError(f"Layer {op.name!r} has no weights: it was never built.")
    if channels == 0:
        raise ValueError(
            f"Layer {op.name!r}: the channel axis {op.axis} of input shape {x.shape} is "
            "empty; expected at least one channel."
        )
    if is_float(x.dtype) and x.dtype != op.compute_dtype:  # Keras autocast
        x = emit.cast(ctx, x, op.compute_dtype, label="autocast")
    compute = "float64" if x.dtype == "float64" else "float32"
    x = emit.cast(ctx, x, compute, label="input")
    if op.uses_batch_statistics(training):
        y = _training(ctx, op, x, axis, mask)
    elif any(op.uses_batch_statistics(t) for t in ctx.trainings(op)):
        y = _inference_from_state(ctx, op, x, axis)
    else:
        y = _inference(ctx, op, x, axis)
    return emit.cast(ctx, y, op.compute_dtype, label="output")


# -- helpers --------------------------------------------------------------------
def _param_shape(rank: int, axis: int, channels: int) -> list[int]:
    """`[C, 1, ..., 1]`: broadcasts along `axis` against a rank-`rank` tensor."""
    return [channels] + [1] * (rank - 1 - axis)


def _weight64(variable, fill: float, channels: int) -> np.ndarray:
    if variable is None:
        return np.full(channels, fill, dtype=np.float64)
    return np.asarray(variable.value, dtype=np.float64)


def _use_native(x: Value, axis: int) -> bool:
    return NATIVE_NORMALIZE and axis < x.rank - 1


def _channel_first(ctx: LoweringContext, x: Value, axis: int) -> Value:
    """`x` viewed with the channel at position 1 (a Reshape/Unsqueeze, no data movement)."""
    if axis == 1:
        return x
    if axis == 0:
        return ctx.op("Unsqueeze", [x, emit.ints(ctx, [0], "axes")], label="channel_first")
    before = emit.static_product(x.shape[:axis])
    after = emit.static_product(x.shape[axis + 1 :])
    if before is None and after is None:
        rest = emit.reduce(
            ctx, "ReduceProd", emit.shape_of(ctx, x, axis + 1), [0], keepdims=True, label="rest"
        )
        target = emit.concat_ints(
            ctx, [emit.ints(ctx, [-1, x.shape[axis]], "shape"), rest], "shape"
        )
        return ctx.op("Reshape", [x, target], label="channel_first", allowzero=0)
    return emit.reshape(ctx, x, [before, x.shape[axis], after], "channel_first")


def _restore(ctx: LoweringContext, y: Value, x: Value, axis: int) -> Value:
    if axis == 1:
        return y
    if axis == 0:
        return ctx.op("Squeeze", [y, emit.ints(ctx, [0], "axes")], label="restored")
    return emit.reshape_like(ctx, y, x, "restored")


def _native(ctx, op, x, axis, scale, bias, mean, var, epsilon) -> Value:
    """The native node in inference mode (training_mode=0), channel moved to position 1."""
    view = _channel_first(ctx, x, axis)
    y = ctx.op(
        "BatchNormalization",
        [view, scale, bias, mean, var],
        label="normalized",
        epsilon=float(epsilon),
        momentum=float(op.momentum),
        training_mode=0,
    )
    return _restore(ctx, y, x, axis)


# -- inference --------------------------------------------------------------------
def _inference(ctx: LoweringContext, op: BatchNormalization, x: Value, axis: int) -> Value:
    """Moving statistics folded at export: `y = x * s + b`, `s`, `b` from float64."""
    channels = x.shape[axis]
    mean = _weight64(op.moving_mean, 0.0, channels)
    var = _weight64(op.moving_variance, 1.0, channels)
    s = _weight64(op.gamma, 1.0, channels) / np.sqrt(var + op.epsilon)
    b = _weight64(op.beta, 0.0, channels) - mean * s
    if _use_native(x, axis):
        return _native(
            ctx,
            op,
            x,
            axis,
            ctx.constant(s, "scale", x.dtype),
            ctx.constant(b, "shift", x.dtype),
            ctx.constant(np.zeros(channels), "zero_mean", x.dtype),
            ctx.constant(np.ones(channels), "unit_variance", x.dtype),
            0.0,
        )
    shape = _param_shape(x.rank, axis, channels)
    scaled = ctx.op("Mul", [x, ctx.constant(s.reshape(shape), "scale", x.dtype)], label="scaled")
    return ctx.op("Add", [scaled, ctx.constant(b.reshape(shape), "shift", x.dtype)], label="y")


def _inference_from_state(
    ctx: LoweringContext, op: BatchNormalization, x: Value, axis: int
) -> Value:
    """Inference call of a layer whose moving statistics are graph state in this export."""
    mean, var = _read_state(ctx, op, x.dtype)
    channels = x.shape[axis]
    gamma, beta = _affine(ctx, op, x.dtype, channels)
    if _use_native(x, axis) and x.dtype == "float32":
        return _native(ctx, op, x, axis, gamma, beta, mean, var, op.epsilon)
    shape = emit.ints(ctx, _param_shape(x.rank, axis, channels), "param_shape")
    inv = _inverse_std(ctx, var, gamma, op.epsilon, x.dtype)
    b = ctx.op("Sub", [beta, ctx.op("Mul", [mean, inv])], label="shift")
    scaled = ctx.op("Mul", [x, ctx.op("Reshape", [inv, shape], label="scale", allowzero=0)])
    return ctx.op("Add", [scaled, ctx.op("Reshape", [b, shape], allowzero=0)], label="y")


def _read_state(ctx: LoweringContext, op: BatchNormalization, dtype: str) -> tuple[Value, Value]:
    mean = ctx.read_state(op.moving_mean.path, op.moving_mean.value, op.moving_mean.dtype)
    var = ctx.read_state(
        op.moving_variance.path, op.moving_variance.value, op.moving_variance.dtype
    )
    return emit.cast(ctx, mean, dtype, "moving_mean"), emit.cast(ctx, var, dtype, "moving_var")


def _affine(ctx, op, dtype: str, channels: int) -> tuple[Value, Value]:
    """`gamma`, `beta` as `[C]` constants (ones / zeros when scale / center is off)."""
    gamma = ctx.constant(_weight64(op.gamma, 1.0, channels), "gamma", dtype)
    beta = ctx.constant(_weight64(op.beta, 0.0, channels), "beta", dtype)
    return gamma, beta


def _inverse_std(ctx, var: Value, gamma: Value | None, epsilon: float, dtype: str) -> Value:
    """`gamma / sqrt(var + epsilon)`."""
    std = ctx.op("Sqrt", [ctx.op("Add", [var, emit.scalar(ctx, epsilon, dtype, "epsilon")])])
    if gamma is None:
        return ctx.op("Reciprocal", [std], label="inv_std")
    return ctx.op("Div", [gamma, std], label="inv_std")


# -- training -----------------------------------------------------------------------
class Sums(NamedTuple):
    """Shifted per-channel sums, all statistics shaped `stat_shape` (broadcasts on `view`)."""

    view: Value  # the data as reduced: `(M, C)` channel last, else `x` itself
    shift: Value  # one sample per channel
    shifted: Value  # view - shift
    total: Value  # Σ valid (x - shift)
    total_sq: Value  # Σ valid (x - shift)²
    n: Value  # number of valid elements per channel
    stat_shape: tuple[int, ...]


def _training(
    ctx: LoweringContext, op: BatchNormalization, x: Value, axis: int, mask: Value | None
) -> Value:
    dtype = x.dtype
    channels = x.shape[axis]
    moving_mean, moving_var = _read_state(ctx, op, dtype)
    valid = None if mask is None else _valid(ctx, mask, x)
    if axis == x.rank - 1:
        sums = _sums_channel_last(ctx, x, valid)
    else:
        sums = _sums_channel_inner(ctx, x, axis, valid)
    mean_d, var = _finish(ctx, sums, masked=valid is not None)
    d, shift, n = sums.shifted, sums.shift, sums.n
    stat_shape = emit.ints(ctx, [channels], "channel_shape")
    if _use_native(x, axis) and dtype == "float32":
        gamma, beta = _affine(ctx, op, dtype, channels)
        flat_mean = ctx.op("Reshape", [mean_d, stat_shape], label="mean_shifted", allowzero=0)
        flat_var = ctx.op("Reshape", [var, stat_shape], label="batch_var", allowzero=0)
        y = _native(ctx, op, d, axis, gamma, beta, flat_mean, flat_var, op.epsilon)
    else:
        shape = sums.stat_shape
        gamma = None if op.gamma is None else _param(ctx, op.gamma, dtype, shape, "gamma")
        inv = _inverse_std(ctx, var, gamma, op.epsilon, dtype)
        shift_out = ctx.op("Mul", [mean_d, inv])
        if op.beta is None:
            offset = ctx.op("Neg", [shift_out], label="offset")
        else:
            beta = _param(ctx, op.beta, dtype, shape, "beta")
            offset = ctx.op("Sub", [beta, shift_out], label="offset")
        y = ctx.op("Add", [ctx.op("Mul", [d, inv], label="scaled"), offset], label="y")
        y = y if sums.view is x else emit.reshape_like(ctx, y, x, "restored")
    batch_mean = ctx.op("Add", [shift, mean_d], label="batch_mean")
    updates = []
    for moving, batch, label in ((moving_mean, batch_mean, "mean"), (moving_var, var, "var")):
        batch = ctx.op("Reshape", [batch, stat_shape], label=f"batch_{label}", allowzero=0)
        new = ctx.op(
            "Add",
            [
                ctx.op("Mul", [moving, emit.scalar(ctx, op.momentum, dtype, "momentum")]),
                ctx.op("Mul", [batch, emit.scalar(ctx, 1.0 - op.momentum, dtype, "rate")]),
            ],
            label=f"new_{label}",
        )
        if valid is None and not _surely_nonempty(x):
            # An empty unmasked batch has no statistics: the eager layer keeps the state.
            nonempty = ctx.op(
                "Greater", [n, emit.scalar(ctx, 0.0, dtype, "zero")], dtype="bool", label="nonempty"
            )
            new = ctx.op("Where", [nonempty, new, moving], dtype=dtype, label=f"new_{label}")
        updates.append(new)
    for variable, new in zip((op.moving_mean, op.moving_variance), updates):
        ctx.write_state(variable.path, emit.cast(ctx, new, variable.dtype, "new"))
    return y


def _param(ctx, variable, dtype: str, shape, label: str) -> Value:
    """A weight as a constant shaped like the statistics (for broadcasting)."""
    value = np.asarray(variable.value, dtype=np.float64).reshape(shape)
    return ctx.constant(value, label, dtype)


def _surely_nonempty(x: Value) -> bool:
    return all(d is not None and d > 0 for d in x.shape)


def _valid(ctx: LoweringContext, mask: Value, x: Value) -> Value:
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


def _sums_channel_last(ctx: LoweringContext, x: Value, valid: Value | None):
    """Shifted sums over an `(M, C)` view, reduced by MatMul with a ones row."""
    dtype, channels = x.dtype, x.shape[-1]
    if x.rank == 2:
        view = x
    else:
        view = emit.reshape(ctx, x, [emit.static_product(x.shape[:-1]), channels], "rows")
    rows = view.shape[0]
    first_row = [emit.ints(ctx, [0], "start"), emit.ints(ctx, [1], "end")]
    if valid is not None:
        flat = emit.reshape(ctx, valid, [rows], "valid_rows")
        n = emit.reduce(ctx, "ReduceSum", emit.cast(ctx, flat, dtype), [0], keepdims=True)
        # The first valid row; one extra 1 keeps ArgMax defined on an empty batch.
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
        first_row = [start, ctx.op("Add", [start, emit.ints(ctx, [1], "one")], label="end")]
    else:
        n = emit.count(ctx, view, [0], dtype)
    sample = ctx.op("Slice", [view, *first_row, emit.ints(ctx, [0], "axes")], label="sample")
    if valid is not None or not rows:
        # No valid row (or no row) leaves an empty slice: its sum is the zero shift.
        sample = emit.reduce(ctx, "ReduceSum", sample, [0], keepdims=True, label="sample")
    d = ctx.op("Sub", [view, sample], label="shifted", shape=view.shape)
    dm = d
    if valid is not None:
        valid_rows = emit.reshape(ctx, valid, [rows, 1], "valid_col")
        dm = ctx.op(
            "Where",
            [valid_rows, d, emit.scalar(ctx, 0.0, dtype, "zero")],
            dtype=dtype,
            label="kept",
        )
    if rows:
        ones_shape = emit.ints(ctx, [1, rows], "ones_shape")
    else:
        ones_shape = emit.concat_ints(
            ctx, [emit.ints(ctx, [1], "one"), emit.shape_of(ctx, view, 0, 1)], "ones_shape"
        )
    ones = emit.constant_of_shape(ctx, ones_shape, 1.0, dtype)
    s1 = ctx.op("MatMul", [ones, dm], label="sum", shape=(1, channels))
    s2 = ctx.op(
        "MatMul",
        [ones, ctx.op("Mul", [dm, dm], label="squares")],
        label="sum_sq",
        shape=(1, channels),
    )
    return Sums(view, sample, d, s1, s2, n, (1, channels))


def _sums_channel_inner(ctx: LoweringContext, x: Value, axis: int, valid: Value | None):
    """Shifted sums kept as `[1, .., C, .., 1]`, by ReduceSum / ReduceSumSquare."""
    dtype = x.dtype
    axes = [a for a in range(x.rank) if a != axis]
    zero = emit.scalar(ctx, 0.0, dtype, "zero")
    if valid is not None:
        valid = ctx.op(
            "Unsqueeze", [valid, emit.ints(ctx, [-1], "axes")], dtype="bool", label="valid_e"
        )
        last = x.rank - 1
        head = ctx.op(
            "Slice",
            [
                x,
                emit.ints(ctx, [0], "start"),
                emit.ints(ctx, [1], "end"),
                emit.ints(ctx, [last], "axes"),
            ],
            label="head",
        )
        # The masked mean of the first slice of the last axis: a shift drawn from
        # valid data only (the mask is constant along that axis).
        n_head = emit.reduce(ctx, "ReduceSum", emit.cast(ctx, valid, dtype), axes, keepdims=True)
        total = emit.reduce(
            ctx, "ReduceSum", ctx.op("Where", [valid, head, zero], dtype=dtype), axes, keepdims=True
        )
        one = emit.scalar(ctx, 1.0, dtype, "one")
        sample = ctx.op("Div", [total, ctx.op("Max", [n_head, one])], label="sample")
        width = x.shape[last]
        if width is None:
            width_v = emit.cast(ctx, emit.shape_of(ctx, x, last, last + 1), dtype)
        else:
            width_v = emit.scalar(ctx, float(width), dtype, "width")
        n = ctx.op("Mul", [n_head, width_v], label="count")
    else:
        n = emit.count(ctx, x, axes, dtype)
        k = len(axes)
        sample = ctx.op(
            "Slice",
            [
                x,
                emit.ints(ctx, [0] * k, "start"),
                emit.ints(ctx, [1] * k, "end"),
                emit.ints(ctx, axes, "axes"),
            ],
            label="sample",
        )
        if not _surely_nonempty(x):
            sample = emit.reduce(ctx, "ReduceSum", sample, axes, keepdims=True, label="sample")
    d = ctx.op("Sub", [x, sample], label="shifted", shape=x.shape)
    dm = d if valid is None else ctx.op("Where", [valid, d, zero], dtype=dtype, label="kept")
    s1 = emit.reduce(ctx, "ReduceSum", dm, axes, keepdims=True, label="sum")
    s2 = emit.reduce(ctx, "ReduceSumSquare", dm, axes, keepdims=True, label="sum_sq")
    stat_shape = tuple(x.shape[axis] if a == axis else 1 for a in range(x.rank))
    return Sums(x, sample, d, s1, s2, n, stat_shape)


def _finish(ctx: LoweringContext, sums: Sums, masked: bool) -> tuple[Value, Value]:
    """Mean of the shifted data and the batch variance (Keras's masked formula when masked)."""
    shift, s1, s2, n = sums.shift, sums.total, sums.total_sq, sums.n
    dtype = s1.dtype
    zero = emit.scalar(ctx, 0.0, dtype, "zero")
    if masked:
        eps = emit.scalar(ctx, MASK_EPSILON, dtype, "count_epsilon")
        den = ctx.op("Add", [n, eps], label="denominator")
        # Keras's mean S/(n+eps) relative to the shift: (S_d - eps * shift) / (n + eps).
        numerator = ctx.op("Sub", [s1, ctx.op("Mul", [shift, eps])])
        mean_d = ctx.op("Div", [numerator, den], label="mean_shifted")
        # Σ (d - mean_d)² = Q - 2 mean_d S + n mean_d², around Keras's shrunken mean.
        two = emit.scalar(ctx, 2.0, dtype, "two")
        cross = ctx.op("Mul", [ctx.op("Mul", [mean_d, s1]), two])
        spread = ctx.op("Mul", [n, ctx.op("Mul", [mean_d, mean_d])])
        m2 = ctx.op("Add", [ctx.op("Sub", [s2, cross]), spread])
        var = ctx.op("Div", [m2, den])
    else:
        mean_d = ctx.op("Div", [s1, n], label="mean_shifted")
        var = ctx.op("Sub", [ctx.op("Div", [s2, n]), ctx.op("Mul", [mean_d, mean_d])])
    # Rounding can leave a tiny negative where the variance is 0.
    return mean_d, ctx.op("Max", [var, zero], label="batch_var")
