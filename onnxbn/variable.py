"""`Variable`: a named weight array owned by a layer."""

from __future__ import annotations

from typing import Any

import numpy as np

from onnxbn.dtypes import standardize_dtype, to_numpy_dtype


class Variable:
    """A layer weight: a NumPy array with a name, a path and a trainable flag.

    Args:
        value: initial value.
        name: weight name (`"gamma"`).
        path: `"<layer name>/<weight name>"`.
        trainable: whether an optimizer would update it.
        dtype: storage dtype name.
        regularizer: optional regularizer (contributes to `layer.losses`).
        constraint: optional constraint (applied by optimizers, kept as metadata).
    """

    def __init__(
        self,
        value: Any,
        *,
        name: str,
        path: str,
        trainable: bool = True,
        dtype: Any = "float32",
        regularizer: Any = None,
        constraint: Any = None,
    ) -> None:
        self.name = name
        self.path = path
        self.trainable = bool(trainable)
        self._dtype = standardize_dtype(dtype)
        self.regularizer = regularizer
        self.constraint = constraint
        array = np.asarray(value)
        self._value = np.array(array, dtype=to_numpy_dtype(self._dtype))
        self.nonnegative = False  # see `require_nonnegative`

    @property
    def dtype(self) -> str:
        return self._dtype

    @property
    def shape(self) -> tuple[int, ...]:
        return self._value.shape

    @property
    def value(self) -> np.ndarray:
        """The stored array itself (no copy; do not mutate)."""
        return self._value

    def numpy(self) -> np.ndarray:
        """A copy of the current value."""
        return self._value.copy()

    def require_nonnegative(self) -> None:
        """Makes every later value (and the current one) have to be >= 0 (a variance).

        Raises:
            ValueError: the current value has a negative entry.
        """
        self.nonnegative = True
        self.check(self._value)

    def check(self, value: Any) -> None:
        """Raises `ValueError` when `value` breaks a rule of this variable (see `assign`)."""
        if not self.nonnegative:
            return
        try:
            array = np.asarray(value, dtype=np.float64)
        except (TypeError, ValueError):
            return  # not numeric: `assign` reports that
        negative = np.argwhere(array < 0)
        if negative.size:
            index = tuple(int(i) for i in negative[0])
            raise ValueError(
                f"Variable {self.path!r} must be >= 0 everywhere (it is a variance or a "
                f"standard deviation), but entry {index} is {array[index]!r} "
                f"({len(negative)} negative entries). Keras would normalize with NaN; fix the "
                "weights before setting them."
            )

    def assign(self, value: Any) -> None:
        """Replaces the value, cast to the variable's dtype.

        Raises:
            TypeError: a non-numeric value.
            ValueError: a shape other than the variable's, or a negative entry
                in a variable that must be >= 0 (`require_nonnegative`).
        """
        array = value.value if isinstance(value, Variable) else np.asarray(value)
        if array.dtype.kind not in "biuf" and array.dtype != to_numpy_dtype("bfloat16"):
            raise TypeError(
                f"Cannot assign a value of dtype {array.dtype} to variable {self.path!r} "
                f"({self._dtype}); expected a numeric array."
            )
        if array.shape != self._value.shape:
            raise ValueError(
                f"Cannot assign a value of shape {array.shape} to variable {self.path!r} "
                f"of shape {self._value.shape}."
            )
        self.check(array)
        self._value = np.array(array, dtype=self._value.dtype)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        return self._value if dtype is None else self._value.astype(dtype)

    def __repr__(self) -> str:
        return (
            f"<Variable path={self.path}, shape={self.shape}, dtype={self._dtype}, "
            f"trainable={self.trainable}>"
        )
