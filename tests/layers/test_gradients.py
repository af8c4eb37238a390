"""Eager gradient rules (`Layer.vjp`) against central finite differences of the eager forward.

Every layer runs in float64 (`dtype="float64"`), so its forward is the float64
computation the pullback differentiates. The loss is a random projection
`L = sum(w * y)`, so `dy = w` and each gradient entry is checked against
`(L(v + h) - L(v - h)) / 2h` for every input and trainable weight entry.
"""

from __future__ import annotations

import numpy as np
import pytest

from onnxbn import layers
from onnxbn.gradients import Gradients
from onnxbn.layers import activation as activations

FD_STEP = 1e-6
FD_TOL = {"rtol": 1e-6, "atol": 1e-8}  # float64 central differences


def finite_difference(loss, value: np.ndarray, where: np.ndarray | None = None) -> np.ndarray:
    """Central differences of `loss()` in each entry of `value` (perturbed in place)."""
    grad = np.zeros(value.shape)
    for i in zip(*np.nonzero(np.ones(value.shape, bool) if where is None else where)):
        original = value[i]
        value[i] = original + FD_STEP
        up = loss()
        value[i] = original - FD_STEP
        down = loss()
        value[i] = original
        grad[i] = (up - down) / (2 * FD_STEP)
    return grad


def projection(shape: tuple, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=shape)


def check_layer(layer, x: np.ndarray, make=None, fd_where=None, **kwargs) -> Gradients:
    """Checks `layer.call_with_vjp(x, **kwargs)` against `layer(x)` and finite differences.

    Args:
        layer: the layer (float64).
        x: its float64 input (checked by finite differences unless integer).
        make: optional factory of a fresh equivalent layer per evaluation
            (a seeded Dropout must redraw the same mask every time).
        fd_where: optional bool array: the input entries checked by finite
            differences (the others are returned for the caller to check).
        **kwargs: call keyword arguments.

    Returns:
        The pullback's `Gradients` for `dy = w`.
    """
    forward = make or (lambda: layer)
    y, pullback = forward().call_with_vjp(x, **kwargs)
    expected = forward()(x, **kwargs)
    assert y.dtype == expected.dtype
    np.testing.assert_array_equal(y, expected)
    w = projection(y.shape)
    trainable = list(layer.trainable_weights)
    grads = pullback(w.copy())
    assert isinstance(grads, Gradients) and len(grads.inputs) == 1
    assert set(grads.weights) == {v.path for v in trainable}

    def loss() -> float:
        return float(np.sum(w * forward()(x, **kwargs)))

    if np.issubdtype(x.dtype, np.floating):
        dx = grads.inputs[0]
        assert dx.shape == x.shape and dx.dtype == np.float64
        where = np.ones(x.shape, bool) if fd_where is None else fd_where
        fd = finite_difference(loss, x, where)
        np.testing.assert_allclose(dx[where], fd[where], **FD_TOL)
    for variable in trainable:
        value = variable.numpy()

        def weight_loss(variable=variable, value=value) -> float:
            variable.assign(value)
            return loss()

        fd = finite_difference(weight_loss, value)
        variable.assign(value)
        got = grads.weights[variable.path]
        assert got.shape == variable.shape and got.dtype == np.float64
        np.testing.assert_allclose(got, fd, **FD_TOL, err_msg=variable.path)
    return grads


def random_input(shape: tuple, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=shape)


def away_from(x: np.ndarray, kinks: list[float], gap: float = 0.05) -> np.ndarray:
    """`x` with entries closer than `gap` to a kink pushed `gap` away (finite differences)."""
    for k in kinks:
        near = np.abs(x - k) < gap
        x[near] = k + np.where(x[near] >= k, gap, -gap)
    return x


def with_random_bias(layer):
    """Gives the (built) layer a non-zero bias, so it matters in the checks."""
    if getattr(layer, "bias", None) is not None:
        layer.bias.assign(projection(layer.bias.shape, seed=5))
    return layer


ACTIVATIONS = ["linear", "relu", "sigmoid", "tanh", "softmax"]


# -- Dense ------------------------------------------------------------------------------
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("shape", [(4, 3), (2, 3, 3), (2, 2, 1, 3)])
def test_dense(activation, shape):
    layer = layers.Dense(4, activation=activation, dtype="float64")
    layer.build(shape)
    with_random_bias(layer)
    check_layer(layer, random_input(shape))


