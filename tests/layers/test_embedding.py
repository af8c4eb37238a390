"""Embedding: lookups, index checks, `mask_zero` recorded as Keras's NotEqual node, configs."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

import onnxbn
from onnxbn import layers
from onnxbn.ops import NotEqual

FIXTURES = Path(__file__).parent.parent / "fixtures" / "keras"


@pytest.mark.parametrize("shape", [(4,), (3, 5), (2, 3, 4)])
@pytest.mark.parametrize("index_dtype", [np.int32, np.int64, np.uint8])
@pytest.mark.parametrize("policy", ["float32", "float64", "mixed_float16"])
def test_lookup(shape, index_dtype, policy):
    rng = np.random.default_rng(4)
    layer = layers.Embedding(10, 3, dtype=policy)
    tokens = rng.integers(0, 10, size=shape).astype(index_dtype)
    y = layer(tokens)
    table = layer.embeddings.numpy()
    assert y.shape == shape + (3,) and str(y.dtype) == layer.compute_dtype
    for index in np.ndindex(*shape):
        np.testing.assert_array_equal(y[index], table[tokens[index]].astype(y.dtype))


def test_float_indices_are_truncated_like_keras_cast():
    layer = layers.Embedding(5, 2, embeddings_initializer="glorot_uniform")
    np.testing.assert_array_equal(
        layer(np.array([[1.9, 3.2]], np.float32)), layer(np.array([[1, 3]]))
    )


@pytest.mark.parametrize("bad", [[5], [-1], [0, 7]])
def test_out_of_range_indices(bad):
    with pytest.raises(ValueError, match=re.escape("indices must be in [0, 5)")):
        layers.Embedding(5, 2)(np.array(bad))


def test_mask_zero_records_not_equal_like_keras():
    tokens = onnxbn.Input(shape=(None,), dtype="int32", name="tokens")
    emb = layers.Embedding(30, 4, mask_zero=True, name="emb")
    y = emb(tokens)
    assert y.shape == (None, None, 4) and y.dtype == "float32"
    op, node_index, _ = y.mask.history
    assert isinstance(op, NotEqual)
    assert op._inbound_nodes[node_index].call_args == (tokens, 0)
    assert y.mask.shape == (None, None) and y.mask.dtype == "bool"
    assert emb.supports_masking
    plain = layers.Embedding(30, 4)
    assert plain(tokens).mask is None and not plain.supports_masking
    np.testing.assert_array_equal(
        emb.compute_mask(np.array([[0, 3, 0]]), None), [[False, True, False]]
    )
    assert plain.compute_mask(np.array([[0, 3]]), None) is None


def test_mask_flows_to_batch_normalization_and_pooling():
    tokens = onnxbn.Input(shape=(6,), dtype="int32")
    h = layers.Embedding(12, 3, mask_zero=True)(tokens)
    bn = layers.BatchNormalization()
    pool = layers.GlobalAveragePooling1D()
    out = pool(bn(layers.Dense(3)(h)))
    assert bn._inbound_nodes[0].call_kwargs["mask"] is h.mask
    assert pool._inbound_nodes[0].call_kwargs["mask"] is h.mask
    assert out.mask is None


def test_weights_and_initial_weights():
    layer = layers.Embedding(4, 2, name="e")
    layer.build((None, 3))
    assert [w.path for w in layer.weights] == ["e/embeddings"] and layer.weights[0].shape == (4, 2)
    values = np.arange(8, dtype=np.float32).reshape(4, 2)
    given = layers.Embedding(4, 2, weights=values)
    np.testing.assert_array_equal(given.get_weights()[0], values)
    np.testing.assert_array_equal(given(np.array([3])), [[6.0, 7.0]])
    assert layers.Embedding(4, 2, weights=[values]).get_weights()[0].shape == (4, 2)


def test_config_matches_keras_fixture():
    fixture = json.loads((FIXTURES / "implicit_mask_model.json").read_text())
    entry = next(e for e in fixture["get_config"]["layers"] if e["class_name"] == "Embedding")
    layer = layers.deserialize(
        {k: v for k, v in entry.items() if k not in ("name", "inbound_nodes")}
    )
    assert layer.get_config() == entry["config"]
    assert list(layer.get_config()) == list(entry["config"])
    assert layers.serialize(layer)["build_config"] == entry["build_config"]
    old = {k: v for k, v in entry["config"].items() if k != "quantization_config"}
    assert layers.Embedding.from_config({**old, "input_length": 9}).get_config() == entry["config"]


@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        ({"input_dim": 0, "output_dim": 2}, ValueError, "`input_dim` to be a positive integer"),
        ({"input_dim": 3, "output_dim": -1}, ValueError, "output_dim=-1"),
        ({"input_dim": 3.0, "output_dim": 2}, TypeError, "input_dim"),
        ({"input_dim": 3, "output_dim": 2, "mask_zero": "yes"}, TypeError, "mask_zero"),
        ({"input_dim": 3, "output_dim": 2, "lora_rank": 2}, NotImplementedError, "lora_rank=2"),
        ({"input_dim": 3, "output_dim": 2, "embeddings_initializer": "nope"}, ValueError, "nope"),
        ({"input_dim": 3, "output_dim": 2, "weights": np.ones((2, 2))}, ValueError, "weight shape"),
    ],
)
def test_errors(kwargs, error, message):
    with pytest.raises(error, match=re.escape(message)):
        layers.Embedding(**kwargs)
