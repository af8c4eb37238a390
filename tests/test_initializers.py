"""Keras 3 initializers: configs, distributions, seeding, dtypes, errors."""

from __future__ import annotations

import math
import re

import ml_dtypes
import numpy as np
import pytest

from onnxbn import initializers
from onnxbn.initializers import (
    Constant,
    GlorotNormal,
    GlorotUniform,
    HeNormal,
    HeUniform,
    LecunNormal,
    LecunUniform,
    Ones,
    RandomNormal,
    RandomUniform,
    TruncatedNormal,
    VarianceScaling,
    Zeros,
    compute_fans,
)
from tests.keras_fixtures import keras_envelopes

# Stddev of a unit normal truncated to [-2, 2]: sqrt(1 - 4 phi(2) / (2 Phi(2) - 1)).
_PHI2 = math.exp(-2.0) / math.sqrt(2 * math.pi)
TRUNC_STD = math.sqrt(1 - 4 * _PHI2 / math.erf(2 / math.sqrt(2)))
SEED_AXES = {"seed": None, "input_axes": None, "output_axes": None}


def test_keras_fixtures_round_trip():
    envelopes = keras_envelopes("keras.initializers")
    names = {e["class_name"] for e in envelopes}
    assert {"Zeros", "Ones", "Constant", "GlorotUniform", "RandomUniform"} <= names
    for envelope in envelopes:
        assert initializers.serialize(initializers.deserialize(envelope)) == envelope


# Keras 3.15 get_config() of each class with default arguments.
KERAS_DEFAULT_CONFIGS = [
    (Zeros, {}),
    (Ones, {}),
    (Constant, {"value": 0.0}),
    (RandomNormal, {"seed": None, "mean": 0.0, "stddev": 0.05}),
    (TruncatedNormal, {"seed": None, "mean": 0.0, "stddev": 0.05}),
    (RandomUniform, {"seed": None, "minval": -0.05, "maxval": 0.05}),
    (
        VarianceScaling,
        {
            "seed": None,
            "scale": 1.0,
            "mode": "fan_in",
            "distribution": "truncated_normal",
            "input_axes": None,
            "output_axes": None,
        },
    ),
    (GlorotUniform, SEED_AXES),
    (GlorotNormal, SEED_AXES),
    (HeUniform, SEED_AXES),
    (HeNormal, SEED_AXES),
    (LecunUniform, SEED_AXES),
    (LecunNormal, SEED_AXES),
]


@pytest.mark.parametrize(("cls", "config"), KERAS_DEFAULT_CONFIGS)
def test_default_configs_match_keras(cls, config):
    obj = cls()
    assert obj.get_config() == config
    assert initializers.serialize(obj) == {
        "module": "keras.initializers",
        "class_name": cls.__name__,
        "config": config,
        "registered_name": None,
    }


@pytest.mark.parametrize(
    "config",
    [
        {"class_name": "GlorotUniform", "config": {"seed": 7}},  # Keras < 3.12
        {"class_name": "GlorotUniform", "config": {**SEED_AXES, "seed": 7}},
        {
            "class_name": "VarianceScaling",
            "config": {"scale": 2.0, "mode": "fan_out", "distribution": "uniform"},
        },
        {"class_name": "Constant", "config": {"value": 3}},
    ],
)
def test_older_configs_are_accepted_and_round_trip(config):
    obj = initializers.deserialize(config)
    again = initializers.deserialize(initializers.serialize(obj))
    assert again.get_config() == obj.get_config()
    for key, value in config["config"].items():
        assert obj.get_config()[key] == value


@pytest.mark.parametrize(
    ("identifier", "cls"),
    [
        ("zeros", Zeros),
        ("zero", Zeros),
        ("Zeros", Zeros),
        ("ones", Ones),
        ("one", Ones),
        ("constant", Constant),
        ("glorot_uniform", GlorotUniform),
        ("GlorotUniform", GlorotUniform),
        ("glorot_normal", GlorotNormal),
        ("he_normal", HeNormal),
        ("he_uniform", HeUniform),
        ("lecun_normal", LecunNormal),
        ("lecun_uniform", LecunUniform),
        ("random_normal", RandomNormal),
        ("normal", RandomNormal),
        ("random_uniform", RandomUniform),
        ("uniform", RandomUniform),
        ("truncated_normal", TruncatedNormal),
        ("variance_scaling", VarianceScaling),
        ({"class_name": "Ones", "config": {}}, Ones),
    ],
)
def test_get_by_name(identifier, cls):
    assert type(initializers.get(identifier)) is cls


