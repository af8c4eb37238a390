"""Conv1D / Conv2D against explicit float64 loops, shapes, weights, configs, errors, masks."""

from __future__ import annotations

import itertools
import json
import math
import re

import numpy as np
import pytest

import onnxbn
from onnxbn import layers
from tests.oracle import TOLERANCES


def same_pads(size, k, s, d):
    """TensorFlow's SAME padding of one axis, written from its definition."""
    out = math.ceil(size / s)
    total = max((out - 1) * s + d * (k - 1) + 1 - size, 0)
    return total // 2, total - total // 2


def conv_oracle(x, kernel, bias, *, strides, padding, dilation, groups, channels_first):
    """Cross-correlation by explicit loops over outputs, filters, taps and channels."""
    x = np.asarray(x, np.float64)
    kernel = np.asarray(kernel, np.float64)
    if channels_first:
        x = np.moveaxis(x, 1, -1)
    rank = x.ndim - 2
    ksize = kernel.shape[:rank]
    pads = []
    for i in range(rank):
        if padding == "valid":
            pads.append((0, 0))
        elif padding == "causal":
            pads.append((dilation[i] * (ksize[i] - 1), 0))
        else:
            pads.append(same_pads(x.shape[1 + i], ksize[i], strides[i], dilation[i]))
    x = np.pad(x, [(0, 0), *pads, (0, 0)])
    out = [
        (x.shape[1 + i] - dilation[i] * (ksize[i] - 1) - 1) // strides[i] + 1 for i in range(rank)
    ]
    cin, filters = x.shape[-1], kernel.shape[-1]
    cg, fg = cin // groups, filters // groups
    y = np.zeros((x.shape[0], *out, filters))
    for n in range(x.shape[0]):
        for pos in itertools.product(*(range(o) for o in out)):
            for f in range(filters):
                g = f // fg
                acc = 0.0
                for tap in itertools.product(*(range(k) for k in ksize)):
                    at = tuple(p * s + t * d for p, s, t, d in zip(pos, strides, tap, dilation))
                    for c in range(cg):
                        acc += x[(n, *at, g * cg + c)] * kernel[(*tap, c, f)]
                y[(n, *pos, f)] = acc + (0.0 if bias is None else bias[f])
    return np.moveaxis(y, -1, 1) if channels_first else y


CASES = [
    # (layer, spatial, cin, filters, kernel, strides, padding, dilation, groups, data_format, bias)
    ("Conv1D", (7,), 3, 4, 3, 1, "valid", 1, 1, "channels_last", True),
    ("Conv1D", (8,), 4, 6, 3, 2, "same", 1, 2, "channels_last", True),
    ("Conv1D", (7,), 2, 3, 3, 1, "causal", 2, 1, "channels_last", False),
    ("Conv1D", (6,), 2, 2, 2, 1, "causal", 1, 1, "channels_first", True),
    ("Conv1D", (9,), 3, 2, 4, 3, "same", 1, 1, "channels_first", True),
    ("Conv2D", (5, 6), 3, 4, (3, 2), 1, "valid", 1, 1, "channels_last", True),
    ("Conv2D", (6, 5), 4, 4, 3, (2, 1), "same", 1, 4, "channels_last", True),
    ("Conv2D", (7, 7), 2, 3, 3, 1, "same", (2, 1), 1, "channels_first", False),
    ("Conv2D", (5, 4), 6, 4, (1, 3), 2, "valid", 1, 2, "channels_first", True),
    ("Conv2D", (4, 4), 2, 2, 2, 2, "same", 1, 1, "channels_last", True),
]


def _tuple(v, n):
    return (v,) * n if isinstance(v, int) else tuple(v)


@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
@pytest.mark.parametrize("policy", ["float32", "float64"])
def test_eager_matches_explicit_loops(case, policy):
    cls, spatial, cin, filters, ksize, strides, padding, dilation, groups, fmt, bias = case
    rank = len(spatial)
    rng = np.random.default_rng(sum(spatial) + cin + filters)
    layer = getattr(layers, cls)(
        filters,
        ksize,
        strides=strides,
        padding=padding,
        dilation_rate=dilation,
        groups=groups,
        data_format=fmt,
        use_bias=bias,
        dtype=policy,
    )
    first = fmt == "channels_first"
    shape = (2, cin, *spatial) if first else (2, *spatial, cin)
    layer.build(shape)
    layer.set_weights([rng.normal(size=w.shape) for w in layer.weights])
    x = rng.normal(size=shape).astype(policy)
    y = layer(x)
    expected = conv_oracle(
        x,
        layer.kernel.numpy(),
        None if layer.bias is None else layer.bias.numpy().astype(np.float64),
        strides=_tuple(strides, rank),
        padding=padding,
        dilation=_tuple(dilation, rank),
        groups=groups,
        channels_first=first,
    )
    assert y.shape == expected.shape and str(y.dtype) == policy
    rtol, atol = TOLERANCES[policy]
    np.testing.assert_allclose(y, expected, rtol=rtol, atol=atol * 10)
    # The symbolic shape rule agrees with the computed shape.
    spec = layer.compute_output_spec(onnxbn.SymbolicTensor(shape, policy))
    assert spec.shape == y.shape and spec.dtype == policy