def test_dense_without_bias_and_frozen():
    layer = layers.Dense(3, activation="tanh", use_bias=False, dtype="float64")
    check_layer(layer, random_input((5, 4)))
    frozen = layers.Dense(3, activation="sigmoid", dtype="float64", trainable=False)
    grads = check_layer(frozen, random_input((5, 4)))
    assert grads.weights == {}


# -- Conv1D / Conv2D --------------------------------------------------------------------
CONV1D = [
    # padding, strides, dilation, groups, use_bias, activation
    ("valid", 1, 1, 1, True, "tanh"),
    ("valid", 2, 1, 2, True, "linear"),
    ("same", 1, 2, 1, False, "sigmoid"),
    ("same", 2, 1, 2, True, "softmax"),
    ("same", 3, 1, 1, True, "linear"),
    ("causal", 1, 2, 2, True, "tanh"),
    ("causal", 2, 1, 1, False, "softmax"),
]


@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
@pytest.mark.parametrize("padding, strides, dilation, groups, use_bias, activation", CONV1D)
def test_conv1d(data_format, padding, strides, dilation, groups, use_bias, activation):
    layer = layers.Conv1D(
        4,
        3,
        strides=strides,
        padding=padding,
        dilation_rate=dilation,
        groups=groups,
        use_bias=use_bias,
        activation=activation,
        data_format=data_format,
        dtype="float64",
    )
    shape = (2, 7, 4) if data_format == "channels_last" else (2, 4, 7)
    layer.build(shape)
    check_layer(with_random_bias(layer), random_input(shape))


CONV2D = [
    # padding, strides, dilation, groups, use_bias, activation
    ("valid", (1, 1), (1, 1), 1, True, "linear"),
    ("valid", (2, 1), (1, 1), 2, True, "tanh"),
    ("same", (1, 1), (2, 1), 1, False, "softmax"),
    ("same", (2, 2), (1, 1), 2, True, "sigmoid"),
    ("same", (1, 1), (1, 1), 4, True, "linear"),
]


@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
@pytest.mark.parametrize("padding, strides, dilation, groups, use_bias, activation", CONV2D)
def test_conv2d(data_format, padding, strides, dilation, groups, use_bias, activation):
    layer = layers.Conv2D(
        4,
        (2, 3),
        strides=strides,
        padding=padding,
        dilation_rate=dilation,
        groups=groups,
        use_bias=use_bias,
        activation=activation,
        data_format=data_format,
        dtype="float64",
    )
    shape = (2, 5, 4, 4) if data_format == "channels_last" else (2, 4, 5, 4)
    layer.build(shape)
    check_layer(with_random_bias(layer), random_input(shape))


def test_conv_relu_and_frozen():
    layer = layers.Conv1D(3, 2, activation="relu", dtype="float64")
    layer.build((2, 5, 2))
    check_layer(with_random_bias(layer), random_input((2, 5, 2)))
    layer.trainable = False
    grads = check_layer(layer, random_input((2, 5, 2)))
    assert grads.weights == {}


# -- Activation and ReLU ----------------------------------------------------------------
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("shape", [(5,), (3, 4), (2, 3, 4)])
def test_activation_layer(activation, shape):
    x = away_from(random_input(shape) * 2, [0.0])
    check_layer(layers.Activation(activation, dtype="float64"), x)


RELU_CONFIGS = [
    {},
    {"max_value": 1.5},
    {"negative_slope": 0.3},
    {"threshold": 0.5},
    {"max_value": 6.0, "negative_slope": 0.1, "threshold": 0.4},
    {"max_value": 0.3, "threshold": 1.0},  # saturates below the threshold
]


@pytest.mark.parametrize("config", RELU_CONFIGS, ids=str)
def test_relu_layer(config):
    layer = layers.ReLU(dtype="float64", **config)
    kinks = [0.0, config.get("threshold", 0.0)] + [config.get("max_value", 0.0)]
    check_layer(layer, away_from(random_input((4, 6)) * 3, kinks))


def test_relu_subgradient_at_the_kinks():
    """At a kink the slope of the piece Keras's formula picks: saturated at x >= max_value,
    damped at x <= threshold."""
    x = np.array([-1.0, 0.0, 0.5, 1.0, 2.0, 3.0])
    dy = np.ones_like(x)
    layer = layers.ReLU(max_value=2.0, negative_slope=0.25, threshold=0.5, dtype="float64")
    _, pullback = layer.call_with_vjp(x)
    np.testing.assert_array_equal(pullback(dy).inputs[0], [0.25, 0.25, 0.25, 1.0, 0.0, 0.0])
    _, pullback = layers.ReLU(dtype="float64").call_with_vjp(x)
    np.testing.assert_array_equal(pullback(dy).inputs[0], [0.0, 0.0, 1.0, 1.0, 1.0, 1.0])


