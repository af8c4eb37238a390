"""Flatten: element order (both data formats), shapes with unknown dims, dtypes, configs, masks."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

import onnxbn
from onnxbn import layers


def flatten_oracle(x, channels_first):
    """Row-major read of the channels-last layout, element by element."""
    x = np.asarray(x)
    if channels_first and x.ndim > 1:
        x = np.transpose(x, (0, *range(2, x.ndim), 1))
    rows = []
    for n in range(x.shape[0]):
        rows.append([x[(n, *index)] for index in np.ndindex(*x.shape[1:])])
    return np.array(rows, dtype=x.dtype).reshape(x.shape[0], int(np.prod(x.shape[1:])))


@pytest.mark.parametrize("shape", [(3,), (2, 5), (2, 3, 4), (2, 2, 3, 4), (0, 3, 2)])
@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
def test_values_and_order(shape, data_format):
    x = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    y = layers.Flatten(data_format=data_format)(x)
    expected = flatten_oracle(x, data_format == "channels_first")
    assert y.shape == (shape[0], max(1, int(np.prod(shape[1:])))) and y.dtype == np.float32
    np.testing.assert_array_equal(y, expected)


def test_dtypes():
    assert layers.Flatten()(np.ones((2, 3), np.int32)).dtype == np.int32  # ints stay ints
    assert layers.Flatten(dtype="float16")(np.ones((2, 3), np.float32)).dtype == np.float16
    assert layers.Flatten()(onnxbn.Input((3,), dtype="int64")).dtype == "int64"
    assert layers.Flatten(dtype="mixed_float16")(onnxbn.Input((3,))).dtype == "float16"


@pytest.mark.parametrize(
    "shape,expected",
    [
        ((None, 4, 5), (None, 20)),
        ((7, 4, None), (7, None)),
        ((None,), (None, 1)),
        ((None, 2, 3, 4), (None, 24)),
    ],
)
def test_symbolic_shapes(shape, expected):
    assert layers.Flatten()(onnxbn.Input(shape[1:], batch_size=shape[0])).shape == expected


def test_mask_is_dropped():
    masked = layers.Masking()(onnxbn.Input((4, 3)))
    assert layers.Flatten()(masked).mask is None


def test_config():
    layer = layers.Flatten(data_format="channels_first", name="flat")
    config = layer.get_config()
    assert list(config) == ["name", "trainable", "dtype", "data_format"]
    assert config["data_format"] == "channels_first"
    layer(onnxbn.Input((2, 3)))
    envelope = json.loads(json.dumps(layers.serialize(layer)))
    assert envelope["build_config"] == {"input_shape": [None, 2, 3]}
    clone = layers.deserialize(envelope)
    assert clone.get_config() == config and clone.built
    assert layers.Flatten().get_config()["data_format"] == "channels_last"


def test_errors():
    with pytest.raises(ValueError, match=re.escape("Received: data_format=nchw")):
        layers.Flatten(data_format="NCHW")
    with pytest.raises(ValueError, match="expected min_ndim=1, found ndim=0"):
        layers.Flatten()(np.float32(1.0))
