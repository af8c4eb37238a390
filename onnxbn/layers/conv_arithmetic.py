"""Convolution arithmetic in NumPy: padding, output sizes, the convolution and its pullback.

What `Conv1D`/`Conv2D` (`onnxbn/layers/conv.py`) compute, as plain functions:
TensorFlow/JAX padding of `"valid"`, `"same"` and `"causal"`, and a
channels-last grouped cross-correlation with its pullback (`convolve_vjp`).
The lowering pads the same way.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import numpy as np


def conv_padding(
    size: int, kernel: int, stride: int, dilation: int, padding: str
) -> tuple[int, int]:
    """`(before, after)` padding of one spatial axis, as TensorFlow/JAX pad them."""
    span = dilation * (kernel - 1) + 1
    if padding == "valid":
        return 0, 0
    if padding == "causal":
        return span - 1, 0
    out = -(-size // stride)  # "same": ceil(size / stride) outputs
    total = max((out - 1) * stride + span - size, 0)
    return total // 2, total - total // 2


def conv_output_size(
    size: int | None, kernel: int, stride: int, dilation: int, padding: str
) -> int | None:
    """Output length of one spatial axis (None stays None)."""
    if size is None:
        return None
    if padding == "valid":
        return math.floor((size - dilation * (kernel - 1) - 1) / stride) + 1
    return math.floor((size - 1) / stride) + 1


def convolve_vjp(
    x: np.ndarray,
    kernel: np.ndarray,
    *,
    strides: tuple[int, ...],
    dilation_rate: tuple[int, ...],
    padding: str,
    groups: int,
) -> tuple[np.ndarray, Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]]:
    """Channels-last grouped cross-correlation (float64 here) and its pullback.

    Args:
        x: `(batch, *spatial, in_channels)`.
        kernel: `(*kernel_size, in_channels // groups, filters)`.
        strides, dilation_rate: one int per spatial axis.
        padding: `"valid"`, `"same"` or `"causal"`.
        groups: number of channel groups.

    Returns:
        `(y, pullback)`: `y` of shape `(batch, *out_spatial, filters)` and
        `pullback(dy) -> (dx, dkernel)`,
        the gradients with respect to `x` and `kernel` for the gradient `dy` of
        `y` (float64).
    """
    rank = kernel.ndim - 2
    ksize = kernel.shape[:rank]
    pads = [
        conv_padding(x.shape[1 + i], ksize[i], strides[i], dilation_rate[i], padding)
        for i in range(rank)
    ]
    padded = np.pad(x, [(0, 0)] + pads + [(0, 0)])
    out = [
        conv_output_size(padded.shape[1 + i], ksize[i], strides[i], dilation_rate[i], "valid")
        for i in range(rank)
    ]
    batch, cin, filters = x.shape[0], x.shape[-1], kernel.shape[-1]
    # Kernel (..., cin/g, filters) -> (..., cin/g, g, filters/g): group g reads its input slice.
    grouped = kernel.reshape(ksize + (cin // groups, groups, filters // groups))
    # Each kernel offset reads one strided window of the padded input.
    windows = [
        (
            offset,
            (slice(None),)
            + tuple(
                slice(o * d, o * d + s * (n - 1) + 1, s)
                for o, d, s, n in zip(offset, dilation_rate, strides, out)
            ),
        )
        for offset in itertools.product(*(range(k) for k in ksize))
    ]

    def patch(window: tuple) -> np.ndarray:
        return padded[window].reshape(batch, *out, groups, cin // groups)

    y = np.zeros((batch, *out, groups, filters // groups))
    for offset, window in windows:
        y += np.einsum("...gc,cgf->...gf", patch(window), grouped[offset])

    def pullback(dy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        dy = dy.reshape(batch, *out, groups, filters // groups)
        rows = dy.reshape(-1, groups, filters // groups)  # one row per output position
        dpadded = np.zeros(padded.shape)
        dgrouped = np.zeros(grouped.shape)
        for offset, window in windows:
            dpatch = np.einsum("...gf,cgf->...gc", dy, grouped[offset])
            dpadded[window] += dpatch.reshape(batch, *out, cin)
            patch_rows = patch(window).reshape(-1, groups, cin // groups)
            dgrouped[offset] = np.einsum("mgc,mgf->cgf", patch_rows, rows)
        inside = tuple(slice(b, b + n) for (b, _), n in zip(pads, x.shape[1:-1]))
        return dpadded[(slice(None),) + inside], dgrouped.reshape(kernel.shape)

    return y.reshape(batch, *out, filters), pullback
