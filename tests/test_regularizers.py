"""Keras 3 regularizers: penalties against float64 formulas, configs, errors."""

from __future__ import annotations

import math
import re

import ml_dtypes
import numpy as np
import pytest

from onnxbn import regularizers
from onnxbn.dtypes import standardize_dtype
from onnxbn.lowering.context import LoweringContext
from onnxbn.lowering.regularizers import lower_regularizer
from onnxbn.regularizers import L1, L1L2, L2, OrthogonalRegularizer
from tests.keras_fixtures import keras_envelopes
from tests.lowering.standalone_graph import model, run


def test_keras_fixtures_round_trip():
    envelopes = keras_envelopes("keras.regularizers")
    assert {e["class_name"] for e in envelopes} >= {"L2", "L1L2"}
    for envelope in envelopes:
        assert regularizers.serialize(regularizers.deserialize(envelope)) == envelope


def _weights(dtype: str, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((7, 5)) * 3).astype(
        ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype
    )


def _l1(x):
    return float(np.sum(np.abs(np.asarray(x, dtype=np.float64))))


def _l2(x):
    return float(np.sum(np.asarray(x, dtype=np.float64) ** 2))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
@pytest.mark.parametrize(
    ("regularizer", "formula"),
    [
        (L1(0.3), lambda x: 0.3 * _l1(x)),
        (L2(0.1), lambda x: 0.1 * _l2(x)),
        (L1L2(0.01, 0.2), lambda x: 0.01 * _l1(x) + 0.2 * _l2(x)),
        (L1L2(l2=0.5), lambda x: 0.5 * _l2(x)),
        (L1L2(l1=0.5), lambda x: 0.5 * _l1(x)),
        (L1L2(), lambda x: 0.0),
    ],
    ids=repr,
)
def test_penalties_match_float64_formulas(regularizer, formula, dtype):
    x = _weights(dtype)
    penalty = regularizer(x)
    assert isinstance(penalty, np.float64)
    assert penalty == pytest.approx(formula(x), rel=1e-12, abs=1e-300)


def test_python_lists_and_integer_weights():
    assert L2(0.5)([[1, 2], [3, 4]]) == 0.5 * 30
    assert L1(2.0)(np.array([-1, 2, -3], dtype=np.int32)) == 12.0


def test_zero_factor_skips_its_term_like_keras():
    x = np.array([np.inf, 1.0])
    assert L1L2(l2=0.1)(x) == np.inf  # the absent L1 term does not give NaN
    assert L1L2()(x) == 0.0


def test_orthogonal_regularizer_matches_formula():
    x = np.random.default_rng(1).standard_normal((4, 6))
    for mode, vectors in (("rows", x), ("columns", x.T)):
        unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
        gram = unit @ unit.T
        n = len(vectors)
        off_diagonal = np.abs(gram).sum() - np.abs(np.diag(gram)).sum()
        expected = 0.2 * 0.5 * off_diagonal / (n * (n - 1) / 2)
        assert OrthogonalRegularizer(0.2, mode)(x) == pytest.approx(expected)
    orthonormal = np.eye(3)
    assert OrthogonalRegularizer(1.0)(orthonormal) == 0.0


def test_orthogonal_regularizer_errors():
    with pytest.raises(ValueError, match=r"inputs.shape=\(6,\)"):
        OrthogonalRegularizer()(np.ones(6))
    with pytest.raises(ValueError, match=r"inputs.shape=\(1, 3\)"):
        OrthogonalRegularizer(mode="rows")(np.ones((1, 3)))
    with pytest.raises(ValueError, match="'diagonal'"):
        OrthogonalRegularizer(mode="diagonal")


