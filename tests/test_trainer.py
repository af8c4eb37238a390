"""`Model.compile` / `train_on_batch` step by step against the float64 train-step oracle.

Each test builds an onnxbn model, copies its weights into `tests/training_oracle.py`
(written from Keras's formulas), runs a few steps on both and compares after every
step the returned loss, every trainable weight and every moving statistic.
Tolerances: float32 models 2e-5 of each array's scale (float32 forward, float32
variables and slots); float64 models 1e-10.
"""

from __future__ import annotations

import numpy as np
import pytest

import onnxbn
from onnxbn import layers
from tests import training_oracle as to

TOL = {"float32": 2e-5, "float64": 1e-10}


def assert_matches(what, got, want, dtype):
    """`max|got - want| <= tol * max(1, max|want|)`, reporting the size of any miss."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, f"{what}: shape {got.shape}, expected {want.shape}"
    scale = max(1.0, float(np.abs(want).max(initial=0.0)))
    err = float(np.abs(got - want).max(initial=0.0))
    assert err <= TOL[dtype] * scale, f"{what}: max error {err:.3g} at scale {scale:.3g} ({dtype})"


def oracle_layers(model, regularizers=None, constraints=None):
    """The oracle's copy of `model` (a chain): structure from each layer's config, current weights.

    `regularizers` / `constraints` map a weight path to the oracle's `(l1, l2)` /
    projection: the test states what it asked onnxbn for, independently.
    """
    regularizers, constraints = regularizers or {}, constraints or {}
    out = []
    for layer in model.layers:
        cfg = layer.get_config()
        w = {v.path.split("/")[-1]: v.numpy() for v in layer.weights}
        own = {
            "trainable": layer.trainable,
            "regularizers": {
                p.split("/")[1]: f
                for p, f in regularizers.items()
                if p.startswith(layer.name + "/")
            },
            "constraints": {
                p.split("/")[1]: c for p, c in constraints.items() if p.startswith(layer.name + "/")
            },
        }
        kind = type(layer).__name__
        if kind == "InputLayer":
            continue
        if kind == "Dense":
            out.append(to.Dense(layer.name, w["kernel"], w.get("bias"), cfg["activation"], **own))
        elif kind == "Conv2D":
            assert cfg["activation"] == "linear" and cfg["strides"][0] == cfg["strides"][1]
            out.append(
                to.Conv2D(
                    layer.name, w["kernel"], w.get("bias"), cfg["strides"][0], cfg["padding"], **own
                )
            )
        elif kind == "BatchNormalization":
            assert cfg["axis"] in (-1, len(layer.input.shape) - 1)
            out.append(
                to.BatchNormalization(
                    layer.name,
                    w["gamma"],
                    w["beta"],
                    w["moving_mean"],
                    w["moving_variance"],
                    momentum=cfg["momentum"],
                    epsilon=cfg["epsilon"],
                    **own,
                )
            )
        elif kind == "ReLU":
            out.append(to.ReLU(layer.name))
        elif kind == "GlobalAveragePooling2D":
            out.append(to.GlobalAveragePooling2D(layer.name))
        else:
            raise AssertionError(f"no oracle for {kind}")
    return out


def randomize(model, rng):
    """Seeded Glorot-uniform kernels; non-trivial biases, BN affine weights and statistics."""
    for layer in model.layers:
        names = [v.path.split("/")[-1] for v in layer.weights]
        values = []
        for name, old in zip(names, layer.get_weights()):
            if name == "kernel":
                receptive = int(np.prod(old.shape[:-2]))
                limit = np.sqrt(6 / (receptive * (old.shape[-2] + old.shape[-1])))
                v = rng.uniform(-limit, limit, old.shape)
            elif name in ("bias", "beta", "moving_mean"):
                v = rng.normal(0, 0.3, old.shape)
            else:  # gamma, moving_variance
                v = rng.uniform(0.5, 1.5, old.shape)
            values.append(v.astype(old.dtype))
        if values:
            layer.set_weights(values)


def run_and_compare(model, net, batches, dtype):
    """`train_on_batch` on each `(x, y, sample_weight)` and the oracle's step; compare all."""
    variables = {v.path: v for v in model.weights}
    assert set(variables) == set(net.weights()), "weight paths differ from the oracle's"
    start = net.optimizer.iterations
    for step, (x, y, sw) in enumerate(batches):
        got = model.train_on_batch(x, y, sample_weight=sw)
        want = net.train_step(x, y, sw)
        assert isinstance(got, float)
        assert_matches(f"step {step} loss", got, want, dtype)
        for path, value in net.weights().items():
            assert variables[path].dtype == dtype
            assert_matches(f"step {step} {path}", variables[path].numpy(), value, dtype)
    assert int(model.optimizer.iterations) == start + len(batches) == net.optimizer.iterations


