"""The Keras envelope reader/writer and the shared config checks."""

from __future__ import annotations

import contextlib
import json
import math
import re

import hypothesis.strategies as st
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

from onnxbn import constraints, initializers, regularizers
from onnxbn.registry import Registry
from onnxbn.serialization import (
    check_config_keys,
    deserialize_object,
    get_object,
    require_choice,
    require_dict,
    require_int,
    require_number,
    serialize_object,
    to_snake_case,
)

# A registry private to these tests, so the generic reader is tested apart
# from the real kinds.
TOYS: Registry[str, type] = Registry("toy")
TOY_MODULES = {"keras.toys", "keras.src.toys"}


@TOYS.register("Scaled")
class Scaled:
    def __init__(self, factor: float = 1.0, name: str = "s") -> None:
        self.factor = require_number(factor, "factor")
        self.name = name

    def get_config(self) -> dict:
        return {"factor": self.factor, "name": self.name}

    @classmethod
    def from_config(cls, config: dict) -> Scaled:
        return cls(**config)


@TOYS.register("Plain")
class Plain:
    def get_config(self) -> dict:
        return {}


@TOYS.register("Open")
class Open:
    """Takes **kwargs: key checking is left to its own from_config."""

    def __init__(self, **kwargs) -> None:
        self.kwargs = kwargs

    @classmethod
    def from_config(cls, config: dict) -> Open:
        return cls(**config)


def toy(identifier, **kwargs):
    return deserialize_object(
        identifier,
        TOYS,
        kind="toy",
        modules=TOY_MODULES,
        aliases={"scaled": "Scaled"},
        **kwargs,
    )


def test_serialize_object_writes_the_keras_envelope():
    assert serialize_object(Scaled(2.5, "a"), "keras.toys") == {
        "module": "keras.toys",
        "class_name": "Scaled",
        "config": {"factor": 2.5, "name": "a"},
        "registered_name": None,
    }


def test_serialize_object_without_get_config_is_a_type_error():
    with pytest.raises(TypeError, match="get_config"):
        serialize_object(object(), "keras.toys")


@pytest.mark.parametrize(
    "identifier",
    [
        {
            "module": "keras.toys",
            "class_name": "Scaled",
            "config": {"factor": 3.0, "name": "x"},
            "registered_name": None,
        },
        {
            "module": "keras.src.toys",
            "class_name": "Scaled",
            "config": {"factor": 3.0, "name": "x"},
        },
        {"class_name": "Scaled", "config": {"factor": 3.0, "name": "x"}},
        {"class_name": "scaled", "config": {"factor": 3.0, "name": "x"}},
        {
            "module": "keras.toys",
            "class_name": "Scaled",
            "config": {"factor": 3.0, "name": "x"},
            "registered_name": "Scaled",
            "build_config": {"input_shape": [None, 3]},
        },
    ],
)
def test_deserialize_accepted_forms(identifier):
    obj = toy(identifier)
    assert isinstance(obj, Scaled)
    assert (obj.factor, obj.name) == (3.0, "x")


@pytest.mark.parametrize("name", ["Scaled", "scaled"])
def test_deserialize_a_name_uses_the_defaults(name):
    obj = toy(name)
    assert isinstance(obj, Scaled)
    assert obj.get_config() == {"factor": 1.0, "name": "s"}


@pytest.mark.parametrize(
    "identifier",
    [{"class_name": "Plain"}, {"class_name": "Plain", "config": None}],
)
def test_missing_or_null_config_means_empty(identifier):
    assert isinstance(toy(identifier), Plain)


def test_none_is_returned_as_none():
    assert toy(None) is None


def test_open_classes_check_their_own_keys():
    assert toy({"class_name": "Open", "config": {"anything": 1}}).kwargs == {"anything": 1}


