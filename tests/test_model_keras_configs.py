"""Functional configs as real Keras writes them: the implicit-mask fixture, weights in Keras
order, eager results against float64 NumPy, round trips of models using every layer type."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import numpy as np
import pytest

import onnxbn
from onnxbn import layers
from tests.oracle import TOLERANCES

FIXTURES = Path(__file__).parent / "fixtures" / "keras"


def implicit_mask_config() -> dict:
    return json.loads((FIXTURES / "implicit_mask_model.json").read_text())["get_config"]


def by_name(config: dict) -> dict:
    """The config with its layer list turned into a dict keyed by name (order aside)."""
    return {**config, "layers": {entry["name"]: entry for entry in config["layers"]}}


def test_implicit_mask_fixture_round_trips_layer_by_layer():
    config = implicit_mask_config()
    model = onnxbn.Model.from_config(config)
    assert by_name(json.loads(json.dumps(model.get_config()))) == by_name(config)
    assert [l.name for l in model.layers] == ["tokens", "emb", "proj", "bn", "pool"]
    assert [type(op).__name__ for op in model.operations].count("NotEqual") == 1
    # The Keras envelope around the config is accepted too.
    wrapped = {
        "module": "keras.src.models.functional",
        "class_name": "Functional",
        "config": config,
    }
    assert by_name(onnxbn.Model.from_config(wrapped).get_config()) == by_name(config)


def test_implicit_mask_fixture_round_trips_in_keras_layer_order():
    config = implicit_mask_config()
    assert onnxbn.Model.from_config(config).get_config() == config


def keras_order_weights(rng):
    """Arrays in Keras order: embeddings, kernel, bias, gamma, beta, moving mean, moving variance."""
    return [
        rng.normal(size=(30, 4)),
        rng.normal(size=(4, 6)),
        rng.normal(size=(6,)),
        rng.uniform(0.5, 1.5, size=(6,)),
        rng.normal(size=(6,)),
        rng.normal(size=(6,)),
        rng.uniform(0.5, 2.0, size=(6,)),
    ]


def oracle(tokens, weights, *, training, momentum=0.99, epsilon=1e-3):
    """Embedding lookup -> dense -> masked batch norm -> masked average, in float64."""
    table, kernel, bias, gamma, beta, moving_mean, moving_var = (
        np.asarray(w, np.float64) for w in weights
    )
    mask = tokens != 0
    h = table[tokens] @ kernel + bias  # (batch, steps, 6)
    if training:
        count = mask.sum()
        mean = (h * mask[..., None]).sum((0, 1)) / (count + 1e-7)
        var = (((h - mean) ** 2) * mask[..., None]).sum((0, 1)) / (count + 1e-7)
        new_mean = moving_mean * momentum + mean * (1 - momentum)
        new_var = moving_var * momentum + var * (1 - momentum)
    else:
        mean, var, new_mean, new_var = moving_mean, moving_var, moving_mean, moving_var
    h = gamma * (h - mean) / np.sqrt(var + epsilon) + beta
    pooled = (h * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
    return pooled, new_mean, new_var


@pytest.mark.parametrize("training", [False, True])
def test_implicit_mask_model_eager_matches_float64_numpy(training):
    rng = np.random.default_rng(21)
    model = onnxbn.Model.from_config(implicit_mask_config())
    weights = keras_order_weights(rng)
    assert [w.path for w in model.weights] == [
        "emb/embeddings",
        "proj/kernel",
        "proj/bias",
        "bn/gamma",
        "bn/beta",
        "bn/moving_mean",
        "bn/moving_variance",
    ]
    model.set_weights(weights)
    tokens = rng.integers(1, 30, size=(5, 9)).astype(np.int32)
    tokens[0, 6:] = 0
    tokens[3, 2:] = 0
    tokens[4, ::2] = 0
    y = model(tokens, training=training)
    stored = [w.astype(np.float32) for w in weights]  # the variables hold float32
    expected, new_mean, new_var = oracle(tokens, stored, training=training)
    assert y.shape == (5, 6) and y.dtype == np.float32
    np.testing.assert_allclose(y, expected, *TOLERANCES["float32"])
    bn = model.get_layer("bn")
    np.testing.assert_allclose(bn.moving_mean.numpy(), new_mean, *TOLERANCES["float32"])
    np.testing.assert_allclose(bn.moving_variance.numpy(), new_var, *TOLERANCES["float32"])


def test_set_weights_checks_count_and_shapes():
    model = onnxbn.Model.from_config(implicit_mask_config())
    weights = keras_order_weights(np.random.default_rng(0))
    with pytest.raises(ValueError, match="expecting 7 weights"):
        model.set_weights(weights[:-1])
    with pytest.raises(ValueError, match="proj/kernel"):
        model.set_weights([weights[0], weights[1].T, *weights[2:]])


@pytest.mark.parametrize(
    "class_name,module",
    [
        ("LSTM", "keras.layers"),
        ("MultiHeadAttention", "keras.layers"),
        ("Equal", "keras.src.ops.numpy"),
    ],
)
def test_unknown_layer_class_is_named(class_name, module):
    config = implicit_mask_config()
    entry = next(e for e in config["layers"] if e["name"] == "pool")
    entry["class_name"], entry["module"] = class_name, module
    with pytest.raises(ValueError, match=f"Unknown layer class '{class_name}'") as info:
        onnxbn.Model.from_config(config)
    assert "Dense" in str(info.value) and "NotEqual" in str(info.value)  # lists the known ones


def test_functional_model_fixture_still_round_trips():
    config = json.loads((FIXTURES / "functional_model.json").read_text())["get_config"]
    assert onnxbn.Model.from_config(config).get_config() == config


def mlp_model():
    x = onnxbn.Input(shape=(2, 3), name="x")
    h = layers.Flatten(name="flat")(x)
    h = layers.Dense(8, use_bias=False, name="d1")(h)
    h = layers.BatchNormalization(name="bn1")(h)
    h = layers.ReLU(max_value=6.0, name="relu")(h)
    h = layers.Dropout(0.3, seed=1, name="drop")(h)
    return onnxbn.Model(x, layers.Dense(3, activation="softmax", name="head")(h), name="mlp")


def sequence_model():
    x = onnxbn.Input(shape=(7, 4), name="seq")
    h = layers.Masking(name="mask")(x)
    h = layers.Dense(5, activation="tanh", name="proj")(h)
    h = layers.BatchNormalization(name="bn")(h)
    h = layers.GlobalAveragePooling1D(name="pool")(h)
    return onnxbn.Model(x, layers.Dense(2, name="head")(h), name="seq_classifier")


def token_model():
    t = onnxbn.Input(shape=(6,), dtype="int32", name="tokens")
    h = layers.Embedding(20, 4, mask_zero=True, name="emb")(t)
    h = layers.Conv1D(4, 3, padding="causal", name="conv")(h)  # drops the mask
    h = layers.BatchNormalization(name="bn")(h)
    h = layers.GlobalAveragePooling1D(keepdims=True, name="pool")(h)
    return onnxbn.Model(t, layers.Flatten(name="flat")(h), name="tokens")


def resnet_model():
    x = onnxbn.Input(shape=(6, 6, 3), name="image")
    h = layers.Conv2D(4, 3, padding="same", use_bias=False, name="stem")(x)
    h = layers.BatchNormalization(name="stem_bn")(h)
    h = layers.ReLU(name="stem_relu")(h)
    r = layers.Conv2D(4, 3, padding="same", use_bias=False, name="block_conv")(h)
    r = layers.BatchNormalization(name="block_bn")(r)
    h = layers.Add(name="block_add")([h, r])
    h = layers.Activation("relu", name="block_relu")(h)
    h = layers.GlobalAveragePooling2D(name="pool")(h)
    return onnxbn.Model(x, layers.Dense(3, name="head")(h), name="resnet")


def sample_input(model, rng):
    tensor = model.inputs[0]
    shape = (3,) + tensor.shape[1:]
    if tensor.dtype == "int32":
        data = rng.integers(0, 20, size=shape).astype(np.int32)
        data[0, 4:] = 0
        return data
    data = rng.normal(size=shape).astype(np.float32)
    if tensor.shape[1:] == (7, 4):
        data[1, 5:] = 0.0  # masked steps for the Masking model
    return data


def check_round_trip(model):
    rng = np.random.default_rng(8)
    for w in model.weights:
        w.assign(
            rng.normal(size=w.shape) if "variance" not in w.name else rng.uniform(0.5, 2, w.shape)
        )
    config = json.loads(json.dumps(model.get_config()))
    rebuilt = onnxbn.Model.from_config(copy.deepcopy(config))
    assert rebuilt.get_config() == config
    assert [w.path for w in rebuilt.weights] == [w.path for w in model.weights]
    rebuilt.set_weights(model.get_weights())
    data = sample_input(model, rng)
    np.testing.assert_array_equal(rebuilt(data), model(data))
    # Training mode too: same batch statistics, same seeded dropout stream.
    np.testing.assert_array_equal(rebuilt(data, training=True), model(data, training=True))


@pytest.mark.parametrize("make", [mlp_model, sequence_model, token_model])
def test_models_round_trip_through_json_configs(make):
    check_round_trip(make())


def test_resnet_with_add_round_trips_through_json_config():
    check_round_trip(resnet_model())


def test_resnet_eager_shapes_and_config_entries():
    model = resnet_model()
    y = model(np.random.default_rng(0).normal(size=(2, 6, 6, 3)).astype(np.float32))
    assert y.shape == (2, 3)
    entries = {e["name"]: e for e in model.get_config()["layers"]}
    assert entries["block_add"]["build_config"] == {
        "input_shape": [[None, 6, 6, 4], [None, 6, 6, 4]]
    }
    args = entries["block_add"]["inbound_nodes"][0]["args"]
    assert [ref["config"]["keras_history"][0] for ref in args[0]] == ["stem_relu", "block_bn"]
    assert entries["stem"]["config"]["kernel_size"] == [3, 3]


# ---------------------------------------------------------------- shared layers


def history(ref: dict) -> list:
    return ref["config"]["keras_history"]


def relu_tanh_config() -> dict:
    """The shared `tanh` listed before `relu`, whose output its first call takes."""
    x = onnxbn.Input(shape=(6,), name="x")
    tanh = layers.Activation("tanh", name="tanh")
    outputs = [tanh(layers.Activation("relu", name="relu")(x)), tanh(x)]
    config = json.loads(json.dumps(onnxbn.Model(x, outputs, name="m").get_config()))
    entries = {e["name"]: e for e in config["layers"]}
    config["layers"] = [entries["x"], entries["tanh"], entries["relu"]]
    return config


def test_a_shared_layers_first_call_may_depend_on_a_later_layer():
    config = relu_tanh_config()
    assert [history(n["args"][0]) for n in config["layers"][1]["inbound_nodes"]] == [
        ["relu", 0, 0],
        ["x", 0, 0],
    ]
    model = onnxbn.Model.from_config(config)
    x = np.linspace(-2, 2, 12).reshape(2, 6)
    first, second = model(x.astype(np.float32))
    np.testing.assert_allclose(first, np.tanh(np.maximum(x, 0.0)), *TOLERANCES["float32"])
    np.testing.assert_allclose(second, np.tanh(x), *TOLERANCES["float32"])
    tanh = model.get_layer("tanh")
    assert tanh.input is model.get_layer("relu").output  # `input` is the first call's


def shared_layers_config() -> dict:
    return json.loads((FIXTURES / "shared_layers_model.json").read_text())["get_config"]


def bn_training(x, moving_mean, moving_var, momentum=0.9, epsilon=1e-3):
    """BatchNormalization in training mode (gamma 1, beta 0), float64."""
    mean, var = x.mean(0), x.var(0)
    y = (x - mean) / np.sqrt(var + epsilon)
    return (
        y,
        moving_mean * momentum + mean * (1 - momentum),
        moving_var * momentum + var * (1 - momentum),
    )


def test_shared_layers_fixture_keeps_each_layers_calls_in_config_order():
    model = onnxbn.Model.from_config(shared_layers_config())
    rng = np.random.default_rng(21)
    x = rng.normal(size=(5, 6)).astype(np.float32)
    z = (rng.normal(size=(5, 6)) * 2 + 1).astype(np.float32)
    b0, b1, t1 = model([x, z])  # both bn calls recorded training=True
    x64, z64 = x.astype(np.float64), z.astype(np.float64)
    expected_t1 = np.tanh(x64)
    # Keras runs nodes by decreasing depth, then walk order: bn's call on the sum first.
    y0, mean, var = bn_training(np.tanh(np.maximum(x64, 0)) + z64, np.zeros(6), np.ones(6))
    y1, mean, var = bn_training(expected_t1, mean, var)
    tolerance = TOLERANCES["float32"]
    np.testing.assert_allclose(b0, y0, *tolerance)
    np.testing.assert_allclose(b1, y1, *tolerance)
    np.testing.assert_allclose(t1, expected_t1, *tolerance)
    bn = model.get_layer("bn")
    np.testing.assert_allclose(bn.moving_mean.numpy(), mean, *tolerance)
    np.testing.assert_allclose(bn.moving_variance.numpy(), var, *tolerance)
    assert bn.input is model.get_layer("add").output


def test_shared_layers_fixture_round_trips():
    config = shared_layers_config()
    written = json.loads(json.dumps(onnxbn.Model.from_config(config).get_config()))
    assert by_name(written) == by_name(config)
    assert onnxbn.Model.from_config(written).get_config() == written


def test_config_numbers_a_layers_calls_in_call_order():
    # tanh's second call runs first (it is deeper), yet Keras numbers nodes by call.
    x = onnxbn.Input(shape=(6,), name="x")
    tanh = layers.Activation("tanh", name="tanh")
    shallow = tanh(layers.Activation("relu", name="relu")(x))
    deep = layers.Dense(6, name="d2")(layers.Dense(6, name="d1")(tanh(x)))
    model = onnxbn.Model(x, [deep, shallow])
    ran = [n for n in model.nodes if n.operation is tanh]
    assert ran == tanh._inbound_nodes[::-1]  # the case this test is about
    config = json.loads(json.dumps(model.get_config()))
    entries = {e["name"]: e for e in config["layers"]}
    assert [history(n["args"][0]) for n in entries["tanh"]["inbound_nodes"]] == [
        ["relu", 0, 0],
        ["x", 0, 0],
    ]
    assert history(entries["d1"]["inbound_nodes"][0]["args"][0]) == ["tanh", 1, 0]
    assert config["output_layers"] == [["d2", 0, 0], ["tanh", 0, 0]]
    rebuilt = onnxbn.Model.from_config(config)
    rebuilt.set_weights(model.get_weights())
    data = np.random.default_rng(2).normal(size=(3, 6)).astype(np.float32)
    for got, want in zip(rebuilt(data), model(data)):
        np.testing.assert_array_equal(got, want)


def test_a_reference_no_layer_produces_is_named():
    config = relu_tanh_config()
    config["layers"][1]["inbound_nodes"][0]["args"][0]["config"]["keras_history"] = ["relu", 3, 0]
    message = "node 0 of layer 'tanh' references tensor ['relu', 3, 0], which no layer produces"
    with pytest.raises(ValueError, match=re.escape(message)):
        onnxbn.Model.from_config(config)
