"""Three engines, each against the float64 oracle: the eager layer, onnxbn.reference, onnxruntime.

Every case of the export case table runs for k training steps on both Sessions and
the eager model; each one's output and moving statistics must match
`tests/oracle.py`'s float64 formulas after each step (the state carried as the
layer stores it), within the table's "graph" tolerance. Engines are never
compared with each other, and the state is asserted whenever the case updates
it (and asserted absent otherwise). Every model in models/ runs on both Sessions
against its stored conformance data (see `test_stored_models_three_ways`).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import numpy_helper

import onnxbn
from onnxbn import reference, runtime
from onnxbn.export import export_onnx
from tests.lowering.test_batch_normalization import (
    AFFINE,
    OPSETS,
    PAIRWISE,
    SEED,
    SHAPES,
    _np,
    build,
    expected_steps,
    resolve_axis,
    sample,
)
from tests.oracle import GRAPH_TOLERANCES

MODELS = Path(__file__).parents[2] / "models"
STEPS = 3


def close(actual, expected, dtype, what):
    rtol, atol = GRAPH_TOLERANCES[dtype]
    np.testing.assert_allclose(
        np.asarray(actual).astype(np.float64), np.asarray(expected).astype(np.float64),
        rtol=rtol, atol=atol, equal_nan=True, err_msg=what,
    )  # fmt: skip


def three_way(model, bn, proto, feeds_per_step, mode, what):
    """Runs every step on each engine; each result against the oracle's for that step."""
    training = mode != "inference"
    updates = mode in ("training", "masked")
    masked = mode == "masked"
    expected = {"eager": expected_steps(bn, feeds_per_step, axis=bn.axis, updates=updates,
                                        masked=masked)}  # fmt: skip
    # A native BatchNormalization node holds epsilon in a float32 attribute (ONNX's
    # type): the graph is exact for that epsilon, which float64 data can tell apart.
    native = any(n.op_type == "BatchNormalization" for n in proto.graph.node)
    epsilon = float(np.float32(bn.epsilon)) if native else bn.epsilon
    expected["graph"] = expected_steps(bn, feeds_per_step, axis=bn.axis, updates=updates,
                                       masked=masked, epsilon=epsilon)  # fmt: skip
    sessions = {
        "ort": runtime.Session(proto, providers=["CPUExecutionProvider"]),
        "reference": reference.Session(proto),
    }
    for step, feeds in enumerate(feeds_per_step):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # NaN at masked positions
            results = {"eager": (model(feeds, training=training), _eager_state(bn))}
            for name, session in sessions.items():
                (y,) = session.run(feeds)
                results[name] = (y, session.state)
        for name, (y, state) in results.items():
            label = f"{what} step {step} {name}"
            want, want_state = expected["eager" if name == "eager" else "graph"][step]
            assert y.dtype == np.dtype(_np(bn.compute_dtype)), label
            assert y.shape == want.shape, label
            close(y, want, bn.compute_dtype, label + ": output")
            if name != "eager":
                assert sorted(state) == (sorted(want_state) if updates else []), label
            for path, value in (want_state.items() if updates or name == "eager" else ()):
                close(state[path], value, bn.variable_dtype, f"{label}: {path}")


def _eager_state(bn):
    return {v.path: v.numpy() for v in (bn.moving_mean, bn.moving_variance)}


@pytest.mark.parametrize("mode,axis_kind,rank,dtype,affine_kind,opset", PAIRWISE)
def test_case_table_three_ways(mode, axis_kind, rank, dtype, affine_kind, opset):
    rng = np.random.default_rng([SEED, 7, rank, opset])
    shape = SHAPES[rank]
    axis = resolve_axis(axis_kind, rank)
    model, bn = build(shape, axis, mode=mode, dtype=dtype, affine=AFFINE[affine_kind], rng=rng)
    proto = export_onnx(model, training=mode != "inference", opset=opset)
    feeds = [sample(shape, axis, dtype, rng, masked=mode == "masked")[0] for _ in range(STEPS)]
    three_way(model, bn, proto, feeds, mode, f"{mode} {axis_kind} rank{rank} {dtype} "
              f"{affine_kind} opset{opset}")  # fmt: skip