def mlp(dtype, **dense_kwargs):
    x = onnxbn.Input(shape=(6,), dtype=dtype, name="x")
    h = layers.Dense(8, name="dense1", dtype=dtype, **dense_kwargs)(x)
    h = layers.BatchNormalization(momentum=0.9, name="bn", dtype=dtype)(h)
    h = layers.ReLU(name="relu", dtype=dtype)(h)
    y = layers.Dense(3, name="dense2", dtype=dtype)(h)
    return onnxbn.Model(x, y, name="mlp")


def cnn(dtype, padding="same", strides=2, head="linear", **conv_kwargs):
    x = onnxbn.Input(shape=(7, 6, 2), dtype=dtype, name="x")
    h = layers.Conv2D(
        4, 3, strides=strides, padding=padding, name="conv", dtype=dtype, **conv_kwargs
    )(x)
    h = layers.BatchNormalization(momentum=0.8, epsilon=1e-2, name="bn", dtype=dtype)(h)
    h = layers.ReLU(name="relu", dtype=dtype)(h)
    h = layers.GlobalAveragePooling2D(name="gap", dtype=dtype)(h)
    y = layers.Dense(3, activation=head, name="head", dtype=dtype)(h)
    return onnxbn.Model(x, y, name="cnn")


def regression_batches(rng, steps=4, n=8, dtype="float32", weighted=False):
    return [
        (
            rng.normal(size=(n, 6)).astype(dtype),
            rng.normal(size=(n, 3)).astype(dtype),
            rng.uniform(0, 2, n) if weighted else None,
        )
        for _ in range(steps)
    ]


def image_batches(rng, steps=4, n=5, dtype="float32", weighted=False, one_hot=False):
    out = []
    for _ in range(steps):
        labels = rng.integers(0, 3, size=n)
        y = np.eye(3, dtype=dtype)[labels] if one_hot else labels
        out.append(
            (
                rng.normal(size=(n, 7, 6, 2)).astype(dtype),
                y,
                rng.uniform(0, 2, n) if weighted else None,
            )
        )
    return out


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_mlp_dense_bn_relu_dense_mse_adam(dtype):
    rng = np.random.default_rng(0)
    model = mlp(dtype)
    randomize(model, rng)
    net = to.Network(
        oracle_layers(model), to.mean_squared_error, to.Adam(0.01), storage_dtype=dtype
    )
    model.compile(optimizer=onnxbn.optimizers.Adam(learning_rate=0.01), loss="mse")
    run_and_compare(model, net, regression_batches(rng, dtype=dtype), dtype)


def test_adam_by_name_and_keras_defaults():
    rng = np.random.default_rng(1)
    model = mlp("float64")
    randomize(model, rng)
    net = to.Network(
        oracle_layers(model), to.mean_squared_error, to.Adam(), storage_dtype="float64"
    )
    model.compile(optimizer="adam", loss="mean_squared_error")
    run_and_compare(model, net, regression_batches(rng, steps=3, dtype="float64"), "float64")