def test_relu_threshold_compared_in_the_compute_dtype():
    # float32(0.1) is not above float32(0.1): the forward zeroes it, so no gradient flows.
    x = np.array([np.float32(0.1), 0.2], np.float32)
    y, pullback = layers.ReLU(threshold=0.1).call_with_vjp(x)
    np.testing.assert_array_equal(y, [0.0, np.float32(0.2)])
    np.testing.assert_array_equal(pullback(np.ones(2)).inputs[0], [0.0, 1.0])


def test_apply_with_vjp_rounds_to_the_function():
    x = random_input((3, 4)).astype(np.float32)
    for name in ACTIVATIONS:
        fn = activations.get(name)
        y, _ = activations.apply_with_vjp(fn, x)
        assert y.dtype == np.float64
        np.testing.assert_array_equal(y.astype(np.float32), fn(x))


# -- Add --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "shapes",
    [[(2, 3)], [(2, 3, 4), (2, 3, 4)], [(2, 3, 4), (2, 1, 4), (2, 3, 1)], [(2, 4), (2, 3, 4)]],
    ids=str,
)
def test_add(shapes):
    layer = layers.Add(dtype="float64")
    xs = [random_input(s, seed=i) for i, s in enumerate(shapes)]
    y, pullback = layer.call_with_vjp(xs)
    np.testing.assert_array_equal(y, layer(xs))
    w = projection(y.shape)
    grads = pullback(w)
    assert len(grads.inputs) == 1 and grads.weights == {}
    assert [g.shape for g in grads.inputs[0]] == [x.shape for x in xs]
    for x, dx in zip(xs, grads.inputs[0]):
        fd = finite_difference(lambda: float(np.sum(w * layer(xs))), x)
        np.testing.assert_allclose(dx, fd, **FD_TOL)


def test_add_call_with_vjp_checks_like_a_call():
    layer = layers.Add()
    with pytest.raises(ValueError, match="list of inputs"):
        layer.call_with_vjp(np.zeros((2, 3)))
    with pytest.raises(TypeError, match="only its list"):
        layer.call_with_vjp([np.zeros((2, 3))], mask=None)
    with pytest.raises(TypeError, match="not symbolic"):
        layer.call_with_vjp([layers.Input((3,)), layers.Input((3,))])


