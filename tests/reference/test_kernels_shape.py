"""Shape and data-movement kernels (Reshape, Squeeze, Slice, Split, Range, ...) against NumPy."""

from __future__ import annotations

import numpy as np
import pytest

from tests.reference.helpers import run_node

# ---------------------------------------------------------------- shape kernels

I64 = np.int64
SHAPE_CASES = [
    # id, op, opset, inputs, attributes, expected (function of the first input)
    (
        "reshape-copy-zero",
        "Reshape",
        14,
        [(2, 3, 4), np.array([0, -1], I64)],
        {},
        lambda x: x.reshape(2, 12),
    ),
    (
        "reshape-allowzero",
        "Reshape",
        14,
        [(0, 3), np.array([0, 3], I64)],
        {"allowzero": 1},
        lambda x: x.reshape(0, 3),
    ),
    ("squeeze-attribute", "Squeeze", 11, [(1, 3, 1)], {"axes": [-1]}, lambda x: x.reshape(1, 3)),
    (
        "squeeze-input",
        "Squeeze",
        13,
        [(1, 3, 1), np.array([0], I64)],
        {},
        lambda x: x.reshape(3, 1),
    ),
    ("squeeze-all", "Squeeze", 13, [(1, 3, 1)], {}, lambda x: x.reshape(3)),
    (
        "unsqueeze-attribute",
        "Unsqueeze",
        11,
        [(3,)],
        {"axes": [0, -1]},
        lambda x: x.reshape(1, 3, 1),
    ),
    ("unsqueeze-input", "Unsqueeze", 13, [(3,), np.array([1], I64)], {}, lambda x: x.reshape(3, 1)),
    (
        "slice-negative-step",
        "Slice",
        13,
        [(5, 4), np.array([-1], I64), np.array([-6], I64), np.array([0], I64), np.array([-2], I64)],
        {},
        lambda x: x[::-2],
    ),
    (
        "slice-attributes",
        "Slice",
        9,
        [(5, 4)],
        {"starts": [1], "ends": [100], "axes": [1]},
        lambda x: x[:, 1:],
    ),
    (
        "shape-start-end",
        "Shape",
        15,
        [(2, 3, 4, 5)],
        {"start": 1, "end": -1},
        lambda x: np.array([3, 4], I64),
    ),
    (
        "gather-negative",
        "Gather",
        13,
        [(4, 3), np.array([[-1, 0]], I64)],
        {"axis": 0},
        lambda x: x[[[3, 0]]],
    ),
    (
        "expand",
        "Expand",
        13,
        [(3, 1), np.array([2, 1, 4], I64)],
        {},
        lambda x: np.broadcast_to(x, (2, 3, 4)),
    ),
    ("tile", "Tile", 13, [(2, 3), np.array([2, 1], I64)], {}, lambda x: np.tile(x, (2, 1))),
    ("transpose-default", "Transpose", 13, [(2, 3, 4)], {}, lambda x: x.transpose()),
    ("flatten-negative", "Flatten", 13, [(2, 3, 4)], {"axis": -1}, lambda x: x.reshape(6, 4)),
]


@pytest.mark.parametrize(
    "op, opset, inputs, attributes, expected",
    [case[1:] for case in SHAPE_CASES],
    ids=[case[0] for case in SHAPE_CASES],
)
def test_shape_kernels(op, opset, inputs, attributes, expected):
    data = np.arange(np.prod(inputs[0]), dtype=np.float32).reshape(inputs[0])
    (got,) = run_node(op, [data, *inputs[1:]], 1, opset, **attributes)
    want = expected(data)
    assert got.shape == want.shape and got.dtype == want.dtype
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize(
    "opset, split, attributes, n_outputs, sizes",
    [
        (13, np.array([1, 4], I64), {}, 2, [1, 4]),
        (13, None, {}, 5, [1] * 5),
        (11, None, {"split": [2, 3]}, 2, [2, 3]),
        (18, None, {"num_outputs": 3}, 3, [2, 2, 1]),
    ],
)
def test_split(opset, split, attributes, n_outputs, sizes):
    x = np.arange(10, dtype=np.float32).reshape(2, 5)
    outputs = run_node("Split", [x, split], n_outputs, opset, axis=1, **attributes)
    assert [o.shape[1] for o in outputs] == sizes
    np.testing.assert_array_equal(np.concatenate(outputs, axis=1), x)


@pytest.mark.parametrize(
    "start, limit, delta, expected",
    [
        (np.int64(3), np.int64(9), np.int64(3), [3, 6]),
        (np.int32(10), np.int32(4), np.int32(-2), [10, 8, 6]),
        (np.float32(1), np.float32(2), np.float32(0.25), [1, 1.25, 1.5, 1.75]),
        (np.int64(5), np.int64(5), np.int64(1), []),
    ],
)
def test_range(start, limit, delta, expected):
    (got,) = run_node("Range", [np.array(start), np.array(limit), np.array(delta)], 1, 11)
    assert got.dtype == np.asarray(start).dtype
    np.testing.assert_array_equal(got, np.array(expected, dtype=got.dtype))
