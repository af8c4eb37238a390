"""Dropout: identity at inference, seeded Bernoulli dropping in training, configs, errors, masks."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

import onnxbn
from onnxbn import layers


@pytest.mark.parametrize("training", [None, False])
@pytest.mark.parametrize("policy", ["float32", "float64", "mixed_float16"])
def test_identity_at_inference(training, policy):
    x = np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32)
    layer = layers.Dropout(0.5, dtype=policy)
    y = layer(x) if training is None else layer(x, training=training)
    assert str(y.dtype) == layer.compute_dtype
    np.testing.assert_array_equal(y, x.astype(y.dtype))


@pytest.mark.parametrize("rate", [0.1, 0.5, 0.8])
def test_training_drops_and_rescales(rate):
    x = np.random.default_rng(1).uniform(1, 2, size=(200, 100)).astype(np.float64)
    layer = layers.Dropout(rate, seed=3, dtype="float64")
    y = layer(x, training=True)
    kept = y != 0
    # Every kept value is x / (1 - rate); the kept fraction is 1 - rate within 4 sigma.
    np.testing.assert_allclose(y[kept], x[kept] / (1 - rate), rtol=1e-15)
    sigma = np.sqrt(rate * (1 - rate) / x.size)
    assert abs(kept.mean() - (1 - rate)) < 4 * sigma


def test_rate_zero_and_one():
    x = np.ones((4, 4), np.float32)
    np.testing.assert_array_equal(layers.Dropout(0.0)(x, training=True), x)
    np.testing.assert_array_equal(layers.Dropout(1.0)(x, training=True), np.zeros_like(x))


def test_seed_reproducibility_and_fresh_draws():
    x = np.ones((8, 16), np.float32)
    a, b = layers.Dropout(0.5, seed=42), layers.Dropout(0.5, seed=42)
    first = [a(x, training=True) for _ in range(3)]
    second = [b(x, training=True) for _ in range(3)]
    for u, v in zip(first, second):
        np.testing.assert_array_equal(u, v)  # same seed, same stream
    assert not np.array_equal(first[0], first[1])  # each call draws a new mask
    other = layers.Dropout(0.5, seed=7)(x, training=True)
    assert not np.array_equal(first[0], other)


def test_noise_shape_broadcasts_the_keep_mask():
    x = np.ones((4, 6, 5), np.float32)
    layer = layers.Dropout(0.5, noise_shape=(None, 1, 5), seed=0)
    y = layer(x, training=True)
    # The same steps pattern for every timestep of a sample.
    assert all(np.array_equal(y[:, 0], y[:, t]) for t in range(6))
    assert set(np.unique(y)) <= {0.0, 2.0}
    with pytest.raises(ValueError, match="does not broadcast"):
        layers.Dropout(0.5, noise_shape=(4, 3, 5))(x, training=True)
    with pytest.raises(ValueError, match="does not match the rank"):
        layers.Dropout(0.5, noise_shape=(4, 5))(x, training=True)


def test_model_training_flag_reaches_dropout():
    x = onnxbn.Input((10,))
    model = onnxbn.Model(x, layers.Dropout(0.5, seed=1)(x))
    data = np.ones((5, 10), np.float32)
    np.testing.assert_array_equal(model(data), data)
    assert (model(data, training=True) == 0).any()
    y = layers.Dropout(0.5)(x, training=True)
    assert y.history[0]._inbound_nodes[0].call_kwargs == {"training": True}


def test_symbolic_spec_and_mask():
    x = onnxbn.Input((None, 3))
    masked = layers.Masking()(x)
    y = layers.Dropout(0.2, dtype="mixed_bfloat16")(masked)
    assert y.shape == (None, None, 3) and y.dtype == "bfloat16"
    assert y.mask is masked.mask


def test_config():
    layer = layers.Dropout(0.25, noise_shape=(None, 1, 4), seed=5, name="drop")
    config = layer.get_config()
    assert list(config) == ["name", "trainable", "dtype", "rate", "seed", "noise_shape"]
    assert (config["rate"], config["seed"], config["noise_shape"]) == (0.25, 5, [None, 1, 4])
    clone = layers.deserialize(json.loads(json.dumps(layers.serialize(layer))))
    assert clone.get_config() == config and clone.noise_shape == (None, 1, 4)
    assert layers.Dropout(0.5).get_config()["seed"] is None


@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        ({"rate": 1.5}, ValueError, "Expected a float value between 0 and 1. Received: rate=1.5"),
        ({"rate": -0.1}, ValueError, "Received: rate=-0.1"),
        ({"rate": "0.5"}, TypeError, "rate"),
        ({"rate": 0.5, "noise_shape": "abc"}, ValueError, "Expected a tuple or list of integers"),
        ({"rate": 0.5, "noise_shape": 3}, ValueError, "Expected an iterable of integers"),
        ({"rate": 0.5, "noise_shape": (2, 1.5)}, ValueError, "Received element at index 1: 1.5"),
        (
            {"rate": 0.5, "noise_shape": (0, 1)},
            ValueError,
            "Received negative or zero value at index 0: 0",
        ),
        ({"rate": 0.5, "seed": 1.5}, TypeError, "seed"),
    ],
)
def test_errors(kwargs, error, message):
    with pytest.raises(error, match=re.escape(message)):
        layers.Dropout(**kwargs)
    with pytest.raises(TypeError, match="training must be a bool"):
        layers.Dropout(0.5)(np.ones((1, 2)), training="yes")
