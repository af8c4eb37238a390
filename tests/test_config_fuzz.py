"""Configs are data: arbitrary JSON-like values into every config reader.

Only `ValueError` or `TypeError` (or `NotImplementedError` for a documented
unsupported feature) may come out, and nothing may be imported while a config is
read: `builtins.__import__` is watched during each call.
"""

from __future__ import annotations

import builtins
import contextlib
import copy
import json
import sys
from pathlib import Path

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, given, settings

import onnxbn
from onnxbn import layers
from onnxbn.operation_registry import LAYERS

FIXTURES = Path(__file__).parent / "fixtures" / "keras"
ALLOWED = (ValueError, TypeError, NotImplementedError)

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats() | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
BN_KEYS = list(json.loads((FIXTURES / "default.json").read_text())["get_config"])
CLASS_NAMES = sorted(name for name, _ in LAYERS.items()) + ["Lambda", "Functional", "os.system"]


@contextlib.contextmanager
def no_imports():
    """Fails if a module outside onnxbn is imported inside the block."""
    real_import = builtins.__import__
    seen = []

    def watching(name, globals=None, locals=None, fromlist=(), level=0):
        # onnxbn's own lazily imported modules are code, not something a config chose.
        if name not in sys.modules and not name.startswith("onnxbn"):
            seen.append(name)
        return real_import(name, globals, locals, fromlist, level)

    builtins.__import__ = watching
    try:
        yield seen
    finally:
        builtins.__import__ = real_import
    assert not seen, f"reading a config imported {seen}"


def read(fn, value):
    with no_imports():
        try:
            fn(value)
        except ALLOWED:
            pass


@st.composite
def bn_configs(draw):
    base = json.loads((FIXTURES / draw(st.sampled_from(
        ["default.json", "regularizers_constraints.json", "mixed_float16.json"]
    ))).read_text())["get_config"]  # fmt: skip
    for key in draw(st.lists(st.sampled_from(BN_KEYS + ["extra"]), max_size=3)):
        base[key] = draw(JSON)
    return base


@st.composite
def envelopes(draw):
    envelope = {
        "class_name": draw(st.sampled_from(CLASS_NAMES) | st.text(max_size=8)),
        "config": draw(bn_configs() | JSON),
    }
    if draw(st.booleans()):
        envelope["module"] = draw(st.sampled_from(["keras.layers", "os", "builtins"]) | JSON)
    if draw(st.booleans()):
        envelope["registered_name"] = draw(st.none() | JSON)
    if draw(st.booleans()):
        envelope["build_config"] = draw(st.fixed_dictionaries({"input_shape": JSON}) | JSON)
    return envelope


@st.composite
def model_configs(draw):
    name = draw(st.sampled_from(["functional_model.json", "implicit_mask_model.json"]))
    config = copy.deepcopy(json.loads((FIXTURES / name).read_text())["get_config"])
    if draw(st.booleans()):  # a dangling or malformed tensor reference
        layer = draw(st.sampled_from([lay for lay in config["layers"] if lay["inbound_nodes"]]))
        layer["inbound_nodes"][0]["args"][0]["config"]["keras_history"] = draw(JSON)
    for _ in range(draw(st.integers(0, 3))):
        where = draw(st.sampled_from(["top", "layer", "node"]))
        if where == "top":
            config[draw(st.sampled_from(list(config) + ["x"]))] = draw(JSON)
        elif isinstance(config.get("layers"), list) and config["layers"]:
            layer = draw(st.sampled_from(config["layers"]))
            if not isinstance(layer, dict):
                continue
            key = "inbound_nodes" if where == "node" else draw(st.sampled_from(list(layer) + ["x"]))
            layer[key] = draw(JSON)
    return config


FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(bn_configs())
def test_batch_normalization_from_config(config):
    read(layers.BatchNormalization.from_config, config)


@FUZZ
@given(JSON)
def test_batch_normalization_from_arbitrary_json(value):
    read(layers.BatchNormalization.from_config, value)


@FUZZ
@given(envelopes())
def test_layers_deserialize(envelope):
    read(layers.deserialize, envelope)


@FUZZ
@given(model_configs())
def test_model_from_config(config):
    read(onnxbn.Model.from_config, config)


@FUZZ
@given(JSON)
def test_model_from_arbitrary_json(value):
    read(onnxbn.Model.from_config, value)


def test_the_import_watch_works():
    sys.modules.pop("colorsys", None)
    with pytest.raises(AssertionError, match="colorsys"):
        with no_imports():
            import colorsys  # noqa: F401  (a small, silent standard module)
