"""Neural-network kernels: MatMul, Gemm, Softmax, Dropout.

Matrix products of float16/bfloat16 are computed in float32 and cast back
(the accumulation a hardware kernel would do).
"""

from __future__ import annotations

import math

import numpy as np

from onnxbn.reference.kernels.precision import (
    as_array,
    compute_dtype,
    float_compute_dtype,
    normalize_axis,
)
from onnxbn.reference.kernels.table import kernel
from onnxbn.reference.limits import check_allocation, max_bytes


def _matmul_shape(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...]:
    a2 = (1, *a) if len(a) == 1 else a
    b2 = (*b, 1) if len(b) == 1 else b
    if a2[-1] != b2[-2]:
        raise ValueError(f"MatMul: shapes {a} and {b} do not align ({a2[-1]} != {b2[-2]}).")
    try:
        batch = np.broadcast_shapes(a2[:-2], b2[:-2])
    except ValueError:
        raise ValueError(f"MatMul: batch dimensions of {a} and {b} do not broadcast.") from None
    shape = (*batch, a2[-2], b2[-1])
    if len(a) == 1:
        shape = shape[:-2] + shape[-1:]
    if len(b) == 1:
        shape = shape[:-1]
    return shape


def _matmul(a: np.ndarray, b: np.ndarray, what: str) -> np.ndarray:
    if a.ndim == 0 or b.ndim == 0:
        raise ValueError(f"{what}: inputs must have rank >= 1, received {a.shape} and {b.shape}.")
    # The product of the input sizes bounds the output; compute it exactly only past the cap.
    if 16 * max(a.size, 1) * max(b.size, 1) > max_bytes():
        check_allocation(f"{what} output", _matmul_shape(a.shape, b.shape), a.dtype)
    work = compute_dtype(a.dtype)
    if work != a.dtype:
        return np.matmul(a.astype(work), b.astype(work)).astype(a.dtype)
    return np.matmul(a, b)


@kernel("MatMul", 1)
def matmul(A: np.ndarray, B: np.ndarray) -> tuple[np.ndarray]:
    return (as_array(_matmul(A, B, "MatMul")),)


@kernel("Gemm", 7)
def gemm(
    A: np.ndarray,
    B: np.ndarray,
    C: np.ndarray | None = None,
    *,
    alpha: float = 1.0,
    beta: float = 1.0,
    transA: int = 0,
    transB: int = 0,
) -> tuple[np.ndarray]:
    if A.ndim != 2 or B.ndim != 2:
        raise ValueError(f"Gemm takes 2-D A and B, received shapes {A.shape} and {B.shape}.")
    a = A.T if transA else A
    b = B.T if transB else B
    dtype = A.dtype
    work = float_compute_dtype(dtype) if dtype.kind != "f" else compute_dtype(dtype)
    y = _matmul(a.astype(work, copy=False), b.astype(work, copy=False), "Gemm")
    if alpha != 1.0:
        y = y * work.type(alpha)
    if C is not None and beta != 0.0:
        y = y + C.astype(work, copy=False) * work.type(beta)
    return (as_array(y, dtype),)


def _softmax(x: np.ndarray, axis: int) -> np.ndarray:
    work = x.astype(float_compute_dtype(x.dtype), copy=False)
    # Subtracting the max keeps exp from overflowing; the result is unchanged.
    shifted = work - np.max(work, axis=axis, keepdims=True)
    e = np.exp(shifted)
    return as_array(e / np.sum(e, axis=axis, keepdims=True), x.dtype)


@kernel("Softmax", 1)
def softmax_1(input: np.ndarray, *, axis: int = 1) -> tuple[np.ndarray]:
    # Before opset 13 the input is coerced to 2-D at `axis` and normalized per row.
    axis = normalize_axis(axis, max(input.ndim, 1), "Softmax axis")
    rows = math.prod(input.shape[:axis])
    flat = (
        input.reshape(rows, -1)
        if input.size
        else input.reshape(rows, math.prod(input.shape[axis:]))
    )
    return (_softmax(flat, 1).reshape(input.shape),)


@kernel("Softmax", 13)
def softmax_13(input: np.ndarray, *, axis: int = -1) -> tuple[np.ndarray]:
    return (_softmax(input, normalize_axis(axis, max(input.ndim, 1), "Softmax axis")),)


@kernel("Dropout", 7)
def dropout_7(data: np.ndarray, *, ratio: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    # Opsets 7-9: inference only; the mask has the data's type.
    return data, np.ones(data.shape, dtype=data.dtype)


@kernel("Dropout", 10)
def dropout_10(data: np.ndarray, *, ratio: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    return data, np.ones(data.shape, dtype=np.bool_)


@kernel("Dropout", 12)
def dropout_12(
    data: np.ndarray,
    ratio: np.ndarray | None = None,
    training_mode: np.ndarray | None = None,
    *,
    seed: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    rate = 0.5 if ratio is None else float(np.asarray(ratio).reshape(()))
    training = training_mode is not None and bool(np.asarray(training_mode).reshape(()))
    if not training or rate == 0.0:
        return data, np.ones(data.shape, dtype=np.bool_)
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"Dropout ratio must lie in [0, 1), received {rate}.")
    # Training-mode dropout is random by definition; `seed` makes it repeatable here.
    keep = np.random.default_rng(seed).uniform(size=data.shape) >= rate
    scaled = data.astype(float_compute_dtype(data.dtype)) * keep / (1.0 - rate)
    return as_array(scaled, data.dtype), keep
