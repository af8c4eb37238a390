"""onnxbn.losses against Keras 3.15: float64 formulas written from Keras's source
(`keras/src/losses/loss.py`, `losses.py`, the NumPy backend's cross-entropies) and the
outputs its docstrings print; gradients against central finite differences."""

from __future__ import annotations

import numpy as np
import pytest

from onnxbn import losses

EPS = 1e-7  # keras.backend.epsilon()


# -- the oracle: Keras's per-sample formulas and the sum_over_batch_size reduction -----


def mse(yt, yp):
    return np.mean(np.square(yt - yp), axis=-1)


def mae(yt, yp):
    return np.mean(np.abs(yt - yp), axis=-1)


def bce(yt, yp, from_logits=False, label_smoothing=0.0):
    t = yt * (1.0 - label_smoothing) + 0.5 * label_smoothing
    p = 1.0 / (1.0 + np.exp(-yp)) if from_logits else yp
    p = np.clip(p, EPS, 1.0 - EPS)
    return np.mean(-(t * np.log(p) + (1.0 - t) * np.log(1.0 - p)), axis=-1)


def cce(yt, yp, from_logits=False, label_smoothing=0.0):
    t = yt * (1.0 - label_smoothing) + label_smoothing / yt.shape[-1]
    if from_logits:
        m = np.max(yp, axis=-1, keepdims=True)
        log_prob = yp - m - np.log(np.sum(np.exp(yp - m), axis=-1, keepdims=True))
    else:
        log_prob = np.log(np.clip(yp / np.sum(yp, axis=-1, keepdims=True), EPS, 1.0 - EPS))
    return -np.sum(t * log_prob, axis=-1)


def scce(ids, yp, from_logits=False):
    ids = np.asarray(ids).astype(np.int64)
    t = (ids[..., None] == np.arange(yp.shape[-1])).astype(np.float64)
    return cce(t, yp, from_logits)


def over_batch(values, sample_weight=None):
    weighted = values if sample_weight is None else values * sample_weight
    return np.sum(weighted) / weighted.size


def masked_mean(values, mask):
    """sum(values * mask * total / valid) / total = sum(values over valid) / valid."""
    mask = np.asarray(mask, bool)
    return np.sum(np.where(mask, values, 0.0)) / np.count_nonzero(mask)


def finite_difference(f, x, h=1e-6):
    grad = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        plus, minus = x.copy(), x.copy()
        plus[idx] += h
        minus[idx] -= h
        grad[idx] = (f(plus) - f(minus)) / (2 * h)
    return grad


RNG = np.random.default_rng(1234)


def probabilities(shape):
    return RNG.uniform(0.05, 0.95, shape)


def targets(shape):
    return RNG.integers(0, 2, shape).astype(np.float64)


def one_hot(shape):
    return np.eye(shape[-1])[RNG.integers(0, shape[-1], shape[:-1])]


# (loss, y_true maker, y_pred maker, oracle of the per-sample losses)
CASES = {
    "mse": (losses.MeanSquaredError(), targets, lambda s: RNG.normal(size=s), mse),
    "mae": (losses.MeanAbsoluteError(), targets, lambda s: RNG.normal(size=s), mae),
    "bce": (losses.BinaryCrossentropy(), targets, probabilities, bce),
    "bce_logits": (
        losses.BinaryCrossentropy(from_logits=True),
        targets,
        lambda s: RNG.normal(scale=3, size=s),
        lambda t, p: bce(t, p, from_logits=True),
    ),
    "bce_smooth": (
        losses.BinaryCrossentropy(label_smoothing=0.2),
        targets,
        probabilities,
        lambda t, p: bce(t, p, label_smoothing=0.2),
    ),
    "cce": (losses.CategoricalCrossentropy(), one_hot, probabilities, cce),
    "cce_logits": (
        losses.CategoricalCrossentropy(from_logits=True),
        one_hot,
        lambda s: RNG.normal(scale=2, size=s),
        lambda t, p: cce(t, p, from_logits=True),
    ),
    "cce_smooth": (
        losses.CategoricalCrossentropy(from_logits=True, label_smoothing=0.1),
        one_hot,
        lambda s: RNG.normal(scale=2, size=s),
        lambda t, p: cce(t, p, from_logits=True, label_smoothing=0.1),
    ),
}


