"""Windowed kernels: Conv (im2col + matmul), ConvTranspose (matmul + scatter-add), AveragePool, MaxPool, GlobalAveragePool/MaxPool.

Tensors are N x C x D1 x ... x Dn. Windows are NumPy strided views of the
padded input (`sliding_window_view`), subsampled by strides and dilations.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from onnxbn.reference.kernels.precision import (
    accumulation_dtype,
    as_array,
    compute_dtype,
    is_float,
)
from onnxbn.reference.kernels.table import kernel
from onnxbn.reference.limits import check_allocation

_AUTO_PADS = ("NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID")


def _per_axis(values: Sequence[int] | None, n: int, default: int, name: str, op: str) -> list[int]:
    if values is None:
        return [default] * n
    if len(values) != n or any(v < 1 for v in values):
        raise ValueError(f"{op} {name} {list(values)} must hold {n} positive ints.")
    return [int(v) for v in values]


def window_geometry(
    op: str,
    spatial: Sequence[int],
    kernel_shape: Sequence[int],
    strides: Sequence[int] | None,
    dilations: Sequence[int] | None,
    pads: Sequence[int] | None,
    auto_pad: str,
    ceil_mode: int = 0,
) -> tuple[list[int], list[int], list[int], list[int], list[int], list[int]]:
    """Output size and padding of a sliding-window op.

    Returns:
        `(strides, dilations, pads_begin, pads_end, extra_end, out)`: `extra_end`
        is padding beyond `pads_end` that ceil mode needs (it counts nowhere).

    Raises:
        ValueError: bad attributes, or an empty output.
    """
    n = len(spatial)
    strides_ = _per_axis(strides, n, 1, "strides", op)
    dilations_ = _per_axis(dilations, n, 1, "dilations", op)
    span = [(k - 1) * d + 1 for k, d in zip(kernel_shape, dilations_)]
    if auto_pad not in _AUTO_PADS:
        raise ValueError(f"{op} auto_pad must be one of {_AUTO_PADS}, received {auto_pad!r}.")
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        out = [-(-size // s) for size, s in zip(spatial, strides_)]
        total = [
            max((o - 1) * s + w - size, 0) for o, s, w, size in zip(out, strides_, span, spatial)
        ]
        small = [t // 2 for t in total]
        big = [t - t // 2 for t in total]
        begin, end = (small, big) if auto_pad == "SAME_UPPER" else (big, small)
        return strides_, dilations_, begin, end, [0] * n, out
    if auto_pad == "VALID" or pads is None:
        pads = [0] * (2 * n)
    if len(pads) != 2 * n or any(p < 0 for p in pads):
        raise ValueError(f"{op} pads {list(pads)} must hold {2 * n} non-negative ints.")
    begin, end = [int(p) for p in pads[:n]], [int(p) for p in pads[n:]]
    out, extra = [], []
    for size, b, e, w, s in zip(spatial, begin, end, span, strides_):
        room = size + b + e - w
        o = (-(-room // s) if ceil_mode else room // s) + 1
        # Ceil mode drops a last window that would start in the end padding.
        if ceil_mode and (o - 1) * s >= size + b:
            o -= 1
        if room < 0 or o < 1:
            raise ValueError(
                f"{op}: window {w} (kernel x dilation) is larger than the padded input "
                f"{size + b + e}."
            )
        out.append(o)
        extra.append(max((o - 1) * s + w - (size + b + e), 0))
    return strides_, dilations_, begin, end, extra, out


def _windows(
    x: np.ndarray,
    kernel_shape: Sequence[int],
    strides: list[int],
    dilations: list[int],
    out: list[int],
) -> np.ndarray:
    """View of shape (..., *out, *kernel_shape) over the last len(out) axes of padded `x`."""
    n = len(out)
    axes = tuple(range(x.ndim - n, x.ndim))
    span = [(k - 1) * d + 1 for k, d in zip(kernel_shape, dilations)]
    view = sliding_window_view(x, span, axis=axes)
    lead = (slice(None),) * (x.ndim - n)
    index = lead + tuple(slice(0, (o - 1) * s + 1, s) for o, s in zip(out, strides))
    return view[index + tuple(slice(None, None, d) for d in dilations)]


def _pad(x: np.ndarray, begin: list[int], end: list[int], value: object, what: str) -> np.ndarray:
    if not any(begin) and not any(end):
        return x
    shape = list(x.shape[:2]) + [s + b + e for s, b, e in zip(x.shape[2:], begin, end)]
    check_allocation(what, shape, x.dtype)
    return np.pad(x, [(0, 0), (0, 0), *zip(begin, end)], constant_values=value)


@kernel("Conv", 1)
def conv(
    X: np.ndarray,
    W: np.ndarray,
    B: np.ndarray | None = None,
    *,
    auto_pad: str = "NOTSET",
    dilations: list[int] | None = None,
    group: int = 1,
    kernel_shape: list[int] | None = None,
    pads: list[int] | None = None,
    strides: list[int] | None = None,
) -> tuple[np.ndarray]:
    if X.ndim < 3 or W.ndim != X.ndim:
        raise ValueError(
            f"Conv takes X (N, C, D...) and W (M, C/group, k...), received {X.shape}, {W.shape}."
        )
    n, c = X.shape[:2]
    m, cg = W.shape[:2]
    if group < 1 or c % group or m % group or cg != c // group:
        raise ValueError(
            f"Conv group={group}: input channels {c} and filters {W.shape} do not match "
            f"(expected W of shape (M, {c}/group, ...) with M divisible by group)."
        )
    kshape = list(W.shape[2:])
    if kernel_shape is not None and list(kernel_shape) != kshape:
        raise ValueError(f"Conv kernel_shape {kernel_shape} differs from W's {kshape}.")
    strides_, dil, begin, end, _, out = window_geometry(
        "Conv", X.shape[2:], kshape, strides, dilations, pads, auto_pad
    )
    work = compute_dtype(X.dtype)
    x = _pad(X.astype(work, copy=False), begin, end, 0, "Conv padded input")
    k, o = math.prod(kshape), math.prod(out)
    check_allocation("Conv im2col buffer", [n, c, o, k], work)
    cols = _windows(x, kshape, strides_, dil, out)  # (N, C, *out, *k)
    s = len(out)
    cols = cols.reshape(n, group, cg, *out, *kshape)
    cols = cols.transpose(0, 1, *range(3, 3 + s), 2, *range(3 + s, 3 + 2 * s))
    cols = cols.reshape(n, group, o, cg * k)
    w = W.astype(work, copy=False).reshape(group, m // group, cg * k).transpose(0, 2, 1)
    y = np.matmul(cols, w)  # (N, G, O, M/G)
    y = y.transpose(0, 1, 3, 2).reshape(n, m, *out)
    if B is not None:
        y = y + B.astype(work, copy=False).reshape(m, *([1] * s))
    return (as_array(y, X.dtype),)


def _transpose_geometry(
    x_spatial: Sequence[int],
    kshape: list[int],
    strides: list[int],
    dil: list[int],
    output_padding: Sequence[int] | None,
    output_shape: Sequence[int] | None,
    pads: Sequence[int] | None,
    auto_pad: str,
) -> tuple[list[int], list[int], list[int]]:
    """ConvTranspose's `(full, begin, out)`: uncropped size, leading crop and output size."""
    n = len(x_spatial)
    extra = [0] * n if output_padding is None else [int(p) for p in output_padding]
    if len(extra) != n or any(p < 0 for p in extra):
        raise ValueError(f"ConvTranspose output_padding {list(extra)} must hold {n} ints >= 0.")
    full = [s * (i - 1) + (k - 1) * d + 1 + e
            for i, k, s, d, e in zip(x_spatial, kshape, strides, dil, extra)]  # fmt: skip
    if auto_pad not in _AUTO_PADS:
        raise ValueError(f"ConvTranspose auto_pad must be one of {_AUTO_PADS}, not {auto_pad!r}.")
    if output_shape is None and auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        output_shape = [i * s for i, s in zip(x_spatial, strides)]
    if output_shape is not None:
        out = [int(o) for o in list(output_shape)[-n:]]
        total = [f - o for f, o in zip(full, out)]
        # The spec's split of the total padding; SAME_UPPER puts the odd element at the end.
        begin = [t // 2 if auto_pad == "SAME_UPPER" else t - t // 2 for t in total]
        return full, [max(b, 0) for b in begin], out
    if auto_pad == "VALID" or pads is None:
        pads = [0] * (2 * n)
    if len(pads) != 2 * n or any(p < 0 for p in pads):
        raise ValueError(f"ConvTranspose pads {list(pads)} must hold {2 * n} ints >= 0.")
    out = [f - int(b) - int(e) for f, b, e in zip(full, pads[:n], pads[n:])]
    if any(o < 1 for o in out):
        raise ValueError(f"ConvTranspose pads {list(pads)} leave an empty output {out}.")
    return full, [int(b) for b in pads[:n]], out


@kernel("ConvTranspose", 1)
def conv_transpose(
    X: np.ndarray,
    W: np.ndarray,
    B: np.ndarray | None = None,
    *,
    auto_pad: str = "NOTSET",
    dilations: list[int] | None = None,
    group: int = 1,
    kernel_shape: list[int] | None = None,
    output_padding: list[int] | None = None,
    output_shape: list[int] | None = None,
    pads: list[int] | None = None,
    strides: list[int] | None = None,
) -> tuple[np.ndarray]:
    if X.ndim < 3 or W.ndim != X.ndim:
        raise ValueError(
            f"ConvTranspose takes X (N, C, D...) and W (C, M/group, k...), received {X.shape}, "
            f"{W.shape}."
        )
    n, c = X.shape[:2]
    mg = W.shape[1]
    if group < 1 or c % group or W.shape[0] != c:
        raise ValueError(
            f"ConvTranspose group={group}: input channels {c} and W {W.shape} do not match "
            f"(expected W of shape ({c}, M/group, ...) with {c} divisible by group)."
        )
    kshape = list(W.shape[2:])
    if kernel_shape is not None and list(kernel_shape) != kshape:
        raise ValueError(f"ConvTranspose kernel_shape {kernel_shape} differs from W's {kshape}.")
    s = len(kshape)
    strides_ = _per_axis(strides, s, 1, "strides", "ConvTranspose")
    dil = _per_axis(dilations, s, 1, "dilations", "ConvTranspose")
    full, begin, out = _transpose_geometry(
        X.shape[2:], kshape, strides_, dil, output_padding, output_shape, pads, auto_pad
    )
    work = compute_dtype(X.dtype)
    size = [max(f, b + o) for f, b, o in zip(full, begin, out)]
    check_allocation("ConvTranspose output buffer", [n, group * mg, *size], work)
    # Every input position times the kernel: (N, G, P, Cg) @ (G, Cg, M/G * K).
    cg, inner = c // group, list(X.shape[2:])
    x = X.astype(work, copy=False).reshape(n, group, cg, math.prod(inner)).transpose(0, 1, 3, 2)
    w = W.astype(work, copy=False).reshape(group, cg, mg * math.prod(kshape))
    cols = np.matmul(x, w).reshape(n, group, *inner, mg, *kshape)
    cols = cols.transpose(0, 1, 2 + s, *range(2, 2 + s), *range(3 + s, 3 + 2 * s))
    y = np.zeros((n, group, mg, *size), dtype=work)
    # Scatter-add: kernel offset `o` of input step `i` lands on `i * stride + o * dilation`.
    for offset in itertools.product(*(range(k) for k in kshape)):
        where = tuple(
            slice(o * d, o * d + st * (i - 1) + 1, st)
            for o, d, st, i in zip(offset, dil, strides_, inner)
        )
        y[(slice(None),) * 3 + where] += cols[(Ellipsis, *offset)]
    y = y[(slice(None),) * 3 + tuple(slice(b, b + o) for b, o in zip(begin, out))]
    y = y.reshape(n, group * mg, *out)
    if B is not None:
        y = y + B.astype(work, copy=False).reshape(group * mg, *([1] * s))
    return (as_array(y, X.dtype),)


def _pool_setup(op: str, X: np.ndarray, kernel_shape: list[int], **geometry: object) -> tuple:
    if X.ndim < 3:
        raise ValueError(f"{op} takes X of shape (N, C, D...), received {X.shape}.")
    if len(kernel_shape) != X.ndim - 2 or any(k < 1 for k in kernel_shape):
        raise ValueError(f"{op} kernel_shape {kernel_shape} must hold {X.ndim - 2} positive ints.")
    return window_geometry(op, X.shape[2:], kernel_shape, **geometry)


@kernel("AveragePool", 7)
def average_pool(
    X: np.ndarray,
    *,
    auto_pad: str = "NOTSET",
    ceil_mode: int = 0,
    count_include_pad: int = 0,
    dilations: list[int] | None = None,
    kernel_shape: list[int],
    pads: list[int] | None = None,
    strides: list[int] | None = None,
) -> tuple[np.ndarray]:
    strides_, dil, begin, end, extra, out = _pool_setup(
        "AveragePool",
        X,
        kernel_shape,
        strides=strides,
        dilations=dilations,
        pads=pads,
        auto_pad=auto_pad,
        ceil_mode=ceil_mode,
    )
    work = compute_dtype(X.dtype)
    full_end = [e + x for e, x in zip(end, extra)]
    x = _pad(X.astype(work, copy=False), begin, full_end, 0, "AveragePool padded input")
    s = len(out)
    axes = tuple(range(-s, 0))
    sums = _windows(x, kernel_shape, strides_, dil, out).sum(axis=axes)
    # Divisor: real elements, plus explicit padding when count_include_pad (never ceil padding).
    weight = np.ones((1, 1, *X.shape[2:]), dtype=work)
    weight = _pad(weight, begin, end, 1 if count_include_pad else 0, "AveragePool counts")
    weight = _pad(weight, [0] * s, extra, 0, "AveragePool counts")
    counts = _windows(weight, kernel_shape, strides_, dil, out).sum(axis=axes)
    return (as_array(sums / counts, X.dtype),)


@kernel("MaxPool", 8, wants_output_count=True)
def max_pool(
    X: np.ndarray,
    *,
    auto_pad: str = "NOTSET",
    ceil_mode: int = 0,
    dilations: list[int] | None = None,
    kernel_shape: list[int],
    pads: list[int] | None = None,
    storage_order: int = 0,
    strides: list[int] | None = None,
    _num_node_outputs: int = 2,
) -> tuple[np.ndarray, ...]:
    strides_, dil, begin, end, extra, out = _pool_setup(
        "MaxPool",
        X,
        kernel_shape,
        strides=strides,
        dilations=dilations,
        pads=pads,
        auto_pad=auto_pad,
        ceil_mode=ceil_mode,
    )
    lowest = -np.inf if is_float(X.dtype) else np.iinfo(X.dtype).min
    full_end = [e + x for e, x in zip(end, extra)]
    x = _pad(X, begin, full_end, lowest, "MaxPool padded input")
    s = len(out)
    windows = _windows(x, kernel_shape, strides_, dil, out)
    if _num_node_outputs < 2:  # no Indices requested
        return (as_array(windows.max(axis=tuple(range(-s, 0))), X.dtype),)
    flat = windows.reshape(*windows.shape[: 2 + s], -1)
    arg = np.argmax(flat, axis=-1)
    y = np.take_along_axis(flat, arg[..., None], axis=-1)[..., 0]
    # Indices: flat position in the unpadded input, row- or column-major per storage_order.
    spatial = X.shape[2:]
    order = "F" if storage_order else "C"
    positions = np.arange(math.prod(spatial), dtype=np.int64).reshape(spatial, order=order)
    positions = _pad(positions[None, None], begin, full_end, -1, "MaxPool indices")
    pos_windows = _windows(positions, kernel_shape, strides_, dil, out)
    pos_flat = pos_windows.reshape(*pos_windows.shape[: 2 + s], -1)
    spatial_index = np.take_along_axis(
        np.broadcast_to(pos_flat, (*flat.shape[:2], *pos_flat.shape[2:])), arg[..., None], axis=-1
    )[..., 0]
    channel = np.arange(X.shape[0] * X.shape[1], dtype=np.int64).reshape(
        X.shape[0], X.shape[1], *([1] * s)
    )
    return as_array(y, X.dtype), spatial_index + channel * math.prod(spatial)


@kernel("GlobalAveragePool", 1)
def global_average_pool(X: np.ndarray) -> tuple[np.ndarray]:
    if X.ndim < 3:
        raise ValueError(f"GlobalAveragePool takes X of shape (N, C, D...), received {X.shape}.")
    axes = tuple(range(2, X.ndim))
    mean = np.mean(X, axis=axes, keepdims=True, dtype=accumulation_dtype(X.dtype))
    return (as_array(mean, X.dtype),)


@kernel("GlobalMaxPool", 1)
def global_max_pool(X: np.ndarray) -> tuple[np.ndarray]:
    if X.ndim < 3:
        raise ValueError(f"GlobalMaxPool takes X of shape (N, C, D...), received {X.shape}.")
    return (np.max(X, axis=tuple(range(2, X.ndim)), keepdims=True),)
