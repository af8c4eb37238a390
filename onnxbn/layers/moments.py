"""Numerically stable batch moments and the pure `batch_normalization` function built on them.

The partial (count, mean, M2), Keras's masked finish, and the axis and
mask-shape rules every moments caller checks first.

Everything here accumulates in float64 and never uses `E[x²] − E[x]²`, which
loses every digit on data such as `1e4 + N(0, 1)` in float32. The partial form
`(count, mean, M2)` combines across replicas with Chan et al.'s parallel formula
(`onnxbn.distributed.combine_moments`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from onnxbn.dtypes import to_numpy_dtype

# Keras's global `backend.epsilon()`, added to the count in masked moments.
MASK_EPSILON = 1e-7


def normalize_axis(axis: int, ndim: int, layer_name: str = "batch_normalization") -> int:
    """`axis` in `[0, ndim)`, or a `ValueError` naming both."""
    if not -ndim <= axis < ndim:
        raise ValueError(
            f"Invalid axis {axis} for layer {layer_name!r}: the input has rank {ndim}, "
            f"so axis must be in [{-ndim}, {ndim})."
        )
    return axis % ndim


def check_mask_rank(mask_ndim: int, mask_shape: Any, input_ndim: int, input_shape: Any) -> None:
    """Keras's check: the mask has one dimension less than the inputs."""
    if mask_ndim != input_ndim - 1:
        raise ValueError(
            "The mask provided should be one dimension less than the inputs. Received: "
            f"mask.shape={tuple(mask_shape)}, inputs.shape={tuple(input_shape)}"
        )


def check_mask_broadcast(mask_shape: tuple, input_shape: tuple) -> None:
    """The mask, expanded at its last axis, must broadcast to the input shape."""
    expanded = tuple(mask_shape) + (1,)
    for m, x in zip(expanded, input_shape):
        if m is not None and x is not None and m not in (1, x):
            raise ValueError(
                f"The mask of shape {tuple(mask_shape)}, expanded at its last axis to "
                f"{expanded}, does not broadcast to the input shape {tuple(input_shape)}."
            )


