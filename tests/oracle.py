"""Float64 oracle written straight from the seed's formulas (independent of onnxbn)."""

from __future__ import annotations

import numpy as np

KERAS_EPSILON = 1e-7  # Keras's backend.epsilon(), used by masked moments

# Per-dtype tolerances (rtol, atol) of a layer output against the float64 oracle.
# float32/float64 outputs are computed in float64 and rounded once; half types
# add their own rounding of the output (2^-11 for float16, 2^-8 for bfloat16).
TOLERANCES = {
    "float64": (1e-10, 1e-10),
    "float32": (2e-6, 2e-6),
    "float16": (2e-3, 2e-3),
    "bfloat16": (1.6e-2, 1.6e-2),
}


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
    reduce = tuple(i for i in range(x.ndim) if i != axis)
    mm = np.asarray(moving_mean, np.float64)
    mv = np.asarray(moving_variance, np.float64)
    if training and mask is None and x.size == 0:
        # An empty batch has no statistics: the moving ones stay (onnxbn's documented choice).
        mean, var, new_mm, new_mv = mm, mv, mm, mv
    elif training:
        if mask is None:
            mean = x.mean(axis=reduce)
            var = ((x - mean.reshape(shape)) ** 2).mean(axis=reduce)
        else:
            w = np.broadcast_to(np.expand_dims(np.asarray(mask) != 0, -1), x.shape)
            n = w.sum(axis=reduce).astype(np.float64)
            mean = np.where(w, x, 0.0).sum(axis=reduce) / (n + KERAS_EPSILON)
            dev = np.where(w, x - mean.reshape(shape), 0.0)
            var = (dev**2).sum(axis=reduce) / (n + KERAS_EPSILON)
        new_mm = mm * momentum + mean * (1 - momentum)
        new_mv = mv * momentum + var * (1 - momentum)
    else:
        mean, var = mm, mv
        new_mm, new_mv = mm, mv
    g = np.ones(channels) if gamma is None else np.asarray(gamma, np.float64)
    b = np.zeros(channels) if beta is None else np.asarray(beta, np.float64)
    y = g.reshape(shape) * (x - mean.reshape(shape)) / np.sqrt(var.reshape(shape) + epsilon)
    return y + b.reshape(shape), new_mm, new_mv
