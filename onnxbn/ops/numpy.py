"""Keras NumPy ops that Keras records in functional graphs: `NotEqual`, `Any`, `LogicalOr`.

Keras builds implicit masks with these ops (`Embedding(mask_zero=True)` records
`NotEqual(x, 0)`, `Masking` records `Any(NotEqual(x, mask_value), axis=-1)`, a merge
layer joins masks with `LogicalOr`), and writes them into functional configs
under module `keras.src.ops.numpy` with `registered_name` = class name. Each op
is registered like a layer so that `Model.from_config` can rebuild them, and
has a function form (`not_equal`, `any`, `logical_or`) that records a node when
given symbolic tensors and computes with NumPy otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any as AnyType

import numpy as np

from onnxbn.operation import Operation, is_symbolic_call
from onnxbn.operation_registry import register_layer
from onnxbn.tensor import SymbolicTensor, to_array

MODULE = "keras.src.ops.numpy"


def broadcast_shapes(shape1: Sequence[int | None], shape2: Sequence[int | None]) -> tuple:
    """Keras's `broadcast_shapes`: NumPy broadcasting where `None` is an unknown dim.

    Raises:
        ValueError: two known dims that differ and are not 1.
    """
    s1, s2 = list(shape1), list(shape2)
    rank = max(len(s1), len(s2))
    s1 = [1] * (rank - len(s1)) + s1
    s2 = [1] * (rank - len(s2)) + s2
    out = []
    for a, b in zip(s1, s2):
        if a == 1:
            out.append(b)
        elif a is None:
            out.append(None if b == 1 else b)
        elif b in (1, None, a):
            out.append(a)
        else:
            raise ValueError(
                f"Cannot broadcast shape, the failure dim has value {a}, which cannot be "
                f"broadcasted to {b}. Input shapes are: {list(shape1)} and {list(shape2)}."
            )
    return tuple(out)


def _check_axis_arg(axis: AnyType, owner: str) -> list[int] | None:
    """The axes of an `axis` argument as a list of ints (None stays None)."""
    if axis is None:
        return None
    if isinstance(axis, (int, np.integer)) and not isinstance(axis, (bool, np.bool_)):
        return [int(axis)]
    if isinstance(axis, (list, tuple)) and all(
        isinstance(a, (int, np.integer)) and not isinstance(a, (bool, np.bool_)) for a in axis
    ):
        return [int(a) for a in axis]
    raise TypeError(f"{owner}: axis must be an int, a list of ints or None, received {axis!r}.")


def _normalize_axes(axis: AnyType, ndim: int, owner: str) -> tuple[int, ...] | None:
    axes = _check_axis_arg(axis, owner)
    if axes is None:
        return None
    result = []
    for a in axes:
        if not -ndim <= a < ndim:
            raise ValueError(
                f"{owner}: axis {a} is out of bounds for a tensor of rank {ndim} "
                f"(expected -{ndim} <= axis < {ndim})."
            )
        result.append(int(a) % ndim)
    if len(set(result)) != len(result):
        raise ValueError(f"{owner}: repeated axis in {axis!r}.")
    return tuple(result)


def reduce_shape(
    shape: Sequence[int | None], axes: tuple[int, ...] | None, keepdims: bool
) -> tuple:
    """Shape after reducing `axes` (all axes when None), as Keras's `reduce_shape`."""
    if axes is None:
        return (1,) * len(shape) if keepdims else ()
    if keepdims:
        return tuple(1 if i in axes else d for i, d in enumerate(shape))
    return tuple(d for i, d in enumerate(shape) if i not in axes)


def _shape_of(x: AnyType) -> tuple:
    if isinstance(x, SymbolicTensor):
        return x.shape
    return np.shape(x)


def _array(x: AnyType, owner: str) -> np.ndarray:
    return to_array(x, f"The input of {owner}")


def _operand(x: AnyType, owner: str) -> AnyType:
    """An operand of a binary op as Keras's backends hand it to NumPy.

    A Python number stays a Python number, so NumPy 2 (NEP 50) compares it in
    the other operand's dtype, as Keras does: `Masking(mask_value=0.1)` on
    float32 data compares with float32(0.1). Turned into an array first, it
    would be a float64 array and every padded step would count as valid.
    NumPy scalars keep their own dtype, as in Keras.
    """
    if type(x) in (bool, int, float):
        return x
    return _array(x, owner)