@pytest.mark.parametrize(
    ("obj", "config"),
    [
        (L1(), {"l1": 0.01}),
        (L2(), {"l2": 0.01}),
        (L1L2(), {"l1": 0.0, "l2": 0.0}),
        (L1(None), {"l1": 0.01}),
        (L2(None), {"l2": 0.01}),
        (L1L2(None, None), {"l1": 0.0, "l2": 0.0}),
        (L2(1), {"l2": 1.0}),
        (L1L2(np.float32(0.5), 2), {"l1": 0.5, "l2": 2.0}),
        (OrthogonalRegularizer(), {"factor": 0.01, "mode": "rows"}),
    ],
)
def test_configs_hold_plain_python_floats(obj, config):
    assert obj.get_config() == config
    assert all(type(v) in (float, str) for v in obj.get_config().values())
    envelope = regularizers.serialize(obj)
    assert envelope == {
        "module": "keras.regularizers",
        "class_name": type(obj).__name__,
        "config": config,
        "registered_name": None,
    }
    assert regularizers.deserialize(envelope).get_config() == config


@pytest.mark.parametrize(
    ("identifier", "cls", "config"),
    [
        ("l1", L1, {"l1": 0.01}),
        ("L1", L1, {"l1": 0.01}),
        ("l2", L2, {"l2": 0.01}),
        ("L2", L2, {"l2": 0.01}),
        ("l1l2", L1L2, {"l1": 0.0, "l2": 0.0}),
        ("L1L2", L1L2, {"l1": 0.0, "l2": 0.0}),
        ("l1_l2", L1L2, {"l1": 0.01, "l2": 0.01}),
        ("orthogonal_regularizer", OrthogonalRegularizer, {"factor": 0.01, "mode": "rows"}),
        ({"class_name": "L2", "config": {"l2": 0.3}}, L2, {"l2": 0.3}),
    ],
)
def test_get(identifier, cls, config):
    obj = regularizers.get(identifier)
    assert type(obj) is cls
    assert obj.get_config() == config


def test_get_passes_instances_and_callables_through():
    reg = L2(0.2)
    assert regularizers.get(reg) is reg
    assert regularizers.get(None) is None
    assert type(regularizers.get(L1)) is L1

    def custom(x):
        return 0.0

    assert regularizers.get(custom) is custom
    with pytest.raises(TypeError, match="0.1 of type float"):
        regularizers.get(0.1)
    with pytest.raises(ValueError, match="'l3'"):
        regularizers.get("l3")


@pytest.mark.parametrize(
    ("make", "fragment"),
    [
        (lambda: L2(-0.01), "l2=-0.01"),
        (lambda: L1(float("nan")), "l1=nan"),
        (lambda: L1L2(l1=float("inf")), "l1=inf"),
        (lambda: L1L2(l2=-1), "l2=-1"),
        (lambda: L2("0.1"), "l2='0.1'"),
        (lambda: L2([0.1]), "l2=[0.1]"),
        (lambda: L1(True), "l1=True"),
        (lambda: L1(10**400), "l1="),
        (lambda: OrthogonalRegularizer(factor=-1.0), "factor=-1.0"),
    ],
)
def test_bad_factors_raise_value_error_like_keras(make, fragment):
    with pytest.raises(ValueError, match=re.escape(fragment)) as info:
        make()
    assert "expected a non-negative float" in str(info.value)


@pytest.mark.parametrize("x", ["abc", [[1.0], [1.0, 2.0]], object(), {"a": 1}])
def test_non_numeric_weights_are_a_type_error(x):
    with pytest.raises(TypeError, match="numeric array"):
        L2()(x)


def test_deserialize_errors():
    with pytest.raises(ValueError, match=r"'l3'.*\['l2'\]"):
        regularizers.deserialize({"class_name": "L2", "config": {"l3": 0.1}})
    with pytest.raises(ValueError, match="l2=-0.5"):
        regularizers.deserialize(
            {"module": "keras.regularizers", "class_name": "L2", "config": {"l2": -0.5}}
        )
    with pytest.raises(ValueError, match="'keras.initializers'"):
        regularizers.deserialize({"module": "keras.initializers", "class_name": "L2", "config": {}})
    with pytest.raises(TypeError, match="of type int"):
        regularizers.deserialize(2)
    assert math.isclose(
        regularizers.deserialize({"class_name": "L1", "config": {"l1": 1}})([-2.0]), 2.0
    )


