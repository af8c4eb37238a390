"""The initializer base class and the registry every initializer joins.

`onnxbn.initializers` is the public module: it re-exports these names, holds
the constant initializers and (de)serialization, and imports
`onnxbn.random_initializers` so that every Keras initializer is registered.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from onnxbn.dtypes import FLOAT_DTYPES, standardize_dtype, to_numpy_dtype
from onnxbn.registry import Registry
from onnxbn.serialization import require_int, short_repr

INITIALIZERS: Registry[str, type] = Registry("initializer")


def _numpy_dtype(dtype: Any, *, floating: bool = True) -> np.dtype:
    """The NumPy dtype to return (`None` means float32, Keras's floatx).

    Raises:
        TypeError: for a dtype onnxbn does not support at all.
        ValueError: for a non-floating dtype where only floats make sense.
    """
    name = standardize_dtype("float32" if dtype is None else dtype)
    if floating and name not in FLOAT_DTYPES:
        raise ValueError(
            f"Random initializers need a floating dtype. Received: dtype={name!r}; "
            f"expected one of {list(FLOAT_DTYPES)}."
        )
    return to_numpy_dtype(name)


def standardize_shape(shape: Any) -> tuple[int, ...]:
    """Checks a weight shape: a tuple or list of non-negative ints.

    Raises:
        TypeError: if `shape` is not a sequence of ints.
        ValueError: for a negative dimension.
    """
    if not isinstance(shape, (tuple, list)):
        raise TypeError(
            f"Expected `shape` to be a tuple of ints. Received: shape="
            f"{short_repr(shape)} of type {type(shape).__name__}."
        )
    dims = tuple(require_int(d, "shape dimension") for d in shape)
    if any(d < 0 for d in dims):
        raise ValueError(f"Expected non-negative dimensions. Received: shape={dims}.")
    return dims


class Initializer:
    """Initializer base class: `__call__(shape, dtype)` returns a NumPy array."""

    def __call__(self, shape: Sequence[int], dtype: Any = "float32") -> np.ndarray:
        raise NotImplementedError(f"{type(self).__name__} must implement `__call__(shape, dtype)`.")

    def get_config(self) -> dict:
        """Returns the constructor arguments as a JSON-simple dict."""
        return {}

    @classmethod
    def from_config(cls, config: dict) -> Initializer:
        """Instantiates the initializer from the output of `get_config()`."""
        return cls(**config)

    def clone(self) -> Initializer:
        return type(self).from_config(self.get_config())

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"
