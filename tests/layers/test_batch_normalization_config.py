"""BatchNormalization configs: Keras 3.15 fixtures, round trips, envelopes, and errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from onnxbn import layers

FIXTURES = Path(__file__).parents[1] / "fixtures" / "keras"
LAYER_FIXTURES = [
    "default",
    "axis_neg3",
    "center_scale_false",
    "mixed_float16",
    "regularizers_constraints",
    "trainable_false",
]


def load(name):
    return json.loads((FIXTURES / f"{name}.json").read_text())


@pytest.mark.parametrize("name", LAYER_FIXTURES)
def test_keras_get_config_round_trips_exactly(name):
    fixture = load(name)
    layer = layers.BatchNormalization.from_config(fixture["get_config"])
    assert layer.get_config() == fixture["get_config"]
    clone = layers.BatchNormalization.from_config(layer.get_config())
    assert clone.get_config() == fixture["get_config"]


@pytest.mark.parametrize("name", [n for n in LAYER_FIXTURES if "serialize" in load(n)])
def test_keras_envelope_round_trips_with_build_config(name):
    fixture = load(name)["serialize"]
    layer = layers.deserialize(fixture)
    assert layer.built
    shape = fixture["build_config"]["input_shape"]
    assert layer.gamma is None or layer.gamma.shape == (shape[layer.axis],)
    assert layers.serialize(layer) == fixture


@pytest.mark.parametrize("name", ["from_config_full_keras_dict", "from_config_pre314_dict"])
def test_from_config_inputs_give_keras_get_config(name):
    fixture = load(name)
    layer = layers.BatchNormalization.from_config(fixture["from_config_input"])
    assert layer.get_config() == fixture["get_config_after"]


def test_configured_values_take_effect():
    layer = layers.BatchNormalization.from_config(load("regularizers_constraints")["get_config"])
    layer.build((None, 4))
    np.testing.assert_array_equal(layer.gamma.numpy(), np.full(4, 3.0))
    np.testing.assert_array_equal(layer.moving_variance.numpy(), np.full(4, 2.0))
    assert len(layer.losses) == 2
    frozen = layers.BatchNormalization.from_config(load("trainable_false")["get_config"])
    assert frozen.trainable is False
    mixed = layers.BatchNormalization.from_config(load("mixed_float16")["get_config"])
    assert mixed.compute_dtype == "float16" and mixed.variable_dtype == "float32"


def test_serialize_envelope_shape():
    layer = layers.BatchNormalization(name="bn", momentum=0.5)
    envelope = layers.serialize(layer)
    assert envelope["module"] == "keras.layers"
    assert envelope["class_name"] == "BatchNormalization"
    assert envelope["registered_name"] is None
    assert "build_config" not in envelope  # not built yet
    json.dumps(envelope)
    assert layers.deserialize(envelope).momentum == 0.5


def test_renorm_keys():
    config = load("default")["get_config"]
    assert layers.BatchNormalization.from_config({**config, "renorm": False}).get_config() == config
    renorm = layers.BatchNormalization.from_config({**config, "renorm": True})
    # Keras stores `renorm_clipping or {}` when renorm is on, so its config says {}.
    assert renorm.get_config() == {**config, "renorm": True, "renorm_clipping": {}}


BAD_CONFIGS = [
    ({"bogus": 1}, ValueError, "bogus"),
    ({"axis": [1, 2]}, TypeError, "axis must be a single int"),
    ({"axis": "1"}, TypeError, "axis must be a single int"),
    ({"momentum": float("nan")}, ValueError, "momentum must be a finite number"),
    ({"momentum": 1.5}, ValueError, "momentum must be in \\[0, 1\\]"),
    ({"momentum": "0.9"}, TypeError, "momentum must be a real number"),
    ({"epsilon": -1e-3}, ValueError, "epsilon must be >= 0"),
    ({"epsilon": float("inf")}, ValueError, "epsilon must be a finite number"),
    ({"center": "yes"}, TypeError, "center must be a bool"),
    ({"gamma_initializer": "nonexistent_init"}, ValueError, "nonexistent_init"),
    (
        {"gamma_initializer": {"module": "os", "class_name": "system", "config": {}}},
        ValueError,
        "os",
    ),
    (
        {"beta_regularizer": {"module": "keras.regularizers", "class_name": "L3", "config": {}}},
        ValueError,
        "L3",
    ),
    ({"dtype": "int3"}, ValueError, "int3"),
    ({"trainable": "no"}, TypeError, "trainable must be a bool"),
    ({"renorm_clipping": 3}, TypeError, "renorm_clipping"),
]


@pytest.mark.parametrize("change,error,match", BAD_CONFIGS)
def test_bad_configs(change, error, match):
    config = {**load("default")["get_config"], **change}
    with pytest.raises(error, match=match):
        layers.BatchNormalization.from_config(config)


@pytest.mark.parametrize(
    "envelope,error,match",
    [
        ("BatchNormalization", TypeError, "must be a dict"),
        (
            {"module": "keras.layers", "class_name": "Lambda", "config": {}},
            ValueError,
            "Unknown layer class 'Lambda'",
        ),
        (
            {"module": "builtins", "class_name": "BatchNormalization", "config": {}},
            ValueError,
            "builtins",
        ),
        (
            {
                "module": "keras.layers",
                "class_name": "BatchNormalization",
                "config": {},
                "registered_name": "my>Custom",
            },
            ValueError,
            "registered_name",
        ),
        (
            {"module": "keras.layers", "class_name": "BatchNormalization", "config": []},
            TypeError,
            "must be a dict",
        ),
        (
            {"module": "keras.layers", "class_name": "BatchNormalization", "config": {}, "x": 1},
            ValueError,
            "Unknown keys \\['x'\\]",
        ),
    ],
)
def test_bad_envelopes(envelope, error, match):
    with pytest.raises(error, match=match):
        layers.deserialize(envelope)
