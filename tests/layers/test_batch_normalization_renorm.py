"""BatchNormalization(renorm=True) eager semantics against the float64 renorm oracle.

Also the renorm tests of Keras 3.15's `batch_normalization_test.py`, ported.
"""

from __future__ import annotations

import itertools
import json
import threading
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

import onnxbn
from onnxbn import distributed, initializers, layers
from onnxbn.dtypes import to_numpy_dtype
from onnxbn.layers.renormalization import batch_renormalization
from tests.distributed.thread_comm import ThreadComm, shared_slots
from tests.oracle import TOLERANCES, renorm_oracle

FIXTURES = Path(__file__).parents[1] / "fixtures" / "keras"
STATES = ("moving_mean", "moving_variance", "moving_stddev", "renorm_mean", "renorm_stddev")
CLIPPINGS = [
    None,
    {},
    {"rmin": 0.8},
    {"rmax": 1.2},
    {"dmax": 0.25},
    {"rmin": 0.9, "rmax": 1.1},
    {"rmax": 1.5, "dmax": 0.5, "rmin": 0.5},
    {"rmin": None, "rmax": 2.0, "dmax": None},
]


def make_layer(channels, *, axis=-1, ndim=2, seed=0, **kwargs):
    """A built renorm layer whose five states are random and unrelated to each other."""
    layer = layers.BatchNormalization(axis=axis, renorm=True, **kwargs)
    shape = [2] * ndim
    shape[axis % ndim] = channels
    layer.build(tuple(shape))
    rng = np.random.default_rng(seed)
    positive = {"moving_variance", "moving_stddev", "renorm_stddev"}
    layer.set_weights(
        [
            rng.uniform(0.3, 2.0, w.shape) if w.name in positive else rng.normal(size=w.shape)
            for w in layer.weights
        ]
    )
    return layer


def oracle_for(layer, x, *, training, mask=None):
    return renorm_oracle(
        x,
        axis=layer.axis,
        gamma=None if layer.gamma is None else layer.gamma.numpy(),
        beta=None if layer.beta is None else layer.beta.numpy(),
        **{name: getattr(layer, name).numpy() for name in STATES},
        momentum=layer.momentum,
        renorm_momentum=layer.renorm_momentum,
        epsilon=layer.epsilon,
        renorm_clipping=layer.renorm_clipping,
        training=training,
        mask=mask,
    )


def check(layer, x, *, training, mask=None, steps=1):
    """Runs `steps` calls; each output and all five states against the oracle."""
    rtol, atol = TOLERANCES[layer.compute_dtype]
    srtol, satol = TOLERANCES[layer.variable_dtype]
    # The oracle sees what the layer computes on: float input after autocast.
    seen = x.astype(to_numpy_dtype(layer.compute_dtype)) if x.dtype.kind == "f" else x
    for _ in range(steps):
        expected, *states = oracle_for(layer, seen, training=training, mask=mask)
        y = layer(x, training=training, mask=mask)
        assert y.dtype == to_numpy_dtype(layer.compute_dtype) and y.shape == x.shape
        np.testing.assert_allclose(y.astype(np.float64), expected, rtol=rtol, atol=atol)
        for name, value in zip(STATES, states):
            actual = getattr(layer, name).numpy().astype(np.float64)
            np.testing.assert_allclose(actual, value, rtol=srtol, atol=satol, err_msg=name)


def data(shape, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=shape) * 3 + 1.5).astype(np.float32)


AXIS_CASES = [(ndim, axis) for ndim in range(1, 5) for axis in sorted({*range(ndim), -1})]


@pytest.mark.parametrize("ndim,axis", AXIS_CASES)
@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_every_rank_and_axis(ndim, axis, training, masked):
    rng = np.random.default_rng(ndim * 31 + axis)
    shape = tuple(int(d) for d in rng.integers(2, 5, size=ndim))
    mask = rng.random(shape[:-1]) > 0.3 if masked else None
    layer = make_layer(shape[axis], axis=axis, ndim=ndim, momentum=0.8, renorm_momentum=0.7)
    check(layer, data(shape, ndim), training=training, mask=mask, steps=2)


