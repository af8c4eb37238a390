"""The portability matrix: every export variant on every runtime, against the float64 oracle.

Runtimes: onnxruntime, onnxbn.reference, onnx.reference.ReferenceEvaluator,
OpenVINO (f32 inference precision) and tract, each run as a user of that
runtime would (`tests/runtimes.py`): the starting state from the model's
metadata, then each `/new` output fed back. Each step is checked against
`tests/oracle.py`'s float64 formulas, never against another engine. A dtype a
runtime cannot represent is a skip with the reason.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import onnxbn
from onnxbn import layers
from onnxbn.export import export_onnx
from tests import runtimes
from tests.lowering.test_batch_normalization import (
    AFFINE,
    PAIRWISE,
    SEED,
    SHAPES,
    build,
    expected_steps,
    resolve_axis,
    sample,
)
from tests.oracle import GRAPH_TOLERANCES, bn_oracle

MODELS = Path(__file__).parents[2] / "models"
STEPS = 3
# The stated exception to tests/oracle.py's one table: OpenVINO's CPU plugin has no
# float64 kernels: it computes a float64 graph in float32 (inputs and outputs stay
# float64), so float64 is held to float32's bound.
RUNTIME_TOLERANCES = {"openvino": {"float64": (2e-5, 2e-5)}}


def close(runtime, actual, expected, dtype, what):
    rtol, atol = RUNTIME_TOLERANCES.get(runtime, {}).get(dtype, GRAPH_TOLERANCES[dtype])
    np.testing.assert_allclose(
        np.asarray(actual).astype(np.float64), np.asarray(expected, np.float64),
        rtol=rtol, atol=atol, equal_nan=True, err_msg=what,
    )  # fmt: skip


def skip_unrepresentable(runtime, *dtypes):
    reason = runtimes.skip_reason(runtime, set(dtypes))
    if reason is not None:
        pytest.skip(f"{runtime}: {reason}")


@pytest.mark.parametrize("runtime", runtimes.RUNTIMES)
@pytest.mark.parametrize("mode,axis_kind,rank,dtype,affine_kind,opset", PAIRWISE)
def test_case_table_on_every_runtime(runtime, mode, axis_kind, rank, dtype, affine_kind, opset):
    skip_unrepresentable(runtime, dtype)
    rng = np.random.default_rng([SEED, 11, rank, opset])
    shape = SHAPES[rank]
    axis = resolve_axis(axis_kind, rank)
    model, bn = build(shape, axis, mode=mode, dtype=dtype, affine=AFFINE[affine_kind], rng=rng)
    proto = export_onnx(model, training=mode != "inference", opset=opset)
    feeds = [sample(shape, axis, dtype, rng, masked=mode == "masked")[0] for _ in range(STEPS)]
    updates = mode in ("training", "masked")
    expected = expected_steps(bn, feeds, axis=axis, updates=updates, masked=mode == "masked")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # NaN at masked-out positions
        got = runtimes.carry_state(runtime, proto, feeds)
    what = f"{runtime} {mode} {axis_kind} rank{rank} {dtype} {affine_kind} opset{opset}"
    for step, ((outputs, state), (y, want_state)) in enumerate(zip(got, expected)):
        (out,) = outputs
        assert out.shape == y.shape, what
        close(runtime, out, y, bn.compute_dtype, f"{what} step {step}: output")
        assert list(state) == (list(want_state) if updates else []), what
        for name in state:
            close(runtime, state[name], want_state[name], bn.variable_dtype,
                  f"{what} step {step}: {name}")  # fmt: skip


def _run_oracle_chain(x, calls, weights):
    """float64 oracle of a chain of BN calls sharing one layer's state."""
    mean, var = weights["mean"], weights["var"]
    y = x
    for training in calls:
        y, new_mean, new_var = bn_oracle(
            y, axis=-1, gamma=weights["gamma"], beta=weights["beta"], moving_mean=mean,
            moving_variance=var, momentum=weights["momentum"], epsilon=1e-3, training=training,
        )  # fmt: skip
        mean = new_mean.astype(np.float32).astype(np.float64)
        var = new_var.astype(np.float32).astype(np.float64)
    return y, mean, var