def test_activation_and_half_precision():
    rng = np.random.default_rng(3)
    layer = layers.Conv2D(2, 2, activation="relu", dtype="mixed_float16")
    x = rng.normal(size=(1, 3, 3, 2)).astype(np.float32)
    y = layer(x)
    assert y.dtype == np.float16
    kernel, bias = layer.kernel.numpy(), layer.bias.numpy()
    assert kernel.dtype == np.float32  # variables stay float32 under mixed precision
    expected = np.maximum(
        conv_oracle(
            x.astype(np.float16),
            kernel,
            bias,
            strides=(1, 1),
            padding="valid",
            dilation=(1, 1),
            groups=1,
            channels_first=False,
        ),
        0,
    )
    np.testing.assert_allclose(y.astype(np.float64), expected, *TOLERANCES["float16"])


@pytest.mark.parametrize(
    "cls,shape,kwargs,expected",
    [
        ("Conv1D", (None, None, 3), {"filters": 4, "kernel_size": 3}, (None, None, 4)),
        ("Conv1D", (None, 10, 3), {"filters": 4, "kernel_size": 3}, (None, 8, 4)),
        (
            "Conv1D",
            (None, 10, 3),
            {"filters": 4, "kernel_size": 3, "strides": 3, "padding": "same"},
            (None, 4, 4),
        ),
        (
            "Conv1D",
            (None, 10, 3),
            {"filters": 4, "kernel_size": 3, "padding": "causal"},
            (None, 10, 4),
        ),
        ("Conv1D", (None, 2, 3), {"filters": 4, "kernel_size": 3}, (None, 0, 4)),
        (
            "Conv2D",
            (None, 32, None, 3),
            {"filters": 8, "kernel_size": 3, "strides": 2},
            (None, 15, None, 8),
        ),
        (
            "Conv2D",
            (4, 3, 9, 9),
            {
                "filters": 6,
                "kernel_size": (3, 1),
                "data_format": "channels_first",
                "dilation_rate": 2,
            },
            (4, 6, 5, 9),
        ),
    ],
)
def test_symbolic_shapes(cls, shape, kwargs, expected):
    x = onnxbn.Input(shape=shape[1:], batch_size=shape[0])
    y = getattr(layers, cls)(**kwargs)(x)
    assert y.shape == expected and y.dtype == "float32"


def test_weights_layout_and_names():
    layer = layers.Conv2D(8, (3, 2), groups=2, name="c")
    layer.build((None, 5, 5, 6))
    assert [w.path for w in layer.weights] == ["c/kernel", "c/bias"]
    assert [w.shape for w in layer.weights] == [(3, 2, 3, 8), (8,)]
    first = layers.Conv1D(4, 5, data_format="channels_first", use_bias=False)
    first.build((None, 2, 9))
    assert [w.shape for w in first.weights] == [(5, 2, 4)]


def test_conv_drops_the_mask():
    x = onnxbn.Input(shape=(None, 3))
    masked = layers.Masking()(x)
    assert masked.mask is not None
    y = layers.Conv1D(2, 3, padding="same")(masked)
    assert y.mask is None


KERAS_CONV2D_DEFAULT = {
    "name": "conv",
    "trainable": True,
    "dtype": {
        "module": "keras",
        "class_name": "DTypePolicy",
        "config": {"name": "float32"},
        "registered_name": None,
    },
    "filters": 16,
    "kernel_size": [3, 3],
    "strides": [1, 1],
    "padding": "valid",
    "data_format": "channels_last",
    "dilation_rate": [1, 1],
    "groups": 1,
    "activation": "linear",
    "use_bias": True,
    "kernel_initializer": {
        "module": "keras.initializers",
        "class_name": "GlorotUniform",
        "config": {"seed": None, "input_axes": None, "output_axes": None},
        "registered_name": None,
    },
    "bias_initializer": {
        "module": "keras.initializers",
        "class_name": "Zeros",
        "config": {},
        "registered_name": None,
    },
    "kernel_regularizer": None,
    "bias_regularizer": None,
    "activity_regularizer": None,
    "kernel_constraint": None,
    "bias_constraint": None,
}


