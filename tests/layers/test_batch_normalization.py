"""BatchNormalization eager semantics against the float64 oracle from the seed."""

from __future__ import annotations

import itertools

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from onnxbn import layers
from onnxbn.dtypes import to_numpy_dtype
from tests.oracle import TOLERANCES, bn_oracle


def make_layer(channels, *, axis, ndim, seed=0, **kwargs):
    layer = layers.BatchNormalization(axis=axis, **kwargs)
    shape = [2] * ndim
    shape[axis % ndim] = channels
    layer.build(tuple(shape))
    rng = np.random.default_rng(seed)
    values = []
    for w in layer.weights:
        if w.name == "moving_variance":
            values.append(rng.uniform(0.5, 2.0, w.shape))
        else:
            values.append(rng.normal(size=w.shape))
    layer.set_weights(values)
    return layer


def check_against_oracle(layer, x, *, training, mask=None, steps=1, dtype="float32"):
    """Runs `steps` calls and compares output and moving statistics each time."""
    rtol, atol = TOLERANCES[dtype]
    for _ in range(steps):
        gamma = None if layer.gamma is None else layer.gamma.numpy()
        beta = None if layer.beta is None else layer.beta.numpy()
        expected, new_mm, new_mv = bn_oracle(
            x,
            axis=layer.axis,
            gamma=gamma,
            beta=beta,
            moving_mean=layer.moving_mean.numpy(),
            moving_variance=layer.moving_variance.numpy(),
            momentum=layer.momentum,
            epsilon=layer.epsilon,
            training=training,
            mask=mask,
        )
        y = layer(x, training=training, mask=mask)
        assert y.dtype == to_numpy_dtype(layer.compute_dtype)
        assert y.shape == x.shape
        np.testing.assert_allclose(y.astype(np.float64), expected, rtol=rtol, atol=atol)
        stat_dtype = layer.moving_mean.dtype
        srtol, satol = TOLERANCES[stat_dtype]
        np.testing.assert_allclose(
            layer.moving_mean.numpy().astype(np.float64), new_mm, rtol=srtol, atol=satol
        )
        np.testing.assert_allclose(
            layer.moving_variance.numpy().astype(np.float64), new_mv, rtol=srtol, atol=satol
        )


# rank x every axis position (positive and negative) x training x mask
AXIS_CASES = [
    (ndim, axis) for ndim in range(1, 6) for axis in sorted(set(range(ndim)) | set(range(-ndim, 0)))
]


@pytest.mark.parametrize("ndim,axis", AXIS_CASES)
@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_every_rank_and_axis(ndim, axis, training, masked):
    rng = np.random.default_rng(ndim * 31 + axis)
    shape = tuple(int(d) for d in rng.integers(2, 5, size=ndim))
    x = (rng.normal(size=shape) * 3 + 1.5).astype(np.float32)
    mask = rng.random(shape[:-1]) > 0.3 if masked else None
    layer = make_layer(shape[axis], axis=axis, ndim=ndim, momentum=0.8)
    check_against_oracle(layer, x, training=training, mask=mask, steps=3)


@pytest.mark.parametrize("center,scale", list(itertools.product([False, True], repeat=2)))
@pytest.mark.parametrize("momentum,epsilon", [(0.99, 1e-3), (0.5, 1e-5), (0.0, 0.0), (1.0, 0.1)])
def test_center_scale_momentum_epsilon(center, scale, momentum, epsilon):
    rng = np.random.default_rng(7)
    x = rng.normal(size=(6, 3, 5)).astype(np.float32)
    layer = make_layer(
        5, axis=-1, ndim=3, center=center, scale=scale, momentum=momentum, epsilon=epsilon
    )
    names = [w.name for w in layer.weights]
    assert names == (["gamma"] if scale else []) + (["beta"] if center else []) + [
        "moving_mean",
        "moving_variance",
    ]
    check_against_oracle(layer, x, training=True, steps=2)
    check_against_oracle(layer, x, training=False)