@pytest.mark.parametrize("clipping", CLIPPINGS, ids=lambda c: json.dumps(c))
@pytest.mark.parametrize("masked", [False, True])
def test_clipping_keys(clipping, masked):
    x = data((16, 5, 6), seed=3)
    mask = np.random.default_rng(3).random((16, 5)) > 0.5 if masked else None

    def spread(**kwargs):
        """r from about 6 down to 0.2 and d of both signs across the channels."""
        layer = make_layer(6, ndim=3, momentum=0.9, renorm_momentum=0.6, **kwargs)
        layer.renorm_stddev.assign(np.array([0.5, 1, 2, 4, 8, 16], np.float32))
        layer.renorm_mean.assign(np.array([-3, -1, 1.4, 1.6, 2, 4], np.float32))
        return layer

    layer = spread(renorm_clipping=clipping)
    if clipping:  # the case must really clip: the unclipped output differs
        assert not np.allclose(layer(x, training=True), spread()(x, training=True))
        layer = spread(renorm_clipping=clipping)
    check(layer, x, training=True, mask=mask, steps=3)
    check(layer, x, training=False)


@pytest.mark.parametrize(
    "momentum,renorm_momentum",
    [(0.99, 0.99), (0.9, 0.8), (0.0, 0.0), (1.0, 1.0), (0.5, 0.0), (0.0, 1.0), (1, 0)],
)
def test_momentum_values(momentum, renorm_momentum):
    layer = make_layer(4, ndim=3, momentum=momentum, renorm_momentum=renorm_momentum)
    check(layer, data((7, 3, 4), seed=1), training=True, steps=3)


@pytest.mark.parametrize("center,scale", list(itertools.product([False, True], repeat=2)))
def test_center_scale(center, scale):
    layer = make_layer(5, ndim=3, center=center, scale=scale, renorm_clipping={"rmax": 1.3})
    names = [w.name for w in layer.weights]
    expected = (["gamma"] if scale else []) + (["beta"] if center else []) + list(STATES)
    assert names == expected
    check(layer, data((6, 3, 5), seed=2), training=True, steps=2)
    check(layer, data((6, 3, 5), seed=2), training=False)


def test_masks_with_all_false_rows_and_a_fully_masked_batch():
    x = data((5, 6, 3), seed=4)
    mask = np.random.default_rng(4).random((5, 6)) > 0.4
    mask[1] = False
    mask[:, 0] = False
    x[1, 2] = np.nan  # masked out: must not reach the statistics
    layer = make_layer(3, ndim=3, renorm_clipping={"dmax": 1.0})
    expected = oracle_for(layer, np.nan_to_num(x), training=True, mask=mask)
    y = layer(x, training=True, mask=mask)
    valid = np.isfinite(x)
    np.testing.assert_allclose(y[valid], expected[0][valid], rtol=2e-6, atol=2e-6)
    for name, value in zip(STATES, expected[1:]):
        np.testing.assert_allclose(getattr(layer, name).numpy(), value, rtol=2e-6, atol=2e-6)
    # All false: mean 0 and variance 0 (Keras's count + 1e-7), so s = sqrt(epsilon).
    check(layer, data((5, 6, 3), seed=5), training=True, mask=np.zeros((5, 6), bool), steps=2)


def test_renorm_stddev_below_sqrt_epsilon_is_floored():
    layer = make_layer(3, epsilon=1e-2, renorm_clipping=None)
    layer.renorm_stddev.assign(np.array([0.0, 0.05, 0.5], np.float32))
    check(layer, data((9, 3), seed=6), training=True, steps=2)