@pytest.mark.parametrize(
    ("identifier", "error", "fragments"),
    [
        (
            {"module": "os", "class_name": "Scaled", "config": {}},
            ValueError,
            ["'os'", "keras.toys"],
        ),
        (
            {"module": None, "class_name": "Scaled", "config": {}},
            ValueError,
            ["None", "keras.src.toys"],
        ),
        (
            {"module": "keras.toys", "class_name": "Nope", "config": {}},
            ValueError,
            ["'Nope'", "Plain", "Scaled", "scaled"],
        ),
        ("Nope", ValueError, ["'Nope'", "Scaled"]),
        (
            {"class_name": "Scaled", "config": {}, "registered_name": "pkg>Scaled"},
            ValueError,
            ["'pkg>Scaled'", "'Scaled'"],
        ),
        (
            {"class_name": "Scaled", "config": {"factr": 1.0}},
            ValueError,
            ["'factr'", "factor", "name"],
        ),
        ({"class_name": "Scaled", "config": {"factor": [1.0]}}, TypeError, ["[1.0]"]),
        ({"class_name": "Scaled", "config": [1.0]}, TypeError, ["[1.0]", "dict"]),
        ({"config": {}}, ValueError, ["class_name"]),
        ({"class_name": 3, "config": {}}, TypeError, ["3", "str"]),
        (
            {"class_name": "Scaled", "config": {}, "modul": "keras.toys"},
            ValueError,
            ["'modul'", "registered_name"],
        ),
        (3.5, TypeError, ["3.5", "float", "dict"]),
        ([{"class_name": "Scaled"}], TypeError, ["list"]),
    ],
)
def test_deserialize_errors_name_the_bad_value(identifier, error, fragments):
    with pytest.raises(error) as info:
        toy(identifier)
    for fragment in fragments:
        assert fragment in str(info.value)


def test_custom_objects_take_priority_and_skip_the_module_check():
    class Mine(Scaled):
        pass

    def my_function(x):
        return x

    custom = {"Scaled": Mine, "pkg>Fn": my_function}
    envelope = {"module": "my.code", "class_name": "Scaled", "config": {"factor": 2}}
    assert type(toy(envelope, custom_objects=custom)) is Mine
    fn = {"class_name": "Fn", "config": {}, "registered_name": "pkg>Fn"}
    assert toy(fn, custom_objects=custom) is my_function
    with pytest.raises(ValueError, match="function"):
        toy(
            {"class_name": "Fn", "config": {"a": 1}, "registered_name": "pkg>Fn"},
            custom_objects=custom,
        )


def test_leaked_lookup_errors_become_value_errors():
    class Fragile(Plain):
        def __init__(self, index: int = 0) -> None:
            [][index]

    registry = Registry("fragile")
    registry.add("Fragile", Fragile)
    with pytest.raises(ValueError, match="Fragile"):
        deserialize_object(
            {"class_name": "Fragile", "config": {"index": 3}},
            registry,
            kind="fragile",
            modules=set(),
        )


def test_check_config_keys_and_require_dict():
    check_config_keys({"a": 1}, {"a", "b"}, "Owner")
    with pytest.raises(ValueError, match=r"Owner: 'c'.*\['a', 'b'\]"):
        check_config_keys({"a": 1, "c": 2}, ["a", "b"], "Owner")
    assert require_dict({}, "x") == {}
    with pytest.raises(TypeError, match=r"the config.*\[1\] of type list"):
        require_dict([1], "the config")


@pytest.mark.parametrize(
    ("value", "kwargs", "expected"),
    [
        (1, {}, 1),
        (2.5, {}, 2.5),
        (np.float32(0.5), {}, 0.5),
        (np.int64(7), {"minimum": 0}, 7),
        (0.0, {"minimum": 0}, 0.0),
        (math.inf, {"finite": False}, math.inf),
    ],
)
def test_require_number_accepts(value, kwargs, expected):
    result = require_number(value, "v", **kwargs)
    assert result == expected
    assert type(result) is type(expected)


@pytest.mark.parametrize(
    ("value", "kwargs", "error", "fragment"),
    [
        ("1.0", {}, TypeError, "v='1.0'"),
        (True, {}, TypeError, "v=True"),
        (None, {}, TypeError, "v=None"),
        ([1.0], {}, TypeError, "v=[1.0]"),
        (math.nan, {}, ValueError, "v=nan"),
        (math.nan, {"finite": False}, ValueError, "v=nan"),
        (-math.inf, {}, ValueError, "v=-inf"),
        (-0.5, {"minimum": 0}, ValueError, "v=-0.5"),
        (0, {"minimum": 0, "strict": True}, ValueError, "v=0"),
        (10**400, {}, ValueError, "float64 range"),
    ],
)
def test_require_number_rejects(value, kwargs, error, fragment):
    with pytest.raises(error, match=re.escape(fragment)):
        require_number(value, "v", **kwargs)