@pytest.mark.parametrize(
    "policy,input_dtype,compute,variable",
    [
        ("float32", np.float32, "float32", "float32"),
        ("float32", np.float16, "float32", "float32"),  # autocast to the compute dtype
        ("float64", np.float64, "float64", "float64"),
        ("float64", np.float32, "float64", "float64"),
        ("float16", np.float16, "float16", "float16"),
        ("bfloat16", ml_dtypes.bfloat16, "bfloat16", "bfloat16"),
        ("mixed_float16", np.float32, "float16", "float32"),
        ("mixed_bfloat16", np.float32, "bfloat16", "float32"),
        ("float32", np.int32, "float32", "float32"),
        ("float32", np.bool_, "float32", "float32"),
    ],
)
@pytest.mark.parametrize("training", [False, True])
def test_dtype_policies(policy, input_dtype, compute, variable, training):
    rng = np.random.default_rng(3)
    raw = rng.normal(size=(8, 4)) * 2
    x = (raw > 0) if input_dtype is np.bool_ else raw.astype(input_dtype)
    layer = layers.BatchNormalization(dtype=policy, momentum=0.5)
    y = layer(x, training=training)
    assert layer.compute_dtype == compute and layer.variable_dtype == variable
    assert all(w.dtype == variable for w in layer.weights)
    assert y.dtype == to_numpy_dtype(compute)
    # The oracle sees what the layer computes on: the input after autocast.
    seen = (
        x.astype(to_numpy_dtype(compute))
        if x.dtype.kind == "f" or x.dtype == ml_dtypes.bfloat16
        else x
    )
    expected, mm, _ = bn_oracle(
        seen,
        axis=-1,
        gamma=np.ones(4),
        beta=np.zeros(4),
        moving_mean=np.zeros(4),
        moving_variance=np.ones(4),
        momentum=0.5,
        epsilon=1e-3,
        training=training,
    )
    rtol, atol = TOLERANCES[compute]
    np.testing.assert_allclose(y.astype(np.float64), expected, rtol=rtol, atol=atol)
    rtol, atol = TOLERANCES[variable]
    np.testing.assert_allclose(
        layer.moving_mean.numpy().astype(np.float64), mm, rtol=rtol, atol=atol
    )


def test_float64_layer_keeps_float64_precision():
    x = np.random.default_rng(0).normal(size=(64, 3)) * 1e-9 + 1.0
    layer = layers.BatchNormalization(dtype="float64")
    y = layer(x, training=True)
    expected, _, _ = bn_oracle(
        x,
        axis=-1,
        gamma=None,
        beta=None,
        moving_mean=np.zeros(3),
        moving_variance=np.ones(3),
        momentum=0.99,
        epsilon=1e-3,
        training=True,
    )
    np.testing.assert_allclose(y, expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_stable_variance_on_large_offset(axis):
    """float32 x = 1e4 + N(0,1): E[x²]-E[x]² loses every digit; two-pass must not."""
    rng = np.random.default_rng(42)
    x = (1e4 + rng.normal(size=(512, 8, 16))).astype(np.float32)
    layer = layers.BatchNormalization(axis=axis, momentum=0.0, epsilon=0.0)
    y = layer(x, training=True)
    reduce = tuple(i for i in range(3) if i != axis % 3)
    true_var = x.astype(np.float64).var(axis=reduce)
    np.testing.assert_allclose(layer.moving_variance.numpy(), true_var, rtol=1e-3)
    assert np.all(np.isfinite(y))
    expected, _, _ = bn_oracle(
        x,
        axis=axis,
        gamma=None,
        beta=None,
        moving_mean=0,
        moving_variance=0,
        momentum=0.0,
        epsilon=0.0,
        training=True,
    )
    assert np.max(np.abs(y - expected)) <= 1e-4


def test_frozen_layer_runs_in_inference_and_writes_nothing():
    rng = np.random.default_rng(1)
    layer = make_layer(4, axis=-1, ndim=2, trainable=False)
    before = layer.get_weights()
    x = rng.normal(size=(16, 4)).astype(np.float32) * 5 + 3
    check_against_oracle(layer, x, training=False)
    y = layer(x, training=True)
    np.testing.assert_array_equal(y, layer(x, training=False))
    for a, b in zip(before, layer.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_training_none_and_false_mean_inference():
    rng = np.random.default_rng(2)
    layer = make_layer(3, axis=-1, ndim=2)
    x = rng.normal(size=(5, 3)).astype(np.float32)
    before = layer.moving_mean.numpy()
    np.testing.assert_array_equal(layer(x), layer(x, training=False))
    np.testing.assert_array_equal(before, layer.moving_mean.numpy())


def test_mask_details():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(4, 6, 3)).astype(np.float32)
    mask = rng.random((4, 6)) > 0.5
    mask[0, 0] = False
    x[0, 0, :] = np.nan  # masked-out NaN must not reach the statistics
    x[0, 0, 1] = np.inf
    layer = make_layer(3, axis=-1, ndim=3, momentum=0.5)
    check_against_oracle(
        layer, np.where(np.isfinite(x), x, 0).astype(np.float32), training=True, mask=mask
    )
    layer2 = make_layer(3, axis=-1, ndim=3, momentum=0.5)
    y = layer2(x, training=True, mask=mask)
    assert np.all(np.isfinite(layer2.moving_mean.numpy()))
    assert np.all(np.isfinite(layer2.moving_variance.numpy()))
    assert np.isnan(y[0, 0, 0]) and np.all(np.isfinite(y[1:]))  # still normalized
    # Non-zero means valid, whatever the mask dtype.
    layer3 = make_layer(3, axis=-1, ndim=3)
    layer4 = make_layer(3, axis=-1, ndim=3)
    xf = np.nan_to_num(x, nan=0.0, posinf=0.0)
    np.testing.assert_array_equal(
        layer3(xf, training=True, mask=mask), layer4(xf, training=True, mask=mask * 2.5)
    )


def test_all_false_mask_gives_zero_moments():
    x = np.random.default_rng(0).normal(size=(3, 4, 2)).astype(np.float32)
    layer = layers.BatchNormalization(momentum=0.5)
    y = layer(x, training=True, mask=np.zeros((3, 4), bool))
    np.testing.assert_allclose(layer.moving_mean.numpy(), [0.0, 0.0])
    np.testing.assert_allclose(layer.moving_variance.numpy(), [0.5, 0.5])
    np.testing.assert_allclose(y, x / np.sqrt(1e-3), rtol=1e-6)


def test_masked_training_with_one_channel():
    rng = np.random.default_rng(9)
    x = rng.normal(size=(5, 7, 1)).astype(np.float32)
    mask = rng.random((5, 7)) > 0.4
    layer = make_layer(1, axis=-1, ndim=3)
    check_against_oracle(layer, x, training=True, mask=mask, steps=2)


def test_mask_broadcasts_from_last_axis_for_a_middle_axis():
    # axis=1 with input (N, C, T): the mask (N, C) is expanded to (N, C, 1).
    rng = np.random.default_rng(4)
    x = rng.normal(size=(3, 4, 5)).astype(np.float32)
    mask = rng.random((3, 4)) > 0.3
    layer = make_layer(4, axis=1, ndim=3)
    check_against_oracle(layer, x, training=True, mask=mask)


def test_mask_ignored_in_inference():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(3, 5, 2)).astype(np.float32)
    layer = make_layer(2, axis=-1, ndim=3)
    np.testing.assert_array_equal(layer(x, mask=np.zeros((3, 5))), layer(x))


