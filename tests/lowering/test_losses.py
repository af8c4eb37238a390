"""lower_loss in a standalone graph (y_true, y_pred[, mask] -> loss, gradient), run on
onnxruntime and onnxbn.reference with a dynamic batch, against the float64 formulas
written from Keras's source (`tests/test_losses.py`) and their central finite differences."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

from onnxbn import losses
from onnxbn.dtypes import standardize_dtype
from onnxbn.lowering.context import LoweringContext, onnx_dtype
from onnxbn.lowering.losses import lower_loss
from tests.runtimes import load
from tests.test_losses import (
    EPS,
    bce,
    cce,
    finite_difference,
    mae,
    masked_mean,
    mse,
    over_batch,
    scce,
)

RUNTIMES = ["onnxruntime", "onnxbn.reference"]
# The portability matrix for the main cases (openvino, tract: skipped when not installed).
ALL_RUNTIMES = [*RUNTIMES, "onnx.reference", "openvino", "tract"]
TOLERANCES = {"float32": {"rtol": 1e-4, "atol": 1e-6}, "float64": {"rtol": 1e-6, "atol": 1e-9}}
RNG = np.random.default_rng(77)


def _dims(array: np.ndarray, dynamic: int) -> list:
    return [f"d{i}" if i < dynamic else d for i, d in enumerate(array.shape)]


def loss_model(loss, y_true, y_pred, mask=None, *, opset=18, dynamic=1):
    """The graph `(y_true, y_pred[, mask]) -> (loss, grad)`; the first `dynamic` axes are dynamic."""
    ctx = LoweringContext(opset)
    t = ctx.add_input("y_true", standardize_dtype(y_true.dtype), _dims(y_true, dynamic))
    p = ctx.add_input("y_pred", standardize_dtype(y_pred.dtype), _dims(y_pred, dynamic))
    m = None
    if mask is not None:
        m = ctx.add_input("mask", standardize_dtype(mask.dtype), _dims(mask, dynamic))
    with ctx.scope("loss"):
        value, grad = lower_loss(ctx, loss, t, p, m)
    assert value.shape == () and grad.dtype == p.dtype and grad.shape == p.shape
    nodes = list(ctx.nodes) + [
        helper.make_node("Identity", [value.name], ["out_loss"]),
        helper.make_node("Identity", [grad.name], ["out_grad"]),
    ]
    outputs = [
        helper.make_tensor_value_info("out_loss", onnx_dtype(value.dtype), []),
        helper.make_tensor_value_info("out_grad", onnx_dtype(grad.dtype), _dims(y_pred, dynamic)),
    ]
    graph = helper.make_graph(nodes, "loss", ctx.inputs, outputs, ctx.initializers)
    opsets = [helper.make_opsetid("", opset)]
    model = helper.make_model(
        graph, opset_imports=opsets, ir_version=helper.find_min_ir_version_for(opsets)
    )
    onnx.checker.check_model(model, full_check=True)
    onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    return model


def run(runtime, model, y_true, y_pred, mask=None):
    if runtime in ("openvino", "tract"):
        pytest.importorskip(runtime)
    feeds = {"y_true": y_true, "y_pred": y_pred}
    if mask is not None:
        feeds["mask"] = mask
    value, grad = load(runtime, model)(feeds)
    return np.asarray(value), np.asarray(grad)


def check(runtime, loss, yt, yp, oracle, mask=None, *, dtype="float32", opset=18, dynamic=1):
    """Runs the graph on `yp` in `dtype`; compares with `oracle(yp64)` and its finite differences."""
    yp = yp.astype(dtype)
    yp64 = yp.astype(np.float64)  # the oracle sees exactly the fed values
    model = loss_model(loss, yt, yp, mask, opset=opset, dynamic=dynamic)
    value, grad = run(runtime, model, yt, yp, mask)
    expected_dtype = np.float64 if dtype == "float64" else np.float32
    assert value.shape == () and value.dtype == expected_dtype
    assert grad.shape == yp.shape and grad.dtype == yp.dtype
    # OpenVINO's CPU plugin computes float64 graphs in float32.
    precise = dtype == "float64" and runtime != "openvino"
    tol = TOLERANCES["float64" if precise else "float32"]
    np.testing.assert_allclose(value, oracle(yp64), **tol)
    np.testing.assert_allclose(grad, finite_difference(oracle, yp64), **tol)
    return model


def probabilities(shape):
    return RNG.uniform(0.05, 0.95, shape)


def targets(shape):
    return RNG.integers(0, 2, shape).astype(np.float32)


def one_hot(shape):
    return np.eye(shape[-1], dtype=np.float32)[RNG.integers(0, shape[-1], shape[:-1])]


# name: (loss, y_true, y_pred, per-sample oracle)
CASES = {
    "mse": (losses.MeanSquaredError(), targets, lambda s: RNG.normal(size=s), mse),
    "mae": (losses.MeanAbsoluteError(), targets, lambda s: RNG.normal(size=s), mae),
    "bce": (losses.BinaryCrossentropy(), targets, probabilities, bce),
    "bce_logits_smooth": (
        losses.BinaryCrossentropy(from_logits=True, label_smoothing=0.2),
        targets,
        lambda s: RNG.normal(scale=3, size=s),
        lambda t, p: bce(t, p, from_logits=True, label_smoothing=0.2),
    ),
    "cce": (losses.CategoricalCrossentropy(), one_hot, probabilities, cce),
    "cce_logits_smooth": (
        losses.CategoricalCrossentropy(from_logits=True, label_smoothing=0.1),
        one_hot,
        lambda s: RNG.normal(scale=2, size=s),
        lambda t, p: cce(t, p, from_logits=True, label_smoothing=0.1),
    ),
}


@pytest.mark.parametrize("runtime", ALL_RUNTIMES)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_loss_and_gradient(case, dtype, runtime):
    loss, make_true, make_pred, per_sample = CASES[case]
    yt, yp = make_true((5, 3)), make_pred((5, 3))
    t64 = yt.astype(np.float64)
    model = check(runtime, loss, yt, yp, lambda p: over_batch(per_sample(t64, p)), dtype=dtype)
    # The same graph on an empty batch: Keras's divide_no_nan, a loss of 0.
    value, grad = run(runtime, model, yt[:0], yp[:0].astype(dtype))
    assert value == 0.0 and grad.shape == (0, 3)


@pytest.mark.parametrize("runtime", ALL_RUNTIMES)
@pytest.mark.parametrize("case", ["mse", "bce", "cce_logits_smooth"])
def test_mask_over_time_steps(case, runtime):
    loss, make_true, make_pred, per_sample = CASES[case]
    yt, yp = make_true((3, 4, 2)), make_pred((3, 4, 2))
    t64 = yt.astype(np.float64)
    mask = np.array([[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1]], bool)

    def oracle(p):
        return masked_mean(per_sample(t64, p), mask)

    model = check(runtime, loss, yt, yp, oracle, mask, dynamic=2)
    # A float mask: non-zero is valid, as Keras casts it to bool.
    check(runtime, loss, yt, yp, oracle, mask.astype(np.float32) * 0.5, dynamic=2)
    # No valid step at all: total / valid is 0 (divide_no_nan), so are loss and gradient.
    value, grad = run(runtime, model, yt, yp.astype(np.float32), np.zeros_like(mask))
    assert value == 0.0
    np.testing.assert_array_equal(grad, 0.0)
    value, grad = run(runtime, model, yt[:0], yp[:0].astype(np.float32), mask[:0])
    assert value == 0.0 and grad.shape == (0, 4, 2)


@pytest.mark.parametrize("runtime", ALL_RUNTIMES)
@pytest.mark.parametrize("from_logits", [False, True])
@pytest.mark.parametrize(
    "ids",
    [
        np.array([2, 0, 1, 3, -1], np.int64),  # -1: a zero row (loss 0), as Keras's one_hot
        np.array([[2], [0], [1], [3], [1]], np.int32),
        np.array([2.0, 0.0, 1.0, 3.0, 1.0], np.float32),
    ],
    ids=["int64", "int32_column", "float32"],
)
def test_sparse_ids(ids, from_logits, runtime):
    loss = losses.SparseCategoricalCrossentropy(from_logits=from_logits)
    yp = RNG.normal(size=(5, 4)) if from_logits else probabilities((5, 4))
    flat = ids.reshape(-1).astype(np.int64)

    def oracle(p):
        return over_batch(scce(np.maximum(flat, 0), p, from_logits) * (flat >= 0))

    check(runtime, loss, ids, yp, oracle)


@pytest.mark.parametrize("runtime", RUNTIMES)
@pytest.mark.parametrize("opset", [15, 18])
def test_opsets_and_rank_alignment(opset, runtime):
    """(batch,) targets against (batch, 1) predictions; reductions by attribute at opset 15."""
    yt, yp = targets((6,)), RNG.normal(size=(6, 1))
    check(
        runtime,
        losses.MeanSquaredError(),
        yt,
        yp,
        lambda p: np.mean((yt - p[:, 0]) ** 2),
        opset=opset,
    )
    logits = losses.CategoricalCrossentropy(from_logits=True)
    yt3, yp3 = one_hot((6, 3)), RNG.normal(size=(6, 3))
    check(runtime, logits, yt3, yp3, lambda p: over_batch(cce(yt3, p, True)), opset=opset)


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_clipping_gives_zero_gradient(runtime):
    yt = np.array([[1.0, 0.0, 1.0, 0.0]], np.float32)
    # Clipped in float32 as Keras clips a float32 tensor: 1 - (1 - eps) is 1.19e-7 there.
    low, high = np.float64(np.float32(EPS)), np.float64(np.float32(1 - EPS))
    expected = (-np.log(low) - np.log(1 - high) - 2 * np.log(high)) / 4
    for loss, yp in [
        (losses.BinaryCrossentropy(), np.array([[0.0, 1.0, 1.0, 0.0]], np.float32)),
        (losses.BinaryCrossentropy(from_logits=True), np.array([[-30, 30, 30, -30]], np.float32)),
    ]:
        value, grad = run(runtime, loss_model(loss, yt, yp), yt, yp)
        np.testing.assert_allclose(value, expected, rtol=1e-5)
        np.testing.assert_array_equal(grad, 0.0)


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_half_precision_predictions(runtime):
    """A float16 y_pred: computed and reported in float32, its gradient in float16."""
    yt, yp = one_hot((4, 3)), RNG.normal(size=(4, 3)).astype(np.float16)
    yp64 = yp.astype(np.float64)
    loss = losses.CategoricalCrossentropy(from_logits=True)
    value, grad = run(runtime, loss_model(loss, yt, yp), yt, yp)
    assert value.dtype == np.float32 and grad.dtype == np.float16
    np.testing.assert_allclose(value, over_batch(cce(yt, yp64, True)), rtol=1e-5)
    expected = finite_difference(lambda p: over_batch(cce(yt, p, True)), yp64)
    np.testing.assert_allclose(grad, expected, rtol=1e-3, atol=1e-4)


def test_bad_inputs():
    ctx = LoweringContext(18)
    p = ctx.add_input("p", "float32", ["batch", 3])
    dynamic_classes = ctx.add_input("q", "float32", ["batch", "classes"])
    ids = ctx.add_input("ids", "int64", ["batch"])
    wrong = ctx.add_input("t", "float32", ["batch", 4])
    with pytest.raises(ValueError, match="class count"):
        lower_loss(ctx, losses.SparseCategoricalCrossentropy(), ids, dynamic_classes)
    with pytest.raises(ValueError, match="same shape"):
        lower_loss(ctx, losses.BinaryCrossentropy(), wrong, p)
    with pytest.raises(ValueError, match="do not broadcast"):
        lower_loss(ctx, "mse", wrong, p)
    with pytest.raises(ValueError, match="mask must have the shape"):
        lower_loss(ctx, "mse", p, p, mask=p)
    with pytest.raises(ValueError, match="Unknown loss"):
        lower_loss(ctx, "hinge", p, p)
    with pytest.raises(TypeError, match="Cannot lower"):
        lower_loss(ctx, lambda t, q: 0.0, p, p)