@pytest.mark.parametrize(
    "dtype, padding, strides, nesterov",
    [
        ("float32", "same", 2, False),
        ("float64", "same", 2, True),
        ("float64", "valid", 1, False),
        ("float32", "valid", 2, True),
        ("float64", "same", 1, False),
    ],
)
def test_cnn_sparse_crossentropy_from_logits_sgd_momentum(dtype, padding, strides, nesterov):
    rng = np.random.default_rng(2)
    model = cnn(dtype, padding, strides)
    randomize(model, rng)

    def loss(y, p, w):
        return to.sparse_categorical_crossentropy(y, p, w, from_logits=True)

    net = to.Network(oracle_layers(model), loss, to.SGD(0.1, 0.9, nesterov), storage_dtype=dtype)
    model.compile(
        optimizer=onnxbn.optimizers.SGD(learning_rate=0.1, momentum=0.9, nesterov=nesterov),
        loss=onnxbn.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    run_and_compare(model, net, image_batches(rng, dtype=dtype), dtype)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize(
    "loss_name", ["categorical_crossentropy", "sparse_categorical_crossentropy"]
)
def test_softmax_head_probability_crossentropy_plain_sgd(dtype, loss_name):
    rng = np.random.default_rng(3)
    model = cnn(dtype, head="softmax")
    randomize(model, rng)
    one_hot = loss_name == "categorical_crossentropy"
    fn = to.categorical_crossentropy if one_hot else to.sparse_categorical_crossentropy
    net = to.Network(oracle_layers(model), fn, to.SGD(0.01), storage_dtype=dtype)
    model.compile(optimizer="sgd", loss=loss_name)  # Keras's default: learning_rate=0.01
    run_and_compare(model, net, image_batches(rng, steps=3, dtype=dtype, one_hot=one_hot), dtype)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_frozen_batch_normalization_runs_in_inference_mode_and_keeps_its_weights(dtype):
    rng = np.random.default_rng(4)
    model = cnn(dtype)
    randomize(model, rng)
    bn = model.get_layer("bn")
    bn.trainable = False
    frozen = [v.numpy().copy() for v in bn.weights]
    assert [v.path for v in model.trainable_weights] == [
        "conv/kernel",
        "conv/bias",
        "head/kernel",
        "head/bias",
    ]

    def loss(y, p, w):
        return to.sparse_categorical_crossentropy(y, p, w, from_logits=True)

    net = to.Network(oracle_layers(model), loss, to.Adam(0.02), storage_dtype=dtype)
    model.compile(
        optimizer=onnxbn.optimizers.Adam(learning_rate=0.02),
        loss=onnxbn.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    run_and_compare(model, net, image_batches(rng, steps=3, dtype=dtype), dtype)
    for before, v in zip(frozen, bn.weights):
        assert np.array_equal(v.numpy(), before), f"frozen {v.path} changed"


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_l2_regularizer_is_in_the_loss_and_the_gradient(dtype):
    rng = np.random.default_rng(5)
    model = mlp(dtype, kernel_regularizer=onnxbn.regularizers.L2(0.05))
    randomize(model, rng)
    net = to.Network(
        oracle_layers(model, regularizers={"dense1/kernel": (0.0, 0.05)}),
        to.mean_squared_error,
        to.SGD(0.1),
        storage_dtype=dtype,
    )
    model.compile(optimizer=onnxbn.optimizers.SGD(learning_rate=0.1), loss="mse")
    x, y, _ = regression_batches(rng, steps=1, dtype=dtype)[0]
    penalty = 0.05 * np.sum(model.get_layer("dense1").kernel.numpy().astype(np.float64) ** 2)
    plain = to.Network(oracle_layers(model), to.mean_squared_error).loss_and_grads(x, y)[0]
    assert penalty > 1e-2
    got = model.train_on_batch(x, y)
    want = net.train_step(x, y)
    assert_matches("loss with the L2 penalty", got, want, dtype)
    assert_matches("L2 penalty alone", got - plain, penalty, dtype)
    run_and_compare(model, net, regression_batches(rng, steps=2, dtype=dtype), dtype)


def test_frozen_layer_regularizer_is_not_counted():
    rng = np.random.default_rng(6)
    model = mlp("float64", kernel_regularizer=onnxbn.regularizers.L2(0.05))
    randomize(model, rng)
    model.get_layer("dense1").trainable = False
    net = to.Network(oracle_layers(model), to.mean_squared_error, to.SGD(0.1))
    model.compile(optimizer=onnxbn.optimizers.SGD(learning_rate=0.1), loss="mse")
    run_and_compare(model, net, regression_batches(rng, steps=2, dtype="float64"), "float64")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_constraints_apply_after_the_update(dtype):
    rng = np.random.default_rng(7)
    x = onnxbn.Input(shape=(7, 6, 2), dtype=dtype, name="x")
    h = layers.Conv2D(
        4,
        3,
        padding="same",
        name="conv",
        dtype=dtype,
        kernel_constraint=onnxbn.constraints.MaxNorm(0.5, axis=[0, 1, 2]),
    )(x)
    h = layers.BatchNormalization(name="bn", dtype=dtype)(h)
    h = layers.GlobalAveragePooling2D(name="gap", dtype=dtype)(h)
    y = layers.Dense(3, name="head", dtype=dtype, kernel_constraint=onnxbn.constraints.NonNeg())(h)
    model = onnxbn.Model(x, y)
    randomize(model, rng)
    net = to.Network(
        oracle_layers(
            model,
            constraints={
                "conv/kernel": to.max_norm(0.5, axis=(0, 1, 2)),
                "head/kernel": to.non_neg,
            },
        ),
        to.mean_squared_error,
        to.SGD(0.5, momentum=0.5),
        storage_dtype=dtype,
    )
    model.compile(optimizer=onnxbn.optimizers.SGD(learning_rate=0.5, momentum=0.5), loss="mse")
    batches = [
        (xb, rng.normal(size=(5, 3)).astype(dtype), None)
        for xb, _, _ in image_batches(rng, 3, dtype=dtype)
    ]
    run_and_compare(model, net, batches, dtype)
    head = model.get_layer("head").kernel.numpy()
    assert head.min() == 0.0 and (head > 0).any()  # the projection was active
    norms = np.sqrt(
        (model.get_layer("conv").kernel.numpy().astype(np.float64) ** 2).sum(axis=(0, 1, 2))
    )
    np.testing.assert_allclose(norms, 0.5, rtol=1e-5)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_sample_weight(dtype):
    rng = np.random.default_rng(8)
    model = mlp(dtype)
    randomize(model, rng)
    net = to.Network(
        oracle_layers(model), to.mean_squared_error, to.Adam(0.01), storage_dtype=dtype
    )
    model.compile(optimizer=onnxbn.optimizers.Adam(learning_rate=0.01), loss="mse")
    run_and_compare(model, net, regression_batches(rng, steps=3, dtype=dtype, weighted=True), dtype)

    model = cnn(dtype)
    randomize(model, rng)

    def loss(y, p, w):
        return to.sparse_categorical_crossentropy(y, p, w, from_logits=True)

    net = to.Network(oracle_layers(model), loss, to.SGD(0.1, 0.9), storage_dtype=dtype)
    model.compile(
        optimizer=onnxbn.optimizers.SGD(learning_rate=0.1, momentum=0.9),
        loss=onnxbn.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    run_and_compare(model, net, image_batches(rng, steps=3, dtype=dtype, weighted=True), dtype)


def test_zero_sample_weights_leave_the_weights_alone_with_sgd():
    """Every sample weighted 0 (no regularizer): the loss is 0 and SGD moves nothing; BN still updates."""
    rng = np.random.default_rng(9)
    model = mlp("float64")
    randomize(model, rng)
    before = {v.path: v.numpy().copy() for v in model.weights}
    model.compile(optimizer=onnxbn.optimizers.SGD(learning_rate=0.1), loss="mse")
    x, y, _ = regression_batches(rng, steps=1, dtype="float64")[0]
    assert model.train_on_batch(x, y, sample_weight=np.zeros(8)) == 0.0
    for v in model.trainable_weights:
        assert np.array_equal(v.numpy(), before[v.path]), v.path
    assert not np.array_equal(model.get_layer("bn").moving_mean.numpy(), before["bn/moving_mean"])


def test_saturated_softmax_is_clipped_in_loss_and_gradient():
    """A true-class probability below 1e-7 counts as 1e-7 and sends no gradient back (Keras's clip)."""
    rng = np.random.default_rng(10)
    x = onnxbn.Input(shape=(4,), dtype="float64", name="x")
    model = onnxbn.Model(x, layers.Dense(3, activation="softmax", name="head", dtype="float64")(x))
    model.get_layer("head").set_weights([rng.normal(0, 40, (4, 3)), np.zeros(3)])
    net = to.Network(oracle_layers(model), to.categorical_crossentropy, to.SGD(0.01))
    xb = rng.normal(size=(16, 4))
    probs = net.forward(xb, training=True)[0]
    labels = np.where(np.arange(16) % 2 == 0, probs.argmin(axis=1), probs.argmax(axis=1))
    clipped = probs[np.arange(16), labels] < 1e-7
    assert clipped.sum() >= 3  # the clip is active for several samples
    y = np.eye(3)[labels]
    model.compile(
        optimizer=onnxbn.optimizers.SGD(learning_rate=0.01), loss="categorical_crossentropy"
    )
    run_and_compare(model, net, [(xb, y, None)] * 3, "float64")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_fit_is_train_on_batch_over_batches_with_a_batch_size_weighted_epoch_loss(dtype):
    """10 samples, batch_size 4, no shuffling: steps of 4, 4, 2; the epoch loss weights by size."""
    rng = np.random.default_rng(11)
    model = cnn(dtype)
    randomize(model, rng)

    def loss(y, p, w):
        return to.sparse_categorical_crossentropy(y, p, w, from_logits=True)

    net = to.Network(oracle_layers(model), loss, to.Adam(0.01), storage_dtype=dtype)
    model.compile(
        optimizer=onnxbn.optimizers.Adam(learning_rate=0.01),
        loss=onnxbn.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    x = rng.normal(size=(10, 7, 6, 2)).astype(dtype)
    y, sw = rng.integers(0, 3, size=10), rng.uniform(0, 2, 10)
    history = model.fit(x, y, batch_size=4, epochs=2, shuffle=False, verbose=0, sample_weight=sw)
    want = []
    for _ in range(2):
        losses = [net.train_step(x[i : i + 4], y[i : i + 4], sw[i : i + 4]) for i in (0, 4, 8)]
        want.append((4 * losses[0] + 4 * losses[1] + 2 * losses[2]) / 10)
    assert_matches("epoch losses", history.history["loss"], want, dtype)
    for v in model.weights:
        assert_matches(f"after fit {v.path}", v.numpy(), net.weights()[v.path], dtype)
    assert int(model.optimizer.iterations) == 6
