"""Keras 3 constraints: projections against float64 formulas, configs, errors."""

from __future__ import annotations

import json
import re

import ml_dtypes
import numpy as np
import pytest

from onnxbn import constraints
from onnxbn.constraints import MaxNorm, MinMaxNorm, NonNeg, UnitNorm
from onnxbn.dtypes import standardize_dtype
from onnxbn.lowering.constraints import lower_constraint
from onnxbn.lowering.context import LoweringContext
from tests.keras_fixtures import keras_envelopes
from tests.lowering.standalone_graph import model, run

EPS = 1e-7  # keras.config.epsilon()


def test_keras_fixtures_round_trip():
    envelopes = keras_envelopes("keras.constraints")
    assert {e["class_name"] for e in envelopes} >= {"NonNeg", "MaxNorm"}
    for envelope in envelopes:
        assert constraints.serialize(constraints.deserialize(envelope)) == envelope


def _norms(w, axis):
    axes = tuple(axis) if isinstance(axis, list) else (axis,)
    w = np.asarray(w, dtype=np.float64)
    return np.sqrt((w * w).sum(axis=axes, keepdims=True))


def _max_norm(w, max_value, axis):
    n = _norms(w, axis)
    return w * (np.minimum(n, max_value) / (EPS + n))


def _unit_norm(w, axis):
    return w / (EPS + _norms(w, axis))


def _min_max_norm(w, lo, hi, rate, axis):
    n = _norms(w, axis)
    desired = rate * np.minimum(np.maximum(n, lo), hi) + (1 - rate) * n
    return w * desired / (EPS + n)


W = np.random.default_rng(7).standard_normal((4, 3, 5)) * 2.0
CASES = [
    (NonNeg(), lambda w: np.where(w > 0, w, 0.0)),
    (MaxNorm(), lambda w: _max_norm(w, 2.0, 0)),
    (MaxNorm(1.5, axis=-1), lambda w: _max_norm(w, 1.5, -1)),
    (MaxNorm(0.5, axis=[0, 1]), lambda w: _max_norm(w, 0.5, [0, 1])),
    (MaxNorm(100.0), lambda w: _max_norm(w, 100.0, 0)),
    (UnitNorm(), lambda w: _unit_norm(w, 0)),
    (UnitNorm(axis=(1, 2)), lambda w: _unit_norm(w, [1, 2])),
    (MinMaxNorm(), lambda w: _min_max_norm(w, 0.0, 1.0, 1.0, 0)),
    (MinMaxNorm(2.0, 3.0, 0.5, 1), lambda w: _min_max_norm(w, 2.0, 3.0, 0.5, 1)),
    (MinMaxNorm(0.1, 0.2, 0.0, -1), lambda w: _min_max_norm(w, 0.1, 0.2, 0.0, -1)),
]


