"""Keras 3 initializers in NumPy: same names, config keys and distributions.

This module is the public one: the base class and registry
(`onnxbn.initializer`), the constant initializers, the seeded random ones
(`onnxbn.random_initializers`, imported here so that they are registered) and
`serialize`/`deserialize`/`get`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from onnxbn.initializer import INITIALIZERS, Initializer, _numpy_dtype, standardize_shape
from onnxbn.random_initializers import (
    GlorotNormal,
    GlorotUniform,
    HeNormal,
    HeUniform,
    LecunNormal,
    LecunUniform,
    RandomInitializer,
    RandomNormal,
    RandomUniform,
    TruncatedNormal,
    VarianceScaling,
    compute_fans,
)
from onnxbn.serialization import (
    deserialize_object,
    get_object,
    require_number,
    serialize_object,
    to_snake_case,
)

__all__ = [
    "ALIASES",
    "INITIALIZERS",
    "MODULE",
    "MODULES",
    "Constant",
    "GlorotNormal",
    "GlorotUniform",
    "HeNormal",
    "HeUniform",
    "Initializer",
    "LecunNormal",
    "LecunUniform",
    "Ones",
    "RandomInitializer",
    "RandomNormal",
    "RandomUniform",
    "TruncatedNormal",
    "VarianceScaling",
    "Zeros",
    "compute_fans",
    "deserialize",
    "get",
    "serialize",
    "standardize_shape",
]

MODULE = "keras.initializers"
# Keras writes the public module; the `keras.src` paths appear in configs
# written by some Keras releases and tools.
MODULES = frozenset(
    {
        MODULE,
        "keras.src.initializers",
        "keras.src.initializers.constant_initializers",
        "keras.src.initializers.random_initializers",
    }
)


@INITIALIZERS.register("Zeros")
class Zeros(Initializer):
    """Initializer that generates arrays of zeros (any numeric or bool dtype)."""

    def __call__(self, shape: Sequence[int], dtype: Any = "float32") -> np.ndarray:
        return np.zeros(standardize_shape(shape), _numpy_dtype(dtype, floating=False))


@INITIALIZERS.register("Ones")
class Ones(Initializer):
    """Initializer that generates arrays of ones (any numeric or bool dtype)."""

    def __call__(self, shape: Sequence[int], dtype: Any = "float32") -> np.ndarray:
        return np.ones(standardize_shape(shape), _numpy_dtype(dtype, floating=False))


@INITIALIZERS.register("Constant")
class Constant(Initializer):
    """Initializer that generates arrays filled with one scalar.

    Args:
        value: A Python scalar, cast to the requested dtype.
    """

    def __init__(self, value: float = 0.0) -> None:
        self.value = require_number(value, "value", finite=False)

    def __call__(self, shape: Sequence[int], dtype: Any = "float32") -> np.ndarray:
        dtype = _numpy_dtype(dtype, floating=False)
        return np.full(standardize_shape(shape), self.value).astype(dtype)

    def get_config(self) -> dict:
        return {"value": self.value}


# Keras's ALL_OBJECTS_DICT: snake_case names plus a few historical aliases.
ALIASES: dict[str, str] = {to_snake_case(name): name for name in INITIALIZERS}
ALIASES.update(
    {
        "normal": "RandomNormal",
        "uniform": "RandomUniform",
        "one": "Ones",
        "zero": "Zeros",
    }
)


def serialize(initializer: Initializer | None) -> dict | None:
    """Returns the Keras envelope (module `"keras.initializers"`), or `None`."""
    if initializer is None:
        return None
    return serialize_object(initializer, MODULE)


def deserialize(
    config: dict | str | None, custom_objects: Mapping[str, Any] | None = None
) -> Initializer | Callable | None:
    """Builds an initializer from an envelope, a `class_name` dict or a name.

    Raises:
        TypeError: for an identifier that is neither dict, str nor None.
        ValueError: for an unknown module, class name or config key, or a
            bad config value.
    """
    return deserialize_object(
        config,
        INITIALIZERS,
        kind="initializer",
        modules=MODULES,
        aliases=ALIASES,
        custom_objects=custom_objects,
    )


def get(identifier: Any) -> Initializer | Callable | None:
    """Returns an initializer for `identifier`.

    Args:
        identifier: `None`; a name (`"zeros"`, `"glorot_uniform"`, `"Ones"`);
            an envelope or `class_name` dict; an `Initializer` instance or
            class; or any callable `(shape, dtype) -> array`, returned as is.

    Returns:
        The initializer, or `None` for `None`.

    Raises:
        TypeError: for an identifier of another type.
        ValueError: see `deserialize`.
    """
    return get_object(identifier, Initializer, deserialize, "initializer")