@pytest.mark.parametrize(
    "policy,input_dtype",
    [
        ("float32", np.float32),
        ("float32", np.float16),
        ("float64", np.float64),
        ("float16", np.float16),
        ("bfloat16", ml_dtypes.bfloat16),
        ("mixed_float16", np.float32),
        ("mixed_bfloat16", np.float32),
        ("float32", np.int32),
    ],
)
@pytest.mark.parametrize("training", [False, True])
def test_dtype_policies(policy, input_dtype, training):
    raw = np.random.default_rng(3).normal(size=(8, 4)) * 2
    x = raw.astype(input_dtype)
    layer = make_layer(4, dtype=policy, momentum=0.5, renorm_clipping={"rmin": 0.7, "dmax": 0.8})
    assert all(w.dtype == layer.variable_dtype for w in layer.weights)
    # The oracle sees what the layer computes on: the input after autocast.
    seen = x.astype(to_numpy_dtype(layer.compute_dtype)) if x.dtype.kind != "i" else x
    expected, *states = oracle_for(layer, seen, training=training)
    y = layer(x, training=training)
    assert y.dtype == to_numpy_dtype(layer.compute_dtype)
    np.testing.assert_allclose(y.astype(np.float64), expected, *TOLERANCES[layer.compute_dtype])
    for name, value in zip(STATES, states):
        actual = getattr(layer, name).numpy().astype(np.float64)
        np.testing.assert_allclose(actual, value, *TOLERANCES[layer.variable_dtype], err_msg=name)


def test_repeated_training_then_inference():
    layer = make_layer(3, ndim=3, momentum=0.7, renorm_momentum=0.5, renorm_clipping={"rmax": 2})
    rng = np.random.default_rng(11)
    for step in range(5):
        x = data((4, 6, 3), seed=step)
        check(layer, x, training=True, mask=rng.random((4, 6)) > 0.2)
    check(layer, data((4, 6, 3), seed=99), training=False)
    # moving_variance stays derived from moving_stddev after every update.
    derived = np.maximum(layer.moving_stddev.numpy().astype(np.float64) ** 2 - layer.epsilon, 0)
    np.testing.assert_allclose(layer.moving_variance.numpy(), derived, rtol=1e-6)


