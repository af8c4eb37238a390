"""ONNX gradient rules of every layer but BatchNormalization against finite differences.

Each case lowers one call and its gradient (`gradient_harness.gradient_model`,
trainable weights as state inputs, dynamic batch), runs it, and compares the
input and weight gradients with central finite differences in float64 of the
eager forward of a float64 twin of the layer (same configuration and weights)
for `loss = sum(layer(x) * dy)`. Every case runs on onnxruntime and
onnxbn.reference; the first case of each layer (and a few more) also on
onnx.reference, OpenVINO and tract.

Tolerances: float64 layers 1e-6 relative to the gradient's scale (central
differences with step 1e-6 are exact to ~1e-9 on these smooth pieces); float32
and half policies (computed in float32) 2e-4; OpenVINO computes in float32
whatever the graph says, so it gets the float32 tolerance.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from onnxbn import layers
from onnxbn.dtypes import to_numpy_dtype
from tests.lowering.gradient_harness import gradient_model
from tests.runtimes import RUNTIMES, load

FAST = ("onnxruntime", "onnxbn.reference")
ALL = tuple(RUNTIMES)
# tract has no float64 Sigmoid/Tanh/Softmax kernels (a forward limitation, not the gradient's).
NO_TRACT = tuple(r for r in RUNTIMES if r != "tract")
TOLERANCE = {"float64": 1e-6, "float32": 2e-4}
EPS = 1e-6


def normal(*shape):
    return lambda rng: rng.normal(size=shape)


def away_from(points, low, high, *shape):
    """Uniform values at least 0.05 from each kink in `points` (finite differences cross none)."""

    def draw(rng):
        x = rng.uniform(low, high, size=shape)
        for p in points:
            near = np.abs(x - p) < 0.05
            x[near] = p + np.where(x[near] >= p, 0.05, -0.05) * 2
        return x

    return draw


def ids(*shape, vocabulary=6):
    return lambda rng: rng.integers(0, vocabulary, size=shape).astype(np.int32)


class Case:
    """One layer configuration: `make(dtype)`, argument generators, call params."""

    def __init__(self, make, args, *, params=None, dtype="float32", runtimes=FAST, check=None):
        self.make, self.args, self.dtype = make, args, dtype
        self.params = params or {}
        self.runtimes = runtimes
        self.check = check  # optional: (args, fd input grads) -> expected input grads


def dense(units, **kw):
    return lambda dtype: layers.Dense(units, dtype=dtype, **kw)


def conv(cls, **kw):
    return lambda dtype: cls(dtype=dtype, **kw)


def masked_zero_gradient(args, grads):
    """Masking's gradient at a masked timestep is 0: Keras differentiates `x * keep` with
    the mask as a constant (finite differences would see the mask switch off there)."""
    x = args[0]
    keep = np.any(x != 0.0, axis=-1, keepdims=True)
    return [np.where(keep, grads[0], 0.0)]


def masked_steps(rng):
    x = rng.normal(size=(3, 4, 2))
    x[0, 1] = 0.0
    x[2, 3] = 0.0
    return x


C1, C2 = layers.Conv1D, layers.Conv2D
CASES = {
    # Dense: rank 2 (Gemm) and higher (MatMul), every activation, bias or not, frozen.
    "dense-gemm": Case(dense(5), [normal(4, 3)], dtype="float64", runtimes=ALL),
    "dense-relu-rank3": Case(dense(2, activation="relu"), [normal(2, 5, 3)]),
    "dense-sigmoid-nobias": Case(
        dense(4, activation="sigmoid", use_bias=False), [normal(2, 3, 4, 3)], dtype="float64"
    ),
    "dense-tanh-f16": Case(dense(3, activation="tanh"), [normal(3, 6)], dtype="float16"),
    "dense-softmax": Case(
        dense(3, activation="softmax"),
        [normal(3, 6)],
        dtype="float64",
        runtimes=("onnx.reference", "openvino", *FAST),
    ),
    "dense-softmax-f32": Case(dense(4, activation="softmax"), [normal(2, 2, 3)], runtimes=ALL),
    "dense-empty-batch": Case(dense(2, activation="relu"), [normal(0, 4)], runtimes=ALL),
    "dense-frozen": Case(
        lambda dtype: layers.Dense(3, dtype=dtype, trainable=False), [normal(2, 4)]
    ),
    # Conv: formats, strides, padding, dilation, groups, activations, policies.
    "conv1d": Case(conv(C1, filters=4, kernel_size=3), [normal(2, 7, 3)], runtimes=ALL),
    "conv1d-f64": Case(
        conv(C1, filters=4, kernel_size=3), [normal(2, 7, 3)], dtype="float64", runtimes=ALL
    ),
    "conv1d-same-stride-relu": Case(
        conv(C1, filters=4, kernel_size=3, strides=2, padding="same", activation="relu"),
        [normal(2, 8, 2)],
    ),
    "conv1d-same-stride-relu-f64": Case(
        conv(C1, filters=3, kernel_size=3, strides=3, padding="same", activation="relu"),
        [normal(2, 8, 2)],
        dtype="float64",
        runtimes=ALL,
    ),
    "conv1d-causal-dilated-groups": Case(
        conv(C1, filters=4, kernel_size=2, dilation_rate=2, padding="causal", groups=2),
        [normal(2, 6, 4)],
        runtimes=ALL,
    ),
    "conv1d-causal-dilated-groups-f64": Case(
        conv(C1, filters=4, kernel_size=2, dilation_rate=2, padding="causal", groups=2),
        [normal(2, 6, 4)],
        dtype="float64",
    ),
    "conv1d-channels-first-valid-stride": Case(
        conv(C1, filters=2, kernel_size=3, strides=2, data_format="channels_first"),
        [normal(2, 3, 8)],
    ),
    "conv2d-same-stride-tanh": Case(
        conv(C2, filters=3, kernel_size=(3, 2), strides=(2, 1), padding="same", activation="tanh"),
        [normal(2, 5, 4, 2)],
        runtimes=ALL,
    ),
    "conv2d-same-stride-tanh-f64": Case(
        conv(C2, filters=3, kernel_size=(3, 2), strides=(2, 1), padding="same", activation="tanh"),
        [normal(2, 5, 4, 2)],
        dtype="float64",
    ),
    "conv2d-cf-groups-stride-softmax": Case(
        conv(
            C2,
            filters=4,
            kernel_size=3,
            strides=2,
            data_format="channels_first",
            groups=2,
            activation="softmax",
        ),
        [normal(2, 4, 7, 6)],
        runtimes=ALL,
    ),
    "conv2d-cf-groups-stride-softmax-f64": Case(
        conv(
            C2,
            filters=4,
            kernel_size=3,
            strides=2,
            data_format="channels_first",
            groups=2,
            activation="softmax",
        ),
        [normal(2, 4, 7, 6)],
        dtype="float64",
    ),
    "conv2d-cl-softmax": Case(
        conv(C2, filters=3, kernel_size=2, activation="softmax"), [normal(2, 4, 3, 2)]
    ),
    "conv2d-cf-dilated-same-sigmoid": Case(
        conv(
            C2,
            filters=2,
            kernel_size=2,
            dilation_rate=(2, 1),
            padding="same",
            data_format="channels_first",
            activation="sigmoid",
        ),
        [normal(1, 3, 5, 4)],
    ),
    "conv2d-cf-dilated-same-sigmoid-f64": Case(
        conv(
            C2,
            filters=2,
            kernel_size=2,
            dilation_rate=(2, 1),
            padding="same",
            data_format="channels_first",
            activation="sigmoid",
            use_bias=False,
        ),
        [normal(1, 3, 5, 4)],
        dtype="float64",
        runtimes=NO_TRACT,
    ),
    "conv2d-mixed-f16": Case(
        conv(C2, filters=2, kernel_size=2, strides=2), [normal(2, 4, 4, 2)], dtype="mixed_float16"
    ),
    "conv2d-empty-batch": Case(
        conv(C2, filters=2, kernel_size=2), [normal(0, 3, 3, 2)], runtimes=ALL
    ),
    # Activation and ReLU.
    **{
        f"activation-{name}-{dtype}": Case(
            lambda dtype, name=name: layers.Activation(name, dtype=dtype),
            [away_from([0.0], -3, 3, 2, 3, 4)],
            dtype=dtype,
            runtimes=ALL if (name, dtype) == ("softmax", "float32") else FAST,
        )
        for name in ("linear", "relu", "sigmoid", "tanh", "softmax")
        for dtype in ("float32", "float64")
    },
    "relu-default": Case(
        lambda dtype: layers.ReLU(dtype=dtype), [away_from([0], -3, 3, 4, 5)], runtimes=ALL
    ),
    "relu-max-value": Case(
        lambda dtype: layers.ReLU(max_value=1.5, dtype=dtype),
        [away_from([0, 1.5], -3, 3, 4, 5)],
        dtype="float64",
    ),
    "relu-negative-slope": Case(
        lambda dtype: layers.ReLU(negative_slope=0.2, dtype=dtype), [away_from([0], -3, 3, 4, 5)]
    ),
    "relu-negative-slope-f64": Case(
        lambda dtype: layers.ReLU(negative_slope=0.2, dtype=dtype),
        [away_from([0], -3, 3, 4, 5)],
        dtype="float64",
    ),
    "relu-all": Case(
        lambda dtype: layers.ReLU(max_value=2.0, negative_slope=0.3, threshold=0.5, dtype=dtype),
        [away_from([0.5, 2.0], -3, 3, 3, 6)],
        dtype="float64",
        runtimes=NO_TRACT,
    ),
    "relu-threshold-f32": Case(
        lambda dtype: layers.ReLU(threshold=0.5, dtype=dtype),
        [away_from([0.5], -3, 3, 3, 6)],
        runtimes=ALL,
    ),
    # Add: equal shapes, broadcast axes, a lower-rank input, three inputs.
    "add": Case(
        lambda dtype: layers.Add(dtype=dtype), [[normal(2, 3, 4), normal(2, 3, 4)]], runtimes=ALL
    ),
    "add-broadcast": Case(
        lambda dtype: layers.Add(dtype=dtype),
        [[normal(2, 3, 4), normal(2, 1, 4), normal(2, 3, 1)]],
        dtype="float64",
    ),
    "add-lower-rank": Case(
        lambda dtype: layers.Add(dtype=dtype), [[normal(2, 4), normal(2, 3, 4)]]
    ),
    # Global average pooling: formats, keepdims, a mask.
    "gap1d": Case(
        lambda dtype: layers.GlobalAveragePooling1D(dtype=dtype), [normal(2, 5, 3)], runtimes=ALL
    ),
    "gap1d-cf-keepdims": Case(
        lambda dtype: layers.GlobalAveragePooling1D(
            data_format="channels_first", keepdims=True, dtype=dtype
        ),
        [normal(2, 3, 5)],
        dtype="float64",
    ),
    "gap1d-mask": Case(
        lambda dtype: layers.GlobalAveragePooling1D(dtype=dtype),
        [normal(3, 4, 2)],
        params={"mask": np.array([[1, 1, 0, 1], [0, 1, 0, 0], [1, 1, 1, 1]], bool)},
        runtimes=ALL,
    ),
    "gap1d-mask-cf-keepdims": Case(
        lambda dtype: layers.GlobalAveragePooling1D(
            data_format="channels_first", keepdims=True, dtype=dtype
        ),
        [normal(2, 3, 4)],
        params={"mask": np.array([[1, 0, 1, 1], [0, 0, 1, 0]], bool)},
        dtype="float64",
    ),
    "gap2d": Case(
        lambda dtype: layers.GlobalAveragePooling2D(dtype=dtype), [normal(2, 3, 4, 2)], runtimes=ALL
    ),
    "gap2d-cf-keepdims": Case(
        lambda dtype: layers.GlobalAveragePooling2D(
            data_format="channels_first", keepdims=True, dtype=dtype
        ),
        [normal(2, 2, 3, 4)],
        dtype="float64",
    ),
    # Flatten, Dropout (the export's identity, see lowering/dropout.py), Masking, Embedding.
    "flatten": Case(lambda dtype: layers.Flatten(dtype=dtype), [normal(2, 3, 4)], runtimes=ALL),
    "flatten-cf": Case(
        lambda dtype: layers.Flatten(data_format="channels_first", dtype=dtype),
        [normal(2, 3, 4, 2)],
        dtype="float64",
    ),
    "dropout": Case(lambda dtype: layers.Dropout(0.5, dtype=dtype), [normal(3, 4)], runtimes=ALL),
    "dropout-training": Case(
        lambda dtype: layers.Dropout(0.5, dtype=dtype),
        [normal(3, 4)],
        params={"training": True},
        dtype="float64",
    ),
    "masking": Case(
        lambda dtype: layers.Masking(dtype=dtype),
        [masked_steps],
        runtimes=ALL,
        check=masked_zero_gradient,
    ),
    "masking-f64": Case(
        lambda dtype: layers.Masking(dtype=dtype),
        [masked_steps],
        dtype="float64",
        check=masked_zero_gradient,
    ),
    "embedding": Case(lambda dtype: layers.Embedding(6, 3, dtype=dtype), [ids(2, 5)], runtimes=ALL),
    "embedding-f64": Case(
        lambda dtype: layers.Embedding(6, 3, dtype=dtype), [ids(4)], dtype="float64"
    ),
    "embedding-f16": Case(
        lambda dtype: layers.Embedding(5, 2, dtype=dtype),
        [ids(3, 2, 2, 5, vocabulary=5)],
        dtype="float16",
    ),
}


def _float(array) -> bool:
    return np.issubdtype(np.asarray(array).dtype, np.floating)


def finite_differences(layer64, args: list, params: dict, dy: np.ndarray):
    """Central differences of `sum(layer64(*args, **params) * dy)`: (input grads, weight grads)."""
    eager_params = {"training": False} if "training" in params else dict(params)

    def loss():
        return float(np.sum(np.asarray(layer64(*args, **eager_params), np.float64) * dy))

    def derivative(array: np.ndarray, commit: Callable[[], None]) -> np.ndarray:
        grad = np.zeros(array.shape)
        for i in np.ndindex(array.shape):
            start = array[i]
            array[i] = start + EPS
            commit()
            up = loss()
            array[i] = start - EPS
            commit()
            down = loss()
            array[i] = start
            grad[i] = (up - down) / (2 * EPS)
        commit()
        return grad

    inputs = []
    for arg in args:
        if isinstance(arg, list):
            inputs.append([derivative(a, lambda: None) for a in arg])
        else:
            inputs.append(derivative(arg, lambda: None) if _float(arg) else None)
    weights = []
    for v in layer64.trainable_weights:
        value = v.numpy().copy()
        weights.append(derivative(value, lambda v=v, value=value: v.assign(value)))
    return inputs, weights


def _prepare(case: Case, seed: int):
    rng = np.random.default_rng(seed)
    layer, twin = case.make(case.dtype), case.make("float64")
    compute = to_numpy_dtype(layer.compute_dtype)
    # Inputs hold values of the compute dtype, so the autocast rounds nothing.
    raw = [[g(rng) for g in a] if isinstance(a, list) else a(rng) for a in case.args]

    def as_input(a):
        if not _float(a):
            return a
        return a.astype(compute).astype(np.float32 if case.dtype != "float64" else np.float64)

    args = [[as_input(a) for a in arg] if isinstance(arg, list) else as_input(arg) for arg in raw]
    y = layer(*args, **case.params)
    twin(*args, **case.params)
    layer.set_weights([rng.normal(size=w.shape) for w in layer.weights])
    twin.set_weights([w.numpy().astype(np.float64) for w in layer.weights])
    dy = rng.normal(size=np.shape(y)).astype(compute)
    args64 = [
        [a.astype(np.float64) for a in arg]
        if isinstance(arg, list)
        else (arg.astype(np.float64) if _float(arg) else arg)
        for arg in args
    ]
    return layer, twin, args, args64, dy


def _close(actual, expected, tolerance: float, what: str) -> None:
    actual = np.asarray(actual, np.float64)
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    scale = max(1.0, float(np.abs(expected).max(initial=0.0)))
    np.testing.assert_allclose(actual, expected, rtol=0, atol=tolerance * scale, err_msg=what)


@pytest.mark.parametrize("name", list(CASES))
def test_gradient_matches_finite_differences(name):
    case = CASES[name]
    layer, twin, args, args64, dy = _prepare(case, seed=len(name))
    model, feeds, names = gradient_model(layer, args, case.params, dy=dy)
    fd_inputs, fd_weights = finite_differences(twin, args64, case.params, dy.astype(np.float64))
    if case.check is not None:
        fd_inputs = case.check(args64, fd_inputs)
    expected = {}
    for i, g in enumerate(fd_inputs):
        if isinstance(g, list):
            expected.update({f"grad/arg{i}_{j}": gj for j, gj in enumerate(g)})
        elif g is not None:
            expected[f"grad/arg{i}"] = g
    for v, g in zip(layer.trainable_weights, fd_weights):
        expected[f"grad/{v.path}"] = g
    gradient_names = [n for n in names if n.startswith("grad/")]
    assert sorted(gradient_names) == sorted(expected)
    if not layer.trainable:
        assert not layer.trainable_weights and all("arg" in n for n in gradient_names)
    working = "float64" if case.dtype == "float64" else "float32"
    for runtime in case.runtimes:
        outputs = dict(zip(names, load(runtime, model)(feeds)))
        tolerance = TOLERANCE["float32" if runtime == "openvino" else working]
        for key, value in expected.items():
            grad = outputs[key]
            if key.startswith("grad/arg"):
                source = feeds[key.removeprefix("grad/")]
                assert grad.dtype == source.dtype, (runtime, key, grad.dtype)
            _close(grad, value, tolerance, f"{name} on {runtime}: {key}")
