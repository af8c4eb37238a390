"""BatchNormalization: how a Keras call becomes ONNX (semantics: `layers/batch_normalization.py`).

Inference is one pass over the data: the native BatchNormalization node
carrying the layer itself (scale = gamma, B = beta, mean and variance = the
moving statistics, the layer's epsilon), wherever the channel can sit at
position 1 through a free Reshape/Unsqueeze; a channels-last tensor is viewed as
`(M, C)` and the output reshaped back; the data is never transposed. The
native node on that view beats Mul+Add broadcasting `[C]` on onnxruntime (the
measurements are in `docs/lowering.md`).

Training uses standard ops only (no `training_mode=1`, which onnxruntime's CUDA
provider rejects and whose CPU kernel can write into the caller's buffers); the
moments live in `lowering/moments.py`:

1. shift the data per channel by the mean of a few of its (valid) elements,
   `d = x - s` (exact by Sterbenz for data like `1e4 + N(0, 1)`);
2. sum `d` and `d²` in the compute dtype (float32 at least): MatMul by a ones
   (or mask weights) vector on the `(M, C)` view for channels last, two-level
   ReduceSum/ReduceSumSquare otherwise;
3. mean and variance of the shifted data (never `E[x²] - E[x]²` of the raw data);
   masked, Keras's formulas with `count + 1e-7`; NaN or Inf at masked-out
   positions cannot reach the statistics (Gather of valid rows or Where);
4. normalize the shifted data by a per-channel Mul and Add,
   `d * inv + (beta - mean_d * inv)`: a native BatchNormalization node fed
   statistics computed in the graph is not portable (tract accepts only
   constant parameters), so the native node is used only with constants;
5. the moving statistics `moving * momentum + batch * (1 - momentum)` become the
   `<layer>/moving_*/new` outputs (renorm: `lowering/renormalization.py`); an
   empty unmasked batch leaves them unchanged.

Float16/bfloat16/integer/bool inputs are computed in float32, float64 in
float64, and the output is cast to the layer's compute dtype, exactly as the
eager `Layer.__call__` (autocast of float inputs) and `BatchNormalization.call` do.

In a train step gamma and beta are read with `ctx.weight` (state inputs), an
inference call then normalizes by Mul and Add (the native node takes constant
parameters only, on tract), and each call saves what its gradient rule
(`lowering/batch_normalization_gradient.py`) reads: the shifted data, the mean
relative to it, the standard deviation, the scale and, in training, the count,
the valid positions, the empty-batch flag and renorm's `r`, `d`.
"""

from __future__ import annotations

import numpy as np

from onnxbn.dtypes import is_float
from onnxbn.gradients import Gradients
from onnxbn.layers.batch_normalization import BatchNormalization, normalize_axis
from onnxbn.lowering import emit, moments, renormalization
from onnxbn.lowering.batch_normalization_gradient import backward
from onnxbn.lowering.context import CallRecord, LoweringContext, Value
from onnxbn.lowering.registry import register_gradient, register_lowering


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


def _channel_first(ctx: LoweringContext, x: Value, axis: int) -> Value:
    """`x` viewed with the channel at position 1 (a Reshape/Unsqueeze, no data movement)."""
    if axis == 1:
        return x
    if axis == 0:
        return ctx.op("Unsqueeze", [x, emit.ints(ctx, [0], "axes")], label="channel_first")
    before = emit.static_product(x.shape[:axis])
    if axis == x.rank - 1:  # the (M, C) rows view
        return emit.reshape(ctx, x, [before, x.shape[axis]], "channel_first")
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
    """The layer itself as one native node: scale = gamma, B = beta, the moving statistics.

    Tools that read BatchNormalization nodes (recalibration, fusions,
    quantizers, viewers) see the layer the user built; gamma/beta are ones/zeros
    when scale/center is off. In a train step whose state holds gamma or beta,
    Mul and Add instead (see `_affine_inference`).
    """
    channels = x.shape[axis]
    if any(v is not None and v.path in ctx.trainable_paths for v in (op.gamma, op.beta)):
        mean = ctx.constant(_weight64(op.moving_mean, 0.0, channels), "moving_mean", x.dtype)
        var = ctx.constant(_weight64(op.moving_variance, 1.0, channels), "moving_variance", x.dtype)
        return _affine_inference(ctx, op, x, axis, mean, var)
    ctx.save("shifted", x)  # the gradient rule folds the constant parameters itself
    return _native(
        ctx,
        op,
        x,
        axis,
        ctx.constant(_weight64(op.gamma, 1.0, channels), "gamma", x.dtype),
        ctx.constant(_weight64(op.beta, 0.0, channels), "beta", x.dtype),
        ctx.constant(_weight64(op.moving_mean, 0.0, channels), "moving_mean", x.dtype),
        ctx.constant(_weight64(op.moving_variance, 1.0, channels), "moving_variance", x.dtype),
        op.epsilon,
    )


