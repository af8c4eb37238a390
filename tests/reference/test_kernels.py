"""Kernel semantics against float64 NumPy formulas written here.

Tolerances are per output dtype: the result is computed in float32 (or
float64) and rounded once, so the error is the final rounding plus a few
float32 ulps.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from tests.reference.helpers import run_node

BF16 = np.dtype(ml_dtypes.bfloat16)
F16, F32, F64 = np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64)
# (rtol, atol) for a value of this dtype computed exactly and rounded once.
TOLERANCE = {F64: (1e-12, 1e-12), F32: (2e-6, 2e-6), F16: (1e-3, 1e-3), BF16: (8e-3, 8e-3)}


def _close(actual: np.ndarray, expected: np.ndarray, dtype: np.dtype) -> None:
    assert actual.dtype == dtype
    rtol, atol = TOLERANCE[dtype]
    np.testing.assert_allclose(actual.astype(np.float64), expected, rtol=rtol, atol=atol)


# ---------------------------------------------------------------- BatchNormalization

# id, opset, training, X dtype, scale/B dtype, mean/var dtype, shape
BN_CASES = [
    ("9-inference-f32-4d", 9, False, F32, F32, F32, (4, 3, 5, 6)),
    ("9-training-f32-4d", 9, True, F32, F32, F32, (4, 3, 5, 6)),
    ("9-training-f64-2d", 9, True, F64, F64, F64, (16, 5)),
    ("13-inference-f16-3d", 13, False, F16, F16, F16, (4, 3, 7)),
    ("14-inference-f32-3d", 14, False, F32, F32, F32, (4, 3, 7)),
    ("14-training-f32-4d", 14, True, F32, F32, F32, (8, 4, 3, 3)),
    ("14-training-f16-stats-f32", 14, True, F16, F16, F32, (8, 4, 6, 6)),
    ("15-inference-f16-params-f32", 15, False, F16, F32, F32, (4, 3, 5, 5)),
    ("15-inference-bf16", 15, False, BF16, BF16, BF16, (4, 3, 5)),
    ("15-training-bf16-params-f32", 15, True, BF16, F32, F32, (16, 6, 4)),
    ("15-training-f64-5d", 15, True, F64, F64, F64, (2, 3, 2, 3, 4)),
]


def _bn_inputs(seed: int, x_dtype, param_dtype, stat_dtype, shape):
    rng = np.random.default_rng(seed)
    c = shape[1]
    x = (rng.normal(size=shape) * 3 + 1.5).astype(x_dtype)
    scale = rng.uniform(0.5, 2.0, c).astype(param_dtype)
    bias = rng.normal(size=c).astype(param_dtype)
    # Running statistics far from the batch's, so using the wrong ones shows.
    mean = rng.normal(-2.0, 1.0, c).astype(stat_dtype)
    var = rng.uniform(4.0, 9.0, c).astype(stat_dtype)
    return x, scale, bias, mean, var


def _bn_oracle(x, scale, bias, mean, var, epsilon, momentum, training):
    # ONNX stores float attributes as float32.
    epsilon, momentum = float(np.float32(epsilon)), float(np.float32(momentum))
    x, scale, bias, mean, var = (
        np.asarray(v, dtype=np.float64) for v in (x, scale, bias, mean, var)
    )
    axes = (0, *range(2, x.ndim))
    shape = (-1,) + (1,) * (x.ndim - 2)
    if training:
        batch_mean, batch_var = x.mean(axis=axes), x.var(axis=axes)
    else:
        batch_mean, batch_var = mean, var
    y = (x - batch_mean.reshape(shape)) / np.sqrt(batch_var.reshape(shape) + epsilon)
    y = y * scale.reshape(shape) + bias.reshape(shape)
    running_mean = mean * momentum + batch_mean * (1 - momentum)
    running_var = var * momentum + batch_var * (1 - momentum)
    return y, running_mean, running_var, batch_mean, batch_var


@pytest.mark.parametrize(
    "opset, training, x_dtype, param_dtype, stat_dtype, shape",
    [case[1:] for case in BN_CASES],
    ids=[case[0] for case in BN_CASES],
)
def test_batch_normalization(opset, training, x_dtype, param_dtype, stat_dtype, shape):
    epsilon, momentum = 1e-3, 0.9
    inputs = _bn_inputs(opset * 100 + len(shape), x_dtype, param_dtype, stat_dtype, shape)
    attributes = {"epsilon": epsilon, "momentum": momentum}
    if opset >= 14:
        attributes["training_mode"] = int(training)
        n_outputs = 3 if training else 1
    else:
        n_outputs = 5 if training else 1
    outputs = run_node("BatchNormalization", inputs, n_outputs, opset, **attributes)
    expected = _bn_oracle(*inputs, epsilon, momentum, training)
    _close(outputs[0], expected[0], x_dtype)
    if training:
        _close(outputs[1], expected[1], stat_dtype)
        _close(outputs[2], expected[2], stat_dtype)
    if n_outputs == 5:  # opset 9: saved mean and (biased) variance of the batch
        _close(outputs[3], expected[3], x_dtype)
        _close(outputs[4], expected[4], x_dtype)
    # The other mode's statistics give a visibly different Y.
    other = _bn_oracle(*inputs, epsilon, momentum, not training)[0]
    assert not np.allclose(outputs[0].astype(np.float64), other, atol=0.1)


@pytest.mark.parametrize("opset", [9, 11, 13])
def test_batch_normalization_9_inference_uses_running_statistics(opset):
    # onnx.reference normalizes with batch statistics here (onnx issue 5799).
    inputs = _bn_inputs(7, F32, F32, F32, (6, 2, 3))
    (y,) = run_node("BatchNormalization", inputs, 1, opset, epsilon=1e-5)
    _close(y, _bn_oracle(*inputs, 1e-5, 0.9, training=False)[0], F32)


def test_batch_normalization_14_inference_names_extra_outputs():
    inputs = _bn_inputs(8, F32, F32, F32, (6, 2, 3))
    with pytest.raises(ValueError, match="produced 1 outputs but the node names 3"):
        run_node("BatchNormalization", inputs, 3, 15, training_mode=0)


def test_batch_normalization_rejects_wrong_parameter_shape():
    x, scale, bias, mean, var = _bn_inputs(9, F32, F32, F32, (6, 2, 3))
    with pytest.raises(ValueError, match=r"input_mean must have shape \(2,\)"):
        run_node("BatchNormalization", [x, scale, bias, mean[:1], var], 1, 15)


# ---------------------------------------------------------------- reductions


@pytest.mark.parametrize("dtype", [F16, BF16], ids=["float16", "bfloat16"])
def test_reduce_mean_accumulates_low_precision_in_float32(dtype):
    x = np.full(100_000, 1.0001, dtype=dtype)  # rounds to exactly 1.0 in both types
    (mean,) = run_node("ReduceMean", [x], 1, 18, keepdims=0)
    assert mean.dtype == dtype and float(mean) == 1.0
    # The same reduction accumulated in the low-precision type drifts (the test can fail).
    with np.errstate(over="ignore"):
        drifted = float(np.add.reduce(x, dtype=dtype)) / x.size
    assert drifted != 1.0


@pytest.mark.parametrize("dtype", [F16, BF16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("op", ["ReduceMean", "ReduceSum", "ReduceSumSquare", "ReduceL2"])
def test_low_precision_reductions_round_once(dtype, op):
    rng = np.random.default_rng(11)
    x = rng.uniform(0.0, 0.2, size=(64, 512)).astype(dtype)
    (got,) = run_node(op, [x, np.array([1], np.int64)], 1, 18, keepdims=0)
    exact = x.astype(np.float64)
    expected = {
        "ReduceMean": exact.mean(axis=1),
        "ReduceSum": exact.sum(axis=1),
        "ReduceSumSquare": (exact**2).sum(axis=1),
        "ReduceL2": np.sqrt((exact**2).sum(axis=1)),
    }[op]
    _close(got, expected, dtype)


# (keepdims, axes) for attribute form vs input form
AXES_CASES = [(1, [1]), (0, [0, 2]), (1, [-1]), (0, [-3, -1]), (1, [0, 1, 2])]


@pytest.mark.parametrize("keepdims, axes", AXES_CASES)
@pytest.mark.parametrize(
    "op, attribute_opset, input_opset",
    [
        ("ReduceMean", 13, 18),
        ("ReduceSum", 11, 13),
        ("ReduceMax", 13, 18),
        ("ReduceProd", 13, 18),
        ("ReduceL2", 13, 18),
    ],
)
def test_axes_as_attribute_or_input(op, attribute_opset, input_opset, keepdims, axes):
    x = np.random.default_rng(3).normal(size=(3, 4, 5)).astype(np.float32)
    (by_attribute,) = run_node(op, [x], 1, attribute_opset, axes=axes, keepdims=keepdims)
    (by_input,) = run_node(op, [x, np.array(axes, np.int64)], 1, input_opset, keepdims=keepdims)
    np.testing.assert_array_equal(by_attribute, by_input)
    reference = {
        "ReduceMean": np.mean,
        "ReduceSum": np.sum,
        "ReduceMax": np.max,
        "ReduceProd": np.prod,
        "ReduceL2": lambda a, axis, keepdims: np.sqrt(np.sum(a * a, axis=axis, keepdims=keepdims)),
    }[op]
    expected = reference(x.astype(np.float64), axis=tuple(axes), keepdims=bool(keepdims))
    np.testing.assert_allclose(by_input, expected, rtol=2e-6, atol=1e-6)


# (axes input, noop_with_empty_axes, expect identity)
NOOP_CASES = [(None, 0, False), (None, 1, True), ([], 0, False), ([], 1, True), ([1], 1, False)]


@pytest.mark.parametrize("axes, noop, identity", NOOP_CASES)
@pytest.mark.parametrize("op, opset", [("ReduceMean", 18), ("ReduceSum", 13), ("ReduceMin", 18)])
def test_noop_with_empty_axes(op, opset, axes, noop, identity):
    x = np.random.default_rng(4).normal(size=(2, 3)).astype(np.float32)
    inputs = [x] if axes is None else [x, np.array(axes, np.int64)]
    (got,) = run_node(op, inputs, 1, opset, keepdims=1, noop_with_empty_axes=noop)
    if identity:
        np.testing.assert_array_equal(got, x)
        return
    reduce_over = (0, 1) if not axes else tuple(axes)
    fn = {"ReduceMean": np.mean, "ReduceSum": np.sum, "ReduceMin": np.min}[op]
    np.testing.assert_allclose(got, fn(x, axis=reduce_over, keepdims=True), rtol=1e-6)


@pytest.mark.parametrize(
    "op, expected",
    [("ReduceMax", -np.inf), ("ReduceMin", np.inf), ("ReduceSum", 0.0), ("ReduceProd", 1.0)],
)
def test_reduction_of_an_empty_set(op, expected):
    x = np.zeros((0, 3), np.float32)
    opset = 13 if op == "ReduceSum" else 18
    (got,) = run_node(op, [x, np.array([0], np.int64)], 1, opset, keepdims=0)
    np.testing.assert_array_equal(got, np.full(3, expected, np.float32))


# ---------------------------------------------------------------- element-wise


@pytest.mark.parametrize("dtype", [np.int8, np.int32, np.int64])
def test_integer_div_truncates_toward_zero(dtype):
    a = np.array([7, -7, 7, -7, 6, -6, 0, 1], dtype=dtype)
    b = np.array([2, 2, -2, -2, 3, -4, 5, -3], dtype=dtype)
    (got,) = run_node("Div", [a, b], 1, 14)
    expected = [int(x / y) for x, y in zip(a.tolist(), b.tolist())]  # C semantics
    assert got.dtype == dtype and got.tolist() == expected


def test_integer_div_large_int64_is_exact():
    a = np.array([2**62 + 1, -(2**62) - 1], np.int64)
    b = np.array([-3, 3], np.int64)
    (got,) = run_node("Div", [a, b], 1, 14)
    assert got.tolist() == [-((2**62 + 1) // 3), -((2**62 + 1) // 3)]


@pytest.mark.parametrize("dtype", [F16, BF16, F32, F64], ids=str)
@pytest.mark.parametrize("op", ["Add", "Sub", "Mul", "Div"])
def test_binary_arithmetic_keeps_dtype_and_broadcasts(op, dtype):
    rng = np.random.default_rng(5)
    a = rng.uniform(1, 2, size=(3, 1, 4)).astype(dtype)
    b = rng.uniform(1, 2, size=(5, 1)).astype(dtype)
    (got,) = run_node(op, [a, b], 1, 14)
    fn = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.divide}[op]
    _close(got, fn(a.astype(np.float64), b.astype(np.float64)), dtype)
    assert got.shape == (3, 5, 4)


def test_pow_keeps_base_type_with_integer_exponent():
    x = np.array([1.5, -2.0, 3.0], np.float32)
    (got,) = run_node("Pow", [x, np.array([2, 3, -1], np.int64)], 1, 15)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, [2.25, -8.0, 1 / 3], rtol=1e-6)


def test_sigmoid_is_stable_at_extremes():
    x = np.array([-1000.0, -20.0, 0.0, 20.0, 1000.0], np.float32)
    (got,) = run_node("Sigmoid", [x], 1, 13)
    with np.errstate(over="ignore"):
        expected = 1 / (1 + np.exp(-x.astype(np.float64)))
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=0)
    assert np.all(np.isfinite(got))


def test_erf_matches_math_erf():
    import math

    x = np.linspace(-4, 4, 101)
    (got,) = run_node("Erf", [x], 1, 13)
    np.testing.assert_allclose(got, [math.erf(v) for v in x], rtol=1e-15, atol=1e-15)


# ---------------------------------------------------------------- cast


def test_cast_to_bfloat16_rounds_to_nearest_even():
    from onnx import TensorProto

    # 1 + 2^-8 is halfway between bfloat16 1.0 and 1 + 2^-7: ties go to even (1.0).
    x = np.array([1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8)], np.float32)
    (got,) = run_node("Cast", [x], 1, 13, to=TensorProto.BFLOAT16)
    assert got.dtype == BF16
    assert got.astype(np.float32).tolist() == [1.0, 1 + 2**-6, -1.0]


def test_cast_float_to_int_truncates():
    from onnx import TensorProto

    (got,) = run_node("Cast", [np.array([1.9, -1.9, 0.5], np.float32)], 1, 13, to=TensorProto.INT32)
    assert got.dtype == np.int32 and got.tolist() == [1, -1, 0]


def test_cast_to_float8_is_not_implemented():
    from onnx import TensorProto

    with pytest.raises(NotImplementedError, match="FLOAT8E4M3FN"):
        run_node("Cast", [np.ones(2, np.float32)], 1, 19, to=TensorProto.FLOAT8E4M3FN)


@pytest.mark.parametrize(
    "a_shape, b_shape",
    [((1, 2**20), (2**20, 3)), ((2**18,), (2**18,)), ((2, 3, 5000), (2, 5000, 4))],
)
def test_float32_matmul_accumulates_long_products_accurately(a_shape, b_shape):
    rng = np.random.default_rng(14)
    a = (3 + rng.standard_normal(a_shape)).astype(np.float32)
    b = (3 + rng.standard_normal(b_shape)).astype(np.float32)
    (got,) = run_node("MatMul", [a, b], 1, 13)
    expected = np.matmul(a.astype(np.float64), b.astype(np.float64))
    assert got.dtype == np.float32 and got.shape == expected.shape
    # All terms positive: the float64 sum rounded to float32 is within ~1 ulp.
    np.testing.assert_allclose(got, expected, rtol=3e-7, atol=0)


@pytest.mark.parametrize("op", ["ReduceMean", "ReduceSum", "ReduceSumSquare", "BatchNormalization"])
def test_float32_statistics_over_millions_of_rows_do_not_drift(op):
    # NumPy adds the rows of an outer-axis reduction one by one; in float32 a
    # sum of 2**22 values near 3 is off by about 1e-3. The kernels accumulate in float64.
    rng = np.random.default_rng(15)
    x = (3 + rng.standard_normal((2**22, 2), dtype=np.float32)).astype(np.float32)
    exact = x.astype(np.float64)
    if op == "BatchNormalization":
        c = np.ones(2, np.float32), np.zeros(2, np.float32)
        outputs = run_node(op, [x, *c, *c], 3, 15, training_mode=1, momentum=0.0)
        got = np.stack([outputs[1], outputs[2]])
        expected = np.stack([exact.mean(axis=0), exact.var(axis=0)])
    else:
        (got,) = run_node(op, [x, np.array([0], np.int64)], 1, 18, keepdims=0)
        expected = {
            "ReduceMean": exact.mean(axis=0),
            "ReduceSum": exact.sum(axis=0),
            "ReduceSumSquare": (exact**2).sum(axis=0),
        }[op]
    np.testing.assert_allclose(got, expected, rtol=3e-7, atol=0)


@pytest.mark.parametrize(
    "shape, axes",
    [
        ((32, 16, 28, 28), (0, 2, 3)),  # NCHW channel statistics: trailing runs
        ((32, 16, 28, 28), (3,)),
        ((3, 10001), (1,)),  # a run longer than one chunk, with a tail
        ((3, 10001), (0, 1)),
        ((2**14, 64), (0,)),  # channels-last: groups of rows
        ((4099, 33), (0,)),  # with a tail of rows
        ((2**16, 3), (0,)),  # narrow rows: the pairwise tree
        ((40, 300, 7), (1,)),  # another layout: the float64 path
    ],
)
@pytest.mark.parametrize("square", [False, True])
@pytest.mark.parametrize("keepdims", [False, True])
def test_float_sum_matches_float64(shape, axes, square, keepdims):
    from onnxbn.reference.kernels.summation import float_sum

    x = (3 + np.random.default_rng(16).standard_normal(shape, dtype=np.float32)).astype(np.float32)
    exact = x.astype(np.float64)
    expected = np.add.reduce(exact * exact if square else exact, axis=axes, keepdims=keepdims)
    got = float_sum(x, axes, keepdims, square)
    assert got.dtype == np.float64 and got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=3e-7, atol=0)


# ---------------------------------------------------------------- Dropout


@pytest.mark.parametrize("ratio", [0.2, 0.75])
def test_training_dropout_scales_what_it_keeps(ratio):
    x = np.random.default_rng(4).normal(size=(40, 50)).astype(F32)
    inputs = [x, np.array(ratio, F32), np.array(True)]
    y, mask = run_node("Dropout", inputs, 2, 13, seed=3)
    assert mask.dtype == np.bool_ and mask.shape == x.shape
    _close(y, np.where(mask, x.astype(F64) / (1.0 - float(np.float32(ratio))), 0.0), F32)
    assert abs(mask.mean() - (1.0 - ratio)) < 0.05  # 2000 draws: within ~4 standard errors
    again, again_mask = run_node("Dropout", inputs, 2, 13, seed=3)
    np.testing.assert_array_equal(again_mask, mask)  # a seed makes it repeatable
    np.testing.assert_array_equal(again, y)


@pytest.mark.parametrize("ratio, training", [(0.5, False), (0.0, True)])
def test_dropout_without_effect_is_the_identity(ratio, training):
    x = np.arange(6, dtype=F32).reshape(2, 3)
    y, mask = run_node("Dropout", [x, np.array(ratio, F32), np.array(training)], 2, 13)
    np.testing.assert_array_equal(y, x)
    assert mask.all() and mask.dtype == np.bool_
