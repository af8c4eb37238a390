"""Empty tensors through every kernel the exports use, against the ONNX specification.

A replica with no rows, a batch whose mask selects nothing, a Slice that starts
past the end: each op must give what the spec defines for zero elements (an
empty result of the right shape, or the identity of a reduction over an empty
set), exactly as a float64 formula written here says.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.reference.helpers import run_node

I64, F32, F64 = np.int64, np.float32, np.float64
BIG = np.iinfo(np.int64).max


def rows(n: int, width: int = 3, dtype=F32) -> np.ndarray:
    """`(n, width)` values 1, 2, 3, ... (nothing when n == 0)."""
    return np.arange(1, n * width + 1, dtype=dtype).reshape(n, width)


def ints(*values: int) -> np.ndarray:
    return np.array(values, I64)


# id, op, opset, inputs, attributes, expected outputs (exact values and dtypes)
CASES = [
    # Reductions over an empty axis yield each reduction's identity (ReduceSum-13 / -18 docs).
    (
        "reduce-sum-empty-axis",
        "ReduceSum",
        13,
        [rows(0), ints(0)],
        {"keepdims": 0},
        [np.zeros(3, F32)],
    ),
    ("reduce-sum-1-empty-axis", "ReduceSum", 1, [rows(0)], {"axes": [0]}, [np.zeros((1, 3), F32)]),
    (
        "reduce-sum-square-empty-axis",
        "ReduceSumSquare",
        18,
        [rows(0), ints(0)],
        {"keepdims": 0},
        [np.zeros(3, F32)],
    ),
    (
        "reduce-l2-empty-axis",
        "ReduceL2",
        18,
        [rows(0), ints(0)],
        {"keepdims": 0},
        [np.zeros(3, F32)],
    ),
    (
        "reduce-prod-empty-axis",
        "ReduceProd",
        18,
        [rows(0), ints(0)],
        {"keepdims": 0},
        [np.ones(3, F32)],
    ),
    (
        "reduce-max-empty-axis",
        "ReduceMax",
        18,
        [rows(0), ints(0)],
        {"keepdims": 0},
        [np.full(3, -np.inf, F32)],
    ),
    (
        "reduce-min-empty-axis",
        "ReduceMin",
        18,
        [rows(0), ints(0)],
        {"keepdims": 0},
        [np.full(3, np.inf, F32)],
    ),
    (
        "reduce-max-int-empty-axis",
        "ReduceMax",
        18,
        [rows(0, dtype=np.int32), ints(0)],
        {"keepdims": 0},
        [np.full(3, np.iinfo(np.int32).min, np.int32)],
    ),
    (
        "reduce-sum-all-of-empty",
        "ReduceSum",
        13,
        [rows(0)],
        {"keepdims": 1},
        [np.zeros((1, 1), F32)],
    ),
    # Reducing a non-empty axis of an empty tensor: an empty result.
    (
        "reduce-mean-other-axis",
        "ReduceMean",
        18,
        [rows(0), ints(1)],
        {"keepdims": 1},
        [np.zeros((0, 1), F32)],
    ),
    (
        "reduce-sum-other-axis",
        "ReduceSum",
        13,
        [rows(0), ints(1)],
        {"keepdims": 0},
        [np.zeros(0, F32)],
    ),
    ("argmax-other-axis", "ArgMax", 13, [rows(0)], {"axis": 1, "keepdims": 0}, [np.zeros(0, I64)]),
    # Gather and MatMul/Gemm with zero rows (the masked and synchronized statistics).
    ("gather-no-indices", "Gather", 13, [rows(4), ints()], {"axis": 0}, [np.zeros((0, 3), F32)]),
    ("gather-from-empty", "Gather", 13, [rows(0), ints()], {"axis": 0}, [np.zeros((0, 3), F32)]),
    (
        "gather-columns-of-empty",
        "Gather",
        13,
        [rows(0), ints(2, 0)],
        {"axis": 1},
        [np.zeros((0, 2), F32)],
    ),
    ("matmul-zero-rows", "MatMul", 13, [rows(0), rows(3, 2)], {}, [np.zeros((0, 2), F32)]),
    # A product over an empty inner axis is a sum over an empty set: 0.
    ("matmul-zero-inner", "MatMul", 13, [rows(2, 0), rows(0, 4)], {}, [np.zeros((2, 4), F32)]),
    ("matmul-vector-zero-inner", "MatMul", 13, [rows(1, 0)[0], rows(0)], {}, [np.zeros(3, F32)]),
    (
        "gemm-zero-rows",
        "Gemm",
        13,
        [rows(0), rows(3, 2), np.array([0.5, -1.0], F32)],
        {},
        [np.zeros((0, 2), F32)],
    ),
    (
        "gemm-zero-inner",
        "Gemm",
        13,
        [rows(2, 0), rows(0, 2), np.array([0.5, -1.0], F32)],
        {"beta": 2.0},
        [np.array([[1.0, -2.0], [1.0, -2.0]], F32)],
    ),
    # Slice past the end clamps to the dim; a start past it gives nothing.
    ("slice-end-past-dim", "Slice", 13, [rows(5), ints(3), ints(100), ints(0)], {}, [rows(5)[3:]]),
    (
        "slice-end-int64-max",
        "Slice",
        13,
        [rows(5), ints(1), ints(BIG), ints(0)],
        {},
        [rows(5)[1:]],
    ),
    ("slice-start-past-dim", "Slice", 13, [rows(5), ints(7), ints(9), ints(0)], {}, [rows(0)]),
    ("slice-of-empty", "Slice", 13, [rows(0), ints(0), ints(4), ints(0)], {}, [rows(0)]),
    (
        "slice-backwards-past-start",
        "Slice",
        13,
        [rows(5), ints(-9), ints(-12), ints(0), ints(-1)],
        {},
        [rows(0)],
    ),
    # Data movement of empty tensors keeps the shape arithmetic.
    ("concat-with-empty", "Concat", 13, [rows(0), rows(2)], {"axis": 0}, [rows(2)]),
    ("reshape-empty", "Reshape", 14, [rows(0), ints(-1, 3, 1)], {}, [np.zeros((0, 3, 1), F32)]),
    ("reshape-copy-zero-dim", "Reshape", 14, [rows(0), ints(0, 3)], {}, [np.zeros((0, 3), F32)]),
    ("expand-empty", "Expand", 13, [rows(0, 1), ints(1, 4)], {}, [np.zeros((0, 4), F32)]),
    ("tile-empty", "Tile", 13, [rows(0), ints(3, 2)], {}, [np.zeros((0, 6), F32)]),
    ("tile-zero-repeats", "Tile", 13, [rows(2), ints(0, 1)], {}, [np.zeros((0, 3), F32)]),
    ("transpose-empty", "Transpose", 13, [rows(0)], {}, [np.zeros((3, 0), F32)]),
    (
        "squeeze-empty",
        "Squeeze",
        13,
        [np.zeros((0, 1, 3), F32), ints(1)],
        {},
        [np.zeros((0, 3), F32)],
    ),
    ("unsqueeze-empty", "Unsqueeze", 13, [rows(0), ints(-1)], {}, [np.zeros((0, 3, 1), F32)]),
    ("shape-of-empty", "Shape", 15, [rows(0)], {}, [ints(0, 3)]),
    ("size-of-empty", "Size", 13, [rows(0)], {}, [np.array(0, I64)]),
    ("constant-of-shape-zero", "ConstantOfShape", 9, [ints(0, 3)], {}, [np.zeros((0, 3), F32)]),
    ("range-empty", "Range", 11, [ints(4)[0], ints(4)[0], ints(1)[0]], {}, [np.zeros(0, I64)]),
    (
        "pad-empty-axis",
        "Pad",
        18,
        [rows(0), ints(1, 0, 1, 0), np.array(7.0, F32)],
        {},
        [np.full((2, 3), 7.0, F32)],
    ),
    ("pad-other-axis", "Pad", 18, [rows(0), ints(0, 1, 0, 1)], {}, [np.zeros((0, 5), F32)]),
    # Element-wise ops on empty operands broadcast to an empty result.
    ("add-empty", "Add", 14, [rows(0), np.ones(3, F32)], {}, [np.zeros((0, 3), F32)]),
    ("sub-empty", "Sub", 14, [np.ones(3, F32), rows(0)], {}, [np.zeros((0, 3), F32)]),
    ("mul-empty", "Mul", 14, [rows(0), rows(1)], {}, [np.zeros((0, 3), F32)]),
    ("div-empty", "Div", 14, [rows(0), rows(1)], {}, [np.zeros((0, 3), F32)]),
    ("max-empty", "Max", 13, [rows(0), rows(1)], {}, [np.zeros((0, 3), F32)]),
    ("min-empty", "Min", 13, [rows(0), rows(1)], {}, [np.zeros((0, 3), F32)]),
    ("equal-empty", "Equal", 13, [rows(0), rows(1)], {}, [np.zeros((0, 3), bool)]),
    ("less-empty", "Less", 13, [rows(0), rows(1)], {}, [np.zeros((0, 3), bool)]),
    ("greater-empty", "Greater", 13, [rows(0), rows(1)], {}, [np.zeros((0, 3), bool)]),
    ("not-empty", "Not", 1, [np.zeros((0, 3), bool)], {}, [np.zeros((0, 3), bool)]),
    (
        "or-empty",
        "Or",
        7,
        [np.zeros((0, 3), bool), np.ones(3, bool)],
        {},
        [np.zeros((0, 3), bool)],
    ),
    (
        "where-empty",
        "Where",
        16,
        [np.zeros((0, 3), bool), rows(1), np.zeros(3, F32)],
        {},
        [np.zeros((0, 3), F32)],
    ),
    ("cast-empty", "Cast", 19, [rows(0)], {"to": 11}, [np.zeros((0, 3), F64)]),
    ("identity-empty", "Identity", 19, [rows(0)], {}, [np.zeros((0, 3), F32)]),
    ("neg-empty", "Neg", 13, [rows(0)], {}, [np.zeros((0, 3), F32)]),
    ("reciprocal-empty", "Reciprocal", 13, [rows(0)], {}, [np.zeros((0, 3), F32)]),
    ("sqrt-empty", "Sqrt", 13, [rows(0)], {}, [np.zeros((0, 3), F32)]),
    ("relu-empty", "Relu", 14, [rows(0)], {}, [np.zeros((0, 3), F32)]),
    ("leaky-relu-empty", "LeakyRelu", 16, [rows(0)], {}, [np.zeros((0, 3), F32)]),
    ("sigmoid-empty", "Sigmoid", 13, [rows(0)], {}, [np.zeros((0, 3), F32)]),
    ("tanh-empty", "Tanh", 13, [rows(0)], {}, [np.zeros((0, 3), F32)]),
    ("clip-empty", "Clip", 13, [rows(0), np.array(0.0, F32)], {}, [np.zeros((0, 3), F32)]),
    ("softmax-empty-rows", "Softmax", 13, [rows(0)], {"axis": -1}, [np.zeros((0, 3), F32)]),
    ("softmax-empty-axis", "Softmax", 13, [rows(3, 0)], {"axis": -1}, [np.zeros((3, 0), F32)]),
    ("softmax-1-empty-axis", "Softmax", 1, [rows(3, 0)], {"axis": 1}, [np.zeros((3, 0), F32)]),
    # Layers with an empty batch: nothing to compute, the shape follows.
    (
        "conv-empty-batch",
        "Conv",
        11,
        [np.zeros((0, 2, 5), F32), np.ones((4, 2, 3), F32)],
        {},
        [np.zeros((0, 4, 3), F32)],
    ),
    (
        "batch-normalization-inference-empty-batch",
        "BatchNormalization",
        15,
        [np.zeros((0, 3, 2), F32)] + [np.ones(3, F32)] * 4,
        {},
        [np.zeros((0, 3, 2), F32)],
    ),
]


@pytest.mark.parametrize(
    "op, opset, inputs, attributes, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_empty_tensors_follow_the_spec(op, opset, inputs, attributes, expected):
    got = run_node(op, inputs, len(expected), opset, **attributes)
    for value, want in zip(got, expected):
        assert value.shape == want.shape and value.dtype == want.dtype
        np.testing.assert_array_equal(value, want)


def test_reduce_mean_of_an_empty_set_is_nan():
    # The spec leaves it undefined; the interpreter gives sum / count = 0 / 0 = NaN, as
    # onnx.reference does, so a graph that relies on another value shows it here.
    (got,) = run_node("ReduceMean", [rows(0), ints(0)], 1, 18, keepdims=0)
    assert got.shape == (3,) and got.dtype == F32 and np.isnan(got).all()


def test_argmax_over_an_empty_axis_is_refused():
    with pytest.raises(ValueError, match="ArgMax over an empty axis"):
        run_node("ArgMax", [rows(0)], 1, 13, axis=0)