def _central_differences(penalty, x, step=1e-6):
    grad = np.zeros_like(x)
    for index in np.ndindex(x.shape):
        up, down = x.copy(), x.copy()
        up[index] += step
        down[index] -= step
        grad[index] = (penalty(up) - penalty(down)) / (2 * step)
    return grad


@pytest.mark.parametrize(
    "regularizer",
    [
        L1(0.3),
        L2(0.1),
        L1L2(0.01, 0.2),
        L1L2(l2=0.5),
        L1L2(l1=0.5),
        L1L2(),
        OrthogonalRegularizer(0.2, "rows"),
        OrthogonalRegularizer(0.7, "columns"),
    ],
    ids=repr,
)
def test_gradient_matches_central_differences(regularizer):
    # Entries kept away from 0, so no finite difference straddles |x|'s kink.
    x = _weights("float64", seed=3)
    x = np.where(np.abs(x) < 0.1, 0.5, x)
    grad = regularizer.gradient(x)
    assert grad.dtype == np.float64 and grad.shape == x.shape
    expected = _central_differences(regularizer, x)
    np.testing.assert_allclose(grad, expected, rtol=1e-6, atol=1e-9)
    if isinstance(regularizer, OrthogonalRegularizer) or regularizer(x) == 0:
        return
    assert np.any(grad != 0)


def test_gradient_at_kinks_and_of_other_dtypes():
    assert np.array_equal(L1(2.0).gradient([-3, 0, 4]), [-2.0, 0.0, 2.0])
    assert np.array_equal(L1L2(1.0, 1.0).gradient(np.zeros(2, np.float16)), [0.0, 0.0])
    assert L2(0.5).gradient(np.float32([1.5])).dtype == np.float64


def test_orthogonal_gradient_of_a_near_zero_row_is_capped_like_the_penalty():
    # A row with inverse norm above 1/epsilon is scaled by the constant cap,
    # so its gradient is the cap times the gradient of the normalized row.
    x = np.array([[1e-9, 2e-9, -1e-9], [1.0, 0.5, -0.3], [0.2, -1.0, 0.4]])
    regularizer = OrthogonalRegularizer(0.5)
    expected = _central_differences(regularizer, x, step=1e-12)
    np.testing.assert_allclose(regularizer.gradient(x)[0], expected[0], rtol=1e-5)
    np.testing.assert_allclose(
        regularizer.gradient(x)[1:], _central_differences(regularizer, x)[1:], rtol=1e-6
    )


def test_orthogonal_gradient_vanishes_on_orthonormal_rows():
    assert np.array_equal(OrthogonalRegularizer(1.0).gradient(np.eye(3)), np.zeros((3, 3)))
    with pytest.raises(ValueError, match="rank 2"):
        OrthogonalRegularizer().gradient(np.ones(3))


# -- ONNX lowering: penalty and gradient on runtimes ---------------------------------


def _lowered(regularizer, w, opset=18):
    ctx = LoweringContext(opset)
    value = ctx.add_input("w", standardize_dtype(w.dtype), list(w.shape))
    penalty, gradient = lower_regularizer(ctx, regularizer, value)
    return model(ctx, [penalty, gradient])


def _orthogonal_formula(factor, mode):
    def formula(x):
        vectors = np.asarray(x, np.float64)
        vectors = vectors.T if mode == "columns" else vectors
        unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
        gram = unit @ unit.T
        n = len(vectors)
        off_diagonal = np.abs(gram).sum() - np.abs(np.diag(gram)).sum()
        return factor * 0.5 * off_diagonal / (n * (n - 1) / 2)

    return formula