def test_rank_one_training_gives_beta():
    layer = layers.BatchNormalization(beta_initializer="random_normal", momentum=0.5)
    x = np.array([3.0, -1.0, 7.0], np.float32)
    y = layer(x, training=True)
    np.testing.assert_allclose(y, layer.beta.numpy(), atol=1e-7)
    np.testing.assert_allclose(layer.moving_mean.numpy(), x * 0.5)


def test_empty_batch_leaves_moving_statistics_unchanged():
    layer = make_layer(3, axis=-1, ndim=2)
    before = layer.get_weights()
    y = layer(np.zeros((0, 3), np.float32), training=True)
    assert y.shape == (0, 3)
    for a, b in zip(before, layer.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_synchronized_is_identical_in_one_process():
    rng = np.random.default_rng(8)
    x = rng.normal(size=(6, 3)).astype(np.float32)
    a = make_layer(3, axis=-1, ndim=2, synchronized=True)
    b = make_layer(3, axis=-1, ndim=2, synchronized=False)
    np.testing.assert_array_equal(a(x, training=True), b(x, training=True))
    np.testing.assert_array_equal(a.moving_variance.numpy(), b.moving_variance.numpy())


@settings(max_examples=60, deadline=None)
@given(
    data=st.data(),
    ndim=st.integers(1, 4),
    training=st.booleans(),
    masked=st.booleans(),
    center=st.booleans(),
    scale=st.booleans(),
    momentum=st.floats(0.0, 1.0),
    epsilon=st.floats(1e-6, 1.0),
)
def test_property_matches_oracle(data, ndim, training, masked, center, scale, momentum, epsilon):
    shape = tuple(data.draw(st.lists(st.integers(1, 4), min_size=ndim, max_size=ndim)))
    axis = data.draw(st.integers(-ndim, ndim - 1))
    seed = data.draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    x = (rng.normal(size=shape) * rng.uniform(0.1, 10) + rng.uniform(-5, 5)).astype(np.float32)
    mask = (rng.random(shape[:-1]) > 0.5) if masked else None
    layer2 = make_layer(
        shape[axis],
        axis=axis,
        ndim=ndim,
        seed=seed,
        center=center,
        scale=scale,
        momentum=momentum,
        epsilon=epsilon,
    )
    # Tiny epsilon and near-constant channels amplify float32 rounding of the output.
    gamma = 1.0 if layer2.gamma is None else np.abs(layer2.gamma.numpy()).max()
    expected, mm, mv = bn_oracle(
        x,
        axis=axis,
        gamma=None if layer2.gamma is None else layer2.gamma.numpy(),
        beta=None if layer2.beta is None else layer2.beta.numpy(),
        moving_mean=layer2.moving_mean.numpy(),
        moving_variance=layer2.moving_variance.numpy(),
        momentum=momentum,
        epsilon=epsilon,
        training=training,
        mask=mask,
    )
    y = layer2(x, training=training, mask=mask)
    scale_of_y = 1.0 + gamma * np.max(np.abs(x)) / np.sqrt(epsilon)
    np.testing.assert_allclose(y, expected, rtol=2e-6, atol=2e-7 * scale_of_y)
    np.testing.assert_allclose(layer2.moving_mean.numpy(), mm, rtol=2e-6, atol=1e-6)
    np.testing.assert_allclose(layer2.moving_variance.numpy(), mv, rtol=2e-6, atol=1e-6)


def _call(layer_kwargs, x, **call_kwargs):
    return lambda: layers.BatchNormalization(**layer_kwargs)(x, **call_kwargs)


X23 = np.zeros((2, 3), np.float32)
X234 = np.zeros((2, 3, 4), np.float32)

CALL_ERRORS = [
    ("axis out of range", _call({"axis": 2}, X23), ValueError, r"Invalid axis 2 .* rank 2"),
    ("axis too negative", _call({"axis": -4}, X234), ValueError, r"axis must be in \[-3, 3\)"),
    ("rank 0 input", _call({}, np.float32(1.0)), ValueError, "Invalid axis -1"),
    (
        "mask rank too high",
        _call({}, X234, training=True, mask=np.ones((2, 3, 4))),
        ValueError,
        "The mask provided should be one dimension less than the inputs",
    ),
    (
        "mask rank too low in inference",
        _call({}, X234, mask=np.ones(2)),
        ValueError,
        r"mask.shape=\(2,\), inputs.shape=\(2, 3, 4\)",
    ),
    (
        "mask shape does not broadcast",
        _call({}, X234, training=True, mask=np.ones((2, 4))),
        ValueError,
        "does not broadcast",
    ),
    (
        "string mask",
        _call({}, X23, training=True, mask=np.array(["a", "b"])),
        TypeError,
        "Mask of layer",
    ),
    ("string input", _call({}, np.array([["a", "b"]])), TypeError, "numeric or bool"),
    ("object input", _call({}, np.array([None, 1.0], dtype=object)), TypeError, "numeric or bool"),
    ("complex input", _call({}, np.ones((2, 2), np.complex64)), TypeError, "complex64"),
    ("training not a bool", _call({}, X23, training="yes"), TypeError, "training must be a bool"),
    ("no input", lambda: layers.BatchNormalization()(), TypeError, "first positional argument"),
    (
        "dynamic channel",
        lambda: layers.BatchNormalization(axis=0)(__import__("onnxbn").Input((3,))),
        ValueError,
        "is not defined",
    ),
    (
        "axis float",
        lambda: layers.BatchNormalization(axis=1.0),
        TypeError,
        "axis must be a single int",
    ),
    (
        "axis tuple",
        lambda: layers.BatchNormalization(axis=(1, 2)),
        TypeError,
        "axis must be a single int",
    ),
    (
        "axis bool",
        lambda: layers.BatchNormalization(axis=True),
        TypeError,
        "axis must be a single int",
    ),
    ("nan epsilon", lambda: layers.BatchNormalization(epsilon=float("nan")), ValueError, "epsilon"),
    ("negative momentum", lambda: layers.BatchNormalization(momentum=-0.1), ValueError, "momentum"),
    (
        "renorm clipping key",
        lambda: layers.BatchNormalization(renorm=True, renorm_clipping={"r_max": 3.0}),
        ValueError,
        "Received invalid keys for `renorm_clipping`.*'r_max'",
    ),
]


@pytest.mark.parametrize(
    "fn,error,match", [c[1:] for c in CALL_ERRORS], ids=[c[0] for c in CALL_ERRORS]
)
def test_call_errors(fn, error, match):
    with pytest.raises(error, match=match):
        fn()
