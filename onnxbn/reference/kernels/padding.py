"""Pad: constant, reflect, edge and wrap modes; negative pads crop (ONNX Pad-2..Pad-19)."""

from __future__ import annotations

import numpy as np

from onnxbn.reference.kernels.table import kernel
from onnxbn.reference.limits import check_allocation

_NUMPY_MODES = {"constant": "constant", "reflect": "reflect", "edge": "edge", "wrap": "wrap"}


def _pad(data: np.ndarray, pads: list[int], mode: str, value, axes=None) -> np.ndarray:
    rank = data.ndim
    axes = list(range(rank)) if axes is None else [int(a) % rank for a in axes]
    if len(pads) != 2 * len(axes):
        raise ValueError(
            f"Pad: pads has {len(pads)} values, expected 2 x {len(axes)} (begins then ends)."
        )
    if mode not in _NUMPY_MODES:
        raise ValueError(f"Pad: unknown mode {mode!r}; expected one of {sorted(_NUMPY_MODES)}.")
    begins = [0] * rank
    ends = [0] * rank
    for i, axis in enumerate(axes):
        begins[axis] = int(pads[i])
        ends[axis] = int(pads[i + len(axes)])
    # Negative pads remove elements: crop first, then pad the positive parts.
    crop = tuple(
        slice(max(-b, 0), data.shape[a] - max(-e, 0)) for a, (b, e) in enumerate(zip(begins, ends))
    )
    data = data[crop]
    widths = [(max(b, 0), max(e, 0)) for b, e in zip(begins, ends)]
    out_shape = tuple(d + b + e for d, (b, e) in zip(data.shape, widths))
    check_allocation("Pad output", out_shape, data.dtype)
    if mode == "constant":
        fill = np.zeros((), data.dtype) if value is None else np.asarray(value).astype(data.dtype)
        return np.pad(
            data, widths, mode="constant", constant_values=fill.item() if fill.size else 0
        )
    return np.pad(data, widths, mode=_NUMPY_MODES[mode])


@kernel("Pad", 2)
def pad_2(data: np.ndarray, *, pads: list[int], mode: str = "constant", value: float = 0.0):
    return (_pad(data, list(pads), mode, np.asarray(value, dtype=data.dtype)),)


@kernel("Pad", 11)
def pad_11(
    data: np.ndarray,
    pads: np.ndarray,
    constant_value: np.ndarray | None = None,
    *,
    mode: str = "constant",
):
    return (_pad(data, pads.tolist(), mode, constant_value),)


@kernel("Pad", 18)
def pad_18(
    data: np.ndarray,
    pads: np.ndarray,
    constant_value: np.ndarray | None = None,
    axes: np.ndarray | None = None,
    *,
    mode: str = "constant",
):
    return (
        _pad(data, pads.tolist(), mode, constant_value, None if axes is None else axes.tolist()),
    )