@pytest.mark.parametrize("runtime", runtimes.RUNTIMES)
@pytest.mark.parametrize("calls", [(True, True), (True, False)], ids=["train_train", "train_infer"])
def test_shared_layer_on_every_runtime(runtime, calls):
    """One state set; the second call reads what the first produced, over several steps."""
    onnxbn.reset_names()
    rng = np.random.default_rng(SEED)
    x = onnxbn.Input((4, 3), name="x")
    bn = layers.BatchNormalization(momentum=0.8, name="shared")
    y = bn(bn(x, training=calls[0]), training=calls[1])
    weights = {"gamma": rng.uniform(0.5, 1.5, 3), "beta": rng.normal(size=3),
               "mean": rng.normal(size=3), "var": rng.uniform(0.5, 2, 3), "momentum": 0.8}  # fmt: skip
    bn.set_weights([weights["gamma"], weights["beta"], weights["mean"], weights["var"]])
    proto = export_onnx(onnxbn.Model(x, y))
    feeds = [{"x": rng.normal(2.0, 3.0, (n, 4, 3)).astype(np.float32)} for n in (5, 2, 7)]
    state = {k: np.asarray(weights[k], np.float32).astype(np.float64) for k in ("mean", "var")}
    for step, (outputs, got) in enumerate(runtimes.carry_state(runtime, proto, feeds)):
        want, mean, var = _run_oracle_chain(
            feeds[step]["x"].astype(np.float64), calls, {**weights, **state}
        )
        state = {"mean": mean, "var": var}
        close(runtime, outputs[0], want, "float32", f"{runtime} step {step}: output")
        close(runtime, got["shared/moving_mean"], mean, "float32", f"{runtime} step {step}: mean")
        close(runtime, got["shared/moving_variance"], var, "float32", f"{runtime} step {step}")


@pytest.mark.parametrize("runtime", runtimes.RUNTIMES)
@pytest.mark.parametrize("axis", [1, -1])
def test_synchronized_export_in_one_process_on_every_runtime(runtime, axis):
    """A synchronized layer's export run plainly (synchronize=False) is local batch norm."""
    onnxbn.reset_names()
    rng = np.random.default_rng(SEED + 3)
    x = onnxbn.Input((4, 6), name="x")
    bn = layers.BatchNormalization(axis=axis, momentum=0.7, synchronized=True, name="bn")
    model = onnxbn.Model(x, bn(x, training=True))
    channels = 4 if axis == 1 else 6
    bn.set_weights([rng.uniform(0.5, 1.5, channels), rng.normal(size=channels),
                    rng.normal(size=channels), rng.uniform(0.5, 2, channels)])  # fmt: skip
    proto = export_onnx(model)
    feeds = [{"x": rng.normal(1.0, 2.0, (n, 4, 6)).astype(np.float32)} for n in (3, 5)]
    expected = expected_steps(bn, feeds, axis=axis, updates=True, masked=False)
    got = runtimes.carry_state(runtime, proto, feeds)
    for step, ((outputs, state), (y, want)) in enumerate(zip(got, expected)):
        close(runtime, outputs[0], y, "float32", f"{runtime} step {step}: output")
        for name in want:
            close(runtime, state[name], want[name], "float32", f"{runtime} step {step}: {name}")


@pytest.mark.parametrize("runtime", runtimes.RUNTIMES)
@pytest.mark.parametrize("mode,axis", [("masked", -1), ("training", -1), ("training", 1),
                                       ("masked", 1)])  # fmt: skip
def test_batch_sizes_other_than_exported_with(runtime, mode, axis):
    """Dynamic batch: batches of 4, 9, 1, an empty one and 1100 rows, state carried."""
    rng = np.random.default_rng(SEED + 5)
    model, bn = build((4, 3, 5), axis, mode=mode, rng=rng)
    proto = export_onnx(model, training=True)
    masked = mode == "masked"
    feeds = [sample((n, 3, 5), axis, "float32", rng, masked=masked)[0] for n in (4, 9, 1, 0, 1100)]
    expected = expected_steps(bn, feeds, axis=axis, updates=True, masked=masked)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        got = runtimes.carry_state(runtime, proto, feeds)
    for step, ((outputs, state), (y, want)) in enumerate(zip(got, expected)):
        assert outputs[0].shape == y.shape
        close(runtime, outputs[0], y, "float32", f"{runtime} step {step}: output")
        for name in want:
            close(runtime, state[name], want[name], "float32", f"{runtime} step {step}: {name}")


