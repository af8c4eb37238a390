"""Keras 3 weight constraints in NumPy: same names, config keys and math.

A constraint projects a weight array after each optimizer step. The norms
are computed in float64 with Keras's fuzz factor `epsilon = 1e-7`
(`keras.config.epsilon()`); the result has the weight's floating dtype
(integer and bool weights give float32, as Keras's `ops.sqrt` does).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from onnxbn.registry import Registry
from onnxbn.serialization import (
    deserialize_object,
    get_object,
    require_int,
    require_number,
    serialize_object,
    short_repr,
    to_snake_case,
)

CONSTRAINTS: Registry[str, type] = Registry("constraint")
MODULE = "keras.constraints"
MODULES = frozenset({MODULE, "keras.src.constraints", "keras.src.constraints.constraints"})
EPSILON = 1e-7


def _check_axis(axis: Any) -> int | list[int]:
    """An int or a list of distinct ints (a tuple is stored as a list)."""
    if isinstance(axis, (list, tuple)):
        axes = [require_int(a, "axis") for a in axis]
        if len(set(axes)) != len(axes):
            raise ValueError(f"Expected distinct axes. Received: axis={axes}.")
        return axes
    if isinstance(axis, (bool, np.bool_)) or not isinstance(axis, (int, np.integer)):
        raise TypeError(
            "Expected `axis` to be an int or a list of ints. Received: "
            f"axis={short_repr(axis)} of type {type(axis).__name__}."
        )
    return int(axis)


def _copy(axis: int | list[int]) -> int | list[int]:
    # A config must not alias the constraint's own list.
    return list(axis) if isinstance(axis, list) else axis


def _as_array(w: Any) -> np.ndarray:
    try:
        array = np.asarray(w)
    except (TypeError, ValueError):
        array = None
    if array is None or (array.dtype.kind not in "biuf" and array.dtype.name != "bfloat16"):
        raise TypeError(
            "Expected a numeric weight array. Received: "
            f"{short_repr(w)} of type {type(w).__name__}."
        )
    return array


def _norms(w: np.ndarray, axis: int | list[int]) -> np.ndarray:
    """L2 norms along `axis` (kept), in float64."""
    axes = axis if isinstance(axis, list) else [axis]
    for a in axes:
        if not -w.ndim <= a < w.ndim:
            raise ValueError(
                f"Constraint axis {axis} is out of range for a weight of shape "
                f"{w.shape} (rank {w.ndim})."
            )
    w64 = w.astype(np.float64)
    return np.sqrt(np.sum(np.square(w64), axis=tuple(axes), keepdims=True))


def _out_dtype(w: np.ndarray) -> np.dtype:
    return w.dtype if w.dtype.kind == "f" or w.dtype.name == "bfloat16" else np.float32


class Constraint:
    """Constraint base class: `__call__(w)` returns the projected weight.

    The base class leaves the weight unchanged.
    """

    def __call__(self, w: np.ndarray) -> np.ndarray:
        return w

    def get_config(self) -> dict:
        """Returns the constructor arguments as a JSON-simple dict."""
        return {}

    @classmethod
    def from_config(cls, config: dict) -> Constraint:
        """Instantiates the constraint from the output of `get_config()`."""
        return cls(**config)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"


@CONSTRAINTS.register("MaxNorm")
class MaxNorm(Constraint):
    """Rescales each slice along `axis` so its L2 norm is at most `max_value`.

    `w * clip(norms, 0, max_value) / (epsilon + norms)`.

    Args:
        max_value: The maximum norm (non-negative).
        axis: Int or list of ints: the axes the norms reduce over (0 for a
            `Dense` kernel `(input_dim, units)`; `[0, 1, 2]` for a
            channels-last `Conv2D` kernel).
    """

    def __init__(self, max_value: float = 2, axis: int | list[int] = 0) -> None:
        self.max_value = require_number(max_value, "max_value", minimum=0)
        self.axis = _check_axis(axis)

    def __call__(self, w: np.ndarray) -> np.ndarray:
        w = _as_array(w)
        norms = _norms(w, self.axis)
        desired = np.clip(norms, 0, self.max_value)
        result = w.astype(np.float64) * (desired / (EPSILON + norms))
        return result.astype(_out_dtype(w))

    def get_config(self) -> dict:
        return {"max_value": self.max_value, "axis": _copy(self.axis)}


@CONSTRAINTS.register("NonNeg")
class NonNeg(Constraint):
    """Constrains the weights to be non-negative: `maximum(w, 0)`."""

    def __call__(self, w: np.ndarray) -> np.ndarray:
        w = _as_array(w)
        return np.maximum(w, np.zeros((), dtype=w.dtype))


@CONSTRAINTS.register("UnitNorm")
class UnitNorm(Constraint):
    """Rescales each slice along `axis` to unit L2 norm: `w / (epsilon + norms)`.

    Args:
        axis: Int or list of ints: the axes the norms reduce over.
    """

    def __init__(self, axis: int | list[int] = 0) -> None:
        self.axis = _check_axis(axis)

    def __call__(self, w: np.ndarray) -> np.ndarray:
        w = _as_array(w)
        norms = _norms(w, self.axis)
        return (w.astype(np.float64) / (EPSILON + norms)).astype(_out_dtype(w))

    def get_config(self) -> dict:
        return {"axis": _copy(self.axis)}


@CONSTRAINTS.register("MinMaxNorm")
class MinMaxNorm(Constraint):
    """Keeps the L2 norm of each slice along `axis` within bounds.

    `desired = rate * clip(norms, min_value, max_value) + (1 - rate) * norms`,
    then `w * desired / (epsilon + norms)`.

    Args:
        min_value: The minimum norm (non-negative).
        max_value: The maximum norm (at least `min_value`).
        rate: How strictly to enforce the bounds, in `[0, 1]` (1 is strict).
        axis: Int or list of ints: the axes the norms reduce over.
    """

    def __init__(
        self,
        min_value: float = 0.0,
        max_value: float = 1.0,
        rate: float = 1.0,
        axis: int | list[int] = 0,
    ) -> None:
        self.min_value = require_number(min_value, "min_value", minimum=0)
        self.max_value = require_number(max_value, "max_value", minimum=0)
        if self.min_value > self.max_value:
            raise ValueError(
                "Expected `min_value <= max_value`. Received: "
                f"min_value={self.min_value}, max_value={self.max_value}."
            )
        self.rate = require_number(rate, "rate", minimum=0)
        if self.rate > 1:
            raise ValueError(f"Expected `rate` in [0, 1]. Received: rate={self.rate}.")
        self.axis = _check_axis(axis)

    def __call__(self, w: np.ndarray) -> np.ndarray:
        w = _as_array(w)
        norms = _norms(w, self.axis)
        desired = (
            self.rate * np.clip(norms, self.min_value, self.max_value) + (1 - self.rate) * norms
        )
        result = w.astype(np.float64) * (desired / (EPSILON + norms))
        return result.astype(_out_dtype(w))

    def get_config(self) -> dict:
        return {
            "min_value": self.min_value,
            "max_value": self.max_value,
            "rate": self.rate,
            "axis": _copy(self.axis),
        }


# Keras's ALL_OBJECTS_DICT: class names and their snake_case forms
# ("max_norm", "non_neg", "unit_norm", "min_max_norm").
ALIASES: dict[str, str] = {to_snake_case(name): name for name in CONSTRAINTS}


def serialize(constraint: Constraint | None) -> dict | None:
    """Returns the Keras envelope (module `"keras.constraints"`), or `None`."""
    if constraint is None:
        return None
    return serialize_object(constraint, MODULE)


def deserialize(
    config: dict | str | None, custom_objects: Mapping[str, Any] | None = None
) -> Constraint | Callable | None:
    """Builds a constraint from an envelope, a `class_name` dict or a name.

    Raises:
        TypeError: for an identifier that is neither dict, str nor None.
        ValueError: for an unknown module, class name or config key, or a
            bad config value.
    """
    return deserialize_object(
        config,
        CONSTRAINTS,
        kind="constraint",
        modules=MODULES,
        aliases=ALIASES,
        custom_objects=custom_objects,
    )


def get(identifier: Any) -> Constraint | Callable | None:
    """Returns a constraint for `identifier`.

    Args:
        identifier: `None`; a name (`"non_neg"`, `"max_norm"`, `"MaxNorm"`,
            built with default arguments); an envelope or `class_name` dict;
            a `Constraint` instance or class; or any callable `w -> w`,
            returned as is.

    Returns:
        The constraint, or `None` for `None`.

    Raises:
        TypeError: for an identifier of another type.
        ValueError: see `deserialize`.
    """
    return get_object(identifier, Constraint, deserialize, "constraint")
