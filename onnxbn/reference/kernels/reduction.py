"""Reductions: ReduceMean, ReduceSum, ReduceSumSquare, ReduceProd, ReduceMax, ReduceMin, ReduceL2,
ArgMax and ArgMin.

`axes` is an attribute before the op's move to an input (opset 13 for
ReduceSum, 18 for the others). No axes reduces every axis, unless
`noop_with_empty_axes=1`, which returns the input unchanged. Float sums,
means and products accumulate in float64 (NumPy adds outer axes one row at a
time, so float32 accumulation over millions of rows drifts by percents); float32
sums do so without a float64 copy of the data (`summation.float_sum`);
integers sum in (at least) their own width and average in float64. The result
is cast back to the input's type.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from onnxbn.reference.kernels.precision import (
    accumulation_dtype,
    as_array,
    float_compute_dtype,
    int_list,
    is_float,
    normalize_axes,
)
from onnxbn.reference.kernels.summation import float_mean, float_sum
from onnxbn.reference.kernels.table import kernel


def _resolve_axes(data: np.ndarray, axes: list[int] | None, noop: int, op: str) -> tuple | None:
    """Normalized axes, or `None` for the no-op case."""
    if not axes:
        return None if noop else tuple(range(data.ndim))
    return normalize_axes(axes, data.ndim, f"{op} axis")


def _sum(data: np.ndarray, axes: tuple, keepdims: bool) -> np.ndarray:
    if is_float(data.dtype):
        return float_sum(data, axes, keepdims)
    return np.add.reduce(data, axis=axes, dtype=accumulation_dtype(data.dtype), keepdims=keepdims)


def _mean(data: np.ndarray, axes: tuple, keepdims: bool) -> np.ndarray:
    # The spec leaves the mean of an empty set undefined; sum / count = 0 / 0 = NaN here
    # (as in onnx.reference), so a graph relying on onnxruntime's 0 shows it.
    return float_mean(data, axes, keepdims)


def sum_of_squares(x: np.ndarray, axes: tuple[int, ...], keepdims: bool = False) -> np.ndarray:
    """Sum of x * x over `axes`, accumulated in float64 for floats (see `float_sum`)."""
    if is_float(x.dtype):
        return float_sum(x, axes, keepdims, square=True)
    return np.add.reduce(x * x, axis=axes, dtype=accumulation_dtype(x.dtype), keepdims=keepdims)


def _sum_square(data: np.ndarray, axes: tuple, keepdims: bool) -> np.ndarray:
    return sum_of_squares(data, axes, keepdims)


def _l2(data: np.ndarray, axes: tuple, keepdims: bool) -> np.ndarray:
    x = data.astype(float_compute_dtype(data.dtype), copy=False)
    return np.sqrt(sum_of_squares(x, axes, keepdims))


def _prod(data: np.ndarray, axes: tuple, keepdims: bool) -> np.ndarray:
    dtype = accumulation_dtype(data.dtype)
    return np.multiply.reduce(data, axis=axes, dtype=dtype, keepdims=keepdims)


def _extreme(ufunc: np.ufunc, sign: int) -> Callable[[np.ndarray, tuple, bool], np.ndarray]:
    def fn(data: np.ndarray, axes: tuple, keepdims: bool) -> np.ndarray:
        if data.size and all(data.shape[a] for a in axes):
            return ufunc.reduce(data, axis=axes, keepdims=keepdims)
        # An empty reduction yields the identity: -inf for max, +inf for min (ReduceMax-18).
        if data.dtype == np.bool_:
            initial = sign < 0
        elif data.dtype.kind in "iu":
            info = np.iinfo(data.dtype)
            initial = info.min if sign > 0 else info.max
        else:
            initial = -np.inf if sign > 0 else np.inf
        return ufunc.reduce(data, axis=axes, keepdims=keepdims, initial=initial)

    return fn


_HOW = {
    "ReduceMean": _mean,
    "ReduceSum": _sum,
    "ReduceSumSquare": _sum_square,
    "ReduceL2": _l2,
    "ReduceProd": _prod,
    "ReduceMax": _extreme(np.maximum, 1),
    "ReduceMin": _extreme(np.minimum, -1),
}


def _reduce(op: str, data: np.ndarray, axes: list[int] | None, keepdims: int, noop: int) -> tuple:
    resolved = _resolve_axes(data, axes, noop, op)
    if resolved is None:
        return (data,)
    return (as_array(_HOW[op](data, resolved, bool(keepdims)), data.dtype),)


def _with_attribute_axes(op: str) -> Callable[..., tuple[np.ndarray]]:
    def fn(data: np.ndarray, *, axes: list[int] | None = None, keepdims: int = 1) -> tuple:
        return _reduce(op, data, axes, keepdims, 0)

    fn.__name__ = f"{op}_attribute_axes"
    return fn


def _with_input_axes(op: str) -> Callable[..., tuple[np.ndarray]]:
    def fn(
        data: np.ndarray,
        axes: np.ndarray | None = None,
        *,
        keepdims: int = 1,
        noop_with_empty_axes: int = 0,
    ) -> tuple[np.ndarray]:
        listed = None if axes is None else int_list(axes, f"{op} axes")
        return _reduce(op, data, listed, keepdims, noop_with_empty_axes)

    fn.__name__ = f"{op}_input_axes"
    return fn


for _op in _HOW:
    _moved = 13 if _op == "ReduceSum" else 18
    kernel(_op, 1)(_with_attribute_axes(_op))
    kernel(_op, _moved)(_with_input_axes(_op))


def _arg_extreme(
    fn, data: np.ndarray, axis: int, keepdims: int, select_last_index: int, op: str
) -> tuple[np.ndarray]:
    axis = normalize_axes([axis], max(data.ndim, 1), f"{op} axis")[0]
    if data.shape[axis] == 0:
        raise ValueError(f"{op} over an empty axis {axis} (shape {data.shape}) has no answer.")
    if select_last_index:
        # The last extreme is the first one of the reversed axis.
        flipped = fn(np.flip(data, axis=axis), axis=axis, keepdims=bool(keepdims))
        index = data.shape[axis] - 1 - flipped
    else:
        index = fn(data, axis=axis, keepdims=bool(keepdims))
    return (as_array(index, np.dtype(np.int64)),)


@kernel("ArgMax", 1)
def arg_max_1(data: np.ndarray, *, axis: int = 0, keepdims: int = 1) -> tuple[np.ndarray]:
    return _arg_extreme(np.argmax, data, axis, keepdims, 0, "ArgMax")


@kernel("ArgMax", 12)
def arg_max_12(
    data: np.ndarray, *, axis: int = 0, keepdims: int = 1, select_last_index: int = 0
) -> tuple[np.ndarray]:
    return _arg_extreme(np.argmax, data, axis, keepdims, select_last_index, "ArgMax")


@kernel("ArgMin", 1)
def arg_min_1(data: np.ndarray, *, axis: int = 0, keepdims: int = 1) -> tuple[np.ndarray]:
    return _arg_extreme(np.argmin, data, axis, keepdims, 0, "ArgMin")


@kernel("ArgMin", 12)
def arg_min_12(
    data: np.ndarray, *, axis: int = 0, keepdims: int = 1, select_last_index: int = 0
) -> tuple[np.ndarray]:
    return _arg_extreme(np.argmin, data, axis, keepdims, select_last_index, "ArgMin")
