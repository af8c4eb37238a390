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


# A float32 BLAS product sums each output over K in a few SIMD lanes, so its
# error grows with K (about 5e-4 relative for K = 2**25). Long products are
# split into chunks of at least _CHUNK along K, each an accurate float32 BLAS
# product, and the partial results are summed pairwise in float64. The
# partials are kept under _PARTIAL_ELEMENTS elements.
_CHUNK = 4096
_PARTIAL_ELEMENTS = 1 << 22


def _chunked_matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """`a @ b` for 2-D-or-more float32 operands, accumulated over K in float64."""
    k = a.shape[-1]
    out_elements = math.prod(_matmul_shape(a.shape, b.shape))
    chunk = max(_CHUNK, -(-k // max(1, _PARTIAL_ELEMENTS // max(out_elements, 1))))
    if chunk >= k:
        return np.matmul(a, b)
    blocks, main = k // chunk, (k // chunk) * chunk
    a_blocks = np.moveaxis(a[..., :main].reshape(*a.shape[:-1], blocks, chunk), -2, 0)
    b_blocks = np.moveaxis(
        b[..., :main, :].reshape(*b.shape[:-2], blocks, chunk, b.shape[-1]), -3, 0
    )
    total = np.add.reduce(np.matmul(a_blocks, b_blocks), axis=0, dtype=np.float64)
    if main < k:
        total += np.matmul(a[..., main:], b[..., main:, :])
    return total.astype(a.dtype)


def _matmul(a: np.ndarray, b: np.ndarray, what: str) -> np.ndarray:
    if a.ndim == 0 or b.ndim == 0:
        raise ValueError(f"{what}: inputs must have rank >= 1, received {a.shape} and {b.shape}.")
    # The product of the input sizes bounds the output; compute it exactly only past the cap.
    if 16 * max(a.size, 1) * max(b.size, 1) > max_bytes():
        check_allocation(f"{what} output", _matmul_shape(a.shape, b.shape), a.dtype)
    _matmul_shape(a.shape, b.shape)  # a clear error for shapes that do not align
    work = compute_dtype(a.dtype)
    x, y = a.astype(work, copy=False), b.astype(work, copy=False)
    if work != np.float32 or a.shape[-1] <= _CHUNK:
        result = np.matmul(x, y)
    else:
        # 1-D operands become matrices (NumPy's matmul rule) and lose that axis after.
        x2 = x[None, :] if x.ndim == 1 else x
        y2 = y[:, None] if y.ndim == 1 else y
        result = _chunked_matmul(x2, y2)
        if y.ndim == 1:
            result = result[..., 0]
        if x.ndim == 1:
            result = result[..., 0, :] if y.ndim > 1 else result[..., 0]
    return result.astype(a.dtype, copy=False)


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
    if x.size == 0:  # nothing to normalize (the max of an empty axis has no value)
        return np.empty(x.shape, x.dtype)
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
    # The spec leaves the random stream to the runtime; for a given `seed` this is
    # onnx.reference's (a legacy RandomState), so the two give the same mask. No
    # seed: a fresh one, as the spec asks.
    keep = np.random.RandomState(seed).uniform(0.0, 1.0, data.shape) >= rate
    scaled = keep * data.astype(float_compute_dtype(data.dtype)) * (1.0 / (1.0 - rate))
    return as_array(scaled, data.dtype), keep
