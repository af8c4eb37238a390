"""Batch renormalization (Keras 3.14+ `BatchNormalization(renorm=True)`): what it means.

The layer lives in `layers/batch_normalization.py`; this module holds the
arithmetic: the clipping rule, the `(r, d)` correction, the extra weights'
initializer and the pure NumPy function the lowering mirrors.

Training, with `mean`, `variance` the (masked, possibly global) batch moments:

    s = sqrt(variance + epsilon)
    r = clip(s / max(renorm_stddev, sqrt(epsilon)), rmin, rmax)
    d = clip((mean - renorm_mean) / max(renorm_stddev, sqrt(epsilon)), -dmax, dmax)
    y = (x - mean) / s * (r * gamma) + (d * gamma + beta)

then `renorm_mean`, `renorm_stddev` move toward `mean`, `s` with
`renorm_momentum`; `moving_mean`, `moving_stddev` toward `mean`, `s` with
`momentum`; `moving_variance = relu(moving_stddev² - epsilon)`. Inference is
plain BatchNormalization with `moving_mean` and `moving_variance`.

Reference:
    - [Ioffe, 2017](https://arxiv.org/abs/1702.03275), Batch Renormalization.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from numbers import Real
from typing import Any, NamedTuple

import numpy as np

from onnxbn.dtypes import to_numpy_dtype
from onnxbn.layers.moments import batch_moments, normalize_axis

# Keras's accepted `renorm_clipping` keys, in the order its error message lists them.
CLIPPING_KEYS = ("rmax", "rmin", "dmax")
# Non-trainable weights a renorm layer adds after `moving_variance`, in Keras's order.
RENORM_WEIGHTS = ("moving_stddev", "renorm_mean", "renorm_stddev")


class RenormResult(NamedTuple):
    """What one call of `batch_renormalization` produces (every state in Keras's weight order)."""

    y: np.ndarray
    moving_mean: np.ndarray
    moving_variance: np.ndarray
    moving_stddev: np.ndarray
    renorm_mean: np.ndarray
    renorm_stddev: np.ndarray


def check_renorm_clipping(renorm_clipping: Any, *, renorm: bool = True) -> dict | None:
    """Validates a `renorm_clipping` argument (Keras's rules) and returns what the layer stores.

    Args:
        renorm_clipping: None (no clipping) or a mapping with any of the keys
            `"rmax"`, `"rmin"`, `"dmax"`, each a real number or None (absent).
        renorm: whether the layer uses it. Keras checks the keys and values
            only with `renorm=True` and otherwise keeps the value as given.

    Returns:
        A new dict with the same keys and values, NumPy scalars turned into
        Python numbers; with `renorm=True`, None gives `{}` (Keras stores
        `renorm_clipping or {}`, so its config says `{}`).

    Raises:
        TypeError: neither None nor a mapping, or a value that is not a real
            number.
        ValueError: an unknown key, a NaN value, `rmax < rmin` or `dmax < 0`.
    """
    if renorm_clipping is not None and not isinstance(renorm_clipping, Mapping):
        raise TypeError(
            f"renorm_clipping must be None or a dict with keys {list(CLIPPING_KEYS)}, "
            f"received {renorm_clipping!r} of type {type(renorm_clipping).__name__}."
        )
    if not renorm:
        return None if renorm_clipping is None else dict(renorm_clipping)
    if renorm_clipping is None:
        return {}
    unknown = [key for key in renorm_clipping if key not in CLIPPING_KEYS]
    if unknown:
        raise ValueError(
            "Received invalid keys for `renorm_clipping` argument: "
            f"{dict(renorm_clipping)}. Supported values: {list(CLIPPING_KEYS)}."
        )
    clipping = {}
    for key, value in renorm_clipping.items():
        if value is not None:
            if isinstance(value, (bool, np.bool_)) or not isinstance(value, Real):
                raise TypeError(
                    f"renorm_clipping[{key!r}] must be a real number or None, "
                    f"received {value!r} of type {type(value).__name__}."
                )
            value = value.item() if isinstance(value, np.generic) else value
            if math.isnan(value):
                raise ValueError(f"renorm_clipping[{key!r}] must not be NaN, received {value!r}.")
        clipping[key] = value
    rmax, rmin, dmax = (clipping.get(key) for key in CLIPPING_KEYS)
    if rmax is not None and rmin is not None and rmax < rmin:
        raise ValueError(
            "rmax should be greater than rmin in the `renorm_clipping` argument. "
            f"Received: rmax={rmax}, rmin={rmin}."
        )
    if dmax is not None and dmax < 0:
        raise ValueError(
            f"dmax should be non-negative in the `renorm_clipping` argument. Received: dmax={dmax}."
        )
    return clipping


def check_renorm_momentum(renorm_momentum: Any) -> float:
    """A finite real number in [0, 1], returned as given (Keras keeps an int an int).

    Raises:
        TypeError: not a real number.
        ValueError: NaN, infinite, or outside [0, 1].
    """
    if isinstance(renorm_momentum, (bool, np.bool_)) or not isinstance(renorm_momentum, Real):
        raise TypeError(f"renorm_momentum must be a real number, received {renorm_momentum!r}.")
    value = renorm_momentum.item() if isinstance(renorm_momentum, np.generic) else renorm_momentum
    if not 0.0 <= value <= 1.0:  # NaN fails this too
        raise ValueError(f"renorm_momentum must be in [0, 1], received {renorm_momentum!r}.")
    return value


def renorm_initializers(moving_mean_initializer: Any, moving_variance_initializer: Any) -> dict:
    """Initializers of the renorm weights, by name, in Keras's order.

    Keras tracks the inference stddev (and derives `moving_variance` from it):
    both stddevs start at `sqrt` of the variance initializer, `renorm_mean` at
    a clone of the mean initializer.
    """
    clone = getattr(moving_mean_initializer, "clone", None)
    return {
        "moving_stddev": stddev_initializer(moving_variance_initializer),
        "renorm_mean": clone() if callable(clone) else moving_mean_initializer,
        "renorm_stddev": stddev_initializer(moving_variance_initializer),
    }


def stddev_initializer(variance_initializer: Any) -> Callable[..., np.ndarray]:
    """Keras's initializer of `moving_stddev` and `renorm_stddev`.

    Each call takes the square root of a fresh clone of `variance_initializer`
    (Keras clones it so a seeded random initializer is not reused); the root
    is taken in float64 and rounded once to `dtype`.
    """

    def initialize(shape: Sequence[int], dtype: Any = "float32") -> np.ndarray:
        clone = getattr(variance_initializer, "clone", None)
        source = clone() if callable(clone) else variance_initializer
        values = np.asarray(source(tuple(shape), dtype=dtype))
        with np.errstate(invalid="ignore"):  # a negative variance gives NaN, as in Keras
            return np.sqrt(values.astype(np.float64)).astype(to_numpy_dtype(dtype))

    return initialize


def renorm_correction(
    mean: np.ndarray,
    variance: np.ndarray,
    *,
    renorm_mean: np.ndarray,
    renorm_stddev: np.ndarray,
    epsilon: float,
    renorm_clipping: Mapping[str, float | None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Keras's `(r, d)` correction (float64), clipped only by the keys present.

    Args:
        mean, variance: the batch moments.
        renorm_mean, renorm_stddev: the renorm statistics before this batch.
        epsilon: the layer's epsilon.
        renorm_clipping: `rmin`, `rmax`, `dmax` (absent or None: no clipping).

    Returns:
        `r = s / ŝ` and `d = (mean - renorm_mean) / ŝ` with `s = sqrt(variance
        + epsilon)` and `ŝ = max(renorm_stddev, sqrt(epsilon))`; `r` is
        raised to `rmin`, then lowered to `rmax`, `d` clipped to `[-dmax,
        dmax]`. NaN propagates. For gradients both are constants (Keras's
        `stop_gradient`).
    """
    clipping = renorm_clipping or {}
    with np.errstate(invalid="ignore", divide="ignore"):  # epsilon = 0 may give 0/0, as Keras
        stddev = np.sqrt(np.asarray(variance, np.float64) + epsilon)
        floor = np.maximum(np.asarray(renorm_stddev, np.float64), math.sqrt(epsilon))
        r = stddev / floor
        d = (np.asarray(mean, np.float64) - np.asarray(renorm_mean, np.float64)) / floor
    rmin, rmax, dmax = (clipping.get(key) for key in ("rmin", "rmax", "dmax"))
    if rmin is not None:
        r = np.maximum(r, float(rmin))
    if rmax is not None:
        r = np.minimum(r, float(rmax))
    if dmax is not None:
        d = np.clip(d, -float(dmax), float(dmax))
    return r, d


def batch_renormalization(
    x: np.ndarray,
    *,
    axis: int,
    moving_mean: np.ndarray,
    moving_variance: np.ndarray,
    moving_stddev: np.ndarray,
    renorm_mean: np.ndarray,
    renorm_stddev: np.ndarray,
    gamma: np.ndarray | None,
    beta: np.ndarray | None,
    momentum: float,
    renorm_momentum: float,
    epsilon: float,
    renorm_clipping: Mapping[str, float | None] | None = None,
    training: bool,
    mask: np.ndarray | None = None,
    compute_dtype: Any = "float32",
    reduce_partial: Callable[[tuple], tuple] | None = None,
    saved: dict | None = None,
) -> RenormResult:
    """Batch renormalization's mathematics, with no state (the semantic reference).

    Everything is computed in float64 from the given arrays and rounded once
    to `compute_dtype`, except `moving_variance`, which is derived from the
    `moving_stddev` already rounded to `compute_dtype` (Keras derives it from
    the value it stores), then rounded.

    Args:
        x: input array.
        axis: channel axis (negative allowed).
        moving_mean, moving_variance, moving_stddev, renorm_mean,
            renorm_stddev: per-channel states before this call.
        gamma, beta: per-channel scale and offset, or None when disabled.
        momentum: momentum of `moving_mean` and `moving_stddev`.
        renorm_momentum: momentum of `renorm_mean` and `renorm_stddev`.
        epsilon: added to the variance.
        renorm_clipping: `rmin` / `rmax` / `dmax` (see `renorm_correction`).
        training: renormalized batch statistics and state updates (True), or
            plain inference with `moving_mean` / `moving_variance` (False).
        mask: optional mask of rank `x.ndim - 1`; non-zero = valid.
        compute_dtype: dtype of `y` and of the returned states.
        reduce_partial: optional function mapping this batch's per-channel
            `(count, mean, M2)` to the global one (synchronized layers): the
            global moments then feed `s`, `r`, `d` and every update.
        saved: optional dict that receives the float64 `mean` and `variance`
            `y` was normalized with and, in training, `r` and `d` (what the
            backward needs).

    Returns:
        A `RenormResult`: `y` of `x.shape`, then the five states in Keras's
        weight order (unchanged in inference, and for an empty unmasked
        batch, which holds no statistics).
    """
    axis = normalize_axis(axis, x.ndim)
    out = to_numpy_dtype(compute_dtype)
    states = [
        np.asarray(v, np.float64)
        for v in (moving_mean, moving_variance, moving_stddev, renorm_mean, renorm_stddev)
    ]
    shape = [1] * x.ndim
    shape[axis] = x.shape[axis]
    channels = x.shape[axis]
    g = np.ones(channels) if gamma is None else np.asarray(gamma, np.float64)
    b = np.zeros(channels) if beta is None else np.asarray(beta, np.float64)
    if training:
        mean, variance, has_statistics = batch_moments(x, axis, mask, reduce_partial)
        r, d = renorm_correction(
            mean,
            variance,
            renorm_mean=states[3],
            renorm_stddev=states[4],
            epsilon=epsilon,
            renorm_clipping=renorm_clipping,
        )
        scale, offset = r * g, d * g + b
        if saved is not None:
            saved.update(r=r, d=d)
        if has_statistics:
            states = _updated_states(
                states, mean, variance, momentum, renorm_momentum, epsilon, out
            )
    else:
        mean, variance = states[0], states[1]
        scale, offset = g, b
    if saved is not None:
        saved.update(mean=mean, variance=variance)
    with np.errstate(invalid="ignore", divide="ignore"):  # poisoned channels give NaN, as Keras
        inv = scale / np.sqrt(variance + epsilon)
        y = (np.asarray(x, np.float64) - mean.reshape(shape)) * inv.reshape(shape)
        y += offset.reshape(shape)
    return RenormResult(y.astype(out), *(s.astype(out) for s in states))


def _updated_states(states, mean, variance, momentum, renorm_momentum, epsilon, out):
    moving_mean, _, moving_stddev, renorm_mean, renorm_stddev = states
    stddev = np.sqrt(variance + epsilon)
    new_stddev = moving_stddev * momentum + stddev * (1.0 - momentum)
    # relu: the square of a rounded stddev can fall a hair below epsilon.
    rounded = new_stddev.astype(out).astype(np.float64)
    return [
        moving_mean * momentum + mean * (1.0 - momentum),
        np.maximum(np.square(rounded) - epsilon, 0.0),
        new_stddev,
        renorm_mean * renorm_momentum + mean * (1.0 - renorm_momentum),
        renorm_stddev * renorm_momentum + stddev * (1.0 - renorm_momentum),
    ]
