"""Add: sums, broadcasting across ranks, shape rules, masks (Keras 3: OR), configs, errors."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

import onnxbn
from onnxbn import layers
from onnxbn.ops import LogicalOr
from tests.oracle import TOLERANCES


@pytest.mark.parametrize("count", [1, 2, 3, 5])
@pytest.mark.parametrize("policy", ["float32", "float64", "float16", "mixed_bfloat16"])
def test_sum_of_inputs(count, policy):
    rng = np.random.default_rng(count)
    xs = [rng.normal(size=(4, 3, 2)).astype(np.float32) for _ in range(count)]
    layer = layers.Add(dtype=policy)
    y = layer(xs)
    compute = layer.compute_dtype
    assert str(y.dtype) == compute and y.shape == (4, 3, 2)
    rounded = [x.astype(y.dtype).astype(np.float64) for x in xs]  # autocast of each input
    np.testing.assert_allclose(y.astype(np.float64), np.sum(rounded, axis=0), *TOLERANCES[compute])


def test_different_ranks_expand_at_axis_1_then_broadcast():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(2, 4)).astype(np.float32)
    b = rng.normal(size=(2, 3, 4)).astype(np.float32)
    c = rng.normal(size=(2, 1, 4)).astype(np.float32)
    y = layers.Add()([a, b, c])
    expected = a[:, None, :].astype(np.float64) + b + c
    np.testing.assert_allclose(y, expected, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize(
    "shapes,expected",
    [
        ([(None, 4), (None, 4)], (None, 4)),
        ([(8, 4), (None, 4)], (8, 4)),
        ([(None, 3, 4), (None, 1, 4)], (None, 3, 4)),
        ([(None, None, 4), (None, 5, 4)], (None, None, 4)),  # Keras: an unknown dim stays unknown
        ([(None, 4), (None, 2, 4)], (None, 2, 4)),
        ([(None, 2, 2), (None, 2, 2), (None, 2, 2)], (None, 2, 2)),
    ],
)
def test_symbolic_shapes(shapes, expected):
    inputs = [onnxbn.Input(shape=s[1:], batch_size=s[0]) for s in shapes]
    y = layers.Add(dtype="mixed_float16")(inputs)
    assert y.shape == expected and y.dtype == "float16"
    node = y.history[0]._inbound_nodes[0]
    assert node.call_args == (inputs,) and node.input_tensors == inputs


@pytest.mark.parametrize(
    "inputs,message",
    [
        (
            lambda: [np.ones((2, 3)), np.ones((2, 4))],
            "Inputs have incompatible shapes. Received shapes (3,) and (4,)",
        ),
        (
            lambda: [np.ones((2, 3)), np.ones((3, 3))],
            "Cannot merge tensors with different batch sizes",
        ),
        (lambda: np.ones((2, 3)), "A merge layer should be called on a list of inputs"),
        (
            lambda: [onnxbn.Input((3,), batch_size=2), onnxbn.Input((3,), batch_size=4)],
            "different batch sizes",
        ),
        (lambda: [], "at least 1 input"),
    ],
)
def test_errors(inputs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        layers.Add()(inputs())


def test_call_arguments_and_mixed_inputs():
    with pytest.raises(TypeError, match="takes only its list of inputs"):
        layers.Add()([np.ones((1, 2))], training=True)
    x = onnxbn.Input((2,))
    with pytest.raises(TypeError, match="both symbolic tensors"):
        layers.Add()([x, np.ones((1, 2))])


def test_masks_are_ored_when_every_input_has_one():
    x = onnxbn.Input(shape=(5, 3), name="x")
    a = layers.Masking(mask_value=0.0)(x)
    b = layers.Masking(mask_value=1.0)(x)
    y = layers.Add()([a, b])
    op, _, _ = y.mask.history
    assert isinstance(op, LogicalOr)
    assert op._inbound_nodes[0].call_args == (a.mask, b.mask)
    assert y.mask.shape == (None, 5) and y.mask.dtype == "bool"
    # Evaluate the mask through a model: any step valid in either input is valid.
    model = onnxbn.Model(x, [y, y.mask])
    data = np.zeros((1, 5, 3), np.float32)
    data[0, 1] = 1.0  # masked by b only
    data[0, 2] = 2.0  # valid in both
    _, mask = model(data)
    np.testing.assert_array_equal(mask, [[True, True, True, True, True]])
    data[0, :] = 0.0
    data[0, 0] = 1.0
    _, mask = model(data)
    expected = np.any(data != 0.0, -1) | np.any(data != 1.0, -1)
    np.testing.assert_array_equal(mask, expected)


def test_no_mask_when_any_input_has_none():
    x = onnxbn.Input(shape=(5, 3))
    masked = layers.Masking()(x)
    assert layers.Add()([masked, x]).mask is None
    assert layers.Add()([x, x]).mask is None


def test_config_and_build_config():
    layer = layers.Add(name="add")
    assert layer.get_config() == {
        "name": "add",
        "trainable": True,
        "dtype": {
            "module": "keras",
            "class_name": "DTypePolicy",
            "config": {"name": "float32"},
            "registered_name": None,
        },
    }
    a, b = onnxbn.Input((4,)), onnxbn.Input((4,))
    layer([a, b])
    envelope = json.loads(json.dumps(layers.serialize(layer)))
    assert envelope["build_config"] == {
        "input_shape": [[None, 4], [None, 4]]
    }  # one shape per input
    clone = layers.Add.from_config(envelope["config"])
    clone.build_from_config(envelope["build_config"])
    assert clone.built and layers.serialize(clone) == envelope
    with pytest.raises(ValueError, match="build_config"):
        layers.Add().build_from_config({"input_shape": None})


def test_deserialize_keras_envelope_with_list_build_config():
    envelope = {
        "module": "keras.layers",
        "class_name": "Add",
        "config": {"name": "add", "trainable": True, "dtype": "float32"},
        "registered_name": None,
        "build_config": {"input_shape": [[None, 4], [None, 4]]},
    }
    assert layers.deserialize(envelope).built