def stored_cases():
    for model_file in sorted(MODELS.glob("*/model.onnx")):
        yield pytest.param(model_file, id=model_file.parent.name)


def read_tensors(folder: Path, prefix: str) -> list[np.ndarray]:
    files = sorted(folder.glob(f"{prefix}_*.pb"), key=lambda p: int(p.stem.split("_")[-1]))
    tensors = []
    for file in files:
        proto = onnx.TensorProto()
        proto.ParseFromString(file.read_bytes())
        tensors.append(numpy_helper.to_array(proto))
    return tensors


@pytest.mark.parametrize("runtime", runtimes.RUNTIMES)
@pytest.mark.parametrize("model_file", list(stored_cases()))
def test_example_models_on_every_runtime(runtime, model_file):
    """The example models' backend-test data (every graph input, every graph output)."""
    proto = onnx.load(str(model_file))
    data = model_file.parent / "test_data_set_0"
    inputs, expected = read_tensors(data, "input"), read_tensors(data, "output")
    feeds = dict(zip([i.name for i in proto.graph.input], inputs))
    state_inputs = set(onnxbn.initial_state(proto))
    model_feeds = {k: v for k, v in feeds.items() if k not in state_inputs}
    (outputs, state), = runtimes.carry_state(runtime, proto, [model_feeds])
    got = outputs + list(state.values())
    assert len(got) == len(expected) == len(proto.graph.output)
    for i, (a, b) in enumerate(zip(got, expected)):
        close(runtime, a, b, "float32", f"{runtime} {model_file.parent.name} output {i}")


@pytest.mark.parametrize("runtime", runtimes.RUNTIMES)
@pytest.mark.parametrize("axis,masked", [(1, False), (1, True), (-1, False), (-1, True)])
def test_chained_layers_over_dynamic_lengths(runtime, axis, masked):
    """Two training layers over (batch, 4, length) inputs with a dynamic length, fed two lengths."""
    onnxbn.reset_names()
    rng = np.random.default_rng(SEED + 9)
    inner = axis == 1  # (batch, 4, length) channel inner, else (batch, length, 4)
    x = onnxbn.Input((4, None) if inner else (None, 4), name="x")
    inputs, kwargs = [x], {}
    if masked:
        mask = onnxbn.Input((4,) if inner else (None,), dtype="bool", name="mask")
        inputs.append(mask)
        kwargs["mask"] = mask
    first = layers.BatchNormalization(axis=axis, momentum=0.6, name="bn")
    second = layers.BatchNormalization(axis=axis, momentum=0.6, name="bn2")
    model = onnxbn.Model(inputs, second(first(x, training=True, **kwargs), training=True, **kwargs))
    proto = export_onnx(model)
    feeds = []
    for length in (6, 3):
        shape = (3, 4, length) if inner else (3, length, 4)
        data = rng.normal(1.0, 2.0, shape).astype(np.float32)
        feed = {"x": data}
        if masked:
            feed["mask"] = rng.random(shape[:2]) < 0.7
        feeds.append(feed)
    got = runtimes.carry_state(runtime, proto, feeds)
    states = {layer.name: (np.asarray(layer.moving_mean.value, np.float64),
                           np.asarray(layer.moving_variance.value, np.float64))
              for layer in (first, second)}  # fmt: skip
    for step, (feed, (outputs, state)) in enumerate(zip(feeds, got)):
        y = feed["x"].astype(np.float64)
        for layer in (first, second):
            mean, var = states[layer.name]
            y, mean, var = bn_oracle(
                y, axis=axis, gamma=None, beta=None, moving_mean=mean, moving_variance=var,
                momentum=0.6, epsilon=1e-3, training=True, mask=feed.get("mask"),
            )  # fmt: skip
            states[layer.name] = (mean.astype(np.float32), var.astype(np.float32))
            close(runtime, state[f"{layer.name}/moving_mean"], mean, "float32",
                  f"{runtime} step {step}: {layer.name} mean")  # fmt: skip
            close(runtime, state[f"{layer.name}/moving_variance"], var, "float32",
                  f"{runtime} step {step}: {layer.name} variance")  # fmt: skip
        close(runtime, outputs[0], y, "float32", f"{runtime} step {step}: output")