# -- values ----------------------------------------------------------------------------


def test_keras_docstring_outputs():
    """The numbers Keras's docstrings print (float32 there: 3 decimals)."""
    assert losses.MeanSquaredError()([1.0, 0.0, 1.0], [0.9, 0.1, 0.8]) == pytest.approx(0.02)
    assert losses.MeanAbsoluteError()([1.0, 0.3, 1.0], [1.9, 0.3, 1.8]) == pytest.approx(0.5666667)
    logits = losses.BinaryCrossentropy(from_logits=True)
    yt, yp = np.array([[0, 1], [0, 0]]), np.array([[-18.6, 0.51], [2.94, -12.8]])
    assert logits(yt, yp) == pytest.approx(0.8654, abs=1e-4)
    assert logits(yt, yp, sample_weight=[0.8, 0.2]) == pytest.approx(0.243, abs=1e-3)
    probs = np.array([[0.05, 0.95, 0], [0.1, 0.8, 0.1]])
    cat = losses.CategoricalCrossentropy()
    assert cat(np.array([[0, 1, 0], [0, 0, 1]]), probs) == pytest.approx(1.177, abs=1e-3)
    assert cat(np.array([[0, 1, 0], [0, 0, 1]]), probs, np.array([0.3, 0.7])) == pytest.approx(
        0.814, abs=1e-3
    )
    sparse = losses.SparseCategoricalCrossentropy()
    assert sparse(np.array([1, 2]), probs) == pytest.approx(1.177, abs=1e-3)
    bce_probs = losses.BinaryCrossentropy()([[0, 1], [0, 0]], [[0.6, 0.4], [0.4, 0.6]])
    assert bce_probs == pytest.approx((0.916 + 0.714) / 2, abs=1e-3)


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("shape", [(5, 3), (2, 4, 3)])
def test_values_and_sample_weight(case, shape):
    loss, make_true, make_pred, oracle = CASES[case]
    yt, yp = make_true(shape), make_pred(shape)
    values = oracle(yt, yp)
    assert loss(yt, yp) == pytest.approx(over_batch(values), rel=1e-12)
    sw = RNG.uniform(0, 2, shape[:-1])
    assert loss(yt, yp, sample_weight=sw) == pytest.approx(over_batch(values, sw), rel=1e-12)
    # A (batch,) weight on (batch, time) losses broadcasts from the right, as in Keras:
    # only when the last axes agree; a (batch, 1) weight weighs whole rows.
    if len(shape) == 3:
        rows = RNG.uniform(0, 2, (shape[0], 1))
        assert loss(yt, yp, sample_weight=rows) == pytest.approx(
            over_batch(values, rows), rel=1e-12
        )


@pytest.mark.parametrize("case", sorted(CASES))
def test_mask_and_sample_weight(case):
    loss, make_true, make_pred, oracle = CASES[case]
    yt, yp = make_true((3, 4, 2)), make_pred((3, 4, 2))
    mask = np.array([[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1]], bool)
    values = oracle(yt, yp)
    assert loss(yt, yp, mask=mask) == pytest.approx(masked_mean(values, mask), rel=1e-12)
    # Keras: weight = sample_weight * mask * total / valid, then sum / total.
    sw = RNG.uniform(0, 2, (3, 4))
    expected = np.sum(values * sw * mask * (mask.size / mask.sum())) / values.size
    assert loss(yt, yp, sample_weight=sw, mask=mask) == pytest.approx(expected, rel=1e-12)
    # A float mask counts non-zero entries as valid.
    assert loss(yt, yp, mask=mask * 0.5) == pytest.approx(masked_mean(values, mask), rel=1e-12)