def test_get_passes_instances_and_callables_through():
    init = RandomNormal(seed=1)
    assert initializers.get(init) is init
    assert initializers.get(None) is None
    assert type(initializers.get(HeNormal)) is HeNormal

    def custom(shape, dtype=None):
        return np.full(shape, 4.0)

    assert initializers.get(custom) is custom
    with pytest.raises(TypeError, match="3.0 of type float"):
        initializers.get(3.0)
    with pytest.raises(ValueError, match="'glorot'"):
        initializers.get("glorot")


@pytest.mark.parametrize(
    ("shape", "fans"),
    [
        ((), (1, 1)),
        ((5,), (5, 5)),
        ((3, 7), (3, 7)),
        ((3, 4, 8), (3 * 4, 3 * 8)),
        ((3, 3, 16, 32), (9 * 16, 9 * 32)),
        ((2, 3, 3, 4, 5), (18 * 4, 18 * 5)),
    ],
)
def test_compute_fans(shape, fans):
    assert compute_fans(shape) == fans


def test_compute_fans_with_axes():
    assert compute_fans((2, 3, 5, 7), input_axes=[0, 1], output_axes=[-1]) == (6, 7)
    # Both lists are needed, as in Keras.
    assert compute_fans((2, 3, 5), input_axes=[0]) == (6, 10)
    with pytest.raises(ValueError, match="Axis 4"):
        compute_fans((2, 3), input_axes=[4], output_axes=[0])


N = 100_000


def _stats(cls_or_obj, shape=(N,), seed=1234):
    values = cls_or_obj(shape, "float64")
    assert values.shape == shape
    return values, float(values.mean()), float(values.std())


@pytest.mark.parametrize(("mean", "stddev"), [(0.0, 0.05), (1.0, 2.0)])
def test_random_normal_distribution(mean, stddev):
    values, m, s = _stats(RandomNormal(mean, stddev, seed=3))
    # The standard error of the mean is stddev / sqrt(N) ~ 0.003 * stddev.
    assert abs(m - mean) < 0.015 * stddev
    assert abs(s - stddev) < 0.015 * stddev
    assert values.max() > mean + 3.5 * stddev  # untruncated tails


@pytest.mark.parametrize(("mean", "stddev"), [(0.0, 0.05), (0.5, 2.0)])
def test_truncated_normal_distribution(mean, stddev):
    values, m, s = _stats(TruncatedNormal(mean, stddev, seed=4))
    assert values.min() >= mean - 2 * stddev
    assert values.max() <= mean + 2 * stddev
    assert values.max() > mean + 1.99 * stddev
    assert abs(m - mean) < 0.015 * stddev
    assert abs(s - TRUNC_STD * stddev) < 0.015 * stddev


@pytest.mark.parametrize(("low", "high"), [(-0.05, 0.05), (-1.0, 3.0)])
def test_random_uniform_distribution(low, high):
    values, m, s = _stats(RandomUniform(low, high, seed=5))
    assert values.min() >= low
    assert values.max() < high
    assert values.min() < low + 1e-3 * (high - low)
    assert values.max() > high - 1e-3 * (high - low)
    assert abs(m - (low + high) / 2) < 0.01 * (high - low)
    assert abs(s - (high - low) / math.sqrt(12)) < 0.01 * (high - low)


