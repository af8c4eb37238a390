"""Boolean and comparison kernels: Not, And, Or, Xor, Equal, Less, Greater, ..., Where."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from onnxbn.reference.kernels.precision import as_array
from onnxbn.reference.kernels.table import kernel
from onnxbn.reference.limits import check_broadcast


def _binary(ufunc: np.ufunc, op_type: str) -> Callable[..., tuple[np.ndarray]]:
    what = f"{op_type} output"

    def fn(A: np.ndarray, B: np.ndarray) -> tuple[np.ndarray]:
        check_broadcast(what, A, B)
        return (as_array(ufunc(A, B)),)

    fn.__name__ = op_type.lower()
    return fn


for _op, _ufunc, _since in (
    ("And", np.logical_and, 7),
    ("Or", np.logical_or, 7),
    ("Xor", np.logical_xor, 7),
    ("Equal", np.equal, 7),
    ("Less", np.less, 7),
    ("Greater", np.greater, 7),
    ("LessOrEqual", np.less_equal, 12),
    ("GreaterOrEqual", np.greater_equal, 12),
):
    kernel(_op, _since)(_binary(_ufunc, _op))


@kernel("Not", 1)
def not_(X: np.ndarray) -> tuple[np.ndarray]:
    return (as_array(np.logical_not(X)),)


@kernel("Where", 9)
def where(condition: np.ndarray, X: np.ndarray, Y: np.ndarray) -> tuple[np.ndarray]:
    check_broadcast("Where output", condition, X, Y)
    if condition.dtype != np.bool_:
        raise TypeError(f"Where's condition must be bool, received {condition.dtype}.")
    return (as_array(np.where(condition, X, Y), X.dtype),)