@register_layer(MODULE, registered_name="NotEqual")
class NotEqual(Operation):
    """`x1 != x2` elementwise, with broadcasting (Keras's `ops.not_equal`).

    Args:
        name: op name (`not_equal`, `not_equal_1`, ... when omitted).

    Call arguments:
        x1, x2: arrays or Python scalars (one may be a scalar constant).

    Returns:
        A bool array of the broadcast shape.
    """

    def __init__(self, name: str | None = None) -> None:
        super().__init__(name=name)

    def call(self, x1: AnyType, x2: AnyType) -> np.ndarray:
        return np.not_equal(_operand(x1, self.name), _operand(x2, self.name))

    def compute_output_spec(self, x1: AnyType, x2: AnyType) -> SymbolicTensor:
        return SymbolicTensor(broadcast_shapes(_shape_of(x1), _shape_of(x2)), "bool")

    def get_config(self) -> dict:
        return {"name": self.name}


@register_layer(MODULE, registered_name="LogicalOr")
class LogicalOr(Operation):
    """`x1 or x2` elementwise, with broadcasting (Keras's `ops.logical_or`).

    Args:
        name: op name.

    Call arguments:
        x1, x2: arrays (non-zero is True).

    Returns:
        A bool array of the broadcast shape.
    """

    def __init__(self, name: str | None = None) -> None:
        super().__init__(name=name)

    def call(self, x1: AnyType, x2: AnyType) -> np.ndarray:
        return np.logical_or(_operand(x1, self.name), _operand(x2, self.name))

    def compute_output_spec(self, x1: AnyType, x2: AnyType) -> SymbolicTensor:
        return SymbolicTensor(broadcast_shapes(_shape_of(x1), _shape_of(x2)), "bool")

    def get_config(self) -> dict:
        return {"name": self.name}


@register_layer(MODULE, registered_name="Any")
class Any(Operation):
    """Logical OR reduction over `axis` (Keras's `ops.any`).

    Args:
        axis: an int, a list of ints, or None (every axis); negative allowed.
        keepdims: keep the reduced axes with size 1.
        name: op name.

    Call arguments:
        x: an array (non-zero is True).

    Returns:
        A bool array with the reduced axes removed (or kept with size 1).

    Raises:
        TypeError: `axis` or `keepdims` of the wrong type.
        ValueError: an axis out of range for the input.
    """

    def __init__(self, axis: AnyType = None, keepdims: bool = False, name: str | None = None):
        _check_axis_arg(axis, "Any")  # the range is checked against each input
        if not isinstance(keepdims, (bool, np.bool_)):
            raise TypeError(f"Any: keepdims must be a bool, got {keepdims!r}.")
        super().__init__(name=name)
        # Keras's auto-config records the argument as passed (an int stays an int).
        self.axis = list(axis) if isinstance(axis, tuple) else axis
        if isinstance(self.axis, np.integer):
            self.axis = int(self.axis)
        self.keepdims = bool(keepdims)

    def call(self, x: AnyType) -> np.ndarray:
        x = _array(x, self.name)
        axes = _normalize_axes(self.axis, x.ndim, f"Any {self.name!r}")
        return np.any(x, axis=axes, keepdims=self.keepdims)

    def compute_output_spec(self, x: SymbolicTensor) -> SymbolicTensor:
        axes = _normalize_axes(self.axis, x.ndim, f"Any {self.name!r}")
        return SymbolicTensor(reduce_shape(x.shape, axes, self.keepdims), "bool")

    def get_config(self) -> dict:
        return {"name": self.name, "axis": self.axis, "keepdims": self.keepdims}


def not_equal(x1: AnyType, x2: AnyType) -> AnyType:
    """`x1 != x2`; records a `NotEqual` node when either argument is symbolic."""
    if is_symbolic_call((x1, x2), {}, "not_equal"):
        return NotEqual().symbolic_call(x1, x2)
    return np.not_equal(_operand(x1, "not_equal"), _operand(x2, "not_equal"))


def logical_or(x1: AnyType, x2: AnyType) -> AnyType:
    """`x1 or x2`; records a `LogicalOr` node when either argument is symbolic."""
    if is_symbolic_call((x1, x2), {}, "logical_or"):
        return LogicalOr().symbolic_call(x1, x2)
    return np.logical_or(_operand(x1, "logical_or"), _operand(x2, "logical_or"))


def any(x: AnyType, axis: AnyType = None, keepdims: bool = False) -> AnyType:  # noqa: A001
    """OR-reduction over `axis`; records an `Any` node when `x` is symbolic."""
    if is_symbolic_call((x,), {}, "any"):
        return Any(axis=axis, keepdims=keepdims).symbolic_call(x)
    x = _array(x, "any")
    if not isinstance(keepdims, (bool, np.bool_)):
        raise TypeError(f"any: keepdims must be a bool, got {keepdims!r}.")
    return np.any(x, axis=_normalize_axes(axis, x.ndim, "any"), keepdims=bool(keepdims))