# -- Global average pooling -------------------------------------------------------------
@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
@pytest.mark.parametrize("keepdims", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_global_average_pooling_1d(data_format, keepdims, masked):
    layer = layers.GlobalAveragePooling1D(
        data_format=data_format, keepdims=keepdims, dtype="float64"
    )
    shape = (3, 5, 2) if data_format == "channels_last" else (3, 2, 5)
    mask = np.array([[1, 1, 0, 1, 0], [0, 0, 0, 0, 1], [1, 1, 1, 1, 1]], bool) if masked else None
    grads = check_layer(layer, random_input(shape), mask=mask)
    if masked:  # masked steps take no part in the mean
        dx = grads.inputs[0] if data_format == "channels_last" else grads.inputs[0].swapaxes(1, 2)
        assert np.all(dx[~mask] == 0.0)


def test_global_average_pooling_1d_fully_masked_row():
    layer = layers.GlobalAveragePooling1D(dtype="float64")
    mask = np.array([[0, 0, 0], [1, 0, 1]], bool)
    with np.errstate(all="raise"):
        y, pullback = layer.call_with_vjp(random_input((2, 3, 2)), mask=mask)
        dx = pullback(np.ones(y.shape)).inputs[0]
    assert np.isnan(y[0]).all()
    np.testing.assert_array_equal(dx[0], 0.0)
    np.testing.assert_array_equal(dx[1], [[0.5, 0.5], [0.0, 0.0], [0.5, 0.5]])


@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
@pytest.mark.parametrize("keepdims", [False, True])
def test_global_average_pooling_2d(data_format, keepdims):
    layer = layers.GlobalAveragePooling2D(
        data_format=data_format, keepdims=keepdims, dtype="float64"
    )
    check_layer(layer, random_input((2, 3, 4, 2)))


# -- Flatten ----------------------------------------------------------------------------
@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
@pytest.mark.parametrize("shape", [(3,), (2, 3), (2, 3, 4), (2, 2, 3, 2)])
def test_flatten(data_format, shape):
    check_layer(layers.Flatten(data_format=data_format, dtype="float64"), random_input(shape))


# -- Dropout ----------------------------------------------------------------------------
@pytest.mark.parametrize("rate", [0.0, 0.4, 1.0])
@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("noise_shape", [None, (None, 1, 4)])
def test_dropout(rate, training, noise_shape):
    # A fresh layer with the same seed per evaluation draws the same keep-mask.
    def make():
        return layers.Dropout(rate, noise_shape=noise_shape, seed=3, dtype="float64")

    layer = make()
    x = random_input((3, 2, 4))
    grads = check_layer(layer, x, make=make, training=training)
    y = make()(x, training=training)
    dx = grads.inputs[0]
    w = projection(y.shape)
    if not training or rate == 0:
        np.testing.assert_array_equal(dx, w)
    else:  # dx = w * keep / keep_prob, with the forward's keep-mask
        keep = y != 0
        expected = np.where(keep, w / (1 - rate), 0.0) if rate < 1 else np.zeros(x.shape)
        np.testing.assert_allclose(dx, expected, rtol=1e-15)


def test_dropout_pullback_uses_the_forward_draw():
    layer = layers.Dropout(0.5, seed=11, dtype="float64")
    x = random_input((20, 10)) + 10.0  # no zero inputs: zero outputs are the dropped ones
    y, pullback = layer.call_with_vjp(x, training=True)
    layer(x, training=True)  # a later draw must not change the pullback
    dx = pullback(np.ones(x.shape)).inputs[0]
    np.testing.assert_array_equal(dx, np.where(y != 0, 2.0, 0.0))


# -- Masking ----------------------------------------------------------------------------
def test_masking():
    layer = layers.Masking(mask_value=0.5, dtype="float64")
    x = random_input((3, 4, 2))
    x[0, 1] = 0.5
    x[2, [0, 3]] = 0.5
    x[1, 2, 0] = 0.5  # one feature only: the step stays valid
    masked = np.zeros(x.shape, bool)
    masked[0, 1] = masked[2, 0] = masked[2, 3] = True
    # Perturbing a masked step would unmask it: finite differences on valid steps only.
    grads = check_layer(layer, x, fd_where=~masked)
    assert np.all(grads.inputs[0][masked] == 0.0)


# -- Embedding --------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(5,), (2, 3), (2, 2, 2)])
def test_embedding(shape):
    layer = layers.Embedding(6, 3, dtype="float64")
    ids = np.random.default_rng(2).integers(0, 6, size=shape)
    grads = check_layer(layer, ids)
    assert grads.inputs == (None,)


def test_embedding_gradient_is_the_scatter_add_of_rows():
    layer = layers.Embedding(5, 2, dtype="float64")
    ids = np.array([[1, 3, 1], [1, 0, 3]])
    y, pullback = layer.call_with_vjp(ids)
    dy = projection(y.shape)
    table = pullback(dy).weights[layer.embeddings.path]
    expected = np.zeros((5, 2))
    expected[0] = dy[1, 1]
    expected[1] = dy[0, 0] + dy[0, 2] + dy[1, 0]
    expected[3] = dy[0, 1] + dy[1, 2]
    np.testing.assert_allclose(table, expected, rtol=1e-15)
    layer.trainable = False
    _, pullback = layer.call_with_vjp(ids)
    assert pullback(dy) == Gradients((None,), {})


# -- Outputs in lower-precision compute dtypes -------------------------------------------
@pytest.mark.parametrize("dtype", ["float32", "mixed_float16"])
@pytest.mark.parametrize(
    "make, shape",
    [
        (lambda d: layers.Dense(3, activation="softmax", dtype=d), (2, 4)),
        (lambda d: layers.Conv1D(2, 3, padding="same", activation="sigmoid", dtype=d), (2, 5, 3)),
        (lambda d: layers.ReLU(max_value=1.0, threshold=0.1, dtype=d), (3, 4)),
        (lambda d: layers.GlobalAveragePooling2D(dtype=d), (2, 3, 3, 2)),
        (lambda d: layers.Masking(dtype=d), (2, 3, 2)),
    ],
)
def test_vjp_output_is_the_call_output(dtype, make, shape):
    layer = make(dtype)
    x = random_input(shape).astype(np.float32)
    y, pullback = layer.call_with_vjp(x)
    expected = layer(x)
    assert y.dtype == expected.dtype
    np.testing.assert_array_equal(y, expected)
    dx = pullback(np.ones(y.shape)).inputs[0]
    assert dx.shape == x.shape and dx.dtype == np.float64
