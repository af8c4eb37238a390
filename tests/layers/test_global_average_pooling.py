"""GlobalAveragePooling1D/2D: (masked) means, data formats, keepdims, shapes, configs, masks."""

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


def masked_mean_oracle(x, mask, steps_axis):
    """Σ_t mask_t x_t / Σ_t mask_t, by an explicit loop over batch rows."""
    x = np.asarray(x, np.float64)
    if steps_axis == 2:
        x = np.moveaxis(x, 2, 1)
    out = np.empty((x.shape[0], x.shape[2]))
    for n in range(x.shape[0]):
        keep = [t for t in range(x.shape[1]) if mask is None or mask[n, t]]
        out[n] = sum(x[n, t] for t in keep) / len(keep) if keep else np.nan
    return out


@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
@pytest.mark.parametrize("keepdims", [False, True])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("policy", ["float32", "float64", "mixed_float16"])
def test_pooling_1d(data_format, keepdims, masked, policy):
    rng = np.random.default_rng(5)
    steps_axis = 1 if data_format == "channels_last" else 2
    shape = (4, 6, 3) if steps_axis == 1 else (4, 3, 6)
    x = rng.normal(size=shape).astype(np.float32)
    mask = rng.random((4, 6)) < 0.6 if masked else None
    if masked:
        mask[0] = [True, False, False, False, False, False]
        mask[1] = True
    layer = layers.GlobalAveragePooling1D(data_format=data_format, keepdims=keepdims, dtype=policy)
    y = layer(x, mask=mask)
    compute = layer.compute_dtype
    expected = masked_mean_oracle(x.astype(y.dtype), mask, steps_axis)
    if keepdims:
        expected = np.expand_dims(expected, steps_axis)
    assert y.shape == expected.shape and str(y.dtype) == compute
    np.testing.assert_allclose(y.astype(np.float64), expected, *TOLERANCES[compute])


def test_fully_masked_row_is_nan_like_keras():
    x = np.ones((2, 3, 2), np.float32)
    mask = np.array([[False] * 3, [True, False, True]])
    y = layers.GlobalAveragePooling1D()(x, mask=mask)
    assert np.isnan(y[0]).all() and np.array_equal(y[1], [1.0, 1.0])
    # Integer masks count non-zero entries as valid.
    np.testing.assert_array_equal(layers.GlobalAveragePooling1D()(x, mask=mask.astype(np.int8)), y)


@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
@pytest.mark.parametrize("keepdims", [False, True])
def test_pooling_2d(data_format, keepdims):
    rng = np.random.default_rng(9)
    shape = (2, 4, 5, 3) if data_format == "channels_last" else (2, 3, 4, 5)
    x = rng.normal(size=shape).astype(np.float32)
    y = layers.GlobalAveragePooling2D(data_format=data_format, keepdims=keepdims)(x)
    axes = (1, 2) if data_format == "channels_last" else (2, 3)
    x64 = x.astype(np.float64)
    expected = np.zeros([d for i, d in enumerate(shape) if i not in axes])
    for i in range(shape[axes[0]]):
        for j in range(shape[axes[1]]):
            index = [slice(None)] * 4
            index[axes[0]], index[axes[1]] = i, j
            expected += x64[tuple(index)]
    expected /= shape[axes[0]] * shape[axes[1]]
    if keepdims:
        expected = np.expand_dims(expected, axes)
    np.testing.assert_allclose(y, expected, *TOLERANCES["float32"])


@pytest.mark.parametrize(
    "cls,kwargs,shape,expected",
    [
        ("GlobalAveragePooling1D", {}, (None, None, 8), (None, 8)),
        ("GlobalAveragePooling1D", {"keepdims": True}, (3, 7, 8), (3, 1, 8)),
        ("GlobalAveragePooling1D", {"data_format": "channels_first"}, (None, 8, None), (None, 8)),
        ("GlobalAveragePooling2D", {}, (None, None, None, 4), (None, 4)),
        (
            "GlobalAveragePooling2D",
            {"keepdims": True, "data_format": "channels_first"},
            (None, 4, 5, 6),
            (None, 4, 1, 1),
        ),
    ],
)
def test_symbolic_shapes(cls, kwargs, shape, expected):
    y = getattr(layers, cls)(**kwargs)(onnxbn.Input(shape=shape[1:], batch_size=shape[0]))
    assert y.shape == expected and y.dtype == "float32"


def test_the_1d_layer_consumes_the_implicit_mask():
    x = onnxbn.Input(shape=(None, 3))
    masked = layers.Masking()(x)
    pool = layers.GlobalAveragePooling1D()
    y = pool(masked)
    node = pool._inbound_nodes[0]
    assert node.call_kwargs == {"mask": masked.mask}  # filled in, as Keras records it
    assert y.mask is None
    model = onnxbn.Model(x, y)
    data = np.array([[[1, 2, 3], [0, 0, 0], [3, 4, 5]]], np.float32)
    np.testing.assert_allclose(model(data), [[2.0, 3.0, 4.0]])


def test_the_2d_layer_drops_a_mask():
    x = onnxbn.Input(shape=(4, 4, 3))
    masked = layers.Masking()(x)
    pool = layers.GlobalAveragePooling2D()
    assert pool(masked).mask is None
    assert pool._inbound_nodes[0].call_kwargs == {}


def test_config_matches_keras_fixture():
    fixture = json.loads((FIXTURES / "implicit_mask_model.json").read_text())
    entry = next(
        e for e in fixture["get_config"]["layers"] if e["class_name"] == "GlobalAveragePooling1D"
    )
    layer = layers.deserialize(
        {k: v for k, v in entry.items() if k not in ("name", "inbound_nodes")}
    )
    assert layer.get_config() == entry["config"]
    layer(np.ones((1, 9, 6), np.float32))
    assert "build_config" not in layers.serialize(layer)  # built at construction, as in Keras
    two_d = layers.GlobalAveragePooling2D(data_format="channels_first", keepdims=True, name="g")
    config = json.loads(json.dumps(two_d.get_config()))
    assert config["data_format"] == "channels_first" and config["keepdims"] is True
    assert layers.GlobalAveragePooling2D.from_config(config).get_config() == config


@pytest.mark.parametrize(
    "make,x,kwargs,error,message",
    [
        (
            lambda: layers.GlobalAveragePooling1D(),
            np.ones((2, 3)),
            {},
            ValueError,
            "expected ndim=3, found ndim=2",
        ),
        (
            lambda: layers.GlobalAveragePooling2D(),
            np.ones((2, 3, 4)),
            {},
            ValueError,
            "expected ndim=4, found ndim=3",
        ),
        (
            lambda: layers.GlobalAveragePooling1D(),
            np.ones((2, 3, 4)),
            {"mask": np.ones((2, 4))},
            ValueError,
            "the mask must have shape (batch, steps) = (2, 3)",
        ),
        (
            lambda: layers.GlobalAveragePooling1D(),
            np.ones((2, 3, 4)),
            {"mask": np.ones((2, 3, 4))},
            ValueError,
            "received a mask of shape (2, 3, 4)",
        ),
        (
            lambda: layers.GlobalAveragePooling1D(data_format="NHWC"),
            None,
            {},
            ValueError,
            "Received: data_format=nhwc",
        ),
        (lambda: layers.GlobalAveragePooling1D(keepdims=1), None, {}, TypeError, "keepdims"),
    ],
)
def test_errors(make, x, kwargs, error, message):
    with pytest.raises(error, match=re.escape(message)):
        make()(x, **kwargs)
