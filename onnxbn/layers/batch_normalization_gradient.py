"""BatchNormalization's backward rule (eager): pure float64 NumPy functions.

The forward (`onnxbn/layers/batch_normalization.py`, `renormalization.py`)
saves the statistics it normalized with; this module maps the gradient of the
output back to the input, `gamma` and `beta`.

Training, per channel, with `v` the valid positions (all of them unmasked),
`n` their (global) count and `D` the divisor of the statistics (`n`, or Keras's
`n + 1e-7` with a mask):

    m = Σ v·x / D,  var = Σ v·(x - m)² / D,  s = 1 / sqrt(var + epsilon)
    x̂ = (x - m)·s,  y = g·x̂ + b            (every position, masked ones too)

so, with the sums over every position (of every process when synchronized):

    dx = g·s·(dy - v/D·(Σdy + Σ(dy·x̂)·(x̂ - s·Σv·(x - m)/D)))

where `Σ v·(x - m) = m·(D - n)`: zero unmasked, `m·1e-7` with a mask (Keras's
shrunken mean is not the mean of the valid positions). Masked-out positions
get only `g·s·dy`: the statistics do not see them. With renorm `g = r·gamma`
and `y = x̂·r·gamma + d·gamma + beta`, `r` and `d` constants (Keras's
`stop_gradient`); the batch mean and variance still carry the gradient.
Inference (and a frozen layer) is the affine map `g·s·dy` with the moving
statistics.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from onnxbn.dtypes import is_float
from onnxbn.gradients import Gradients, Pullback
from onnxbn.layers.moments import MASK_EPSILON, normalize_axis, valid_positions

SumsReducer = Callable[[tuple[np.ndarray, ...]], tuple[np.ndarray, ...]]


def batch_normalization_gradient(
    x: np.ndarray,
    dy: np.ndarray,
    *,
    axis: int,
    mean: np.ndarray,
    variance: np.ndarray,
    epsilon: float,
    gamma: np.ndarray | None,
    training: bool,
    mask: np.ndarray | None = None,
    r: np.ndarray | None = None,
    d: np.ndarray | None = None,
    reduce_sums: SumsReducer | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The gradients of one BatchNormalization call, in float64.

    Args:
        x: the call's input.
        dy: gradient of the loss with respect to the output (`x.shape`).
        axis: channel axis (negative allowed).
        mean, variance: the per-channel statistics the forward normalized
            with (batch ones in training, moving ones otherwise).
        epsilon: the layer's epsilon.
        gamma: per-channel scale, or None when disabled.
        training: whether `mean` and `variance` are functions of `x`.
        mask: the training mask (rank `x.ndim - 1`, non-zero = valid), or None.
        r, d: renorm's corrections (constants), or None without renorm.
        reduce_sums: for synchronized statistics, maps this process's
            per-channel `(Σdy, Σdy·x̂, n)` to the global sums.

    Returns:
        `(dx, dgamma, dbeta)`: `dx` of `x.shape`; `dgamma` (as if `gamma`
        were 1 when disabled) and `dbeta` per channel, summed over this
        process's batch only (a data-parallel optimizer sums them).
    """
    x64 = np.asarray(x, dtype=np.float64)
    dy = np.asarray(dy, dtype=np.float64)
    axis = normalize_axis(axis, x64.ndim)
    shape = [1] * x64.ndim
    shape[axis] = x64.shape[axis]
    reduction_axes = tuple(a for a in range(x64.ndim) if a != axis)
    scale = np.ones(shape[axis]) if gamma is None else np.asarray(gamma, dtype=np.float64)
    if r is not None:
        scale = scale * r
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):  # NaN stays NaN, as Keras
        inv = 1.0 / np.sqrt(np.asarray(variance, dtype=np.float64) + epsilon)
        mean = np.asarray(mean, dtype=np.float64)
        xhat = (x64 - mean.reshape(shape)) * inv.reshape(shape)
        sum_dy = dy.sum(axis=reduction_axes)
        sum_dy_xhat = (dy * xhat).sum(axis=reduction_axes)
        dgamma = sum_dy_xhat if r is None else r * sum_dy_xhat + d * sum_dy
        dx = dy * (scale * inv).reshape(shape)
        if training:
            dx -= (scale * inv).reshape(shape) * _statistics_term(
                x64.shape, xhat, mean, inv, sum_dy, sum_dy_xhat, mask, reduction_axes, reduce_sums
            )
    return dx, dgamma, sum_dy


