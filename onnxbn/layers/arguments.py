"""Argument checks the layers share, with Keras's messages."""

from __future__ import annotations

import math
from numbers import Real
from typing import Any

import numpy as np

from onnxbn.layers.layer import Layer


def check_min_ndim(layer: Layer, shape: tuple, min_ndim: int) -> None:
    """Keras's `InputSpec(min_ndim=...)` check, with Keras's message."""
    if len(shape) < min_ndim:
        raise ValueError(
            f'Input 0 of layer "{layer.name}" is incompatible with the layer: '
            f"expected min_ndim={min_ndim}, found ndim={len(shape)}. "
            f"Full shape received: {tuple(shape)}"
        )


def reject_unsupported(owner: str, **arguments: Any) -> None:
    """Keras arguments onnxbn accepts only at their default (None).

    Raises:
        NotImplementedError: naming the layer, the argument and its value.
    """
    for name, value in arguments.items():
        if value is not None:
            raise NotImplementedError(
                f"{owner}: argument `{name}` is not supported (only None), received "
                f"{name}={value!r}."
            )


def check_bool(value: Any, name: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, received {name}={value!r}.")
    return bool(value)


def check_real(value: Any, name: str) -> float:
    """A finite real number (not a bool) as a float."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a real number, received {value!r}.")
    value = float(value)
    if math.isnan(value) or math.isinf(value):
        raise ValueError(f"{name} must be a finite number, received {value!r}.")
    return value