def test_another_batch_size_than_exported_with():
    rng = np.random.default_rng(SEED)
    model, bn = build((4, 3, 5), -1, mode="masked", rng=rng)
    proto = export_onnx(model, training=True)
    feeds = [sample((n, 3, 5), -1, "float32", rng, masked=True)[0] for n in (4, 9, 1)]
    three_way(model, bn, proto, feeds, "masked", "batch sizes 4, 9, 1")


def stored_cases():
    for model_file in sorted(MODELS.glob("*/model.onnx")):
        for data_dir in sorted(model_file.parent.glob("test_data_set_*")):
            yield pytest.param(model_file, data_dir, id=f"{model_file.parent.name}/{data_dir.name}")


def read_tensors(data_dir, prefix):
    files = sorted(data_dir.glob(f"{prefix}_*.pb"), key=lambda p: int(p.stem.split("_")[-1]))
    tensors = []
    for file in files:
        proto = onnx.TensorProto()
        proto.ParseFromString(file.read_bytes())
        tensors.append(numpy_helper.to_array(proto))
    return tensors


@pytest.mark.parametrize("model_file,data_dir", list(stored_cases()))
def test_stored_models_three_ways(model_file, data_dir):
    """Both Sessions reproduce the stored conformance data, state included.

    The stored outputs are conformance data, like ONNX's `test_data_set_*`: the
    example scripts (`models/zoo.py`) computed them with the eager model when the
    files were made, and they are kept as expectations so that a change in any
    engine shows. They are tied to implementations that share no code with onnxbn
    by `tests/conformance/test_portability.py::test_example_models_on_every_runtime`,
    which reproduces the same files on onnx.reference.ReferenceEvaluator, OpenVINO
    and tract; the BatchNormalization arithmetic itself is checked against the
    float64 oracle by the case tables above.
    """
    proto = onnx.load(str(model_file))
    inputs = read_tensors(data_dir, "input")
    expected = read_tensors(data_dir, "output")
    names = [i.name for i in proto.graph.input]
    assert len(names) == len(inputs)
    assert len(expected) == len(proto.graph.output)
    stored = dict(zip(names, inputs))
    # The stored state inputs are the starting state the sessions carry themselves.
    start = onnxbn.initial_state(proto)
    for name, value in start.items():
        np.testing.assert_array_equal(stored.pop(name), value)
    feeds = stored
    sessions = {
        "ort": runtime.Session(proto, providers=["CPUExecutionProvider"]),
        "reference": reference.Session(proto),
    }
    for engine, session in sessions.items():
        got = session.run(feeds)
        assert list(session.state) == list(start), engine  # every state input is carried
        got += list(session.state.values())  # state outputs follow, in state-input order
        assert len(got) == len(expected), engine
        for i, (a, b) in enumerate(zip(got, expected)):
            dtype = str(np.asarray(b).dtype)
            close(a, b, dtype if dtype in GRAPH_TOLERANCES else "float32", f"{engine} output {i}")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.data(),
    rank=st.integers(2, 4),
    mode=st.sampled_from(["inference", "training", "masked", "frozen"]),
    dtype=st.sampled_from(["float32", "float16", "bfloat16", "float64"]),
    affine=st.sampled_from(list(AFFINE)),
    momentum=st.floats(0.0, 1.0),
    epsilon=st.floats(1e-5, 0.5),
    opset=st.sampled_from(OPSETS),
)
def test_random_configs_three_ways(data, rank, mode, dtype, affine, momentum, epsilon, opset):
    shape = tuple(data.draw(st.lists(st.integers(1, 5), min_size=rank, max_size=rank)))
    axis = data.draw(st.integers(-rank, rank - 1))
    seed = data.draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    model, bn = build(shape, axis, mode=mode, dtype=dtype, affine=AFFINE[affine], rng=rng,
                      momentum=momentum, epsilon=epsilon)  # fmt: skip
    proto = export_onnx(model, training=mode != "inference", opset=opset)
    # Tiny channels with a large spread: keep outputs O(1) so tolerances are meaningful.
    feeds = [sample(shape, axis, dtype, rng, masked=mode == "masked")[0] for _ in range(2)]
    three_way(model, bn, proto, feeds, mode, f"{mode} {shape} axis={axis} {dtype}")
