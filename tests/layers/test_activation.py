"""Activation functions, `get`/`serialize`, and the Activation / ReLU layers."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

import onnxbn
from onnxbn import layers
from onnxbn.dtypes import to_numpy_dtype
from onnxbn.layers import activation as activations
from tests.oracle import TOLERANCES


def softmax_formula(z, axis=-1):
    e = np.exp(z - z.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


FORMULAS = {
    "linear": lambda z: z,
    "relu": lambda z: np.where(z > 0, z, 0.0),
    "sigmoid": lambda z: 1.0 / (1.0 + np.exp(-z)),
    "tanh": lambda z: (np.exp(z) - np.exp(-z)) / (np.exp(z) + np.exp(-z)),
    "softmax": softmax_formula,
}


@pytest.mark.parametrize("name", sorted(FORMULAS))
@pytest.mark.parametrize("dtype", ["float64", "float32", "float16", "bfloat16"])
def test_functions_match_formulas(name, dtype):
    rng = np.random.default_rng(7)
    x = (rng.normal(size=(3, 4, 5)) * 3).astype(to_numpy_dtype(dtype))
    y = activations.get(name)(x)
    assert y.dtype == x.dtype and y.shape == x.shape
    expected = FORMULAS[name](x.astype(np.float64))
    np.testing.assert_allclose(y.astype(np.float64), expected, *TOLERANCES[dtype])


def test_function_edge_values():
    big = np.array([-1000.0, -30.0, 0.0, 30.0, 1000.0])
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        np.testing.assert_allclose(
            activations.sigmoid(big), [0, 1 / (1 + np.exp(30)), 0.5, 1 / (1 + np.exp(-30)), 1]
        )
        np.testing.assert_allclose(activations.softmax(np.array([1000.0, 1000.0])), [0.5, 0.5])
    np.testing.assert_allclose(
        activations.softmax(np.array([[1.0, 2.0], [3.0, 4.0]]), axis=0),
        softmax_formula(np.array([[1.0, 2.0], [3.0, 4.0]]), axis=0),
    )
    assert activations.relu(np.array([1, -2], np.int32)).dtype == np.float32
    assert np.isnan(activations.relu(np.array([np.nan]))[0])


def relu_formula(x, negative_slope, max_value, threshold):
    """Keras's documented piecewise ReLU."""
    x = np.asarray(x, np.float64)
    y = np.where(x > threshold, x, negative_slope * (x - threshold))
    if max_value is not None:
        y = np.where(x >= max_value, max_value, y)
    return y


@pytest.mark.parametrize(
    "max_value,negative_slope,threshold",
    [
        (None, 0.0, 0.0),
        (6.0, 0.0, 0.0),
        (None, 0.5, 0.0),
        (5.0, 0.5, 0.0),
        (None, 0.0, 1.5),
        (4.0, 0.2, 1.0),
        (3, 0, 2),
    ],
)
def test_relu_layer_matches_piecewise_formula(max_value, negative_slope, threshold):
    x = np.linspace(-10, 10, 81).reshape(9, 9).astype(np.float32)
    layer = layers.ReLU(max_value=max_value, negative_slope=negative_slope, threshold=threshold)
    y = layer(x)
    assert y.dtype == np.float32
    np.testing.assert_allclose(
        y, relu_formula(x, negative_slope, max_value, threshold), rtol=1e-6, atol=1e-6
    )
    # The activation function with the same arguments is the same thing.
    np.testing.assert_array_equal(
        y,
        activations.relu(
            x, negative_slope=negative_slope, max_value=max_value, threshold=threshold
        ),
    )


def test_keras_docstring_examples():
    x = np.array([-10, -5, 0.0, 5, 10], np.float32)
    np.testing.assert_array_equal(activations.relu(x), [0, 0, 0, 5, 10])
    np.testing.assert_array_equal(activations.relu(x, negative_slope=0.5), [-5, -2.5, 0, 5, 10])
    np.testing.assert_array_equal(activations.relu(x, max_value=5.0), [0, 0, 0, 5, 5])
    np.testing.assert_array_equal(activations.relu(x, threshold=5.0), [-0.0, -0.0, 0, 0, 10])
    layer = layers.ReLU(max_value=10, negative_slope=0.5, threshold=0)
    np.testing.assert_array_equal(layer(x), [-5, -2.5, 0, 5, 10])


@pytest.mark.parametrize("name", sorted(FORMULAS))
@pytest.mark.parametrize("policy", ["float32", "float64", "mixed_float16"])
def test_activation_layer(name, policy):
    rng = np.random.default_rng(1)
    layer = layers.Activation(name, dtype=policy)
    x = rng.normal(size=(2, 3, 4)).astype(np.float32)
    y = layer(x)
    assert str(y.dtype) == layer.compute_dtype
    expected = FORMULAS[name](x.astype(to_numpy_dtype(layer.compute_dtype)).astype(np.float64))
    np.testing.assert_allclose(y.astype(np.float64), expected, *TOLERANCES[layer.compute_dtype])
    spec = layer(onnxbn.Input(shape=(None, 4)))
    assert spec.shape == (None, None, 4) and spec.dtype == layer.compute_dtype


