"""Keras 3's seeded random initializers in NumPy.

Random initializers follow Keras's seeding contract: an instance seeded with
an int, or unseeded (`seed=None` draws a fresh seed once, at construction),
returns the same values on every call; two unseeded instances differ. The
bit streams differ from Keras's backends (NumPy's `default_rng` here), the
distributions do not. Import them from `onnxbn.initializers`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from onnxbn.initializer import INITIALIZERS, Initializer, _numpy_dtype, standardize_shape
from onnxbn.serialization import require_choice, require_int, require_number, short_repr

# Keras's truncated normal redraws beyond 2 stddev; this is the stddev of a
# unit normal truncated to [-2, 2], used to keep VarianceScaling's variance.
_TRUNCATED_STDDEV = 0.87962566103423978


def compute_fans(
    shape: Sequence[int],
    input_axes: Sequence[int] | None = None,
    output_axes: Sequence[int] | None = None,
) -> tuple[int, int]:
    """Returns `(fan_in, fan_out)` for a weight shape, as Keras computes them.

    With both `input_axes` and `output_axes`, the fans are the products of
    those dimensions; otherwise rank 0 gives (1, 1), rank 1 `(n, n)`, rank 2
    `(rows, cols)`, and higher ranks (conv kernels, `(..., in, out)`)
    multiply by the receptive field size.

    Raises:
        ValueError: if an axis is out of range for `shape`.
    """
    shape = tuple(shape)
    if input_axes is not None and output_axes is not None:
        for axis in (*input_axes, *output_axes):
            if not -len(shape) <= axis < len(shape):
                raise ValueError(
                    f"Axis {axis} is out of range for shape {shape} (input_axes="
                    f"{list(input_axes)}, output_axes={list(output_axes)})."
                )
        fan_in = math.prod(shape[a] for a in input_axes)
        fan_out = math.prod(shape[a] for a in output_axes)
        return int(fan_in), int(fan_out)
    if len(shape) < 1:
        return 1, 1
    if len(shape) == 1:
        return shape[0], shape[0]
    receptive_field = math.prod(shape[:-2])
    return shape[-2] * receptive_field, shape[-1] * receptive_field


def _check_seed(seed: Any) -> int | None:
    if seed is None or (
        isinstance(seed, (int, np.integer)) and not isinstance(seed, (bool, np.bool_))
    ):
        return None if seed is None else int(seed)
    raise TypeError(
        "Expected `seed` to be an int or None (a SeedGenerator is not supported). "
        f"Received: seed={short_repr(seed)} of type {type(seed).__name__}."
    )


class RandomInitializer(Initializer):
    """Base of the seeded initializers.

    Args:
        seed: An int makes the values reproducible across calls and instances;
            `None` draws a fresh seed once, so this instance still returns the
            same values on every call (Keras's contract).
    """

    def __init__(self, seed: int | None = None) -> None:
        self.seed = _check_seed(seed)
        key = np.random.SeedSequence().entropy if self.seed is None else self.seed
        # default_rng takes non-negative ints only; Keras accepts any int seed.
        self._rng_key = int(key) % 2**128

    def _rng(self) -> np.random.Generator:
        return np.random.default_rng(self._rng_key)

    def _finish(self, values: np.ndarray, dtype: Any) -> np.ndarray:
        return np.asarray(values, dtype=np.float64).astype(_numpy_dtype(dtype))

    def get_config(self) -> dict:
        return {"seed": self.seed}


def _truncated_normal(rng: np.random.Generator, shape: tuple, mean: float, stddev: float):
    values = np.array(rng.standard_normal(size=shape), dtype=np.float64)
    outside = np.abs(values) > 2.0
    while outside.any():  # redraw, as Keras does; each pass keeps ~95%
        values[outside] = rng.standard_normal(size=int(outside.sum()))
        outside = np.abs(values) > 2.0
    return mean + stddev * values


def _mean_stddev(mean: Any, stddev: Any) -> tuple[float, float]:
    return require_number(mean, "mean"), require_number(stddev, "stddev", minimum=0)


@INITIALIZERS.register("RandomNormal")
class RandomNormal(RandomInitializer):
    """Draws samples from a normal distribution `N(mean, stddev**2)`.

    Args:
        mean: Mean of the values.
        stddev: Standard deviation of the values (non-negative).
        seed: An int, or `None` (see `RandomInitializer`).
    """

    def __init__(self, mean: float = 0.0, stddev: float = 0.05, seed: int | None = None):
        self.mean, self.stddev = _mean_stddev(mean, stddev)
        super().__init__(seed=seed)

    def __call__(self, shape: Sequence[int], dtype: Any = "float32") -> np.ndarray:
        shape, _ = standardize_shape(shape), _numpy_dtype(dtype)
        return self._finish(self._rng().normal(self.mean, self.stddev, shape), dtype)

    def get_config(self) -> dict:
        return {**super().get_config(), "mean": self.mean, "stddev": self.stddev}


@INITIALIZERS.register("TruncatedNormal")
class TruncatedNormal(RandomInitializer):
    """Normal samples, with values beyond two stddev from the mean redrawn.

    Args:
        mean: Mean of the untruncated distribution.
        stddev: Standard deviation of the untruncated distribution.
        seed: An int, or `None` (see `RandomInitializer`).
    """

    def __init__(self, mean: float = 0.0, stddev: float = 0.05, seed: int | None = None):
        self.mean, self.stddev = _mean_stddev(mean, stddev)
        super().__init__(seed=seed)

    def __call__(self, shape: Sequence[int], dtype: Any = "float32") -> np.ndarray:
        shape, _ = standardize_shape(shape), _numpy_dtype(dtype)
        values = _truncated_normal(self._rng(), shape, self.mean, self.stddev)
        return self._finish(values, dtype)

    def get_config(self) -> dict:
        return {**super().get_config(), "mean": self.mean, "stddev": self.stddev}


@INITIALIZERS.register("RandomUniform")
class RandomUniform(RandomInitializer):
    """Draws samples from a uniform distribution on `[minval, maxval)`.

    Args:
        minval: Lower bound (inclusive).
        maxval: Upper bound (exclusive), at least `minval`.
        seed: An int, or `None` (see `RandomInitializer`).
    """

    def __init__(self, minval: float = -0.05, maxval: float = 0.05, seed: int | None = None):
        self.minval = require_number(minval, "minval")
        self.maxval = require_number(maxval, "maxval")
        # NumPy draws `minval + (maxval - minval) * u`: the width must be finite.
        if self.minval > self.maxval or not math.isfinite(self.maxval - self.minval):
            raise ValueError(
                "Expected `minval <= maxval` with a finite difference. Received: "
                f"minval={self.minval}, maxval={self.maxval}."
            )
        super().__init__(seed=seed)

    def __call__(self, shape: Sequence[int], dtype: Any = "float32") -> np.ndarray:
        shape, _ = standardize_shape(shape), _numpy_dtype(dtype)
        return self._finish(self._rng().uniform(self.minval, self.maxval, shape), dtype)

    def get_config(self) -> dict:
        return {**super().get_config(), "minval": self.minval, "maxval": self.maxval}


def _copy(axes: list[int] | None) -> list[int] | None:
    # A config must not alias the initializer's own list.
    return None if axes is None else list(axes)


def _check_axes(axes: Any, name: str) -> list[int] | None:
    if axes is None:
        return None
    if not isinstance(axes, (list, tuple)):
        raise TypeError(
            f"Expected `{name}` to be a list of ints or None. Received: "
            f"{name}={short_repr(axes)} of type {type(axes).__name__}."
        )
    return [require_int(a, name) for a in axes]


@INITIALIZERS.register("VarianceScaling")
class VarianceScaling(RandomInitializer):
    """Initializer that adapts its scale to the fans of the weight shape.

    With `n` the fan-in, fan-out or their mean (`mode`): `"truncated_normal"`
    draws with stddev `sqrt(scale / n)` after truncation at two stddev,
    `"untruncated_normal"` with stddev `sqrt(scale / n)`, and `"uniform"` on
    `[-limit, limit]` with `limit = sqrt(3 * scale / n)`.

    Args:
        scale: Scaling factor (positive).
        mode: One of `"fan_in"`, `"fan_out"`, `"fan_avg"`.
        distribution: One of `"truncated_normal"` (`"normal"` is an alias),
            `"untruncated_normal"`, `"uniform"` (case-insensitive).
        seed: An int, or `None` (see `RandomInitializer`).
        input_axes: Optional axes whose product is the fan-in.
        output_axes: Optional axes whose product is the fan-out (both must be
            given to take effect, as in Keras).
    """

    _MODES = ("fan_in", "fan_out", "fan_avg")
    _DISTRIBUTIONS = ("truncated_normal", "untruncated_normal", "uniform")

    def __init__(
        self,
        scale: float = 1.0,
        mode: str = "fan_in",
        distribution: str = "truncated_normal",
        seed: int | None = None,
        input_axes: Sequence[int] | None = None,
        output_axes: Sequence[int] | None = None,
    ) -> None:
        scale = require_number(scale, "scale")
        if scale <= 0.0:
            raise ValueError(f"Argument `scale` must be positive float. Received: scale={scale}.")
        self.scale = scale
        self.mode = require_choice(mode, "mode", self._MODES)
        if isinstance(distribution, str):
            distribution = distribution.lower()
            distribution = "truncated_normal" if distribution == "normal" else distribution
        self.distribution = require_choice(distribution, "distribution", self._DISTRIBUTIONS)
        self.input_axes = _check_axes(input_axes, "input_axes")
        self.output_axes = _check_axes(output_axes, "output_axes")
        super().__init__(seed=seed)

    def __call__(self, shape: Sequence[int], dtype: Any = "float32") -> np.ndarray:
        shape, _ = standardize_shape(shape), _numpy_dtype(dtype)
        fan_in, fan_out = compute_fans(shape, self.input_axes, self.output_axes)
        n = {"fan_in": fan_in, "fan_out": fan_out, "fan_avg": (fan_in + fan_out) / 2.0}
        scale = self.scale / max(1.0, n[self.mode])
        if not math.isfinite(3.0 * scale):  # NumPy's samplers overflow
            raise ValueError(
                f"VarianceScaling(scale={self.scale}) is too large for shape "
                f"{shape}: the sampling range overflows float64."
            )
        rng = self._rng()
        if self.distribution == "truncated_normal":
            stddev = math.sqrt(scale) / _TRUNCATED_STDDEV
            values = _truncated_normal(rng, shape, 0.0, stddev)
        elif self.distribution == "untruncated_normal":
            values = rng.normal(0.0, math.sqrt(scale), shape)
        else:
            limit = math.sqrt(3.0 * scale)
            values = rng.uniform(-limit, limit, shape)
        return self._finish(values, dtype)

    def get_config(self) -> dict:
        return {
            **super().get_config(),
            "scale": self.scale,
            "mode": self.mode,
            "distribution": self.distribution,
            "input_axes": _copy(self.input_axes),
            "output_axes": _copy(self.output_axes),
        }


class _VarianceScalingPreset(VarianceScaling):
    """A VarianceScaling with fixed `(scale, mode, distribution)`.

    Args:
        seed: An int, or `None` (see `RandomInitializer`).
        input_axes: Optional axes whose product is the fan-in.
        output_axes: Optional axes whose product is the fan-out.
    """

    _PRESET: tuple[float, str, str]

    def __init__(
        self,
        seed: int | None = None,
        input_axes: Sequence[int] | None = None,
        output_axes: Sequence[int] | None = None,
    ) -> None:
        scale, mode, distribution = self._PRESET
        super().__init__(scale, mode, distribution, seed, input_axes, output_axes)

    def get_config(self) -> dict:
        return {
            "seed": self.seed,
            "input_axes": _copy(self.input_axes),
            "output_axes": _copy(self.output_axes),
        }


@INITIALIZERS.register("GlorotUniform")
class GlorotUniform(_VarianceScalingPreset):
    """Glorot (Xavier) uniform: `limit = sqrt(6 / (fan_in + fan_out))`."""

    _PRESET = (1.0, "fan_avg", "uniform")


@INITIALIZERS.register("GlorotNormal")
class GlorotNormal(_VarianceScalingPreset):
    """Glorot (Xavier) normal: truncated, `stddev = sqrt(2 / (fan_in + fan_out))`."""

    _PRESET = (1.0, "fan_avg", "truncated_normal")


@INITIALIZERS.register("HeUniform")
class HeUniform(_VarianceScalingPreset):
    """He uniform: `limit = sqrt(6 / fan_in)`."""

    _PRESET = (2.0, "fan_in", "uniform")


@INITIALIZERS.register("HeNormal")
class HeNormal(_VarianceScalingPreset):
    """He normal: truncated, `stddev = sqrt(2 / fan_in)`."""

    _PRESET = (2.0, "fan_in", "truncated_normal")


@INITIALIZERS.register("LecunUniform")
class LecunUniform(_VarianceScalingPreset):
    """Lecun uniform: `limit = sqrt(3 / fan_in)`."""

    _PRESET = (1.0, "fan_in", "uniform")


@INITIALIZERS.register("LecunNormal")
class LecunNormal(_VarianceScalingPreset):
    """Lecun normal: truncated, `stddev = sqrt(1 / fan_in)`."""

    _PRESET = (1.0, "fan_in", "truncated_normal")
