"""Float64 oracle written straight from the seed's formulas (independent of onnxbn)."""

from __future__ import annotations

import numpy as np

KERAS_EPSILON = 1e-7  # Keras's backend.epsilon(), used by masked moments

# The one tolerance table: (rtol, atol) of a result against this module's float64
# oracle, by the dtype the result is delivered in.
# - "layer": the eager layers compute in float64 and round once to the delivered
#   dtype (half types also round their float32 compute: 2^-11 for float16, 2^-8
#   for bfloat16);
# - "graph": an exported graph on a runtime computes in float32 (a few ulps at
#   the output's scale, which reaches ~1e1), plus one rounding to a half type.
# Every engine of a cross-engine test (eager, onnxbn.reference, onnxruntime, the
# runtimes of the portability matrix) is held to the "graph" column; a runtime's
# documented exception is stated where it applies (test_portability.py).
TOLERANCE_TABLE = {  # dtype: (layer, graph)
    "float64": ((1e-10, 1e-10), (1e-9, 1e-9)),
    "float32": ((2e-6, 2e-6), (2e-5, 2e-5)),
    "float16": ((2e-3, 2e-3), (4e-3, 4e-3)),
    "bfloat16": ((1.6e-2, 1.6e-2), (3.2e-2, 3.2e-2)),
}
TOLERANCES = {dtype: layer for dtype, (layer, _) in TOLERANCE_TABLE.items()}
GRAPH_TOLERANCES = {dtype: graph for dtype, (_, graph) in TOLERANCE_TABLE.items()}


def batch_moments(x, axis, mask=None):
    """`(mean, variance)` over every axis but `axis` in float64 (x already float64, axis >= 0).

    Masked: Keras's moments, the mask expanded at its last axis and the sums
    divided by count + 1e-7. Unmasked over an empty batch: NaN (callers keep
    their state then).
    """
    shape = [1] * x.ndim
    shape[axis] = x.shape[axis]
    reduce = tuple(i for i in range(x.ndim) if i != axis)
    if mask is None:
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = x.mean(axis=reduce)
            return mean, ((x - mean.reshape(shape)) ** 2).mean(axis=reduce)
    w = np.broadcast_to(np.expand_dims(np.asarray(mask) != 0, -1), x.shape)
    n = w.sum(axis=reduce).astype(np.float64)
    mean = np.where(w, x, 0.0).sum(axis=reduce) / (n + KERAS_EPSILON)
    dev = np.where(w, x - mean.reshape(shape), 0.0)
    return mean, (dev**2).sum(axis=reduce) / (n + KERAS_EPSILON)


def bn_oracle(
    x, *, axis, gamma, beta, moving_mean, moving_variance, momentum, epsilon, training, mask=None
):
    """Returns (y, new_moving_mean, new_moving_variance) in float64.

    Training: gamma * (x - mean(batch)) / sqrt(var(batch) + epsilon) + beta and
    moving = moving * momentum + batch * (1 - momentum). Inference: the same
    with the moving statistics. Masked statistics follow Keras: the mask is
    expanded at its last axis, and sums are divided by count + 1e-7. An empty
    unmasked batch leaves the moving statistics unchanged.
    """
    x = np.asarray(x, dtype=np.float64)
    axis = axis % x.ndim
    channels = x.shape[axis]
    shape = [1] * x.ndim
    shape[axis] = channels
    mm = np.asarray(moving_mean, np.float64)
    mv = np.asarray(moving_variance, np.float64)
    if training and mask is None and x.size == 0:
        # An empty batch has no statistics: the moving ones stay (onnxbn's documented choice).
        mean, var, new_mm, new_mv = mm, mv, mm, mv
    elif training:
        mean, var = batch_moments(x, axis, mask)
        new_mm = mm * momentum + mean * (1 - momentum)
        new_mv = mv * momentum + var * (1 - momentum)
    else:
        mean, var = mm, mv
        new_mm, new_mv = mm, mv
    g = np.ones(channels) if gamma is None else np.asarray(gamma, np.float64)
    b = np.zeros(channels) if beta is None else np.asarray(beta, np.float64)
    y = g.reshape(shape) * (x - mean.reshape(shape)) / np.sqrt(var.reshape(shape) + epsilon)
    return y + b.reshape(shape), new_mm, new_mv


def renorm_oracle(
    x,
    *,
    axis,
    gamma,
    beta,
    moving_mean,
    moving_variance,
    moving_stddev,
    renorm_mean,
    renorm_stddev,
    momentum,
    renorm_momentum,
    epsilon,
    renorm_clipping,
    training,
    mask=None,
):
    """Batch renormalization (Keras 3.14+ `renorm=True`) in float64.

    Returns `(y, moving_mean, moving_variance, moving_stddev, renorm_mean,
    renorm_stddev)`, the states after the call. Training, with `mean`, `var`
    the batch moments (masked as in `bn_oracle`):
    `s = sqrt(var + eps)`, `ŝ = max(renorm_stddev, sqrt(eps))`,
    `r = s / ŝ` clipped to `[rmin, rmax]`, `d = (mean - renorm_mean) / ŝ`
    clipped to `[-dmax, dmax]` (only the keys present clip),
    `y = (x - mean) / s * (r * gamma) + (d * gamma + beta)`; the renorm
    statistics move toward `mean`, `s` with `renorm_momentum`, `moving_mean`
    and `moving_stddev` with `momentum`, and `moving_variance =
    relu(moving_stddev² - eps)`. Inference (and an empty unmasked batch, for
    the states): plain BatchNormalization with the moving statistics.
    """
    x = np.asarray(x, dtype=np.float64)
    axis = axis % x.ndim
    channels = x.shape[axis]
    shape = [1] * x.ndim
    shape[axis] = channels
    mm, mv, ms, rm, rs = (
        np.asarray(v, np.float64)
        for v in (moving_mean, moving_variance, moving_stddev, renorm_mean, renorm_stddev)
    )
    g = np.ones(channels) if gamma is None else np.asarray(gamma, np.float64)
    b = np.zeros(channels) if beta is None else np.asarray(beta, np.float64)
    if not training:
        y = (x - mm.reshape(shape)) / np.sqrt(mv.reshape(shape) + epsilon)
        return y * g.reshape(shape) + b.reshape(shape), mm, mv, ms, rm, rs
    mean, var = batch_moments(x, axis, mask)  # N = 0 unmasked: NaN, states kept below
    clipping = renorm_clipping or {}
    s = np.sqrt(var + epsilon)
    s_hat = np.maximum(rs, np.sqrt(epsilon))
    r = s / s_hat
    d = (mean - rm) / s_hat
    if clipping.get("rmin") is not None:
        r = np.maximum(r, clipping["rmin"])
    if clipping.get("rmax") is not None:
        r = np.minimum(r, clipping["rmax"])
    if clipping.get("dmax") is not None:
        d = np.clip(d, -clipping["dmax"], clipping["dmax"])
    normalized = (x - mean.reshape(shape)) / s.reshape(shape)
    y = normalized * (r * g).reshape(shape) + (d * g + b).reshape(shape)
    if mask is None and x.size == 0:
        return y, mm, mv, ms, rm, rs  # no data, no update (as bn_oracle)
    new_ms = ms * momentum + s * (1 - momentum)
    return (
        y,
        mm * momentum + mean * (1 - momentum),
        np.maximum(new_ms**2 - epsilon, 0.0),
        new_ms,
        rm * renorm_momentum + mean * (1 - renorm_momentum),
        rs * renorm_momentum + s * (1 - renorm_momentum),
    )