def test_get_and_serialize():
    assert activations.get(None) is activations.linear
    assert activations.serialize(activations.get(None)) == "linear"
    for name, fn in activations.ACTIVATIONS.items():
        assert activations.get(name) is fn and activations.get(fn) is fn
        assert activations.serialize(fn) == name
        keras_dict = {
            "module": "keras.activations",
            "class_name": "function",
            "config": name,
            "registered_name": None,
        }
        assert activations.get(keras_dict) is fn


@pytest.mark.parametrize(
    "identifier",
    [
        "swish",
        "Relu",
        {"class_name": "function", "config": "gelu"},
        {"class_name": "Custom", "config": "relu"},
        np.abs,
        3,
    ],
)
def test_unknown_activation_names_it_and_lists_the_known(identifier):
    with pytest.raises(
        ValueError, match=re.escape("Could not interpret activation function identifier")
    ) as info:
        activations.get(identifier)
    assert "Known activations: ['linear', 'relu', 'sigmoid', 'softmax', 'tanh']" in str(info.value)
    if isinstance(identifier, str):
        assert repr(identifier) in str(info.value)
    with pytest.raises(ValueError, match="Could not interpret"):
        activations.serialize(np.abs)


def test_configs():
    act = layers.Activation("softmax", name="act")
    assert act.get_config() == {
        "name": "act",
        "trainable": True,
        "dtype": {
            "module": "keras",
            "class_name": "DTypePolicy",
            "config": {"name": "float32"},
            "registered_name": None,
        },
        "activation": "softmax",
    }
    relu = layers.ReLU(max_value=6.0, name="r")
    config = relu.get_config()
    assert list(config) == [
        "name",
        "trainable",
        "dtype",
        "max_value",
        "negative_slope",
        "threshold",
    ]
    assert (config["max_value"], config["negative_slope"], config["threshold"]) == (6.0, 0.0, 0.0)
    for layer in (act, relu):
        clone = layers.deserialize(json.loads(json.dumps(layers.serialize(layer))))
        assert type(clone) is type(layer) and clone.get_config() == layer.get_config()
        # Built at construction, as Keras builds weightless layers: no build_config.
        layer(np.ones((1, 2), np.float32))
        assert "build_config" not in layers.serialize(layer)


@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        (
            {"max_value": -1.0},
            ValueError,
            "max_value of a ReLU layer cannot be a negative value. Received: max_value=-1.0",
        ),
        (
            {"negative_slope": -0.1},
            ValueError,
            "negative_slope of a ReLU layer cannot be a negative value",
        ),
        ({"threshold": -2}, ValueError, "threshold of a ReLU layer cannot be a negative value"),
        ({"threshold": None}, TypeError, "threshold of a ReLU layer must be a number"),
        ({"negative_slope": "0.1"}, TypeError, "negative_slope"),
        ({"max_value": float("nan")}, ValueError, "NaN"),
    ],
)
def test_relu_errors(kwargs, error, message):
    with pytest.raises(error, match=re.escape(message)):
        layers.ReLU(**kwargs)


@pytest.mark.parametrize("make", [lambda: layers.Activation("tanh"), lambda: layers.ReLU()])
def test_mask_passes_through(make):
    x = onnxbn.Input(shape=(None, 3))
    masked = layers.Masking()(x)
    assert make()(masked).mask is masked.mask


@pytest.mark.parametrize("policy", ["float32", "mixed_float16", "float64"])
def test_relu_threshold_is_compared_in_the_data_dtype(policy):
    # Keras casts the threshold to the data's dtype: data equal to that rounded threshold
    # is not above it (float32(0.1) > float64(0.1), but not > float32(0.1)).
    layer = layers.ReLU(threshold=0.1, negative_slope=0.5, dtype=policy)
    dtype = np.dtype(np.float16 if policy == "mixed_float16" else policy)
    x = np.array([0.1, 0.2, 0.05], np.float32)
    data, t = x.astype(dtype).astype(np.float64), float(dtype.type(0.1))
    expected = np.where(data > t, data, 0.5 * (data - t))  # float64 formula, rounded threshold
    np.testing.assert_allclose(layer(x).astype(np.float64), expected, rtol=1e-3, atol=1e-6)
    assert (layer(x)[0] == 0.0) == (policy != "float64")
    np.testing.assert_array_equal(activations.relu(x, threshold=0.1)[0], 0.0)
