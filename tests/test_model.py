"""Symbolic graph: SymbolicTensor, Input, Operation dispatch, Node, Model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import onnxbn
from onnxbn import layers
from tests.oracle import TOLERANCES, bn_oracle

FIXTURES = Path(__file__).parent / "fixtures" / "keras"


def two_input_model():
    x = onnxbn.Input(shape=(4, 4), name="x")
    m = onnxbn.Input(shape=(4,), dtype="bool", name="mask")
    bn1 = layers.BatchNormalization(momentum=0.9, name="bn1")
    bn2 = layers.BatchNormalization(axis=1, name="bn2")
    y = bn2(bn1(x, mask=m))
    return onnxbn.Model(inputs=[x, m], outputs=y, name="demo"), (x, m, bn1, bn2, y)


def test_input_and_symbolic_tensor():
    x = onnxbn.Input(shape=(None, 16), name="x")
    assert x.shape == (None, None, 16) and x.dtype == "float32" and x.name == "x"
    fixed = onnxbn.Input(shape=(3,), batch_size=8, dtype="float16")
    assert fixed.shape == (8, 3) and fixed.dtype == "float16"
    with pytest.raises(AttributeError, match="immutable"):
        x.shape = (1,)
    with pytest.raises(TypeError, match="has no value"):
        np.asarray(x)


def test_symbolic_call_records_a_node_and_infers_spec():
    x = onnxbn.Input(shape=(5, 3), dtype="float16", name="x")
    bn = layers.BatchNormalization(dtype="mixed_float16", name="bn")
    y = bn(x, training=True)
    assert isinstance(y, onnxbn.SymbolicTensor)
    assert y.shape == (None, 5, 3) and y.dtype == "float16"
    assert len(bn._inbound_nodes) == 1
    node = bn._inbound_nodes[0]
    assert node.call_kwargs == {"training": True} and node.input_tensors == [x]
    assert y.history == (bn, 0, 0)
    assert bn.built and [w.shape for w in bn.weights] == [(3,)] * 4


def test_input_output_are_those_of_the_first_call():
    x1 = onnxbn.Input(shape=(4,), name="a")
    x2 = onnxbn.Input(shape=(4,), name="b")
    m = onnxbn.Input(shape=(), dtype="bool", name="m")
    bn = layers.BatchNormalization(name="shared")
    y1 = bn(x1, mask=m)
    y2 = bn(x2)
    assert bn.input == [x1, m]  # with a mask, [x, mask] as in Keras
    assert bn.output is y1 and y2 is not y1
    assert y2.history == (bn, 1, 0) and y1.name != y2.name
    unused = layers.BatchNormalization()
    with pytest.raises(ValueError, match="never been called"):
        _ = unused.output


def test_shared_layer_two_nodes_one_set_of_weights():
    a = onnxbn.Input(shape=(3,), name="a")
    b = onnxbn.Input(shape=(3,), name="b")
    bn = layers.BatchNormalization(momentum=0.5, name="bn")
    model = onnxbn.Model([a, b], [bn(a), bn(b)])
    assert len(bn._inbound_nodes) == 2
    assert [l.name for l in model.layers] == ["a", "b", "bn"]
    assert len(model.weights) == 4
    rng = np.random.default_rng(0)
    xa, xb = rng.normal(size=(2, 5, 3)).astype(np.float32)
    ya, yb = model(xa, xb, training=True)
    # The second call sees the moving statistics the first call wrote.
    m1 = 0.5 * 0 + 0.5 * xa.astype(np.float64).mean(0)
    m2 = 0.5 * m1 + 0.5 * xb.astype(np.float64).mean(0)
    np.testing.assert_allclose(bn.moving_mean.numpy(), m2, rtol=1e-6, atol=1e-7)


def test_model_eager_matches_oracle_and_propagates_training():
    model, (_, _, bn1, bn2, _) = two_input_model()
    rng = np.random.default_rng(1)
    x = (rng.normal(size=(3, 4, 4)) * 2 + 1).astype(np.float32)
    mask = rng.random((3, 4)) > 0.3
    kw = dict(
        gamma=np.ones(4),
        beta=np.zeros(4),
        moving_mean=np.zeros(4),
        moving_variance=np.ones(4),
        epsilon=1e-3,
        training=True,
    )
    h, _, _ = bn_oracle(x, axis=-1, momentum=0.9, mask=mask, **kw)
    expected, _, _ = bn_oracle(h, axis=1, momentum=0.99, **kw)
    y = model(x, mask, training=True)
    rtol, atol = TOLERANCES["float32"]
    np.testing.assert_allclose(y, expected, rtol=10 * rtol, atol=10 * atol)
    assert not np.allclose(bn1.moving_mean.numpy(), 0)
    # Inference by default: moving statistics only, no update.
    before = model.get_weights()
    model([x, mask])
    model({"x": x, "mask": mask}, training=False)
    for a, b in zip(before, model.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_recorded_training_flag_is_kept_unless_overridden():
    x = onnxbn.Input(shape=(2,), name="x")
    bn = layers.BatchNormalization(momentum=0.0)
    model = onnxbn.Model(x, bn(x, training=True))
    data = np.array([[1.0, 2.0], [3.0, 6.0]], np.float32)
    model(data)
    np.testing.assert_allclose(bn.moving_mean.numpy(), [2.0, 4.0])
    bn.moving_mean.assign(np.zeros(2))
    model(data, training=False)
    np.testing.assert_allclose(bn.moving_mean.numpy(), [0.0, 0.0])


def test_model_errors():
    x = onnxbn.Input(shape=(2,), name="x")
    other = onnxbn.Input(shape=(2,), name="other")
    bn = layers.BatchNormalization()
    y = bn(x)
    with pytest.raises(ValueError, match="not connected"):
        onnxbn.Model([x, other], y)
    with pytest.raises(ValueError, match="Graph disconnected"):
        onnxbn.Model(other, y)
    with pytest.raises(TypeError, match="SymbolicTensors"):
        onnxbn.Model(x, np.zeros(2))
    model = onnxbn.Model(x, y)
    with pytest.raises(ValueError, match="expects 1 inputs"):
        model(np.zeros((1, 2)), np.zeros((1, 2)))
    with pytest.raises(ValueError, match="expects shape"):
        model(np.zeros((1, 3), np.float32))
    with pytest.raises(TypeError, match="numeric"):
        model(np.array([["a", "b"]]))
    with pytest.raises(TypeError, match="both symbolic tensors"):
        bn(x, mask=np.ones(1))
    with pytest.raises(TypeError, match="cannot be called on symbolic"):
        model(x)


def test_automatic_unique_names():
    onnxbn.reset_names()
    names = [layers.BatchNormalization().name for _ in range(3)]
    assert names == ["batch_normalization", "batch_normalization_1", "batch_normalization_2"]


def test_model_weights_in_keras_order_and_set_weights():
    model, (_, _, bn1, bn2, _) = two_input_model()
    assert [w.path for w in model.weights] == [
        f"{b}/{w}"
        for b in ("bn1", "bn2")
        for w in ("gamma", "beta", "moving_mean", "moving_variance")
    ]
    values = [np.full(4, i, np.float32) for i in range(8)]
    model.set_weights(values)
    np.testing.assert_array_equal(bn2.beta.numpy(), np.full(4, 5))
    with pytest.raises(ValueError, match="length 7"):
        model.set_weights(values[:7])
    bad = values[:-1] + [np.zeros(5)]
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        model.set_weights(bad)
    np.testing.assert_array_equal(bn2.moving_variance.numpy(), np.full(4, 7))  # nothing assigned
    model.trainable = False
    assert model.trainable_weights == [] and len(model.non_trainable_weights) == 8


def test_functional_config_round_trip():
    model, _ = two_input_model()
    config = model.get_config()
    json.dumps(config)  # JSON-simple
    clone = onnxbn.Model.from_config(config)
    assert clone.get_config() == config
    clone.set_weights(model.get_weights())
    x = np.random.default_rng(2).normal(size=(2, 4, 4)).astype(np.float32)
    m = np.ones((2, 4), bool)
    np.testing.assert_array_equal(model(x, m, training=True), clone(x, m, training=True))


def test_reads_the_real_keras_functional_config():
    fixture = json.loads((FIXTURES / "functional_model.json").read_text())
    model = onnxbn.Model.from_config(fixture["get_config"])
    assert [l.name for l in model.layers] == ["x", "mask", "bn1", "bn2"]
    assert model.get_config() == fixture["get_config"]
    assert onnxbn.Model.from_config(fixture["serialize"]).name == "demo"
    bn1 = model.get_layer("bn1")
    assert bn1.momentum == 0.9 and bn1._inbound_nodes[0].call_kwargs["mask"].name == "mask"


@pytest.mark.parametrize(
    "mutate,error,match",
    [
        (
            lambda c: c["layers"][2].update(class_name="Evil"),
            ValueError,
            "Unknown layer class 'Evil'",
        ),
        (lambda c: c["layers"][2].update(module="os"), ValueError, "module 'os'"),
        (lambda c: c.update(extra=1), ValueError, "Unknown keys \\['extra'\\]"),
        (lambda c: c.update(layers="x"), TypeError, "'layers' must be a list"),
        (
            lambda c: c["layers"][3]["inbound_nodes"][0]["args"][0]["config"].update(
                keras_history=["nope", 0, 0]
            ),
            ValueError,
            "Cannot rebuild",
        ),
        (lambda c: c.update(output_layers=["zz", 0, 0]), ValueError, "unknown tensor"),
        (lambda c: c["layers"][2]["config"].update(bogus=True), ValueError, "bogus"),
    ],
)
def test_bad_model_configs(mutate, error, match):
    config = json.loads((FIXTURES / "functional_model.json").read_text())["get_config"]
    mutate(config)
    with pytest.raises(error, match=match):
        onnxbn.Model.from_config(config)


def test_two_layers_with_one_name_are_refused_at_model():
    x = onnxbn.Input(shape=(4,), name="x")
    first = layers.BatchNormalization(name="bn")
    second = layers.BatchNormalization(name="bn")
    y = second(first(x))
    with pytest.raises(ValueError) as info:
        onnxbn.Model(x, y)
    message = str(info.value)
    assert "'bn' is used by 2 different layers" in message
    assert message.count("<BatchNormalization name='bn' at 0x") == 2
    assert f"0x{id(first):x}" in message and f"0x{id(second):x}" in message
    # An input named like a layer collides too; a shared layer is one layer.
    z = onnxbn.Input(shape=(4,), name="dense")
    with pytest.raises(ValueError, match="'dense' is used by 2 different layers"):
        onnxbn.Model(z, layers.Dense(2, name="dense")(z))
    shared = layers.BatchNormalization(name="shared")
    model = onnxbn.Model(x, shared(shared(x)))
    assert [layer.name for layer in model.layers] == ["x", "shared"]


def test_a_frozen_layer_survives_the_config_round_trip_alone():
    """Keras's `Model.trainable` is the model's own flag: one frozen layer does not freeze all."""
    onnxbn.reset_names()
    x = onnxbn.Input((3,), name="x")
    frozen = layers.Dense(2, name="frozen")
    y = layers.Dense(1, name="free")(frozen(x))
    model = onnxbn.Model(x, y)
    frozen.trainable = False
    assert model.trainable
    twin = onnxbn.Model.from_config(model.get_config())
    assert [l.trainable for l in twin.layers] == [l.trainable for l in model.layers]
    assert [w.path for w in twin.trainable_weights] == ["free/kernel", "free/bias"]
    model.trainable = False
    assert not onnxbn.Model.from_config(model.get_config()).get_layer("free").trainable