def test_rank_alignment():
    """Keras squeezes or expands a last axis of 1 when ranks differ by one."""
    yt, yp = targets((6,)), RNG.normal(size=(6, 1))
    mse_loss = losses.MeanSquaredError()
    assert mse_loss(yt, yp) == pytest.approx(np.mean((yt - yp[:, 0]) ** 2), rel=1e-12)
    assert mse_loss(yt[:, None], yp[:, 0]) == pytest.approx(np.mean((yt - yp[:, 0]) ** 2))
    # Rank-1 predictions: the "last axis" is the batch, one scalar loss (Keras's quirk).
    assert mse_loss(yt, yp[:, 0]) == pytest.approx(np.mean((yt - yp[:, 0]) ** 2))
    # y_true (batch, 1) against 3 outputs broadcasts in Keras's MSE.
    yp3 = RNG.normal(size=(6, 3))
    assert mse_loss(yt[:, None], yp3) == pytest.approx(np.mean((yt[:, None] - yp3) ** 2))


def test_sparse_ids():
    yp = probabilities((5, 4))
    ids = np.array([0, 3, 1, 2, 3])
    loss = losses.SparseCategoricalCrossentropy()
    expected = over_batch(scce(ids, yp))
    for labels in (ids, ids.astype(np.int32), ids.astype(np.float32), ids[:, None]):
        assert loss(labels, yp) == pytest.approx(expected, rel=1e-12)
    # Float ids truncate toward zero (Keras casts to int32).
    assert loss(ids + 0.7, yp) == pytest.approx(expected, rel=1e-12)
    # A negative id is a zero row in the NumPy backend's one_hot: loss 0 for that sample.
    with_negative = np.array([0, -1, 1, 2, 3])
    values = scce(np.maximum(with_negative, 0), yp) * (with_negative >= 0)
    assert loss(with_negative, yp) == pytest.approx(over_batch(values), rel=1e-12)
    logits = losses.SparseCategoricalCrossentropy(from_logits=True)
    z = RNG.normal(size=(5, 4))
    assert logits(ids, z) == pytest.approx(over_batch(scce(ids, z, True)), rel=1e-12)


def test_clipping_at_zero_and_one():
    yt = np.array([[1.0, 0.0, 1.0, 0.0]])
    yp = np.array([[0.0, 1.0, 1.0, 0.0]])
    # -log(eps) for the two wrong certainties, -log(1 - eps) for the right ones.
    expected = (2 * -np.log(EPS) + 2 * -np.log(1 - EPS)) / 4
    value, grad = losses.BinaryCrossentropy().value_and_gradient(yt, yp)
    assert value == pytest.approx(expected, rel=1e-9)  # 1 - (1 - eps) is eps to 1e-9
    np.testing.assert_array_equal(grad, 0.0)  # every probability was clipped
    # Logits beyond ±16.1 saturate through the clipped sigmoid: zero gradient too.
    value, grad = losses.BinaryCrossentropy(from_logits=True).value_and_gradient(
        yt, np.array([[-30.0, 30.0, 30.0, -30.0]])
    )
    assert value == pytest.approx(expected, rel=1e-9)
    np.testing.assert_array_equal(grad, 0.0)
    # Categorical: a zero probability on the target class is clipped to eps.
    value, grad = losses.CategoricalCrossentropy().value_and_gradient(
        np.array([[1.0, 0.0]]), np.array([[0.0, 2.0]])
    )
    assert value == pytest.approx(-np.log(EPS), rel=1e-12)
    np.testing.assert_allclose(grad, 0.0, atol=1e-12)


