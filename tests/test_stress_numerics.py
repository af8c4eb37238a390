"""Numerics under stress, three ways: eager layer, reference interpreter, onnxruntime."""

from __future__ import annotations

import numpy as np
import pytest

import onnxbn
from onnxbn import layers, reference, runtime


def three_ways(shape, axis, x, momentum=0.5):
    """Eager training call, then the same on both engines from a training export."""
    inp = onnxbn.Input(shape=shape[1:], name="x")
    bn = layers.BatchNormalization(axis=axis, momentum=momentum, name="bn")
    model = onnxbn.Model(inp, bn(inp, training=True))
    proto = onnxbn.export_onnx(model, training=True)
    results = {}
    for name, engine in (("ort", runtime.Session), ("reference", reference.Session)):
        session = engine(proto)
        (y,) = session.run({"x": x})
        results[name] = (y, session.state["bn/moving_mean"], session.state["bn/moving_variance"])
    y = model(x, training=True)
    results["eager"] = (y, bn.moving_mean.numpy(), bn.moving_variance.numpy())
    return results


def test_nan_and_inf_stay_in_their_channel():
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(6, 4, 5)) * 2 + 1).astype(np.float32)
    x[2, 1, 0] = np.nan
    x[3, 3, 1] = np.inf
    results = three_ways(x.shape, -1, x)
    clean = x[..., 2:].astype(np.float64)
    mean = clean.mean(axis=(0, 1))
    var = clean.var(axis=(0, 1))
    expected = (clean - mean) / np.sqrt(var + 1e-3)
    for name, (y, mm, mv) in results.items():
        assert np.all(np.isnan(y[..., 0])), name  # NaN poisons only its channel
        assert np.isnan(mm[0]) and np.isnan(mv[0]), name
        assert np.isinf(mm[1]) or np.isnan(mm[1]), name
        assert not np.isfinite(mv[1]), name
        np.testing.assert_allclose(y[..., 2:], expected, rtol=1e-4, atol=1e-4, err_msg=name)
        np.testing.assert_allclose(mm[2:], 0.5 * mean, rtol=1e-5, err_msg=name)
        np.testing.assert_allclose(mv[2:], 0.5 + 0.5 * var, rtol=1e-5, err_msg=name)


def test_mean_of_a_channel_with_2_to_the_25_elements():
    n = 2**25
    rng = np.random.default_rng(1)
    x = (3.0 + rng.standard_normal(n, dtype=np.float32)).reshape(n, 1)
    true_mean = x.astype(np.float64).mean()
    true_var = x.astype(np.float64).var()
    results = three_ways(x.shape, -1, x, momentum=0.0)
    for name, (_, mm, mv) in results.items():
        assert abs(mm[0] - true_mean) <= 1e-6 * abs(true_mean), (name, mm[0], true_mean)
        # onnxruntime sums squares in float32 (MatMul/ReduceSum); 2^25 terms cost ~1e-3.
        var_rtol = 2e-3 if name == "ort" else 1e-5
        assert abs(mv[0] - true_var) <= var_rtol * true_var, (name, mv[0], true_var)


@pytest.mark.parametrize("axis", [1, -1])
def test_large_offset_training_output(axis):
    rng = np.random.default_rng(2)
    x = (1e4 + rng.normal(size=(64, 8, 6))).astype(np.float32)
    results = three_ways(x.shape, axis, x, momentum=0.0)
    x64 = x.astype(np.float64)
    red = tuple(i for i in range(3) if i != axis % 3)
    shape = [1, 1, 1]
    shape[axis] = x.shape[axis]
    mean = x64.mean(axis=red).reshape(shape)
    var = x64.var(axis=red).reshape(shape)
    expected = (x64 - mean) / np.sqrt(var + 1e-3)
    for name, (y, _, mv) in results.items():
        assert np.max(np.abs(y - expected)) <= 1e-4, name
        np.testing.assert_allclose(mv, var.ravel(), rtol=1e-3, err_msg=name)