LOWERING_CASES = [  # (regularizer, float64 penalty formula)
    (L1(0.3), lambda x: 0.3 * _l1(x)),
    (L2(0.1), lambda x: 0.1 * _l2(x)),
    (L1L2(0.01, 0.2), lambda x: 0.01 * _l1(x) + 0.2 * _l2(x)),
    (L1L2(), lambda x: 0.0),
    (OrthogonalRegularizer(0.2, "rows"), _orthogonal_formula(0.2, "rows")),
    (OrthogonalRegularizer(0.7, "columns"), _orthogonal_formula(0.7, "columns")),
]
LOWERING_TOL = {"float16": 2e-3, "float32": 1e-5, "float64": 1e-9}


@pytest.mark.parametrize("runtime", ["onnxruntime", "onnxbn.reference"])
@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
@pytest.mark.parametrize(("regularizer", "formula"), LOWERING_CASES, ids=repr)
def test_lowering_matches_formula_and_central_differences(regularizer, formula, dtype, runtime):
    x = _weights("float64", seed=3)
    x = np.where(np.abs(x) < 0.1, 0.5, x).astype(dtype)
    penalty, gradient = run(runtime, _lowered(regularizer, x), {"w": x}).values()
    x64 = x.astype(np.float64)
    assert penalty.shape == () and penalty.dtype == (
        np.float64 if dtype == "float64" else np.float32
    )
    assert gradient.shape == x.shape and gradient.dtype == x.dtype
    tol = LOWERING_TOL[dtype]
    np.testing.assert_allclose(penalty, formula(x64), rtol=tol, atol=tol)
    expected = _central_differences(formula, x64)
    fd_tol = max(tol, 1e-6)  # central differences of a sum of 35 terms, step 1e-6
    np.testing.assert_allclose(gradient.astype(np.float64), expected, rtol=fd_tol, atol=fd_tol)


def test_lowering_of_zero_factors_and_capped_rows():
    x = np.array([np.inf, 1.0], np.float32)
    penalty, gradient = run("onnxbn.reference", _lowered(L1L2(), x), {"w": x}).values()
    assert penalty == 0 and np.array_equal(gradient, [0.0, 0.0])
    penalty, gradient = run("onnxruntime", _lowered(L1L2(l2=0.5), x), {"w": x}).values()
    assert penalty == np.inf and np.array_equal(gradient, [np.inf, 1.0])
    # A near-zero row: scaled by the capped inverse norm, as eagerly.
    rows = np.array([[1e-9, 2e-9, -1e-9], [1.0, 0.5, -0.3], [0.2, -1.0, 0.4]])
    regularizer = OrthogonalRegularizer(0.5)
    _, gradient = run("onnxruntime", _lowered(regularizer, rows), {"w": rows}).values()
    np.testing.assert_allclose(gradient, regularizer.gradient(rows), rtol=1e-9)
    np.testing.assert_allclose(
        gradient[0], _central_differences(regularizer, rows, step=1e-12)[0], rtol=1e-5
    )


def test_lowering_errors():
    ctx = LoweringContext(18)
    vector = ctx.add_input("v", "float32", [6])
    with pytest.raises(ValueError, match="rank 2"):
        lower_regularizer(ctx, OrthogonalRegularizer(), vector)
    row = ctx.add_input("r", "float32", [1, 3])
    with pytest.raises(ValueError, match="at least 2 rows"):
        lower_regularizer(ctx, OrthogonalRegularizer(), row)
    dynamic = ctx.add_input("d", "float32", ["n", 3])
    with pytest.raises(ValueError, match="not static"):
        lower_regularizer(ctx, L2(), dynamic)

    class Doubled(L2):
        def __call__(self, x):
            return 2 * super().__call__(x)

    for custom in (lambda x: 0.0, Doubled()):
        with pytest.raises(TypeError, match="Cannot export the regularizer"):
            lower_regularizer(ctx, custom, vector)
