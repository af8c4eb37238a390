"""BatchNormalization's ONNX gradient rule against central finite differences of the eager layer.

Each case builds the one-call gradient graph (`gradient_harness.gradient_model`:
the forward in a train step, gamma/beta as state inputs, then the gradient
rule fed `dy`), runs it on the five runtimes of `tests/runtimes.py` and compares `dx`,
`dgamma`, `dbeta` with central finite differences in float64 of
`L = Σ dy·y`, `y` the eager forward of a float64 copy of the layer (same
weights, its state restored after every call). Renorm: the oracle is a float64
formula with `r` and `d` held at their values at the point (Keras's
`stop_gradient`). The moving-statistic `/new` outputs are checked against the
float64 oracles of `tests/oracle.py`.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

import onnxbn
from onnxbn import layers
from onnxbn.dtypes import to_numpy_dtype
from tests import runtimes
from tests.lowering.gradient_harness import gradient_model
from tests.oracle import GRAPH_TOLERANCES, batch_moments, bn_oracle, renorm_oracle

SEED = 20240617
STEP = 1e-5  # central differences in float64: truncation and rounding both ~1e-10
# Gradients of O(1) data: float32 graphs hold a few ulps of the sums' scale;
# float16 results round once more.
GRAD_TOLERANCES = {"float64": 1e-8, "float32": 2e-5, "float16": 2e-3}
# OpenVINO computes float64 graphs in float32 (`INFERENCE_PRECISION_HINT` f32), as
# tests/conformance/test_portability.py documents.
RUNTIME_DTYPE = {("openvino", "float64"): "float32"}


# (shape, axis, kwargs of the layer, dtype policy, input dtype, masked, training)
CASES = {
    "train_nchw": ((4, 3, 2, 5), 1, {}, "float32", "float32", False, True),
    "train_nhwc": ((2, 3, 2, 4), -1, {}, "float32", "float32", False, True),
    "train_2d": ((7, 3), -1, {}, "float32", "float32", False, True),
    "train_axis0": ((3, 4, 2), 0, {}, "float32", "float32", False, True),
    "train_axis_middle": ((2, 3, 4, 3), 2, {}, "float32", "float32", False, True),
    "train_no_affine": ((5, 3, 4), 1, {"center": False, "scale": False}, "float32", "float32",
                        False, True),
    "train_scale_only": ((6, 3), -1, {"center": False}, "float32", "float32", False, True),
    "train_center_only": ((2, 3, 4), -2, {"scale": False}, "float32", "float32", False, True),
    "train_float64": ((3, 4, 5), 1, {}, "float64", "float64", False, True),
    "train_mixed_float16": ((3, 4, 3), -1, {}, "mixed_float16", "float16", False, True),
    "train_float16": ((4, 2, 3), 1, {}, "float16", "float16", False, True),
    "synchronized": ((3, 4, 3), -1, {"synchronized": True}, "float32", "float32", False, True),
    "masked_nhwc": ((3, 5, 4), -1, {}, "float32", "float32", True, True),
    "masked_inner": ((3, 4, 5), 1, {}, "float32", "float32", True, True),
    "masked_4d_no_scale": ((2, 3, 2, 4), -1, {"scale": False}, "float32", "float32", True, True),
    "masked_float64": ((3, 3, 4), 1, {}, "float64", "float64", True, True),
    "renorm_nchw": ((4, 3, 2, 3), 1, {"renorm": True,
                                      "renorm_clipping": {"rmin": 0.9, "rmax": 1.1, "dmax": 0.2}},
                    "float32", "float32", False, True),
    "renorm_masked": ((3, 4, 3), -1, {"renorm": True, "renorm_clipping": {"dmax": 0.5}},
                      "float32", "float32", True, True),
    "renorm_unclipped_no_center": ((5, 4), -1, {"renorm": True, "center": False}, "float64",
                                   "float64", False, True),
    "frozen": ((3, 4, 2, 2), 1, {"trainable": False}, "float32", "float32", False, True),
    "frozen_renorm_nhwc": ((3, 2, 4), -1, {"trainable": False, "renorm": True}, "float32",
                           "float32", False, True),
    "inference_trainable": ((4, 3, 2), 1, {}, "float32", "float32", False, False),
    "inference_mixed": ((4, 3), -1, {}, "mixed_float16", "float16", False, False),
}  # fmt: skip


# -- layers and data -----------------------------------------------------------------
def make_layer(shape, axis, kwargs, policy, rng):
    """A built layer with random weights and its float64 twin (same weights)."""
    onnxbn.reset_names()
    kwargs = dict(kwargs, momentum=0.8, epsilon=1e-3)
    trainable = kwargs.pop("trainable", True)
    layer = layers.BatchNormalization(axis=axis, dtype=policy, name="bn", **kwargs)
    twin = layers.BatchNormalization(axis=axis, dtype="float64", name="bn64", **kwargs)
    for each in (layer, twin):
        each.build(shape)
    channels = shape[axis]
    values = {
        "gamma": rng.uniform(0.5, 1.5, channels),
        "beta": rng.normal(size=channels),
        "moving_mean": rng.normal(size=channels),
        "moving_variance": rng.uniform(0.5, 2.0, channels),
        "moving_stddev": rng.uniform(0.7, 1.4, channels),
        "renorm_mean": rng.normal(scale=0.3, size=channels),
        "renorm_stddev": rng.uniform(0.7, 1.4, channels),
    }
    for variable in layer.weights:
        name = variable.path.rpartition("/")[2]
        variable.assign(values[name].astype(to_numpy_dtype(variable.dtype)))
    twin.set_weights([w.value.astype(np.float64) for w in layer.weights])
    layer.trainable = trainable
    twin.trainable = trainable
    return layer, twin


def make_data(name, rng):
    shape, axis, kwargs, policy, in_dtype, masked, training = CASES[name]
    layer, twin = make_layer(shape, axis, kwargs, policy, rng)
    x = (rng.normal(size=shape) * 2.0 + 3.0).astype(in_dtype)
    mask = None
    if masked:
        mask = rng.random(shape[:-1]) < 0.6
        mask.flat[0] = True
        # Masked-out positions far off: any leak into the moments shows.
        x = np.where(np.expand_dims(mask, -1), x, np.asarray(40.0, in_dtype))
    out_dtype = to_numpy_dtype(layer.compute_dtype)
    dy = rng.normal(size=shape).astype(out_dtype)
    return layer, twin, x, mask, dy


# -- the finite-difference oracle ------------------------------------------------------
def _renorm_loss(twin, x, mask, dy, training, point):
    """`Σ dy·y` of renorm with `r`, `d` fixed at `point`'s moments (Keras's stop_gradient)."""
    axis = twin.axis % x.ndim
    shape = [1] * x.ndim
    shape[axis] = x.shape[axis]
    eps = twin.epsilon
    clipping = twin.renorm_clipping or {}
    mean0, var0 = batch_moments(point, axis, mask)
    floor = np.maximum(twin.renorm_stddev.value, math.sqrt(eps))
    r = np.sqrt(var0 + eps) / floor
    d = (mean0 - twin.renorm_mean.value) / floor
    r = np.clip(r, clipping.get("rmin", -np.inf), clipping.get("rmax", np.inf))
    d = np.clip(d, -clipping.get("dmax", np.inf), clipping.get("dmax", np.inf))

    def loss(x, gamma, beta):
        mean, var = batch_moments(x, axis, mask)
        xhat = (x - mean.reshape(shape)) / np.sqrt(var + eps).reshape(shape)
        y = xhat * (r * gamma).reshape(shape) + (d * gamma + beta).reshape(shape)
        return np.sum(dy * y), y

    return loss


def _eager_loss(twin, mask, dy, training):
    def loss(x, gamma, beta):
        saved = twin.get_weights()
        if twin.gamma is not None:
            twin.gamma.assign(gamma)
        if twin.beta is not None:
            twin.beta.assign(beta)
        y = twin(x, training=training, mask=mask)
        twin.set_weights(saved)
        return np.sum(dy * y), y

    return loss


def finite_differences(twin, x, mask, dy, training):
    """`(dx, dgamma, dbeta)` of `Σ dy·y` by central differences in float64."""
    x = x.astype(np.float64)
    dy = dy.astype(np.float64)
    channels = x.shape[twin.axis]
    gamma = np.ones(channels) if twin.gamma is None else twin.gamma.value.copy()
    beta = np.zeros(channels) if twin.beta is None else twin.beta.value.copy()
    renorm_training = twin.renorm and training and twin.trainable
    if renorm_training:
        loss = _renorm_loss(twin, x, mask, dy, training, x)
        # The formula is the layer at the point.
        eager_y = _eager_loss(twin, mask, dy, training)(x, gamma, beta)[1]
        np.testing.assert_allclose(loss(x, gamma, beta)[1], eager_y, rtol=1e-12, atol=1e-12)
    else:
        loss = _eager_loss(twin, mask, dy, training)
    args = [x, gamma, beta]
    grads = []
    for i in range(3):
        grad = np.zeros_like(args[i])
        for j in np.ndindex(args[i].shape):
            values = []
            for sign in (1.0, -1.0):
                moved = [a.copy() for a in args]
                moved[i][j] += sign * STEP
                values.append(loss(*moved)[0])
            grad[j] = (values[0] - values[1]) / (2 * STEP)
        grads.append(grad)
    return grads


# -- running the gradient graph ------------------------------------------------------------
def run_gradient(layer, x, mask, dy, training, runtime, dynamic_batch=True):
    params = {"training": training}
    if mask is not None:
        params["mask"] = mask
    model, feeds, names = gradient_model(layer, [x], params, dy=dy, dynamic_batch=dynamic_batch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        results = runtimes.load(runtime, model)(feeds)
    return dict(zip(names, (np.asarray(r) for r in results)))


def assert_gradient(actual, expected, dtype, what, runtime="onnxruntime"):
    dtype = np.dtype(dtype).name
    assert actual.dtype == dtype, (what, actual.dtype, dtype)
    actual = actual.astype(np.float64)
    scale = max(1.0, float(np.max(np.abs(expected), initial=0.0)))
    tol = GRAD_TOLERANCES[RUNTIME_DTYPE.get((runtime, dtype), dtype)]
    np.testing.assert_allclose(actual, expected, rtol=tol, atol=tol * scale, err_msg=what)


def expected_states(layer, x, mask, training):
    """The `/new` states by the float64 oracles of `tests/oracle.py`."""
    weights = {w.path.rpartition("/")[2]: w.value.astype(np.float64) for w in layer.weights}
    common = dict(
        axis=layer.axis, gamma=weights.get("gamma"), beta=weights.get("beta"),
        moving_mean=weights["moving_mean"], moving_variance=weights["moving_variance"],
        momentum=layer.momentum, epsilon=layer.epsilon, training=training, mask=mask,
    )  # fmt: skip
    x = x.astype(np.float64)
    if layer.renorm:
        _, *states = renorm_oracle(
            x, moving_stddev=weights["moving_stddev"], renorm_mean=weights["renorm_mean"],
            renorm_stddev=weights["renorm_stddev"], renorm_momentum=layer.renorm_momentum,
            renorm_clipping=layer.renorm_clipping, **common,
        )  # fmt: skip
    else:
        _, *states = bn_oracle(x, **common)
    return dict(zip([v.path for v in layer.state_variables], states))


@pytest.mark.parametrize(
    "name,runtime",
    [(name, runtime) for name in CASES for runtime in runtimes.RUNTIMES],
)
def test_gradient_matches_finite_differences(name, runtime):
    rng = np.random.default_rng(SEED + sorted(CASES).index(name))
    shape, axis, kwargs, policy, in_dtype, masked, training = CASES[name]
    layer, twin, x, mask, dy = make_data(name, rng)
    uses_batch = training and layer.trainable
    dx, dgamma, dbeta = finite_differences(twin, x, mask, dy, training)
    out = run_gradient(layer, x, mask, dy, training, runtime, dynamic_batch=axis % len(shape) != 0)
    assert_gradient(out["grad/arg0"], dx, x.dtype, f"{name} dx on {runtime}", runtime)
    grads = {k: v for k, v in out.items() if k.startswith("grad/") and k != "grad/arg0"}
    expected_grads = {}
    if layer.gamma is not None and layer.trainable:
        expected_grads["grad/bn/gamma"] = dgamma
    if layer.beta is not None and layer.trainable:
        expected_grads["grad/bn/beta"] = dbeta
    assert sorted(grads) == sorted(expected_grads)
    compute = "float64" if layer.compute_dtype == "float64" else "float32"
    for key, expected in expected_grads.items():
        assert_gradient(grads[key], expected, compute, f"{name} {key} on {runtime}", runtime)
    if uses_batch:
        variable = layer.variable_dtype
        rtol, atol = GRAPH_TOLERANCES[RUNTIME_DTYPE.get((runtime, variable), variable)]
        for path, expected in expected_states(layer, x, mask, training).items():
            np.testing.assert_allclose(
                out[path + "/new"].astype(np.float64), expected, rtol=rtol, atol=atol,
                err_msg=f"{name} {path}/new on {runtime}",
            )  # fmt: skip


EMPTY_CASES = {
    "nchw": ((0, 3, 2, 2), 1, {}, False),
    "nhwc": ((0, 2, 3), -1, {}, False),
    "masked": ((0, 2, 3), -1, {}, True),
    "masked_inner": ((0, 3, 4), 1, {}, True),
    "renorm": ((0, 3), -1, {"renorm": True}, False),
}


@pytest.mark.parametrize("runtime", runtimes.RUNTIMES)
@pytest.mark.parametrize("name", sorted(EMPTY_CASES))
def test_empty_batch_gives_zero_gradients(name, runtime):
    shape, axis, kwargs, masked = EMPTY_CASES[name]
    rng = np.random.default_rng(SEED)
    layer, _ = make_layer((2,) + shape[1:], axis, kwargs, "float32", rng)
    before = {v.path: v.value.copy() for v in layer.state_variables}
    x = np.zeros(shape, np.float32)
    mask = np.zeros(shape[:-1], bool) if masked else None
    out = run_gradient(layer, x, mask, np.zeros(shape, np.float32), True, runtime)
    assert out["grad/arg0"].shape == shape and out["grad/arg0"].dtype == np.float32
    for key in ("grad/bn/gamma", "grad/bn/beta"):
        np.testing.assert_array_equal(out[key], np.zeros(shape[axis], np.float32), err_msg=key)
    if not masked:  # no statistics: the state is kept
        for path, value in before.items():
            np.testing.assert_array_equal(out[path + "/new"], value, err_msg=path)
    for key, value in out.items():
        assert not np.any(np.isnan(value)), key


def test_all_masked_batch_has_finite_gradients():
    """No valid position: Keras's moments are 0 (count + 1e-7); only `dy·k` reaches x."""
    rng = np.random.default_rng(SEED)
    layer, twin = make_layer((3, 2, 4), -1, {}, "float32", rng)
    x = rng.normal(size=(3, 2, 4)).astype(np.float32)
    mask = np.zeros((3, 2), bool)
    dy = rng.normal(size=x.shape).astype(np.float32)
    dx, dgamma, dbeta = finite_differences(twin, x, mask, dy, True)
    out = run_gradient(layer, x, mask, dy, True, "onnxruntime")
    assert_gradient(out["grad/arg0"], dx, np.float32, "dx")
    assert_gradient(out["grad/bn/gamma"], dgamma, np.float32, "dgamma")
    assert_gradient(out["grad/bn/beta"], dbeta, np.float32, "dbeta")


def test_integer_input_has_no_input_gradient():
    rng = np.random.default_rng(SEED)
    layer, _ = make_layer((4, 3), -1, {}, "float32", rng)
    x = rng.integers(-3, 4, size=(4, 3)).astype(np.int32)
    out = run_gradient(layer, x, None, rng.normal(size=(4, 3)).astype(np.float32), True,
                       "onnxbn.reference")  # fmt: skip
    assert "grad/arg0" not in out
    assert sorted(k for k in out if k.startswith("grad/")) == ["grad/bn/beta", "grad/bn/gamma"]
