"""Dtype and argument helpers shared by the kernels.

float16 and bfloat16 (`ml_dtypes.bfloat16`) are computed in float32 wherever
a kernel chains several roundings (sigmoid, softmax, matrix products), then
cast back: the ONNX result type with at least float32 accuracy. Sums over
reduced axes (reductions, BatchNormalization statistics) accumulate in float64.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import ml_dtypes
import numpy as np

FLOAT32 = np.dtype(np.float32)
LOW_PRECISION = frozenset({np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16)})


def compute_dtype(dtype: np.dtype) -> np.dtype:
    """float32 for float16/bfloat16, the dtype itself otherwise."""
    return FLOAT32 if dtype in LOW_PRECISION else dtype


def is_float(dtype: np.dtype) -> bool:
    """Whether `dtype` is a float type (bfloat16's NumPy kind is 'V', not 'f')."""
    return dtype.kind == "f" or dtype in LOW_PRECISION


def accumulation_dtype(dtype: np.dtype) -> np.dtype | None:
    """float64 for every float type (sums over millions of rows stay exact to
    float32 precision); `None` (NumPy's default) for integers and bools."""
    return np.dtype(np.float64) if is_float(dtype) else None


def float_compute_dtype(dtype: np.dtype) -> np.dtype:
    """Like `compute_dtype`, but integers and bools are computed in float64."""
    if dtype in LOW_PRECISION:
        return FLOAT32
    if dtype.kind in "fc":
        return dtype
    return np.dtype(np.float64)


def as_array(value: Any, dtype: np.dtype | None = None) -> np.ndarray:
    """`value` as an ndarray (NumPy returns scalars from 0-d operations)."""
    if type(value) is np.ndarray and (dtype is None or value.dtype == dtype):
        return value
    return np.asarray(value, dtype=dtype)


def int_list(tensor: Any, what: str) -> list[int]:
    """A 0-d or 1-d integer tensor (or a list of ints) as a list of Python ints.

    Raises:
        ValueError: not integer-valued, or of rank above 1.
    """
    array = np.asarray(tensor)
    if array.ndim > 1:
        raise ValueError(f"{what} must be a 1-D tensor, received shape {array.shape}.")
    if array.size and array.dtype.kind not in "iub":
        raise ValueError(f"{what} must be integers, received dtype {array.dtype}.")
    return [int(v) for v in array.reshape(-1)]


def normalize_axis(axis: int, rank: int, what: str) -> int:
    """`axis` in `[-rank, rank)` made non-negative.

    Raises:
        ValueError: `axis` out of range.
    """
    if not -rank <= axis < rank:
        raise ValueError(
            f"{what} {axis} is out of range for rank {rank}; expected [-{rank}, {rank})."
        )
    return axis + rank if axis < 0 else axis


def normalize_axes(axes: Iterable[int], rank: int, what: str) -> tuple[int, ...]:
    """Distinct axes made non-negative, in the given order.

    Raises:
        ValueError: an axis out of range, or a repeated axis.
    """
    result = tuple(normalize_axis(int(a), rank, what) for a in axes)
    if len(set(result)) != len(result):
        raise ValueError(f"{what} {list(axes)} repeats an axis (rank {rank}).")
    return result