def _inference_from_state(
    ctx: LoweringContext, op: BatchNormalization, x: Value, axis: int
) -> Value:
    """Inference call of a layer whose moving statistics are graph state in this export."""
    mean, var = _read_state(ctx, op, x.dtype)
    return _affine_inference(ctx, op, x, axis, mean, var)


def _affine_inference(
    ctx: LoweringContext, op: BatchNormalization, x: Value, axis: int, mean: Value, var: Value
) -> Value:
    """`x * inv + (beta - mean * inv)` by Mul and Add, `inv = gamma / sqrt(var + epsilon)`."""
    channels = x.shape[axis]
    gamma, beta = _affine(ctx, op, x.dtype, channels)
    shape = emit.ints(ctx, _param_shape(x.rank, axis, channels), "param_shape")
    std = stddev(ctx, var, op.epsilon, x.dtype)
    inv = _over(ctx, gamma, std)
    b = ctx.op("Sub", [beta, ctx.op("Mul", [mean, inv])], label="shift")
    scaled = ctx.op("Mul", [x, ctx.op("Reshape", [inv, shape], label="scale", allowzero=0)])
    for key, value in (("shifted", x), ("mean_shifted", mean), ("std", std), ("scale", inv)):
        ctx.save(key, value)
    return ctx.op("Add", [scaled, ctx.op("Reshape", [b, shape], allowzero=0)], label="y")


def _read_state(ctx: LoweringContext, op: BatchNormalization, dtype: str) -> tuple[Value, Value]:
    mean = ctx.read_state(op.moving_mean.path, op.moving_mean.value, op.moving_mean.dtype)
    var = ctx.read_state(
        op.moving_variance.path, op.moving_variance.value, op.moving_variance.dtype
    )
    return emit.cast(ctx, mean, dtype, "moving_mean"), emit.cast(ctx, var, dtype, "moving_var")


def _affine(ctx, op, dtype: str, channels: int) -> tuple[Value, Value]:
    """`gamma`, `beta` as `[C]` values of `dtype` (`ctx.weight`; ones / zeros constants
    when scale / center is off)."""
    if op.gamma is None:
        gamma = ctx.constant(np.ones(channels), "gamma", dtype)
    else:
        gamma = ctx.weight(op.gamma, "gamma", dtype)
    if op.beta is None:
        beta = ctx.constant(np.zeros(channels), "beta", dtype)
    else:
        beta = ctx.weight(op.beta, "beta", dtype)
    return gamma, beta


def stddev(ctx, var: Value, epsilon: float, dtype: str) -> Value:
    """`sqrt(var + epsilon)`."""
    return ctx.op("Sqrt", [ctx.op("Add", [var, emit.scalar(ctx, epsilon, dtype, "epsilon")])])


def _over(ctx, gamma: Value | None, std: Value) -> Value:
    """`gamma / std` (`1 / std` without gamma)."""
    if gamma is None:
        return ctx.op("Reciprocal", [std], label="inv_std")
    return ctx.op("Div", [gamma, std], label="inv_std")


def inverse_std(ctx, var: Value, gamma: Value | None, epsilon: float, dtype: str) -> Value:
    """`gamma / sqrt(var + epsilon)`."""
    return _over(ctx, gamma, stddev(ctx, var, epsilon, dtype))


# -- training -----------------------------------------------------------------------
def _training(
    ctx: LoweringContext, op: BatchNormalization, x: Value, axis: int, mask: Value | None
) -> Value:
    dtype, channels = x.dtype, x.shape[axis]
    # Every state is declared here, in the layer's weight order (the input order).
    states = {
        v.name: emit.cast(ctx, ctx.read_state(v.path, v.value, v.dtype), dtype, v.name)
        for v in op.state_variables
    }
    valid = None if mask is None else moments.valid_positions(ctx, mask, x)
    stats = moments.batch_moments(ctx, x, axis, valid, synchronized=op.synchronized)
    mean_d, var = stats.mean_shifted, stats.var
    batch_mean = ctx.op("Add", [stats.shift, mean_d], label="batch_mean")
    gamma = None if op.gamma is None else ctx.weight(op.gamma, "gamma", dtype)
    beta = None if op.beta is None else ctx.weight(op.beta, "beta", dtype)
    if op.renorm:
        std, r, d = renormalization.correction(ctx, op, batch_mean, var, states)
        inv, offset = renormalization.affine(ctx, std, r, d, gamma, beta)
        new_states = renormalization.updates(ctx, op, batch_mean, std, states, moving_average)
        ctx.save("r", r)  # constants of the gradient (Keras's stop_gradient)
        ctx.save("d", d)
    else:
        std = stddev(ctx, var, op.epsilon, dtype)
        inv = _over(ctx, gamma, std)
        offset = beta
        new_states = {
            "moving_mean": moving_average(ctx, states["moving_mean"], batch_mean, op.momentum),
            "moving_variance": moving_average(ctx, states["moving_variance"], var, op.momentum),
        }
    y = normalized(ctx, stats, inv, offset, axis, x.rank, channels)
    saved = {
        "shifted": stats.shifted,
        "mean_shifted": mean_d,
        "std": std,
        "scale": inv,
        "count": stats.count,
        "valid": valid,
        "nonempty": stats.nonempty,
        "batch_mean": batch_mean,
    }
    for key, value in saved.items():
        ctx.save(key, value)
    updates = [(v.path, v.dtype, states[v.name], new_states[v.name]) for v in op.state_variables]
    write_updates(ctx, stats, updates)
    return y


