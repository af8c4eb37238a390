"""Tensors: the symbolic placeholders a graph is built from, and concrete arrays from array-likes."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from onnxbn.dtypes import standardize_dtype
from onnxbn.variable import Variable

if TYPE_CHECKING:
    from onnxbn.operation import Operation


def standardize_shape(shape: Any, what: str = "shape") -> tuple[int | None, ...]:
    """Tuple of non-negative ints / None from a shape-like.

    Raises:
        TypeError: not a sequence of ints / None.
        ValueError: a negative dimension.
    """
    if isinstance(shape, (str, bytes)) or not isinstance(shape, Sequence):
        raise TypeError(f"{what} must be a tuple of ints or None, received {shape!r}.")
    dims = []
    for dim in shape:
        if dim is None:
            dims.append(None)
            continue
        if isinstance(dim, bool) or not hasattr(dim, "__index__"):
            raise TypeError(f"{what} must be a tuple of ints or None, received {shape!r}.")
        dim = int(dim)
        if dim < 0:
            raise ValueError(f"{what} dimensions must be >= 0 or None, received {shape!r}.")
        dims.append(dim)
    return tuple(dims)


class SymbolicTensor:
    """An immutable placeholder: shape, dtype and where it came from.

    Calling an `Operation` on a `SymbolicTensor` records a `Node` and returns
    new symbolic tensors; nothing is computed.

    Args:
        shape: full shape, batch axis included; `None` marks an unknown dim.
        dtype: dtype name (`"float32"`, `"bool"`, ...).
        name: tensor name (also its name in exported graphs).
    """

    __slots__ = ("_shape", "_dtype", "_name", "_history", "_mask")

    def __init__(
        self,
        shape: Sequence[int | None],
        dtype: Any = "float32",
        name: str | None = None,
    ):
        object.__setattr__(self, "_shape", standardize_shape(shape))
        object.__setattr__(self, "_dtype", standardize_dtype(dtype))
        object.__setattr__(self, "_name", name)
        object.__setattr__(self, "_history", None)
        object.__setattr__(self, "_mask", None)

    def __setattr__(self, key: str, value: Any) -> None:
        raise AttributeError(f"SymbolicTensor is immutable; cannot set {key!r}.")

    @property
    def shape(self) -> tuple[int | None, ...]:
        return self._shape

    @property
    def ndim(self) -> int:
        return len(self._shape)

    @property
    def dtype(self) -> str:
        return self._dtype

    @property
    def name(self) -> str | None:
        return self._name

    @property
    def history(self) -> tuple[Operation, int, int] | None:
        """`(operation, node index, output index)` that produced this tensor."""
        return self._history

    @property
    def mask(self) -> SymbolicTensor | None:
        """The implicit Keras mask carried by this tensor (`_keras_mask`), if any."""
        return self._mask

    def _record(self, history: tuple[Operation, int, int], name: str) -> None:
        object.__setattr__(self, "_history", history)
        object.__setattr__(self, "_name", name)

    def _attach_mask(self, mask: SymbolicTensor | None) -> None:
        object.__setattr__(self, "_mask", mask)

    def __repr__(self) -> str:
        return f"<SymbolicTensor name={self._name}, shape={self._shape}, dtype={self._dtype}>"

    def __array__(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError(
            f"SymbolicTensor {self._name!r} has no value: it is a placeholder in a graph. "
            "Build an onnxbn.Model and call it on arrays instead."
        )

    def __bool__(self) -> bool:
        raise TypeError(f"SymbolicTensor {self._name!r} has no truth value.")


def to_array(value: Any, what: str) -> np.ndarray:
    """NumPy array from an array-like; non-numeric data is a `TypeError`."""
    if isinstance(value, Variable):
        return value.value
    try:
        array = np.asarray(value)
    except (TypeError, ValueError) as error:
        raise TypeError(
            f"{what} must be a numeric array, received {type(value).__name__}: {error}"
        ) from None
    try:
        standardize_dtype(array.dtype)
    except TypeError:
        raise TypeError(
            f"{what} must be a numeric or bool array, received dtype {array.dtype}."
        ) from None
    return array


def as_float64(value: Any, what: str) -> np.ndarray:
    """`value` as a float64 array: numeric and bool data, cast as Keras casts it.

    Raises:
        TypeError: non-numeric data, naming `what` (e.g. "`y_true`").
    """
    try:
        array = np.asarray(value)
        if array.dtype.kind not in "biuf" and array.dtype.name != "bfloat16":
            raise TypeError
        return array.astype(np.float64)
    except (TypeError, ValueError):
        from onnxbn.serialization import short_repr

        raise TypeError(
            f"Expected {what} to be a numeric array. Received: "
            f"{short_repr(value)} of type {type(value).__name__}."
        ) from None
