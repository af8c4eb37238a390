"""Keras 3 weight regularizers in NumPy: same names, config keys and math.

A regularizer maps a weight array to a scalar penalty that a layer adds to
`layer.losses`. Penalties are computed in float64 and returned as a
`np.float64` scalar, so the value does not depend on the weight dtype.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from onnxbn.registry import Registry
from onnxbn.serialization import (
    deserialize_object,
    get_object,
    require_choice,
    serialize_object,
    short_repr,
    to_snake_case,
)
from onnxbn.tensor import as_float64

REGULARIZERS: Registry[str, type] = Registry("regularizer")
MODULE = "keras.regularizers"
MODULES = frozenset({MODULE, "keras.src.regularizers", "keras.src.regularizers.regularizers"})
# OrthogonalRegularizer caps inverse norms at 1 / epsilon (Keras's `normalize`).
_INV_EPSILON = 1.0 / 1e-7


def validate_float_arg(value: Any, name: str) -> float:
    """Keras's check of a penalty factor: a finite, non-negative number.

    Returns:
        The factor as a Python float.

    Raises:
        ValueError: for anything else (bools, strings, NaN, infinities and
            negative numbers alike, as Keras).
    """
    number = math.nan
    if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
        value, (bool, np.bool_)
    ):
        try:
            number = float(value)
        except OverflowError:  # an int beyond float range
            number = math.inf
    if not math.isfinite(number) or number < 0:
        raise ValueError(
            f"Invalid value for argument {name}: expected a non-negative float. "
            f"Received: {name}={short_repr(value)}"
        )
    return number


def _weights(x: Any) -> np.ndarray:
    return as_float64(x, "the regularized weights")


class Regularizer:
    """Regularizer base class: `__call__(x)` returns a scalar penalty."""

    def __call__(self, x: Any) -> np.float64:
        return np.float64(0.0)

    def gradient(self, x: Any) -> np.ndarray:
        """The gradient of the penalty with respect to `x`, in float64.

        Where the penalty has a kink (`abs` at 0), the gradient there is 0,
        as the backends' `sign` gives.
        """
        return np.zeros(np.shape(_weights(x)))

    def get_config(self) -> dict:
        """Returns the constructor arguments as a JSON-simple dict."""
        raise NotImplementedError(f"{type(self).__name__} does not implement get_config().")

    @classmethod
    def from_config(cls, config: dict) -> Regularizer:
        """Instantiates the regularizer from the output of `get_config()`."""
        return cls(**config)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"


@REGULARIZERS.register("L1L2")
class L1L2(Regularizer):
    """Applies both penalties: `l1 * sum(abs(x)) + l2 * sum(square(x))`.

    A zero factor skips its term entirely (as Keras), so `L1L2(l2=0.1)` of an
    array holding `inf` is `inf`, not NaN.

    Args:
        l1: L1 factor (non-negative; `None` means 0).
        l2: L2 factor (non-negative; `None` means 0).
    """

    def __init__(self, l1: float = 0.0, l2: float = 0.0) -> None:
        self.l1 = validate_float_arg(0.0 if l1 is None else l1, name="l1")
        self.l2 = validate_float_arg(0.0 if l2 is None else l2, name="l2")

    def __call__(self, x: Any) -> np.float64:
        x = _weights(x)
        penalty = np.float64(0.0)
        if self.l1 != 0.0:
            penalty += self.l1 * np.sum(np.abs(x))
        if self.l2 != 0.0:
            penalty += self.l2 * np.sum(np.square(x))
        return np.float64(penalty)

    def gradient(self, x: Any) -> np.ndarray:
        x = _weights(x)
        grad = np.zeros(x.shape)
        if self.l1 != 0.0:
            grad += self.l1 * np.sign(x)
        if self.l2 != 0.0:
            grad += 2.0 * self.l2 * x
        return grad

    def get_config(self) -> dict:
        return {"l1": self.l1, "l2": self.l2}


@REGULARIZERS.register("L1")
class L1(Regularizer):
    """The L1 penalty `l1 * sum(abs(x))`.

    Args:
        l1: L1 factor (non-negative; `None` means 0.01).
    """

    def __init__(self, l1: float = 0.01) -> None:
        self.l1 = validate_float_arg(0.01 if l1 is None else l1, name="l1")

    def __call__(self, x: Any) -> np.float64:
        return np.float64(self.l1 * np.sum(np.abs(_weights(x))))

    def gradient(self, x: Any) -> np.ndarray:
        return self.l1 * np.sign(_weights(x))

    def get_config(self) -> dict:
        return {"l1": self.l1}


@REGULARIZERS.register("L2")
class L2(Regularizer):
    """The L2 penalty `l2 * sum(square(x))`.

    Args:
        l2: L2 factor (non-negative; `None` means 0.01).
    """

    def __init__(self, l2: float = 0.01) -> None:
        self.l2 = validate_float_arg(0.01 if l2 is None else l2, name="l2")

    def __call__(self, x: Any) -> np.float64:
        return np.float64(self.l2 * np.sum(np.square(_weights(x))))

    def gradient(self, x: Any) -> np.ndarray:
        return 2.0 * self.l2 * _weights(x)

    def get_config(self) -> dict:
        return {"l2": self.l2}


@REGULARIZERS.register("OrthogonalRegularizer")
class OrthogonalRegularizer(Regularizer):
    """Pushes the rows (or columns) of a rank-2 weight towards orthogonality.

    The penalty is `factor * 0.5 * sum(|P - diag(P)|) / (n * (n - 1) / 2)`
    where `P` is the Gram matrix of the L2-normalized rows (`mode="rows"`) or
    columns (`mode="columns"`) and `n` their number.

    Args:
        factor: Regularization factor (non-negative).
        mode: `"rows"` or `"columns"`.
    """

    def __init__(self, factor: float = 0.01, mode: str = "rows") -> None:
        self.factor = validate_float_arg(factor, name="factor")
        self.mode = require_choice(mode, "mode", ("rows", "columns"))

    def _rows(self, x: Any) -> np.ndarray:
        """The weight as float64 rows to orthogonalize (columns transposed)."""
        x = _weights(x)
        if x.ndim != 2:
            raise ValueError(
                "Inputs to OrthogonalRegularizer must have rank 2. Received: "
                f"inputs.shape={x.shape}"
            )
        rows = x.T if self.mode == "columns" else x
        if rows.shape[0] < 2:
            # Keras divides by zero pairs here (NaN); refuse instead.
            raise ValueError(
                f"OrthogonalRegularizer(mode={self.mode!r}) needs at least 2 "
                f"{self.mode}. Received: inputs.shape={x.shape}"
            )
        return rows

    def _forward(self, rows: np.ndarray) -> tuple[np.ndarray, ...]:
        """`(uncapped, inverse norms, normalized rows, their Gram matrix)`.

        `uncapped` marks the rows whose inverse norm is below the cap.
        """
        # Keras's `normalize`: x * min(rsqrt(sum(x^2)), 1 / epsilon).
        square_sum = np.sum(np.square(rows), axis=1, keepdims=True)
        with np.errstate(divide="ignore"):
            rsqrt = 1.0 / np.sqrt(square_sum)
        uncapped = rsqrt < _INV_EPSILON
        normalized = rows * np.where(uncapped, rsqrt, _INV_EPSILON)
        return (
            uncapped,
            np.where(uncapped, rsqrt, _INV_EPSILON),
            normalized,
            normalized @ normalized.T,
        )

    def _scale(self, size: int) -> float:
        # factor * 0.5 * mean over the n * (n - 1) / 2 pairs.
        return self.factor * 0.5 / (size * (size - 1.0) / 2.0)

    def __call__(self, x: Any) -> np.float64:
        rows = self._rows(x)
        size = rows.shape[0]
        *_, product = self._forward(rows)
        off_diagonal = product * (1.0 - np.eye(size))
        return np.float64(self._scale(size) * np.sum(np.abs(off_diagonal)))

    def gradient(self, x: Any) -> np.ndarray:
        rows = self._rows(x)
        size = rows.shape[0]
        uncapped, scale, normalized, product = self._forward(rows)
        # d/dP of the sum of |P_ij| off the diagonal; P = Y Y^T is symmetric.
        d_product = self._scale(size) * np.sign(product) * (1.0 - np.eye(size))
        d_normalized = 2.0 * d_product @ normalized
        # Y = x * r with r = |x|^-1 (a constant where capped): the projection
        # of dY off each row's direction, scaled by r.
        radial = np.sum(d_normalized * normalized, axis=1, keepdims=True)
        grad = scale * (d_normalized - np.where(uncapped, radial, 0.0) * normalized)
        return grad.T if self.mode == "columns" else grad

    def get_config(self) -> dict:
        return {"factor": self.factor, "mode": self.mode}


# Keras's ALL_OBJECTS_DICT: the snake_case names ("l1", "l2", "l1l2",
# "orthogonal_regularizer"), each built with its class defaults.
ALIASES: dict[str, str] = {to_snake_case(name): name for name in REGULARIZERS}
# Keras documents `kernel_regularizer="l1_l2"` as l1 = l2 = 0.01 (the class
# defaults are 0.0, which would silently regularize nothing).
_L1_L2 = "l1_l2"


def serialize(regularizer: Regularizer | None) -> dict | None:
    """Returns the Keras envelope (module `"keras.regularizers"`), or `None`."""
    if regularizer is None:
        return None
    return serialize_object(regularizer, MODULE)


def deserialize(
    config: dict | str | None, custom_objects: Mapping[str, Any] | None = None
) -> Regularizer | Callable | None:
    """Builds a regularizer from an envelope, a `class_name` dict or a name.

    Raises:
        TypeError: for an identifier that is neither dict, str nor None.
        ValueError: for an unknown module, class name or config key, or a
            bad factor.
    """
    if config == _L1_L2:
        return L1L2(l1=0.01, l2=0.01)
    return deserialize_object(
        config,
        REGULARIZERS,
        kind="regularizer",
        modules=MODULES,
        aliases=ALIASES,
        custom_objects=custom_objects,
    )


def get(identifier: Any) -> Regularizer | Callable | None:
    """Returns a regularizer for `identifier`.

    Args:
        identifier: `None`; a name (`"l1"`, `"l2"`, `"L2"`, built with
            default factors; `"l1_l2"` is `L1L2(0.01, 0.01)`); an envelope
            or `class_name` dict; a `Regularizer` instance or class; or any
            callable `x -> scalar`, returned as is.

    Returns:
        The regularizer, or `None` for `None`.

    Raises:
        TypeError: for an identifier of another type.
        ValueError: see `deserialize`.
    """
    return get_object(identifier, Regularizer, deserialize, "regularizer")
