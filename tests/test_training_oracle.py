"""The train-step oracle checks itself: every backward against central finite differences,
the convolution against a direct sum, the optimizers against their unrolled recurrences."""

from __future__ import annotations

import numpy as np
import pytest

from tests import training_oracle as to
from tests.oracle import bn_oracle

RNG = np.random.default_rng(1234)
FD_STEP = 1e-6
FD_TOL = 1e-6  # relative to the largest gradient entry; central differences in float64


def numeric_grad(f, a):
    """Central differences of the scalar `f()` with respect to the array `a` (edited in place)."""
    g = np.zeros_like(a)
    for i in np.ndindex(a.shape):
        old = a[i]
        a[i] = old + FD_STEP
        up = f()
        a[i] = old - FD_STEP
        down = f()
        a[i] = old
        g[i] = (up - down) / (2 * FD_STEP)
    return g


def assert_grad(analytic, numeric):
    scale = max(1.0, np.abs(numeric).max())
    np.testing.assert_allclose(analytic, numeric, rtol=0, atol=FD_TOL * scale)


def check_layer(layer, x, training=True):
    """dx and every weight gradient of `sum(layer(x) * r)` against finite differences."""
    y, cache = layer.forward(x, training)
    r = RNG.normal(size=y.shape)
    dx, grads = layer.backward(cache, r)

    def objective():
        return np.sum(layer.forward(x, training)[0] * r)

    assert_grad(dx, numeric_grad(objective, x))
    assert set(grads) == set(layer.params)  # Network drops those of frozen layers
    for name in grads:
        assert_grad(grads[name], numeric_grad(objective, layer.params[name]))


@pytest.mark.parametrize("activation", ["linear", "relu", "softmax"])
def test_dense_backward(activation):
    layer = to.Dense("d", RNG.normal(size=(4, 3)), RNG.normal(size=3), activation=activation)
    check_layer(layer, RNG.normal(size=(5, 4)))


def test_dense_rank3_without_bias_relu_and_gap_backward():
    check_layer(to.Dense("d", RNG.normal(size=(4, 3))), RNG.normal(size=(2, 5, 4)))
    check_layer(to.ReLU("r"), RNG.normal(size=(3, 4)) + 0.01)
    check_layer(to.GlobalAveragePooling2D("g"), RNG.normal(size=(2, 3, 4, 5)))