def normalized(
    ctx: LoweringContext,
    stats: moments.Moments,
    inv: Value,
    offset: Value | None,
    axis: int,
    rank: int,
    channels: int,
) -> Value:
    """`(x - mean) * inv + offset` from the shifted data, `inv` and `offset` of shape `(C,)`.

    Computed as `d * inv + (offset - mean_d * inv)`: one Mul and one Add over
    the data (`offset` None: no offset).
    """
    shift_out = ctx.op("Mul", [stats.mean_shifted, inv])
    if offset is None:
        offset = ctx.op("Neg", [shift_out], label="offset")
    else:
        offset = ctx.op("Sub", [offset, shift_out], label="offset")
    if axis != rank - 1:  # (C,) broadcasts on the last axis only
        shape = emit.ints(ctx, _param_shape(rank, axis, channels), "param_shape")
        inv = ctx.op("Reshape", [inv, shape], label="scale", allowzero=0)
        offset = ctx.op("Reshape", [offset, shape], label="offset", allowzero=0)
    return ctx.op("Add", [ctx.op("Mul", [stats.shifted, inv], label="scaled"), offset], label="y")


def write_updates(
    ctx: LoweringContext, stats: moments.Moments, updates: list[tuple[str, str, Value, Value]]
) -> None:
    """Writes each `(state path, state dtype, current value, new value)` as the new state.

    An empty unmasked batch has no statistics: the state is kept, as the eager
    layer keeps it.
    """
    for path, dtype, current, new in updates:
        if stats.nonempty is not None:
            new = ctx.op("Where", [stats.nonempty, new, current], dtype=new.dtype, label="new")
        ctx.write_state(path, emit.cast(ctx, new, dtype, "new"))


def moving_average(ctx, moving: Value, batch: Value, momentum: float) -> Value:
    """`moving * momentum + batch * (1 - momentum)`."""
    kept = ctx.op("Mul", [moving, emit.scalar(ctx, momentum, moving.dtype, "momentum")])
    rate = emit.scalar(ctx, 1.0 - momentum, moving.dtype, "rate")
    return ctx.op("Add", [kept, ctx.op("Mul", [batch, rate])], label="new")


# -- gradient -------------------------------------------------------------------------
@register_gradient(BatchNormalization)
def batch_normalization_gradient(
    ctx: LoweringContext, op: BatchNormalization, call: CallRecord, dy: Value
) -> Gradients:
    """The gradient of one call (`lowering/batch_normalization_gradient.py`).

    Args:
        ctx: the lowering context.
        op: the layer.
        call: the forward call's record (what `lower_batch_normalization` saved).
        dy: the gradient of the loss with respect to the call's output.

    Returns:
        `Gradients((dx,), {path: grad})`: `dx` in the input's dtype (None for
        an integer or bool input), `gamma` / `beta` gradients for the
        trainable weights, in the compute dtype (float32 or float64).
    """
    saved = dict(call.saved)
    x = saved["shifted"]
    if "scale" not in saved:  # the native inference node: fold its constant parameters
        channels = x.shape[normalize_axis(op.axis, x.rank, op.name)]
        mean = _weight64(op.moving_mean, 0.0, channels)
        std = np.sqrt(_weight64(op.moving_variance, 1.0, channels) + op.epsilon)
        scale = _weight64(op.gamma, 1.0, channels) / std
        for key, value in (("mean_shifted", mean), ("std", std), ("scale", scale)):
            saved[key] = ctx.constant(value, key, x.dtype)
    return backward(ctx, op, saved, call.operands[0], dy)
