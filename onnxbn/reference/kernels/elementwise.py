"""Element-wise arithmetic kernels: Add, Sub, Mul, Div, Pow, unary math, Max/Min/Sum/Mean, Clip.

Inputs broadcast NumPy-style (ONNX multidirectional broadcasting, opset >= 7).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import numpy as np

from onnxbn.reference.kernels.precision import LOW_PRECISION, as_array, float_compute_dtype
from onnxbn.reference.kernels.table import kernel
from onnxbn.reference.limits import check_broadcast


def _binary(ufunc: np.ufunc, op_type: str) -> Callable[..., tuple[np.ndarray]]:
    what = f"{op_type} output"

    def fn(A: np.ndarray, B: np.ndarray) -> tuple[np.ndarray]:
        if A.shape != B.shape:  # equal shapes cannot grow
            check_broadcast(what, A, B)
        result = ufunc(A, B)
        return (result if type(result) is np.ndarray else np.asarray(result),)

    fn.__name__ = op_type.lower()
    return fn


for _op, _ufunc in (("Add", np.add), ("Sub", np.subtract), ("Mul", np.multiply)):
    kernel(_op, 7)(_binary(_ufunc, _op))


def _truncating_divide(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    # ONNX integer Div rounds toward zero (C semantics); floor_divide rounds down.
    quotient = np.floor_divide(a, b)
    if a.dtype.kind == "i":
        inexact = (np.remainder(a, b) != 0) & ((a < 0) != (b < 0))
        quotient = quotient + inexact.astype(quotient.dtype)
    return quotient


@kernel("Div", 7)
def div(A: np.ndarray, B: np.ndarray) -> tuple[np.ndarray]:
    check_broadcast("Div output", A, B)
    if A.dtype.kind in "iu":
        return (as_array(_truncating_divide(A, B)),)
    return (as_array(np.true_divide(A, B)),)


@kernel("Pow", 7)
def pow_(X: np.ndarray, Y: np.ndarray) -> tuple[np.ndarray]:
    check_broadcast("Pow output", X, Y)
    if X.dtype in LOW_PRECISION:
        result = np.power(X.astype(np.float32), Y.astype(np.float32))
    elif X.dtype.kind in "iu" and Y.dtype.kind == "f":
        result = np.power(X.astype(np.float64), Y)
    else:
        result = np.power(X, Y)
    # The result has the base's type (Pow-12 allows a different exponent type).
    return (as_array(result, X.dtype),)


def _unary(ufunc: Callable[[np.ndarray], np.ndarray], name: str) -> Callable[..., tuple]:
    def fn(X: np.ndarray) -> tuple[np.ndarray]:
        result = ufunc(X)
        return (result if type(result) is np.ndarray else np.asarray(result),)

    fn.__name__ = name
    return fn


for _op, _ufunc in (
    ("Sqrt", np.sqrt),
    ("Reciprocal", np.reciprocal),
    ("Neg", np.negative),
    ("Abs", np.absolute),
    ("Exp", np.exp),
    ("Log", np.log),
    ("Tanh", np.tanh),
):
    kernel(_op, 6)(_unary(_ufunc, _op.lower()))


@kernel("Relu", 6)
def relu(X: np.ndarray) -> tuple[np.ndarray]:
    # maximum(x, 0) keeps NaN, as the spec's max(0, x) does on every runtime we know.
    return (as_array(np.maximum(X, X.dtype.type(0))),)


@kernel("LeakyRelu", 6)
def leaky_relu(X: np.ndarray, *, alpha: float = 0.01) -> tuple[np.ndarray]:
    compute = X.astype(float_compute_dtype(X.dtype))
    return (as_array(np.where(compute < 0, compute * alpha, compute), X.dtype),)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    # Two branches so exp never overflows: 1/(1+e^-x) for x >= 0, e^x/(1+e^x) below.
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1 / (1 + e), e / (1 + e))


@kernel("Sigmoid", 6)
def sigmoid(X: np.ndarray) -> tuple[np.ndarray]:
    return (as_array(_sigmoid(X.astype(float_compute_dtype(X.dtype))), X.dtype),)


_erf = np.frompyfunc(math.erf, 1, 1)


@kernel("Erf", 9)
def erf(input: np.ndarray) -> tuple[np.ndarray]:
    # NumPy has no erf; math.erf is correctly rounded in float64 (slow, but exact).
    values = np.asarray(_erf(input.astype(np.float64)), dtype=np.float64)
    return (as_array(values, input.dtype),)


def _variadic(ufunc: np.ufunc, op_type: str) -> Callable[..., tuple[np.ndarray]]:
    what = f"{op_type} output"

    def fn(*data: np.ndarray) -> tuple[np.ndarray]:
        if not data:
            raise ValueError(f"{op_type} needs at least one input, received none.")
        check_broadcast(what, *data)
        return (as_array(functools.reduce(ufunc, data)),)

    fn.__name__ = op_type.lower()
    return fn


# Max and Min propagate NaN (NumPy maximum/minimum), as onnxruntime does.
kernel("Max", 8)(_variadic(np.maximum, "Max"))
kernel("Min", 8)(_variadic(np.minimum, "Min"))
kernel("Sum", 8)(_variadic(np.add, "Sum"))


@kernel("Mean", 8)
def mean(*data: np.ndarray) -> tuple[np.ndarray]:
    if not data:
        raise ValueError("Mean needs at least one input, received none.")
    check_broadcast("Mean output", *data)
    dtype = data[0].dtype
    total = functools.reduce(np.add, (d.astype(float_compute_dtype(dtype)) for d in data))
    return (as_array(total / len(data), dtype),)


@kernel("Clip", 6)
def clip_6(
    input: np.ndarray, *, max: float = 3.4028234663852886e38, min: float = -3.4028234663852886e38
) -> tuple:
    return clip_11(input, np.asarray(min, input.dtype), np.asarray(max, input.dtype))


@kernel("Clip", 11)
def clip_11(
    input: np.ndarray,
    min: np.ndarray | None = None,
    max: np.ndarray | None = None,
) -> tuple[np.ndarray]:
    result = input
    # Clip applies max(x, min) then min(., max): when min > max every value becomes max.
    if min is not None:
        result = np.maximum(result, min.reshape(()))
    if max is not None:
        result = np.minimum(result, max.reshape(()))
    return (as_array(result, input.dtype),)