def direct_conv(x, k, b, stride, padding):
    """The definition: y[n, p, q, f] = sum_{i, j, c} xpad[n, p*s + i, q*s + j, c] k[i, j, c, f] + b[f]."""
    n, h, w, _ = x.shape
    kh, kw, _, f = k.shape
    if padding == "same":
        oh, ow = -(-h // stride), -(-w // stride)
        ph = max((oh - 1) * stride + kh - h, 0)
        pw = max((ow - 1) * stride + kw - w, 0)
        x = np.pad(x, ((0, 0), (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)))
    else:
        oh, ow = (h - kh) // stride + 1, (w - kw) // stride + 1
    y = np.zeros((n, oh, ow, f))
    for p in range(oh):
        for q in range(ow):
            window = x[:, p * stride : p * stride + kh, q * stride : q * stride + kw, :]
            y[:, p, q, :] = np.tensordot(window, k, axes=([1, 2, 3], [0, 1, 2])) + b
    return y


@pytest.mark.parametrize("padding", ["same", "valid"])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("size", [(5, 6), (4, 7)])
def test_conv2d_forward_and_backward(padding, stride, size):
    k, b = RNG.normal(size=(3, 3, 2, 3)), RNG.normal(size=3)
    layer = to.Conv2D("c", k, b, strides=stride, padding=padding)
    x = RNG.normal(size=(2, *size, 2))
    y, _ = layer.forward(x, True)
    np.testing.assert_allclose(y, direct_conv(x, k, b, stride, padding), rtol=1e-12, atol=1e-12)
    if padding == "same":
        assert y.shape[1:3] == (-(-size[0] // stride), -(-size[1] // stride))
    check_layer(layer, x)


def test_same_padding_puts_the_odd_pixel_at_the_end():
    assert to.same_padding(6, 3, 2) == (0, 1)
    assert to.same_padding(5, 3, 2) == (1, 1)
    assert to.same_padding(5, 3, 1) == (1, 1)


@pytest.mark.parametrize("shape", [(6, 3), (2, 3, 4, 3)])
def test_batch_normalization_training_forward_state_and_backward(shape):
    gamma, beta = RNG.uniform(0.5, 1.5, shape[-1]), RNG.normal(size=shape[-1])
    mm, mv = RNG.normal(size=shape[-1]), RNG.uniform(0.5, 2, shape[-1])
    layer = to.BatchNormalization("bn", gamma, beta, mm, mv, momentum=0.9, epsilon=1e-3)
    x = RNG.normal(size=shape) * 3 + 1
    y, _ = layer.forward(x, True)
    want = bn_oracle(
        x,
        axis=x.ndim - 1,
        gamma=gamma,
        beta=beta,
        moving_mean=mm,
        moving_variance=mv,
        momentum=0.9,
        epsilon=1e-3,
        training=True,
    )
    np.testing.assert_allclose(y, want[0], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(layer.state["moving_mean"], want[1], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(layer.state["moving_variance"], want[2], rtol=1e-12, atol=1e-12)
    axes = tuple(range(x.ndim - 1))
    np.testing.assert_allclose(
        layer.state["moving_variance"], mv * 0.9 + np.var(x, axis=axes) * 0.1, rtol=1e-12
    )
    check_layer(layer, x)


def test_frozen_batch_normalization_uses_and_keeps_the_moving_statistics():
    mm, mv = RNG.normal(size=3), RNG.uniform(0.5, 2, 3)
    layer = to.BatchNormalization(
        "bn", RNG.normal(size=3), RNG.normal(size=3), mm, mv, trainable=False
    )
    x = RNG.normal(size=(4, 3))
    y, _ = layer.forward(x, True)
    np.testing.assert_allclose(
        y, layer.params["gamma"] * (x - mm) / np.sqrt(mv + 1e-3) + layer.params["beta"], rtol=1e-12
    )
    assert np.array_equal(layer.state["moving_mean"], mm)
    assert np.array_equal(layer.state["moving_variance"], mv)
    check_layer(layer, x)


def check_loss(fn, y_true, y_pred, sample_weight=None):
    loss, dy = fn(y_true, y_pred, sample_weight)
    assert_grad(dy, numeric_grad(lambda: fn(y_true, y_pred, sample_weight)[0], y_pred))
    return loss


def test_mean_squared_error_value_and_gradient():
    y_true, y_pred, sw = RNG.normal(size=(5, 3)), RNG.normal(size=(5, 3)), RNG.uniform(0, 2, 5)
    loss = check_loss(to.mean_squared_error, y_true, y_pred, sw)
    # sum_over_batch_size: divided by the batch size, not by the weights' sum.
    assert loss == pytest.approx(
        np.sum(sw * np.mean((y_pred - y_true) ** 2, axis=1)) / 5, rel=1e-14
    )


def test_crossentropies_value_and_gradient():
    logits, labels = RNG.normal(size=(6, 4)), RNG.integers(0, 4, size=6)
    sw = RNG.uniform(0, 2, 6)
    loss = check_loss(
        lambda t, p, w: to.sparse_categorical_crossentropy(t, p, w, from_logits=True),
        labels,
        logits,
        sw,
    )
    log_softmax = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    assert loss == pytest.approx(-np.sum(sw * log_softmax[np.arange(6), labels]) / 6, rel=1e-13)
    probs = to._softmax(logits)
    one_hot = np.eye(4)[labels]
    loss = check_loss(to.categorical_crossentropy, one_hot, probs)
    assert loss == pytest.approx(-np.mean(log_softmax[np.arange(6), labels]), rel=1e-12)
    # Not normalized: the probabilities are divided by their sum first.
    check_loss(to.categorical_crossentropy, one_hot, probs * RNG.uniform(0.5, 2, (6, 1)))


def test_crossentropy_clips_probabilities():
    probs = np.array([[0.0, 1.0], [0.5, 0.5]])
    loss, dy = to.categorical_crossentropy(np.array([[1.0, 0.0], [1.0, 0.0]]), probs)
    assert loss == pytest.approx((-np.log(1e-7) - np.log(0.5)) / 2, rel=1e-14)
    assert np.array_equal(dy[0], [0.0, 0.0])  # both entries clipped: no gradient


def test_regularization_gradient():
    w = RNG.normal(size=(3, 4))
    value, grad = to.regularization(w, (0.01, 0.02))
    assert value == pytest.approx(0.01 * np.abs(w).sum() + 0.02 * (w**2).sum(), rel=1e-14)
    assert_grad(grad, numeric_grad(lambda: to.regularization(w, (0.01, 0.02))[0], w))


def test_constraints():
    w = np.array([[3.0, -1.0], [4.0, 0.5]])
    assert np.array_equal(to.non_neg(w), [[3.0, 0.0], [4.0, 0.5]])
    got = to.max_norm(2.0, axis=0)(w)
    np.testing.assert_allclose(got[:, 0], w[:, 0] * 2.0 / (5.0 + 1e-7), rtol=1e-15)
    np.testing.assert_allclose(
        got[:, 1], w[:, 1] * np.hypot(1, 0.5) / (np.hypot(1, 0.5) + 1e-7), rtol=1e-15
    )


def test_learning_rate_is_a_float32_variable():
    assert to.SGD(0.1).lr == float(np.float32(0.1)) != 0.1
    assert to.Adam(0.01).lr == float(np.float32(0.01))


def test_sgd_recurrences():
    g1, g2 = np.array([1.0, -2.0]), np.array([0.5, 4.0])
    w0 = np.array([0.1, 0.2])
    plain = to.SGD(0.125)
    np.testing.assert_allclose(plain.update_step("w", w0, g1), w0 - 0.125 * g1, rtol=1e-14)
    for nesterov in (False, True):
        opt = to.SGD(0.1, momentum=0.9, nesterov=nesterov)
        w1 = opt.update_step("w", w0, g1)
        w2 = opt.update_step("w", w1, g2)
        lr = float(np.float32(0.1))
        m1 = -lr * g1
        m2 = 0.9 * m1 - lr * g2
        if nesterov:
            want1, want2 = w0 + 0.9 * m1 - lr * g1, w0 + 0.9 * m1 - lr * g1 + 0.9 * m2 - lr * g2
        else:
            want1, want2 = w0 + m1, w0 + m1 + m2
        np.testing.assert_allclose(w1, want1, rtol=1e-14)
        np.testing.assert_allclose(w2, want2, rtol=1e-14)
        np.testing.assert_allclose(opt.slots["momentum"]["w"], m2, rtol=1e-14)


def test_adam_unrolled_two_steps():
    lr, b1, b2, eps = 0.25, 0.8, 0.9, 1e-3  # lr exact in float32
    g1, g2 = np.array([1.0, -2e-3, 0.0]), np.array([0.5, 4.0, -1e-4])
    w0 = np.array([0.1, 0.2, -0.3])
    opt = to.Adam(lr, b1, b2, eps)
    w1 = opt.update_step("w", w0, g1)
    opt.iterations += 1
    w2 = opt.update_step("w", w1, g2)
    # Step t uses alpha = lr * sqrt(1 - b2^t) / (1 - b1^t) and epsilon outside the root.
    want1 = w0 - lr * np.sqrt(1 - b2) / (1 - b1) * (1 - b1) * g1 / (np.sqrt((1 - b2) * g1**2) + eps)
    m2 = b1 * (1 - b1) * g1 + (1 - b1) * g2
    v2 = b2 * (1 - b2) * g1**2 + (1 - b2) * g2**2
    want2 = want1 - lr * np.sqrt(1 - b2**2) / (1 - b1**2) * m2 / (np.sqrt(v2) + eps)
    np.testing.assert_allclose(w1, want1, rtol=1e-14)
    np.testing.assert_allclose(w2, want2, rtol=1e-14)


def small_cnn(reg=(0.0, 0.01)):
    return [
        to.Conv2D(
            "conv",
            RNG.normal(size=(3, 3, 2, 3)) * 0.5,
            RNG.normal(size=3),
            strides=2,
            padding="same",
            regularizers={"kernel": reg},
        ),
        to.BatchNormalization(
            "bn", RNG.uniform(0.5, 1.5, 3), RNG.normal(size=3), np.zeros(3), np.ones(3)
        ),
        to.ReLU("relu"),
        to.GlobalAveragePooling2D("gap"),
        to.Dense("dense", RNG.normal(size=(3, 4)), RNG.normal(size=4), activation="softmax"),
    ]


def test_network_gradient_against_finite_differences():
    net = to.Network(small_cnn(), to.sparse_categorical_crossentropy)
    x, y, sw = RNG.normal(size=(4, 5, 6, 2)), RNG.integers(0, 4, size=4), RNG.uniform(0.5, 2, 4)
    _, grads = net.loss_and_grads(x, y, sw)
    assert list(grads) == [f"{layer.name}/{name}" for layer, name in net.trainable()]
    for layer, name in net.trainable():
        numeric = numeric_grad(lambda: net.loss_and_grads(x, y, sw)[0], layer.params[name])
        assert_grad(grads[f"{layer.name}/{name}"], numeric)


def test_network_train_step_order():
    """Loss before the update includes the penalty; constraints after the update; state rounded."""
    layers = small_cnn(reg=(0.0, 0.05))
    layers[-1].constraints["kernel"] = to.non_neg
    net = to.Network(
        layers, to.sparse_categorical_crossentropy, to.SGD(0.1), storage_dtype="float32"
    )
    x, y = RNG.normal(size=(4, 5, 6, 2)), RNG.integers(0, 4, size=4)
    before = {k: v.copy() for k, v in net.weights().items()}
    want_loss, want_grads = net.loss_and_grads(x, y)
    for layer in net.layers:  # undo the moving-statistics update of that probe
        layer.state = {k: before[f"{layer.name}/{k}"].copy() for k in layer.state}
    got = net.train_step(x, y)
    assert got == pytest.approx(want_loss, rel=1e-15)
    penalty = 0.05 * np.sum(before["conv/kernel"] ** 2)
    assert penalty > 0 and got > penalty
    after = net.weights()
    lr = float(np.float32(0.1))
    kernel = np.maximum(before["dense/kernel"] - lr * want_grads["dense/kernel"], 0)
    np.testing.assert_allclose(after["dense/kernel"], kernel.astype(np.float32), rtol=0, atol=0)
    np.testing.assert_allclose(
        after["conv/kernel"],
        (before["conv/kernel"] - lr * want_grads["conv/kernel"]).astype(np.float32),
        rtol=0,
    )
    assert not np.array_equal(after["bn/moving_mean"], before["bn/moving_mean"])
    assert net.optimizer.iterations == 1