def _statistics_term(shape, xhat, mean, inv, sum_dy, sum_dy_xhat, mask, reduction_axes, reduce):
    """`v/D·(Σdy + Σ(dy·x̂)·(x̂ - s·Σv·(x - m)/D))`: the gradient through `m` and `var`."""
    valid = None if mask is None else valid_positions(mask, shape)
    channel = [1 if a in reduction_axes else d for a, d in enumerate(shape)]
    if valid is None:
        size = int(np.prod([shape[a] for a in reduction_axes], dtype=np.int64))
        count = np.full(sum_dy.shape, float(size))
    else:
        count = valid.sum(axis=reduction_axes, dtype=np.float64)
    if reduce is not None:
        sum_dy, sum_dy_xhat, count = reduce((sum_dy, sum_dy_xhat, count))
    if valid is None:
        denominator = np.where(count > 0, count, 1.0)  # an empty batch has no gradient to spread
        shift = np.zeros_like(count)
    else:
        denominator = count + MASK_EPSILON
        shift = mean * MASK_EPSILON  # Σ v·(x - m) = m·(D - n)
    term = (
        sum_dy.reshape(channel)
        + sum_dy_xhat.reshape(channel) * (xhat - (inv * shift / denominator).reshape(channel))
    ) / denominator.reshape(channel)
    return term if valid is None else np.where(valid, term, 0.0)


def layer_pullback(layer: Any, x: np.ndarray, saved: dict[str, Any]) -> Pullback:
    """The pullback of one eager BatchNormalization call.

    Args:
        layer: the `BatchNormalization` layer.
        x: the call's (converted) input.
        saved: what the forward recorded: `training`, `mask`, `comm`,
            `gamma`, and the pure function's `mean`, `variance` (`r`, `d`).

    Returns:
        `pullback(dy) -> Gradients`: `inputs = (dx,)` (None for integer or
        bool inputs), `weights` for `gamma` and `beta` unless the layer is
        frozen. With a communicator every process must call its pullback: it
        exchanges the per-channel sums once.
    """
    comm = saved["comm"]
    what = f"BatchNormalization {layer.name!r}"
    reduce_sums = None
    if comm is not None:
        from onnxbn import distributed

        def reduce_sums(sums):
            return distributed.allreduce_sums(comm, sums, what=what)

    def pullback(dy: np.ndarray) -> Gradients:
        dy = np.asarray(dy)
        error = None
        if dy.shape != x.shape:
            error = ValueError(
                f"{what}: the output gradient has shape {dy.shape}, expected {x.shape}."
            )
        if comm is not None:  # every process raises together, none waits in the exchange
            from onnxbn import distributed

            distributed.agree(comm, "float64", error, what)
        elif error is not None:
            raise error
        dx, dgamma, dbeta = batch_normalization_gradient(
            x,
            dy,
            axis=layer.axis,
            mean=saved["mean"],
            variance=saved["variance"],
            epsilon=layer.epsilon,
            gamma=saved["gamma"],
            training=saved["training"],
            mask=saved["mask"],
            r=saved.get("r"),
            d=saved.get("d"),
            reduce_sums=reduce_sums,
        )
        by_variable = {id(layer.gamma): dgamma, id(layer.beta): dbeta}
        weights = {v.path: by_variable[id(v)] for v in layer.trainable_weights}
        return Gradients((dx if is_float(x.dtype) else None,), weights)

    return pullback