def test_frozen_layer_runs_in_inference_and_writes_nothing():
    layer = make_layer(4, trainable=False)
    before = layer.get_weights()
    x = data((16, 4), seed=7)
    check(layer, x, training=False)
    np.testing.assert_array_equal(layer(x, training=True), layer(x, training=False))
    for a, b in zip(before, layer.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert layer.trainable_weights == [] and len(layer.non_trainable_weights) == 7


def test_empty_batch_leaves_every_state_unchanged():
    layer = make_layer(3)
    before = layer.get_weights()
    assert layer(np.zeros((0, 3), np.float32), training=True).shape == (0, 3)
    for a, b in zip(before, layer.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_weights_order_and_set_weights_through_a_model():
    x = onnxbn.Input(shape=(3,), name="x")
    bn = layers.BatchNormalization(renorm=True, name="bn")
    model = onnxbn.Model(x, bn(x))
    assert [w.path for w in model.weights] == [f"bn/{n}" for n in ("gamma", "beta", *STATES)]
    values = [np.full(3, i + 1.0, np.float32) for i in range(7)]
    model.set_weights(values)
    for got, want in zip(model.get_weights(), values):
        np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError):
        model.set_weights(values[:4])  # a plain-BN weight list does not fit


def test_pure_function_matches_the_oracle_with_global_moments():
    """`reduce_partial` swaps in other moments: renorm must use them for s, r and d."""
    x = data((6, 4), seed=8)
    other = data((10, 4), seed=9)
    layer = make_layer(4, renorm_clipping={"rmax": 1.4, "dmax": 0.6})
    states = {name: getattr(layer, name).numpy() for name in STATES}
    full = np.concatenate([x, other])
    whole = oracle_for(layer, full, training=True)

    def reduce_partial(partial):
        from onnxbn.distributed import combine_moments
        from onnxbn.layers.moments import partial_moments

        return combine_moments(partial, partial_moments(other, (0,)))

    result = batch_renormalization(
        x,
        axis=-1,
        **states,
        gamma=layer.gamma.numpy(),
        beta=layer.beta.numpy(),
        momentum=layer.momentum,
        renorm_momentum=layer.renorm_momentum,
        epsilon=layer.epsilon,
        renorm_clipping=layer.renorm_clipping,
        training=True,
        reduce_partial=reduce_partial,
    )
    np.testing.assert_allclose(result.y, whole[0][:6], rtol=2e-6, atol=2e-6)
    for name, value in zip(STATES, whole[1:]):
        np.testing.assert_allclose(getattr(result, name), value, rtol=2e-6, atol=2e-6)


def test_synchronized_replicas_use_the_global_batch():
    steps, sizes = 3, [5, 0, 9]
    batches = [data((sum(sizes), 4, 3), seed=20 + s) for s in range(steps)]
    masks = [np.random.default_rng(s).random((sum(sizes), 4)) > 0.3 for s in range(steps)]
    starts = np.cumsum([0] + sizes)
    shared = shared_slots(len(sizes))
    kwargs = dict(synchronized=True, momentum=0.6, renorm_momentum=0.4, name="bn")
    replicas = [make_layer(3, ndim=3, renorm_clipping={"rmax": 1.2}, **kwargs) for _ in sizes]
    outputs = [[] for _ in sizes]

    def run(rank):
        with distributed.communicator(ThreadComm(rank, shared)):
            for s in range(steps):
                part = slice(starts[rank], starts[rank + 1])
                outputs[rank].append(
                    replicas[rank](batches[s][part], training=True, mask=masks[s][part])
                )

    threads = [threading.Thread(target=run, args=(r,)) for r in range(len(sizes))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    single = make_layer(3, ndim=3, renorm_clipping={"rmax": 1.2}, **kwargs)
    for s in range(steps):
        expected, *states = oracle_for(single, batches[s], training=True, mask=masks[s])
        for rank in range(len(sizes)):
            part = slice(starts[rank], starts[rank + 1])
            np.testing.assert_allclose(outputs[rank][s], expected[part], rtol=2e-6, atol=2e-6)
        for variable, value in zip(single.state_variables, states):
            variable.assign(value)
    for rank in range(len(sizes)):
        for name in STATES:  # identical on every replica, and as the oracle says
            np.testing.assert_array_equal(
                getattr(replicas[rank], name).numpy(), getattr(replicas[0], name).numpy()
            )
            np.testing.assert_allclose(
                getattr(replicas[rank], name).numpy(),
                getattr(single, name).numpy(),
                rtol=1e-5,
                atol=1e-6,
            )


def test_synchronized_is_identical_in_one_process():
    x = data((6, 3), seed=8)
    a = make_layer(3, synchronized=True, renorm_clipping={"dmax": 0.2})
    b = make_layer(3, synchronized=False, renorm_clipping={"dmax": 0.2})
    np.testing.assert_array_equal(a(x, training=True), b(x, training=True))
    for x_state, y_state in zip(a.get_weights(), b.get_weights()):
        np.testing.assert_array_equal(x_state, y_state)


# -- configs ------------------------------------------------------------------------------


def load(name):
    return json.loads((FIXTURES / f"{name}.json").read_text())


@pytest.mark.parametrize("name", ["renorm", "renorm_partial_clipping_mixed_float16"])
def test_keras_renorm_configs_round_trip_exactly(name):
    fixture = load(name)
    layer = layers.BatchNormalization.from_config(fixture["get_config"])
    assert layer.renorm and layer.get_config() == fixture["get_config"]
    envelope = fixture["serialize"]
    built = layers.deserialize(envelope)
    assert built.built and [w.name for w in built.weights][-3:] == list(STATES[2:])
    assert layers.serialize(built) == envelope


def test_keras_renorm_from_config_writes_empty_clipping():
    fixture = load("from_config_renorm_dict")
    layer = layers.BatchNormalization.from_config(fixture["from_config_input"])
    assert layer.get_config() == fixture["get_config_after"]


def test_keras_renorm_config_drives_the_arithmetic():
    layer = layers.BatchNormalization.from_config(
        load("renorm_partial_clipping_mixed_float16")["get_config"]
    )
    assert layer.renorm_clipping == {"dmax": 2.0} and layer.renorm_momentum == 0.5
    layer.build((None, 5, 2))
    rng = np.random.default_rng(12)
    layer.set_weights([rng.uniform(0.5, 2, 5) for _ in layer.weights])
    x = data((6, 5, 2), seed=12)
    check(layer, x, training=True, steps=2)
    check(layer, x, training=False)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"renorm_clipping": {"random_key": 1.0}}, ValueError, "Received invalid keys"),
        ({"renorm_clipping": {"rmax": 0.0, "rmin": 1.0}}, ValueError, "rmax=0.0, rmin=1.0"),
        ({"renorm_clipping": {"rmax": 1.0, "dmax": -1.0}}, ValueError, "dmax=-1.0"),
        ({"renorm_clipping": {"rmin": float("nan")}}, ValueError, "'rmin'.*NaN"),
        ({"renorm_clipping": {"dmax": "1"}}, TypeError, "'dmax'.*real number.*str"),
        ({"renorm_clipping": {"rmax": True}}, TypeError, "'rmax'.*real number"),
        ({"renorm_clipping": [("rmax", 1.0)]}, TypeError, "renorm_clipping must be None or a dict"),
        ({"renorm_momentum": 1.5}, ValueError, "renorm_momentum must be in \\[0, 1\\]"),
        ({"renorm_momentum": float("nan")}, ValueError, "renorm_momentum"),
        ({"renorm_momentum": "0.9"}, TypeError, "renorm_momentum must be a real number"),
        ({"renorm": "yes"}, TypeError, "renorm must be a bool"),
    ],
)
def test_bad_renorm_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        layers.BatchNormalization(**{"renorm": True, **kwargs})