def test_require_int_and_choice():
    assert require_int(np.int32(3), "n") == 3
    assert require_int(None, "n", allow_none=True) is None
    for bad in (True, 1.0, "1", None):
        with pytest.raises(TypeError, match="n="):
            require_int(bad, "n")
    assert require_choice("a", "mode", ("a", "b")) == "a"
    with pytest.raises(ValueError, match=r"'c'.*\['a', 'b'\]"):
        require_choice("c", "mode", ("b", "a"))


@pytest.mark.parametrize(
    ("name", "snake"),
    [
        ("GlorotUniform", "glorot_uniform"),
        ("L1L2", "l1l2"),
        ("L2", "l2"),
        ("MinMaxNorm", "min_max_norm"),
        ("NonNeg", "non_neg"),
        ("OrthogonalRegularizer", "orthogonal_regularizer"),
    ],
)
def test_to_snake_case_matches_keras(name, snake):
    assert to_snake_case(name) == snake


def test_get_object_dispatch():
    def deserialize(x):
        return ("deserialized", x)

    instance = Scaled()

    def fn(x):
        return x

    assert get_object(None, Scaled, deserialize, "toy") is None
    assert get_object(instance, Scaled, deserialize, "toy") is instance
    assert get_object("a", Scaled, deserialize, "toy") == ("deserialized", "a")
    assert isinstance(get_object(Scaled, Scaled, deserialize, "toy"), Scaled)
    assert get_object(fn, Scaled, deserialize, "toy") is fn
    for bad in (3, Plain, [1]):
        with pytest.raises(TypeError, match="toy identifier"):
            get_object(bad, Scaled, deserialize, "toy")


# Anything JSON can hold, and envelopes of real class names with fuzzed
# configs (so constructors see wrong-typed values, not just unknown names).
JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
KINDS = {
    "initializer": (initializers, initializers.INITIALIZERS),
    "regularizer": (regularizers, regularizers.REGULARIZERS),
    "constraint": (constraints, constraints.CONSTRAINTS),
}
CONFIG_KEYS = [
    "value", "mean", "stddev", "seed", "minval", "maxval", "scale", "mode",
    "distribution", "input_axes", "output_axes", "l1", "l2", "factor",
    "max_value", "min_value", "rate", "axis",
]  # fmt: skip


def _names(kind):
    module, registry = KINDS[kind]
    return sorted(set(registry) | set(module.ALIASES))


@st.composite
def envelopes(draw, kind):
    module, _ = KINDS[kind]
    envelope = {
        "class_name": draw(st.sampled_from(_names(kind))),
        "config": draw(st.dictionaries(st.sampled_from(CONFIG_KEYS), JSON, max_size=4)),
    }
    if draw(st.booleans()):
        envelope["module"] = draw(st.sampled_from(sorted(module.MODULES)) | JSON)
    if draw(st.booleans()):
        envelope["registered_name"] = draw(st.none() | JSON)
    return envelope


@pytest.mark.parametrize("kind", sorted(KINDS))
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_deserialize_raises_only_value_or_type_errors(kind, data):
    module, _ = KINDS[kind]
    identifier = data.draw(JSON | envelopes(kind) | st.sampled_from(_names(kind)))
    try:
        obj = module.deserialize(identifier)
    except (ValueError, TypeError):
        return
    if obj is not None:
        # Whatever was accepted must serialize and read back the same.
        again = module.deserialize(module.serialize(obj))
        dump = json.dumps(obj.get_config(), sort_keys=True)
        assert json.dumps(again.get_config(), sort_keys=True) == dump
        # And using it fails only with ValueError/TypeError (e.g. bad axes).
        with contextlib.suppress(ValueError, TypeError), np.errstate(all="ignore"):
            if kind == "initializer":
                obj((3, 4), "float32")
            else:
                obj(np.arange(12.0).reshape(3, 4))