def test_empty_batch():
    """Keras divides with divide_no_nan: nothing to average is a loss of 0."""
    for name, (loss, make_true, make_pred, _) in CASES.items():
        value, grad = loss.value_and_gradient(make_true((0, 3)), make_pred((0, 3)))
        assert value == 0.0, name
        assert grad.shape == (0, 3)
    value, grad = losses.SparseCategoricalCrossentropy().value_and_gradient(
        np.zeros((0,)), np.zeros((0, 3))
    )
    assert (value, grad.shape) == (0.0, (0, 3))
    # A mask with no valid entry: weight total / valid is 0 (divide_no_nan), loss 0.
    yp = RNG.normal(size=(2, 3, 2))
    value, grad = losses.MeanSquaredError().value_and_gradient(
        np.zeros_like(yp), yp, mask=np.zeros((2, 3), bool)
    )
    assert value == 0.0
    np.testing.assert_array_equal(grad, 0.0)


# -- gradients -------------------------------------------------------------------------


@pytest.mark.parametrize("case", sorted(CASES))
def test_gradient_matches_finite_differences(case):
    loss, make_true, make_pred, _ = CASES[case]
    yt, yp = make_true((3, 2, 4)), make_pred((3, 2, 4))
    sw = RNG.uniform(0.5, 2, (3, 2))
    mask = np.array([[1, 0], [1, 1], [0, 1]], bool)
    for kwargs in ({}, {"sample_weight": sw}, {"mask": mask, "sample_weight": sw}):
        value, grad = loss.value_and_gradient(yt, yp, **kwargs)
        assert value == loss(yt, yp, **kwargs)
        expected = finite_difference(lambda p, kw=kwargs: loss(yt, p, **kw), yp)
        np.testing.assert_allclose(grad, expected, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("from_logits", [False, True])
def test_sparse_gradient_matches_finite_differences(from_logits):
    loss = losses.SparseCategoricalCrossentropy(from_logits=from_logits)
    yp = RNG.normal(size=(4, 3)) if from_logits else probabilities((4, 3))
    ids = np.array([[2], [0], [1], [-1]])
    value, grad = loss.value_and_gradient(ids, yp, sample_weight=[1.0, 2.0, 0.5, 1.0])
    expected = finite_difference(lambda p: loss(ids, p, [1.0, 2.0, 0.5, 1.0]), yp)
    np.testing.assert_allclose(grad, expected, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(grad[3], 0.0, atol=1e-12)  # the negative id


def test_gradient_through_rank_alignment_and_broadcast():
    loss = losses.MeanSquaredError()
    yt = targets((4,))
    for yp in (RNG.normal(size=(4, 1)), RNG.normal(size=(4,))):
        _, grad = loss.value_and_gradient(yt[:, None] if yp.ndim == 1 else yt, yp)
        assert grad.shape == yp.shape
        target = yt[:, None] if yp.ndim == 1 else yt
        expected = finite_difference(lambda p, t=target: loss(t, p), yp)
        np.testing.assert_allclose(grad, expected, rtol=1e-6, atol=1e-9)
    # (batch, 1) predictions broadcast against (batch, 3) targets: summed back.
    yt3, yp1 = targets((4, 3)), RNG.normal(size=(4, 1))
    _, grad = losses.MeanAbsoluteError().value_and_gradient(yt3, yp1 + 0.5)
    f = lambda p: losses.MeanAbsoluteError()(yt3, p)  # noqa: E731
    np.testing.assert_allclose(grad, finite_difference(f, yp1 + 0.5), rtol=1e-6, atol=1e-9)


# -- names, configs, errors ---------------------------------------------------------------


@pytest.mark.parametrize(
    "name, cls",
    [
        ("mean_squared_error", losses.MeanSquaredError),
        ("mse", losses.MeanSquaredError),
        ("MeanSquaredError", losses.MeanSquaredError),
        ("mean_absolute_error", losses.MeanAbsoluteError),
        ("mae", losses.MeanAbsoluteError),
        ("binary_crossentropy", losses.BinaryCrossentropy),
        ("categorical_crossentropy", losses.CategoricalCrossentropy),
        ("sparse_categorical_crossentropy", losses.SparseCategoricalCrossentropy),
    ],
)
def test_get_by_name(name, cls):
    assert type(losses.get(name)) is cls


def test_get_instances_configs_and_envelopes():
    bce_loss = losses.BinaryCrossentropy(from_logits=True, label_smoothing=0.1)
    assert losses.get(bce_loss) is bce_loss
    assert losses.get(None) is None
    assert bce_loss.get_config() == {
        "name": "binary_crossentropy",
        "reduction": "sum_over_batch_size",
        "from_logits": True,
        "label_smoothing": 0.1,
        "axis": -1,
    }
    assert losses.SparseCategoricalCrossentropy().get_config() == {
        "name": "sparse_categorical_crossentropy",
        "reduction": "sum_over_batch_size",
        "from_logits": False,
        "ignore_class": None,
    }
    envelope = losses.serialize(bce_loss)
    assert envelope["module"] == "keras.losses"
    assert envelope["class_name"] == "BinaryCrossentropy"
    rebuilt = losses.deserialize(envelope)
    assert type(rebuilt) is losses.BinaryCrossentropy
    assert rebuilt.get_config() == bce_loss.get_config()
    keras_written = {
        "module": "keras.losses",
        "class_name": "CategoricalCrossentropy",
        "config": {
            "name": "cce",
            "reduction": "sum_over_batch_size",
            "from_logits": True,
            "label_smoothing": 0.0,
            "axis": -1,
        },
        "registered_name": None,
    }
    assert losses.get(keras_written).from_logits is True


def test_bad_inputs():
    with pytest.raises(ValueError, match="Unknown loss.*mean_squared_error"):
        losses.get("mean_squared_eror")
    with pytest.raises(TypeError, match="loss function identifier"):
        losses.get(3)
    with pytest.raises(ValueError, match="reduction.*'sum'"):
        losses.MeanSquaredError(reduction="sum")
    with pytest.raises(ValueError, match="reduction"):
        losses.MeanSquaredError(reduction=None)
    with pytest.raises(ValueError, match="label_smoothing"):
        losses.BinaryCrossentropy(label_smoothing=1.5)
    with pytest.raises(TypeError, match="from_logits"):
        losses.CategoricalCrossentropy(from_logits="yes")
    with pytest.raises(ValueError, match="axis"):
        losses.CategoricalCrossentropy(axis=1)
    with pytest.raises(ValueError, match="ignore_class"):
        losses.SparseCategoricalCrossentropy(ignore_class=0)
    with pytest.raises(ValueError, match="same shape.*\\(2, 3\\).*\\(2, 4\\)"):
        losses.BinaryCrossentropy()(np.zeros((2, 3)), np.full((2, 4), 0.5))
    with pytest.raises(ValueError, match="same shape"):
        losses.CategoricalCrossentropy()(np.zeros((2, 3)), np.full((2, 4), 0.5))
    with pytest.raises(ValueError, match="do not broadcast"):
        losses.MeanSquaredError()(np.zeros((2, 3)), np.zeros((2, 4)))
    with pytest.raises(ValueError, match="without its last axis"):
        losses.SparseCategoricalCrossentropy()(np.zeros((3,)), np.full((2, 4), 0.5))
    with pytest.raises(ValueError, match="below the number of classes \\(4\\)"):
        losses.SparseCategoricalCrossentropy()(np.array([0, 4]), np.full((2, 4), 0.25))
    with pytest.raises(ValueError, match="finite"):
        losses.SparseCategoricalCrossentropy()(np.array([0, np.nan]), np.full((2, 4), 0.25))
    with pytest.raises(TypeError, match="y_pred"):
        losses.MeanSquaredError()(np.zeros(2), np.array(["a", "b"]))
    with pytest.raises(ValueError, match="sample_weight"):
        losses.MeanSquaredError()(np.zeros((4, 2)), np.zeros((4, 2)), sample_weight=np.ones(3))
    with pytest.raises(ValueError, match="at least rank 1"):
        losses.MeanSquaredError()(0.0, 1.0)