# (initializer, shape, fan used, scale, distribution)
VARIANCE_CASES = [
    (GlorotUniform(seed=1), (400, 250), (400 + 250) / 2, 1.0, "uniform"),
    (GlorotNormal(seed=2), (400, 250), (400 + 250) / 2, 1.0, "truncated"),
    (HeUniform(seed=3), (3, 3, 64, 200), 9 * 64, 2.0, "uniform"),
    (HeNormal(seed=4), (3, 3, 64, 200), 9 * 64, 2.0, "truncated"),
    (LecunUniform(seed=5), (250, 400), 250, 1.0, "uniform"),
    (LecunNormal(seed=6), (250, 400), 250, 1.0, "truncated"),
    (VarianceScaling(3.0, "fan_out", "untruncated_normal", 7), (500, 200), 200, 3.0, "normal"),
    (VarianceScaling(0.5, "fan_avg", "normal", 8), (2, 5, 100, 100), 1000, 0.5, "truncated"),
    (GlorotUniform(9, input_axes=[0], output_axes=[1, 2]), (1000, 10, 10), 550, 1.0, "uniform"),
    (VarianceScaling(1.0, "fan_in", "uniform", 10), (N,), N, 1.0, "uniform"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("init", "shape", "fan", "scale", "kind"),
    VARIANCE_CASES,
    ids=[type(case[0]).__name__ for case in VARIANCE_CASES],
)
def test_variance_scaling_distributions(init, shape, fan, scale, kind):
    values, m, s = _stats(init, shape)
    target_std = math.sqrt(scale / max(1.0, fan))  # Keras's documented stddev
    assert abs(m) < 0.015 * target_std
    assert abs(s - target_std) < 0.015 * target_std
    if kind == "uniform":
        limit = math.sqrt(3 * scale / fan)
        assert np.abs(values).max() <= limit
        assert np.abs(values).max() > 0.999 * limit
    elif kind == "truncated":
        bound = 2 * target_std / TRUNC_STD
        assert np.abs(values).max() <= bound
        assert np.abs(values).max() > 0.99 * bound
    else:
        assert np.abs(values).max() > 3.5 * target_std


def test_glorot_uniform_limit_formula():
    fan_in, fan_out = 30, 70
    values = GlorotUniform(seed=0)((fan_in, fan_out), "float64")
    limit = math.sqrt(6 / (fan_in + fan_out))
    assert np.abs(values).max() <= limit
    assert np.abs(values).max() > 0.98 * limit


RANDOM_CLASSES = [
    RandomNormal, TruncatedNormal, RandomUniform, VarianceScaling, GlorotUniform,
    GlorotNormal, HeUniform, HeNormal, LecunUniform, LecunNormal,
]  # fmt: skip


@pytest.mark.parametrize("cls", RANDOM_CLASSES)
def test_seeded_initializers_are_reproducible(cls):
    first = cls(seed=42)((20, 30))
    assert np.array_equal(first, cls(seed=42)((20, 30)))
    init = cls(seed=42)
    assert np.array_equal(init((20, 30)), init((20, 30)))
    assert not np.array_equal(first, cls(seed=43)((20, 30)))
    assert np.array_equal(cls(seed=-5)((4,)), cls(seed=-5)((4,)))


@pytest.mark.parametrize("cls", RANDOM_CLASSES)
def test_unseeded_instances_differ_but_each_repeats(cls):
    a, b = cls(), cls()
    assert not np.array_equal(a((20, 30)), b((20, 30)))
    # Keras's contract: an unseeded instance returns the same values per call.
    assert np.array_equal(a((20, 30)), a((20, 30)))
    assert a.get_config()["seed"] is None


@pytest.mark.parametrize(
    ("dtype", "expected"),
    [
        ("float16", np.float16),
        ("bfloat16", ml_dtypes.bfloat16),
        ("float32", np.float32),
        ("float64", np.float64),
        (None, np.float32),
        (np.float16, np.float16),
        (np.dtype(ml_dtypes.bfloat16), ml_dtypes.bfloat16),
    ],
)
@pytest.mark.parametrize(
    "init",
    [Zeros(), Ones(), Constant(2.5), RandomNormal(seed=1), HeUniform(seed=2)],
    ids=lambda i: type(i).__name__,
)
def test_requested_dtype(init, dtype, expected):
    values = init((3, 4), dtype)
    assert values.dtype == np.dtype(expected)
    assert values.shape == (3, 4)


@pytest.mark.parametrize(
    ("init", "expected"),
    [
        (Zeros(), np.zeros((2, 3))),
        (Ones(), np.ones((2, 3))),
        (Constant(2.5), np.full((2, 3), 2.5)),
        (Constant(-3), np.full((2, 3), -3.0)),
    ],
)
def test_constant_values(init, expected):
    np.testing.assert_array_equal(init((2, 3), "float64"), expected)
    np.testing.assert_array_equal(init([2, 3], "float16"), expected.astype(np.float16))


def test_constant_initializers_accept_integer_dtypes():
    assert Ones()((2,), "int32").dtype == np.int32
    np.testing.assert_array_equal(Constant(3)((2,), "int64"), [3, 3])
    assert Zeros()((0, 4)).shape == (0, 4)
    assert Constant(1.5)(()).shape == ()


@pytest.mark.parametrize(
    ("make", "error", "fragment"),
    [
        (lambda: RandomNormal(stddev=-1.0), ValueError, "stddev=-1.0"),
        (lambda: TruncatedNormal(stddev=float("nan")), ValueError, "stddev=nan"),
        (lambda: RandomNormal(mean="0"), TypeError, "mean='0'"),
        (lambda: RandomUniform(minval=1.0, maxval=0.0), ValueError, "minval=1.0"),
        (lambda: RandomUniform(maxval=[1.0]), TypeError, "maxval=[1.0]"),
        (lambda: RandomUniform(-1e308, 1e308), ValueError, "minval=-1e+308"),
        (lambda: VarianceScaling(scale=0.0), ValueError, "scale=0.0"),
        (lambda: VarianceScaling(scale=-2), ValueError, "scale=-2"),
        (lambda: VarianceScaling(mode="fan_mid"), ValueError, "'fan_mid'"),
        (lambda: VarianceScaling(mode="fan_mid"), ValueError, "'fan_avg'"),
        (lambda: VarianceScaling(distribution="cauchy"), ValueError, "'cauchy'"),
        (lambda: VarianceScaling(distribution="cauchy"), ValueError, "'uniform'"),
        (lambda: VarianceScaling(distribution=3), ValueError, "3"),
        (lambda: GlorotUniform(seed="7"), TypeError, "seed='7'"),
        (lambda: GlorotUniform(seed=1.5), TypeError, "seed=1.5"),
        (lambda: HeNormal(seed=True), TypeError, "seed=True"),
        (lambda: RandomNormal(seed={"class_name": "SeedGenerator"}), TypeError, "seed="),
        (lambda: GlorotUniform(input_axes=0, output_axes=[1]), TypeError, "input_axes=0"),
        (lambda: GlorotUniform(input_axes=[0.5], output_axes=[1]), TypeError, "0.5"),
        (lambda: Constant("3"), TypeError, "value='3'"),
        (lambda: Constant([1.0, 2.0]), TypeError, "value=[1.0, 2.0]"),
    ],
)
def test_constructor_errors(make, error, fragment):
    with pytest.raises(error, match=re.escape(fragment)):
        make()


@pytest.mark.parametrize(
    ("call", "error", "fragment"),
    [
        (lambda: Zeros()((2, -1)), ValueError, "(2, -1)"),
        (lambda: Zeros()((2, None)), TypeError, "None"),
        (lambda: Zeros()(3), TypeError, "shape=3"),
        (lambda: Ones()((2.0,)), TypeError, "2.0"),
        (lambda: RandomNormal(seed=1)((2,), "int32"), ValueError, "'int32'"),
        (lambda: RandomNormal(seed=1)((2,), "float8"), TypeError, "'float8'"),
        (lambda: Zeros()((2,), "complex64"), TypeError, "'complex64'"),
        (lambda: Zeros()((2,), object()), TypeError, "object"),
        (lambda: VarianceScaling(1e308, seed=1)((1,)), ValueError, "scale=1e+308"),
        (
            lambda: GlorotUniform(1, input_axes=[3], output_axes=[0])((2, 2)),
            ValueError,
            "Axis 3",
        ),
    ],
)
def test_call_errors(call, error, fragment):
    with pytest.raises(error, match=re.escape(fragment)):
        call()


def test_deserialize_errors():
    with pytest.raises(ValueError, match=r"'stdev'.*'mean', 'seed', 'stddev'"):
        initializers.deserialize({"class_name": "RandomNormal", "config": {"stdev": 1}})
    with pytest.raises(ValueError, match="'keras.layers'"):
        initializers.deserialize({"module": "keras.layers", "class_name": "Zeros", "config": {}})
    with pytest.raises(TypeError, match="of type list"):
        initializers.deserialize(["zeros"])
