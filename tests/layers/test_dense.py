"""Dense: eager values against a float64 formula, symbolic specs, weights, configs, errors, masks."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

import onnxbn
from onnxbn import layers
from tests.oracle import TOLERANCES

FIXTURES = Path(__file__).parent.parent / "fixtures" / "keras"

ACTIVATIONS = {
    None: lambda z: z,
    "linear": lambda z: z,
    "relu": lambda z: np.maximum(z, 0.0),
    "sigmoid": lambda z: 1.0 / (1.0 + np.exp(-z)),
    "tanh": np.tanh,
    "softmax": lambda z: np.exp(z) / np.exp(z).sum(-1, keepdims=True),
}

CASES = [
    # (input shape, units, activation, use_bias, dtype policy)
    ((4, 3), 5, None, True, "float32"),
    ((2, 5, 3), 2, "relu", True, "float32"),
    ((2, 3, 4, 3), 4, "sigmoid", False, "float64"),
    ((3, 6), 3, "tanh", True, "float16"),
    ((3, 6), 3, "softmax", True, "bfloat16"),
    ((2, 2, 6), 1, "linear", True, "mixed_float16"),
    ((0, 4), 2, "relu", True, "float32"),
]


def dense_oracle(x, kernel, bias, activation):
    x = np.asarray(x, np.float64)
    z = np.einsum("...i,ij->...j", x, np.asarray(kernel, np.float64))
    if bias is not None:
        z = z + np.asarray(bias, np.float64)
    return ACTIVATIONS[activation](z)


@pytest.mark.parametrize("shape,units,activation,use_bias,policy", CASES)
def test_eager_matches_float64_formula(shape, units, activation, use_bias, policy):
    rng = np.random.default_rng(len(shape) * 10 + units)
    layer = layers.Dense(units, activation=activation, use_bias=use_bias, dtype=policy)
    layer.build(shape)
    weights = [rng.normal(size=w.shape) for w in layer.weights]
    layer.set_weights(weights)
    x = rng.normal(size=shape).astype(np.float32)
    y = layer(x)
    compute = layer.compute_dtype
    assert y.shape == shape[:-1] + (units,) and str(y.dtype) == compute
    kernel, bias = layer.kernel.numpy(), None if layer.bias is None else layer.bias.numpy()
    x_in = x.astype(onnxbn.dtypes.to_numpy_dtype(compute))  # Keras autocasts float inputs
    expected = dense_oracle(x_in, kernel, bias, activation)
    rtol, atol = TOLERANCES[compute]
    np.testing.assert_allclose(y.astype(np.float64), expected, rtol=rtol, atol=atol)


def test_integer_inputs_are_computed_in_float():
    layer = layers.Dense(2, kernel_initializer="ones")
    y = layer(np.array([[1, 2, 3]], np.int32))
    assert y.dtype == np.float32
    np.testing.assert_array_equal(y, [[6.0, 6.0]])


def test_weights_names_order_and_shapes():
    layer = layers.Dense(4, name="d")
    layer.build((None, 7, 3))
    assert [w.path for w in layer.weights] == ["d/kernel", "d/bias"]
    assert [w.shape for w in layer.weights] == [(3, 4), (4,)]
    assert [w.trainable for w in layer.weights] == [True, True]
    nobias = layers.Dense(4, use_bias=False)
    nobias.build((None, 3))
    assert [w.name for w in nobias.weights] == ["kernel"]
    assert np.all(nobias.get_weights()[0] != 0)  # glorot_uniform, not zeros


@pytest.mark.parametrize(
    "shape,expected",
    [((None, 3), (None, 5)), ((None, None, 3), (None, None, 5)), ((2, 4, 6, 3), (2, 4, 6, 5))],
)
def test_symbolic_output_spec(shape, expected):
    x = onnxbn.Input(shape=shape[1:], batch_size=shape[0])
    y = layers.Dense(5)(x)
    assert y.shape == expected and y.dtype == "float32"
    half = layers.Dense(5, dtype="mixed_float16")(x)
    assert half.dtype == "float16"


def test_mask_passes_through():
    x = onnxbn.Input(shape=(None, 3))
    masked = layers.Masking()(x)
    y = layers.Dense(2)(masked)
    assert y.mask is masked.mask
    node = y.history[0]._inbound_nodes[0]
    assert node.call_kwargs == {}  # Dense.call has no mask argument: nothing recorded


def test_config_matches_keras_fixture():
    fixture = json.loads((FIXTURES / "implicit_mask_model.json").read_text())
    entry = next(e for e in fixture["get_config"]["layers"] if e["class_name"] == "Dense")
    layer = layers.Dense.from_config(entry["config"])
    assert layer.get_config() == entry["config"]
    envelope = layers.serialize(layer)
    assert envelope["module"] == "keras.layers" and envelope["registered_name"] is None
    assert list(layer.get_config()) == list(entry["config"])  # Keras's key order too


def test_config_round_trip_non_defaults():
    layer = layers.Dense(
        3,
        activation="softmax",
        use_bias=False,
        kernel_initializer="he_normal",
        kernel_regularizer="l2",
        bias_constraint="non_neg",
        dtype="float64",
        name="head",
        trainable=False,
    )
    config = json.loads(json.dumps(layer.get_config()))
    assert config["activation"] == "softmax" and config["units"] == 3
    assert config["kernel_initializer"]["class_name"] == "HeNormal"
    clone = layers.deserialize(json.loads(json.dumps(layers.serialize(layer))))
    assert isinstance(clone, layers.Dense) and clone.get_config() == config


@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        ({"units": 0}, ValueError, "expected a positive integer. Received: units=0"),
        ({"units": -2}, ValueError, "Received: units=-2"),
        ({"units": 2.5}, ValueError, "invalid value for `units`"),
        ({"units": True}, ValueError, "invalid value for `units`"),
        ({"units": 2, "activation": "swish"}, ValueError, "identifier: 'swish'"),
        ({"units": 2, "activation": "nope"}, ValueError, "Known activations: ['linear', 'relu'"),
        ({"units": 2, "use_bias": "yes"}, TypeError, "use_bias"),
        ({"units": 2, "kernel_initializer": "bogus"}, ValueError, "bogus"),
        ({"units": 2, "quantization_config": {"mode": "int8"}}, NotImplementedError, "quant"),
        ({"units": 2, "lora_rank": 4}, NotImplementedError, "lora_rank=4"),
        ({"units": 2, "activity_regularizer": "l2"}, NotImplementedError, "activity_regularizer"),
        ({"units": 2, "colour": "red"}, ValueError, "Unrecognized keyword arguments"),
    ],
)
def test_constructor_errors(kwargs, error, message):
    with pytest.raises(error, match=re.escape(message)):
        layers.Dense(**kwargs)


def test_input_errors():
    layer = layers.Dense(2, name="d")
    with pytest.raises(ValueError, match="expected min_ndim=2, found ndim=1"):
        layer(np.ones(3, np.float32))
    with pytest.raises(ValueError, match="must be defined"):
        layer(onnxbn.Input(shape=(None,)))
    layer(np.ones((1, 3), np.float32))
    with pytest.raises(ValueError, match="expected axis -1 of input shape to have value 3"):
        layer(np.ones((1, 4), np.float32))
    with pytest.raises(TypeError, match="numeric"):
        layers.Dense(2)(np.array([["a", "b"]]))
