"""Conv against direct loops written here (float64, so the tolerance is round-off only)."""

from __future__ import annotations

import numpy as np
import pytest

from tests.reference.helpers import run_node

# ---------------------------------------------------------------- Conv


def _naive_conv(x, w, b, strides, dilations, pads, group):
    n, c, h, wd = x.shape
    m, cg, kh, kw = w.shape
    x = np.pad(x, [(0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])])
    oh = (x.shape[2] - (kh - 1) * dilations[0] - 1) // strides[0] + 1
    ow = (x.shape[3] - (kw - 1) * dilations[1] - 1) // strides[1] + 1
    y = np.zeros((n, m, oh, ow))
    per_group = m // group
    for f in range(m):
        g = f // per_group
        for i in range(oh):
            for j in range(ow):
                rows = i * strides[0] + np.arange(kh) * dilations[0]
                cols = j * strides[1] + np.arange(kw) * dilations[1]
                patch = x[:, g * cg : (g + 1) * cg][:, :, rows][:, :, :, cols]
                y[:, f, i, j] = (patch * w[f]).sum(axis=(1, 2, 3)) + (b[f] if b is not None else 0)
    return y


CONV_CASES = [
    ("plain", 1, [1, 1], [1, 1], [0, 0, 0, 0]),
    ("strided-padded", 1, [2, 2], [1, 1], [1, 2, 1, 0]),
    ("dilated", 1, [1, 1], [2, 1], [0, 0, 0, 0]),
    ("grouped", 2, [1, 2], [1, 1], [1, 1, 1, 1]),
    ("depthwise", 4, [1, 1], [1, 1], [1, 1, 1, 1]),
]


@pytest.mark.parametrize(
    "group, strides, dilations, pads", [c[1:] for c in CONV_CASES], ids=[c[0] for c in CONV_CASES]
)
def test_conv_matches_direct_loops(group, strides, dilations, pads):
    rng = np.random.default_rng(12)
    x = rng.normal(size=(2, 4, 7, 6))
    w = rng.normal(size=(4, 4 // group, 3, 2))
    b = rng.normal(size=4)
    (got,) = run_node(
        "Conv", [x, w, b], 1, 11, group=group, strides=strides, dilations=dilations, pads=pads
    )
    np.testing.assert_allclose(
        got, _naive_conv(x, w, b, strides, dilations, pads, group), rtol=1e-12, atol=1e-12
    )


def test_conv_same_upper_keeps_spatial_size():
    rng = np.random.default_rng(13)
    x, w = (
        rng.normal(size=(1, 2, 5, 5)).astype(np.float32),
        rng.normal(size=(3, 2, 3, 3)).astype(np.float32),
    )
    (got,) = run_node("Conv", [x, w], 1, 11, auto_pad="SAME_UPPER")
    expected = _naive_conv(
        x.astype(np.float64), w.astype(np.float64), None, [1, 1], [1, 1], [1, 1, 1, 1], 1
    )
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