def test_clipping_is_unchecked_without_renorm_as_in_keras():
    layer = layers.BatchNormalization(renorm_clipping={"anything": 1})
    assert layer.get_config()["renorm_clipping"] == {"anything": 1}
    assert layer.get_config()["renorm"] is False


# -- Keras 3.15's renorm tests (keras/src/layers/normalization/batch_normalization_test.py) --


@pytest.mark.parametrize(
    "init_kwargs,input_shape",
    [
        ({"center": True, "scale": True, "renorm": True}, (2, 3)),
        (
            {
                "center": True,
                "scale": True,
                "renorm": True,
                "renorm_clipping": {"rmax": 3.0, "rmin": 0.3, "dmax": 5.0},
            },
            (2, 4, 4, 3),
        ),
    ],
)
def test_keras_renorm_basics(init_kwargs, input_shape):
    layer = layers.BatchNormalization(**init_kwargs)
    y = layer(np.random.default_rng(0).normal(size=input_shape), training=True)
    assert y.shape == input_shape
    assert len(layer.trainable_weights) == 2
    assert len(layer.non_trainable_weights) == 5
    assert layer.losses == [] and layer.supports_masking
    clone = layers.BatchNormalization.from_config(layer.get_config())
    assert clone.get_config() == layer.get_config()


def test_keras_renorm_stddev_initializer():
    layer = layers.BatchNormalization(
        renorm=True, moving_variance_initializer=initializers.Constant(4.0)
    )
    layer.build((None, 5))
    np.testing.assert_allclose(layer.moving_stddev.numpy(), np.full((5,), 2.0), atol=1e-6)
    np.testing.assert_allclose(layer.renorm_stddev.numpy(), np.full((5,), 2.0), atol=1e-6)
    np.testing.assert_allclose(layer.renorm_mean.numpy(), np.zeros(5))


def test_keras_renorm_inference():
    bn = layers.BatchNormalization(renorm=False)
    bn_renorm = layers.BatchNormalization(renorm=True)
    bn.build((None, 10))
    bn_renorm.build((None, 10))
    rng = np.random.default_rng(0)
    for attr in ["gamma", "beta", "moving_mean", "moving_variance"]:
        value = rng.normal(size=(10,))
        value = np.abs(value) if attr == "moving_variance" else value
        getattr(bn, attr).assign(value)
        getattr(bn_renorm, attr).assign(value)
    x = rng.normal(size=(4, 10))
    np.testing.assert_allclose(
        bn(x, training=False), bn_renorm(x, training=False), atol=1e-5, rtol=1e-5
    )