@pytest.mark.parametrize(("constraint", "formula"), CASES, ids=repr)
def test_projection_matches_float64_formula(constraint, formula):
    result = constraint(W)
    assert result.dtype == np.float64
    np.testing.assert_allclose(result, formula(W), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize(
    ("dtype", "rtol"),
    [("float16", 1e-3), ("bfloat16", 1e-2), ("float32", 1e-6)],
)
@pytest.mark.parametrize(("constraint", "formula"), CASES, ids=repr)
def test_projection_keeps_float_dtype(constraint, formula, dtype, rtol):
    np_dtype = np.dtype(ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype)
    w = W.astype(np_dtype)
    result = constraint(w)
    assert result.dtype == np_dtype
    expected = formula(w.astype(np.float64))
    np.testing.assert_allclose(result.astype(np.float64), expected, rtol=rtol, atol=rtol)


def test_projection_results():
    # Norms after projection, checked directly.
    assert np.all(_norms(MaxNorm(1.5, axis=-1)(W), -1) <= 1.5 + 1e-9)
    np.testing.assert_allclose(_norms(UnitNorm()(W), 0), 1.0, rtol=1e-6)
    norms = _norms(MinMaxNorm(2.0, 3.0, 1.0, 1)(W), 1)
    assert np.all((norms >= 2.0 - 1e-6) & (norms <= 3.0 + 1e-6))
    assert np.all(NonNeg()(W) >= 0)


def test_integer_and_list_weights():
    assert NonNeg()(np.array([-2, 3], dtype=np.int32)).dtype == np.int32
    np.testing.assert_array_equal(NonNeg()([-1.0, 2.0]), [0.0, 2.0])
    result = UnitNorm()(np.array([[3, 0], [4, 0]], dtype=np.int64))
    assert result.dtype == np.float32  # as Keras's ops.sqrt of an int tensor
    np.testing.assert_allclose(result, [[0.6, 0.0], [0.8, 0.0]], rtol=1e-6)


@pytest.mark.parametrize(
    ("obj", "config"),
    [
        (NonNeg(), {}),
        (MaxNorm(), {"max_value": 2, "axis": 0}),
        (MaxNorm(2.0, 0), {"max_value": 2.0, "axis": 0}),
        (MaxNorm(3, axis=(0, 1)), {"max_value": 3, "axis": [0, 1]}),
        (UnitNorm(), {"axis": 0}),
        (UnitNorm(-1), {"axis": -1}),
        (
            MinMaxNorm(),
            {"min_value": 0.0, "max_value": 1.0, "rate": 1.0, "axis": 0},
        ),
    ],
)
def test_configs_match_keras(obj, config):
    assert obj.get_config() == config
    envelope = constraints.serialize(obj)
    assert envelope == {
        "module": "keras.constraints",
        "class_name": type(obj).__name__,
        "config": config,
        "registered_name": None,
    }
    assert json.loads(json.dumps(envelope)) == envelope
    assert constraints.deserialize(envelope).get_config() == config
    returned = obj.get_config()
    if isinstance(returned.get("axis"), list):
        returned["axis"].append(9)
    assert obj.get_config() == config  # a config never aliases the object's lists


@pytest.mark.parametrize(
    ("identifier", "cls"),
    [
        ("non_neg", NonNeg),
        ("NonNeg", NonNeg),
        ("max_norm", MaxNorm),
        ("MaxNorm", MaxNorm),
        ("unit_norm", UnitNorm),
        ("UnitNorm", UnitNorm),
        ("min_max_norm", MinMaxNorm),
        ("MinMaxNorm", MinMaxNorm),
        ({"class_name": "MaxNorm", "config": {"max_value": 3}}, MaxNorm),
    ],
)
def test_get(identifier, cls):
    assert type(constraints.get(identifier)) is cls


def test_get_passes_instances_and_callables_through():
    c = MaxNorm(3.0)
    assert constraints.get(c) is c
    assert constraints.get(None) is None
    assert type(constraints.get(UnitNorm)) is UnitNorm

    def custom(w):
        return w

    assert constraints.get(custom) is custom
    with pytest.raises(TypeError, match="5 of type int"):
        constraints.get(5)
    with pytest.raises(ValueError, match="'nonneg'"):
        constraints.get("nonneg")


@pytest.mark.parametrize(
    ("make", "error", "fragment"),
    [
        (lambda: MaxNorm(-1.0), ValueError, "max_value=-1.0"),
        (lambda: MaxNorm(float("nan")), ValueError, "max_value=nan"),
        (lambda: MaxNorm("2"), TypeError, "max_value='2'"),
        (lambda: MaxNorm(axis=1.0), TypeError, "axis=1.0"),
        (lambda: MaxNorm(axis=True), TypeError, "axis=True"),
        (lambda: MaxNorm(axis=None), TypeError, "axis=None"),
        (lambda: UnitNorm(axis=[0, "1"]), TypeError, "axis='1'"),
        (lambda: UnitNorm(axis=[0, 0]), ValueError, "axis=[0, 0]"),
        (lambda: MinMaxNorm(2.0, 1.0), ValueError, "min_value=2.0, max_value=1.0"),
        (lambda: MinMaxNorm(rate=1.5), ValueError, "rate=1.5"),
        (lambda: MinMaxNorm(rate=-0.1), ValueError, "rate=-0.1"),
        (lambda: MinMaxNorm(min_value=-1.0), ValueError, "min_value=-1.0"),
    ],
)
def test_constructor_errors(make, error, fragment):
    with pytest.raises(error, match=re.escape(fragment)):
        make()


@pytest.mark.parametrize(
    ("call", "error", "fragment"),
    [
        (lambda: MaxNorm(axis=3)(W), ValueError, "axis 3"),
        (lambda: UnitNorm(axis=[0, -4])(W), ValueError, "[0, -4]"),
        (lambda: MaxNorm()(np.float32(2.0)), ValueError, "rank 0"),
        (lambda: NonNeg()("abc"), TypeError, "'abc'"),
        (lambda: MaxNorm()([[1.0], [1.0, 2.0]]), TypeError, "numeric"),
    ],
)
def test_call_errors(call, error, fragment):
    with pytest.raises(error, match=re.escape(fragment)):
        call()


def test_deserialize_errors():
    with pytest.raises(ValueError, match=r"'maxvalue'.*\['axis', 'max_value'\]"):
        constraints.deserialize({"class_name": "MaxNorm", "config": {"maxvalue": 1}})
    with pytest.raises(ValueError, match="'keras.regularizers'"):
        constraints.deserialize(
            {"module": "keras.regularizers", "class_name": "NonNeg", "config": {}}
        )
    with pytest.raises(TypeError, match="of type tuple"):
        constraints.deserialize(("NonNeg",))


# -- ONNX lowering: the same formulas on runtimes ----------------------------------


def _lowered(constraint, w, opset=18):
    ctx = LoweringContext(opset)
    value = ctx.add_input("w", standardize_dtype(w.dtype), list(w.shape))
    projected = lower_constraint(ctx, constraint, value)
    return model(ctx, [projected]), projected.name


LOWERING_RTOL = {"float16": 1e-3, "bfloat16": 1e-2, "float32": 2e-6, "float64": 1e-12}


@pytest.mark.parametrize("runtime", ["onnxruntime", "onnxbn.reference"])
@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
@pytest.mark.parametrize(("constraint", "formula"), CASES, ids=repr)
def test_lowering_matches_float64_formula(constraint, formula, dtype, runtime):
    w = W.astype(dtype)
    proto, name = _lowered(constraint, w)
    (result,) = run(runtime, proto, {"w": w}).values()
    assert result.dtype == w.dtype and result.shape == w.shape
    rtol = LOWERING_RTOL[dtype]
    np.testing.assert_allclose(result.astype(np.float64), formula(w.astype(np.float64)),
                               rtol=rtol, atol=rtol)  # fmt: skip


def test_lowering_is_portable_and_keeps_nan():
    w = np.array([[np.nan, -1.0], [2.0, -3.0]], np.float32)
    for opset in (15, 21):
        proto, _ = _lowered(NonNeg(), w, opset)
        (result,) = run("onnxruntime", proto, {"w": w}).values()
        np.testing.assert_array_equal(result, [[np.nan, 0.0], [2.0, 0.0]])
        proto, _ = _lowered(MinMaxNorm(0.5, 1.0, 0.5, axis=[0, 1]), w, opset)
        assert not {n.op_type for n in proto.graph.node} & {"Max", "Min", "Clip"}
        (result,) = run("onnxbn.reference", proto, {"w": w}).values()
        assert np.isnan(result).all()  # the NaN entry's norm is NaN, as eagerly


def test_lowering_errors():
    ctx = LoweringContext(18)
    w = ctx.add_input("w", "float32", [3, 2])
    assert lower_constraint(ctx, None, w) is w
    assert lower_constraint(ctx, constraints.Constraint(), w) is w
    with pytest.raises(ValueError, match="Constraint axis 2 is out of range"):
        lower_constraint(ctx, MaxNorm(axis=2), w)

    class Clipped(MaxNorm):
        def __call__(self, w):
            return np.clip(w, -1, 1)

    for custom in (lambda x: x, Clipped()):
        with pytest.raises(TypeError, match="Cannot export the constraint"):
            lower_constraint(ctx, custom, w)
