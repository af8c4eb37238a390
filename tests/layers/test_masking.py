"""Masking: zeroed timesteps, the implicit mask recorded as Keras's NotEqual/Any op nodes,
and its flow into BatchNormalization without an explicit `mask` argument."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

import onnxbn
from onnxbn import layers
from onnxbn.ops import Any, NotEqual
from tests.oracle import TOLERANCES, bn_oracle


def timestep_valid(x, mask_value):
    """A timestep is valid when some feature differs from mask_value in the data's dtype
    (Keras compares a Python number in the data's dtype); a loop over features."""
    x = np.asarray(x)
    padding = x.dtype.type(mask_value)
    valid = np.zeros(x.shape[:-1], bool)
    for index in np.ndindex(*x.shape[:-1]):
        valid[index] = any(v != padding for v in x[index])
    return valid


@pytest.mark.parametrize("mask_value", [0.0, -1.0, 2, 0.1])
@pytest.mark.parametrize("policy", ["float32", "float64", "mixed_float16"])
def test_eager_zeroes_masked_timesteps(mask_value, policy):
    rng = np.random.default_rng(2)
    x = rng.normal(size=(3, 5, 4)).astype(np.float32)
    x[0, 1] = mask_value
    x[2, [0, 4]] = mask_value
    x[1, 2, :2] = mask_value  # partly equal: still valid
    layer = layers.Masking(mask_value=mask_value, dtype=policy)
    y = layer(x)
    # The call sees the input cast to the compute dtype, and compares there (as Keras).
    valid = timestep_valid(x.astype(layer.compute_dtype), mask_value)
    assert str(y.dtype) == layer.compute_dtype
    np.testing.assert_allclose(
        y.astype(np.float64),
        np.where(valid[..., None], x.astype(y.dtype), 0.0),
        *TOLERANCES[layer.compute_dtype],
    )
    np.testing.assert_array_equal(layer.compute_mask(x, None), timestep_valid(x, mask_value))


def test_symbolic_mask_is_recorded_as_keras_ops():
    x = onnxbn.Input(shape=(None, 4), name="x")
    y = layers.Masking(mask_value=0.5, name="masking")(x)
    assert y.shape == (None, None, 4) and y.dtype == "float32"
    mask = y.mask
    assert mask.shape == (None, None) and mask.dtype == "bool"
    any_op, _, _ = mask.history
    assert isinstance(any_op, Any) and any_op.get_config() == {
        "name": any_op.name,
        "axis": -1,
        "keepdims": False,
    }
    (comparison,) = any_op._inbound_nodes[0].call_args
    ne_op, _, _ = comparison.history
    assert isinstance(ne_op, NotEqual)
    assert ne_op._inbound_nodes[0].call_args == (x, 0.5)  # on the layer's input, as Keras
    assert comparison.shape == (None, None, 4)


def test_batch_normalization_receives_the_mask_implicitly():
    x = onnxbn.Input(shape=(6, 3), name="x")
    masked = layers.Masking(name="masking")(x)
    bn = layers.BatchNormalization(momentum=0.5, name="bn")
    y = bn(masked)
    assert bn._inbound_nodes[0].call_kwargs == {"mask": masked.mask}
    assert y.mask is masked.mask  # BatchNormalization passes it on
    model = onnxbn.Model(x, y)
    rng = np.random.default_rng(11)
    data = rng.normal(size=(4, 6, 3)).astype(np.float32) + 3.0
    data[0, 4:] = 0.0
    data[3, :2] = 0.0
    out = model(data, training=True)
    valid = timestep_valid(data, 0.0)
    zeroed = np.where(valid[..., None], data, 0.0)
    expected, mean, var = bn_oracle(
        zeroed,
        axis=-1,
        gamma=np.ones(3),
        beta=np.zeros(3),
        moving_mean=np.zeros(3),
        moving_variance=np.ones(3),
        momentum=0.5,
        epsilon=1e-3,
        training=True,
        mask=valid,
    )
    np.testing.assert_allclose(out, expected, *TOLERANCES["float32"])
    np.testing.assert_allclose(bn.moving_mean.numpy(), mean, *TOLERANCES["float32"])
    np.testing.assert_allclose(bn.moving_variance.numpy(), var, *TOLERANCES["float32"])
    # Unmasked statistics would differ: the mask really reached the layer.
    assert not np.allclose(mean, 0.5 * zeroed.reshape(-1, 3).mean(0))


@pytest.mark.parametrize("mask_value", [0.0, 0.1])
def test_batch_normalization_ignores_masked_values(mask_value):
    # Keras's test_bachnorm_ignore_masked_values, with a padding value float32 cannot
    # represent exactly: the padded steps must not reach the statistics.
    padded = np.array([[[1, 5], [2, 5], [mask_value] * 2, [mask_value] * 2]] * 10, np.float32)
    x = onnxbn.Input(shape=(None, 2), name="x")
    bn = layers.BatchNormalization(momentum=0.0, name="bn")
    model = onnxbn.Model(x, bn(layers.Masking(mask_value=mask_value, name="masking")(x)))
    model(padded, training=True)
    np.testing.assert_allclose(bn.moving_mean.numpy(), [1.5, 5.0], *TOLERANCES["float32"])
    np.testing.assert_allclose(bn.moving_variance.numpy(), [0.25, 0.0], *TOLERANCES["float32"])


def test_model_config_records_the_mask_ops_as_keras_does():
    x = onnxbn.Input(shape=(5, 2), name="x")
    y = layers.BatchNormalization(name="bn")(layers.Masking(name="masking")(x))
    config = json.loads(json.dumps(onnxbn.Model(x, y, name="m").get_config()))
    entries = {e["name"]: e for e in config["layers"]}
    ne = next(e for e in entries.values() if e["class_name"] == "NotEqual")
    anyop = next(e for e in entries.values() if e["class_name"] == "Any")
    assert (ne["module"], ne["registered_name"]) == ("keras.src.ops.numpy", "NotEqual")
    assert (anyop["module"], anyop["registered_name"]) == ("keras.src.ops.numpy", "Any")
    assert ne["inbound_nodes"][0]["args"][0]["config"]["keras_history"] == ["x", 0, 0]
    assert ne["inbound_nodes"][0]["args"][1] == 0.0
    assert anyop["config"]["axis"] == -1 and anyop["config"]["keepdims"] is False
    mask_ref = entries["bn"]["inbound_nodes"][0]["kwargs"]["mask"]["config"]
    assert mask_ref["keras_history"] == [anyop["name"], 0, 0] and mask_ref["dtype"] == "bool"
    assert entries["masking"]["config"]["mask_value"] == 0.0
    assert "build_config" not in entries["masking"]  # built at construction, as in Keras
    rebuilt = onnxbn.Model.from_config(config)
    assert rebuilt.get_config() == config
    data = np.random.default_rng(0).normal(size=(2, 5, 2)).astype(np.float32)
    data[1, 3] = 0
    np.testing.assert_array_equal(
        rebuilt(data, training=True), onnxbn.Model(x, y)(data, training=True)
    )


def test_config_and_errors():
    layer = layers.Masking(mask_value=-1, name="pad")
    assert layer.get_config() == {
        "name": "pad",
        "trainable": True,
        "dtype": {
            "module": "keras",
            "class_name": "DTypePolicy",
            "config": {"name": "float32"},
            "registered_name": None,
        },
        "mask_value": -1,
    }
    assert layers.Masking.from_config(layer.get_config()).get_config() == layer.get_config()
    with pytest.raises(TypeError, match=re.escape("Expected `mask_value` to be a number")):
        layers.Masking(mask_value="0")
    with pytest.raises(ValueError, match="Unknown config key"):
        layers.Masking.from_config({"mask_value": 0.0, "colour": 1})


def test_layers_without_masking_support_drop_it():
    x = onnxbn.Input(shape=(5, 2))
    masked = layers.Masking()(x)
    assert layers.Flatten()(masked).mask is None
    assert layers.Conv1D(2, 2)(masked).mask is None
    assert layers.Dense(2)(masked).mask is masked.mask