def test_keras_renorm_correctness():
    epsilon, momentum, renorm_momentum = 1e-3, 0.9, 0.8
    layer = layers.BatchNormalization(
        axis=-1,
        epsilon=epsilon,
        momentum=momentum,
        renorm=True,
        renorm_momentum=renorm_momentum,
    )
    layer.build((None, 3))
    rng = np.random.default_rng(1337)
    size = (3,)
    init_moving_mean = rng.normal(0.0, 1.0, size=size)
    init_moving_var = np.abs(rng.normal(1.0, 0.5, size=size))
    init_moving_stddev = np.sqrt(init_moving_var)
    init_renorm_mean = rng.normal(0.0, 1.0, size=size)
    init_renorm_stddev = np.abs(rng.normal(1.0, 0.5, size=size))
    init_gamma = rng.normal(1.0, 0.1, size=size)
    init_beta = rng.normal(0.0, 0.1, size=size)
    layer.moving_mean.assign(init_moving_mean)
    layer.moving_variance.assign(init_moving_var)
    layer.moving_stddev.assign(init_moving_stddev)
    layer.renorm_mean.assign(init_renorm_mean)
    layer.renorm_stddev.assign(init_renorm_stddev)
    layer.gamma.assign(init_gamma)
    layer.beta.assign(init_beta)
    x = np.array([[4.0, 6.0, 2.0], [8.0, -2.0, 5.0], [6.0, 4.0, 3.0]], dtype="float32")

    batch_mean = np.mean(x, axis=0)
    batch_var = np.var(x, axis=0)
    batch_stddev = np.sqrt(batch_var + epsilon)
    r = batch_stddev / init_renorm_stddev
    d = (batch_mean - init_renorm_mean) / init_renorm_stddev
    expected_output = (((x - batch_mean) / batch_stddev) * r + d) * init_gamma + init_beta
    np.testing.assert_allclose(layer(x, training=True), expected_output, atol=1e-5)

    expected = {
        "renorm_mean": init_renorm_mean * renorm_momentum + batch_mean * (1 - renorm_momentum),
        "renorm_stddev": init_renorm_stddev * renorm_momentum
        + batch_stddev * (1 - renorm_momentum),
        "moving_mean": init_moving_mean * momentum + batch_mean * (1 - momentum),
        "moving_stddev": init_moving_stddev * momentum + batch_stddev * (1 - momentum),
    }
    expected["moving_variance"] = expected["moving_stddev"] ** 2 - epsilon
    for name, value in expected.items():
        np.testing.assert_allclose(getattr(layer, name).numpy(), value, atol=1e-5)


def test_keras_serialization():
    layer = layers.BatchNormalization(
        renorm=True,
        renorm_clipping={"rmax": 3.0, "rmin": 0.3, "dmax": 5.0},
        renorm_momentum=0.95,
    )
    config = layer.get_config()
    assert layers.BatchNormalization.from_config(config).get_config() == config


# -- ONNX export ----------------------------------------------------------------------------


@pytest.mark.parametrize("fold", [True, False])
def test_inference_export_on_onnxruntime_matches_the_oracle(fold):
    ort = pytest.importorskip("onnxruntime")
    x_in = onnxbn.Input(shape=(5, 4), name="x")
    dense = layers.Dense(4, name="dense")
    bn = layers.BatchNormalization(renorm=True, renorm_clipping={"rmax": 1.5}, name="bn")
    model = onnxbn.Model(x_in, bn(dense(x_in)))
    rng = np.random.default_rng(5)
    bn.set_weights([rng.uniform(0.5, 2, 4) for _ in bn.weights])
    x = data((3, 5, 4), seed=5)
    proto = onnxbn.export_onnx(model, fold_batchnorm=fold)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    (y,) = session.run(None, {"x": x})
    hidden = x.astype(np.float64) @ dense.kernel.numpy().astype(np.float64) + dense.bias.numpy()
    expected = oracle_for(bn, hidden, training=False)[0]
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