def test_config_keys_and_values_as_keras_writes_them():
    config = layers.Conv2D(16, 3, name="conv").get_config()
    expected = json.loads(json.dumps(KERAS_CONV2D_DEFAULT))
    assert config == expected and list(config) == list(expected)
    assert layers.Conv2D.from_config(expected).get_config() == expected


def test_config_round_trip_non_defaults():
    layer = layers.Conv1D(
        6,
        (5,),
        strides=2,
        padding="SAME",
        data_format="channels_first",
        groups=3,
        activation="tanh",
        use_bias=False,
        kernel_regularizer="l1",
        dtype="float64",
    )
    config = json.loads(json.dumps(layer.get_config()))
    assert config["padding"] == "same" and config["kernel_size"] == [5]
    assert config["strides"] == [2] and config["dilation_rate"] == [1]
    clone = layers.deserialize(json.loads(json.dumps(layers.serialize(layer))))
    assert isinstance(clone, layers.Conv1D) and clone.get_config() == config
    with pytest.raises(ValueError, match="Unknown config key"):
        layers.Conv2D.from_config({**config, "rank": 2})


@pytest.mark.parametrize(
    "cls,kwargs,message",
    [
        (
            "Conv2D",
            {"filters": 0, "kernel_size": 3},
            "Expected a strictly positive value. Received filters=0",
        ),
        (
            "Conv2D",
            {"filters": 4, "kernel_size": 3, "groups": 0},
            "groups must be a positive integer",
        ),
        (
            "Conv2D",
            {"filters": 6, "kernel_size": 3, "groups": 4},
            "filters must be evenly divisible by the number of groups",
        ),
        (
            "Conv2D",
            {"filters": 4, "kernel_size": 0},
            "`kernel_size` argument must be a tuple of 2 integers",
        ),
        ("Conv2D", {"filters": 4, "kernel_size": (3, 3, 3)}, "tuple of 2 integers"),
        (
            "Conv1D",
            {"filters": 4, "kernel_size": 3, "strides": 0},
            "`strides` argument must be a tuple of 1 integers",
        ),
        (
            "Conv2D",
            {"filters": 4, "kernel_size": 3, "padding": "full"},
            "The `padding` argument must be one of",
        ),
        ("Conv2D", {"filters": 4, "kernel_size": 3, "padding": "causal"}, "Received: 'causal'"),
        (
            "Conv2D",
            {"filters": 4, "kernel_size": 3, "data_format": "channels_middle"},
            "Received: data_format=channels_middle",
        ),
        (
            "Conv2D",
            {"filters": 4, "kernel_size": 3, "strides": 2, "dilation_rate": 2},
            "`strides > 1` not supported in conjunction with `dilation_rate > 1`",
        ),
        (
            "Conv2D",
            {"filters": 4, "kernel_size": 3, "activation": "gelu"},
            "Could not interpret activation function identifier: 'gelu'",
        ),
        ("Conv1D", {"filters": 4, "kernel_size": 3, "dora_rank": 2}, "dora_rank=2"),
    ],
)
def test_constructor_errors(cls, kwargs, message):
    with pytest.raises((ValueError, NotImplementedError), match=re.escape(message)):
        getattr(layers, cls)(**kwargs)


def test_input_errors():
    with pytest.raises(ValueError, match=re.escape("input has 3 channels")):
        layers.Conv2D(4, 3, groups=2)(np.ones((1, 5, 5, 3), np.float32))
    with pytest.raises(ValueError, match="expected min_ndim=4, found ndim=3"):
        layers.Conv2D(4, 3)(np.ones((1, 5, 3), np.float32))
    with pytest.raises(ValueError, match="Kernel shape must have the same length as input"):
        layers.Conv1D(4, 3)(np.ones((1, 5, 5, 3), np.float32))
    with pytest.raises(ValueError, match="Computed output size would be negative"):
        layers.Conv1D(4, 5)(onnxbn.Input(shape=(3, 2)))
    with pytest.raises(ValueError, match="must be defined"):
        layers.Conv1D(4, 3, data_format="channels_first")(onnxbn.Input(shape=(None, 8)))
    layer = layers.Conv1D(2, 3)
    layer(np.ones((1, 5, 3), np.float32))
    with pytest.raises(ValueError, match="expected axis -1 of input shape to have value 3"):
        layer(np.ones((1, 5, 4), np.float32))