def valid_positions(mask: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Boolean array of `shape`: the mask expanded at its last axis and broadcast (Keras rule)."""
    expanded = np.expand_dims(np.asarray(mask) != 0, axis=-1)
    return np.broadcast_to(expanded, shape)


def partial_moments(
    x: np.ndarray, reduction_axes: tuple[int, ...], valid: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-channel `(count, mean, M2)` in float64, by two passes.

    Args:
        x: input array.
        reduction_axes: every axis but the channel axis.
        valid: optional boolean array of `x.shape`; invalid positions (even NaN
            or Inf there) do not reach the statistics.

    Returns:
        `count`, `mean`, `M2 = Σ (x - mean)²`, each of the channel's shape; a
        channel with no valid position has mean 0 and M2 0.
    """
    with np.errstate(invalid="ignore"):  # Inf data gives NaN statistics, as in Keras
        return _partial_moments(np.asarray(x, dtype=np.float64), reduction_axes, valid)


def _partial_moments(x64, reduction_axes, valid):
    x = x64
    if valid is None:
        size = int(np.prod([x.shape[a] for a in reduction_axes], dtype=np.int64))
        keep = [d for a, d in enumerate(x.shape) if a not in reduction_axes]
        count = np.full(keep, float(size))
        if size == 0:
            return count, np.zeros(keep), np.zeros(keep)
        mean = x64.mean(axis=reduction_axes, keepdims=True)
        m2 = np.square(x64 - mean).sum(axis=reduction_axes)
        return count, mean.reshape(keep), m2
    count = valid.sum(axis=reduction_axes, dtype=np.float64, keepdims=True)
    total = np.where(valid, x64, 0.0).sum(axis=reduction_axes, keepdims=True)
    mean = total / np.maximum(count, 1.0)
    m2 = np.where(valid, np.square(x64 - mean), 0.0).sum(axis=reduction_axes)
    return count.reshape(m2.shape), mean.reshape(m2.shape), m2


def finish_moments(
    count: np.ndarray, mean: np.ndarray, m2: np.ndarray, masked: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Batch mean and population variance from a partial (float64).

    Unmasked: `mean`, `M2 / count`. Masked, exactly Keras's formula: both
    divided by `count + 1e-7`, the variance taken around that shrunken mean,
    so an all-false mask gives mean 0 and variance 0.
    """
    if not masked:
        safe = np.where(count > 0, count, 1.0)
        return mean, m2 / safe
    denominator = count + MASK_EPSILON
    keras_mean = mean * count / denominator
    # Σ (x - m')² = M2 + n (mean - m')², around Keras's shrunken mean m'.
    variance = (m2 + count * np.square(mean - keras_mean)) / denominator
    return keras_mean, variance


def batch_moments(
    x: np.ndarray,
    axis: int,
    mask: np.ndarray | None = None,
    reduce_partial: Callable[[tuple], tuple] | None = None,
) -> tuple[np.ndarray, np.ndarray, bool]:
    """Per-channel batch mean and population variance (float64), as BatchNormalization uses them.

    Args:
        x: input array.
        axis: the channel axis, in `[0, x.ndim)`.
        mask: optional mask of rank `x.ndim - 1`; non-zero = valid (Keras's
            masked moments, see `finish_moments`).
        reduce_partial: optional function mapping this batch's per-channel
            `(count, mean, M2)` to the global one (synchronized layers).

    Returns:
        `(mean, variance, has_statistics)`; `has_statistics` is False for an
        empty unmasked (global) batch, whose moments are meaningless and must
        not update any state.
    """
    reduction_axes = tuple(a for a in range(x.ndim) if a != axis)
    valid = None if mask is None else valid_positions(mask, x.shape)
    count, mean, m2 = partial_moments(x, reduction_axes, valid)
    if reduce_partial is not None:
        count, mean, m2 = reduce_partial((count, mean, m2))
    batch_mean, batch_var = finish_moments(count, mean, m2, masked=valid is not None)
    return batch_mean, batch_var, bool(valid is not None or np.all(count > 0))


def batch_normalization(
    x: np.ndarray,
    *,
    axis: int,
    moving_mean: np.ndarray,
    moving_variance: np.ndarray,
    gamma: np.ndarray | None,
    beta: np.ndarray | None,
    momentum: float,
    epsilon: float,
    training: bool,
    mask: np.ndarray | None = None,
    compute_dtype: Any = "float32",
    reduce_partial: Callable[[tuple], tuple] | None = None,
    saved: dict | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The layer's mathematics, with no state: `(y, new_moving_mean, new_moving_variance)`.

    Training uses the batch mean and population variance (masked positions
    excluded, Keras's `count + 1e-7` rule) and returns the updated moving
    statistics `moving * momentum + batch * (1 - momentum)`; inference uses the
    moving statistics and returns them unchanged. Everything is computed in
    float64 and cast to `compute_dtype` at the end.

    Args:
        x: input array.
        axis: channel axis (negative allowed).
        moving_mean, moving_variance: per-channel moving statistics.
        gamma, beta: per-channel scale and offset, or None when disabled.
        momentum, epsilon: Keras hyper-parameters.
        training: batch statistics (True) or moving statistics (False).
        mask: optional mask of rank `x.ndim - 1`; non-zero = valid.
        compute_dtype: dtype of `y` and of the returned statistics.
        reduce_partial: optional function mapping this batch's per-channel
            `(count, mean, M2)` to the global one (synchronized layers).
        saved: optional dict that receives the float64 `mean` and `variance`
            `y` was normalized with (what the backward needs).

    Returns:
        `y` of `x.shape`, and the new moving mean and variance (unchanged in
        inference, and for an empty unmasked batch, which holds no statistics).
    """
    ndim = x.ndim
    axis = normalize_axis(axis, ndim)
    out_dtype = to_numpy_dtype(compute_dtype)
    mean64 = np.asarray(moving_mean, dtype=np.float64)
    var64 = np.asarray(moving_variance, dtype=np.float64)
    new_mean, new_var = mean64, var64
    if training:
        batch_mean, batch_var, has_statistics = batch_moments(x, axis, mask, reduce_partial)
        if has_statistics:
            new_mean = mean64 * momentum + batch_mean * (1.0 - momentum)
            new_var = var64 * momentum + batch_var * (1.0 - momentum)
        mean64, var64 = batch_mean, batch_var
    if saved is not None:
        saved.update(mean=mean64, variance=var64)
    shape = [1] * ndim
    shape[axis] = x.shape[axis]
    inv = 1.0 / np.sqrt(var64 + epsilon)
    if gamma is not None:
        inv = inv * np.asarray(gamma, dtype=np.float64)
    offset = np.zeros_like(inv) if beta is None else np.asarray(beta, dtype=np.float64)
    with np.errstate(invalid="ignore"):  # Inf - Inf in a poisoned channel is NaN, as in Keras
        y = (np.asarray(x, dtype=np.float64) - mean64.reshape(shape)) * inv.reshape(shape)
        y += offset.reshape(shape)
    return y.astype(out_dtype), new_mean.astype(out_dtype), new_var.astype(out_dtype)
