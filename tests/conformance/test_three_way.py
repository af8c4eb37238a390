"""Three-way agreement: eager layer == reference interpreter(ONNX) == onnxruntime(ONNX).

Every case of the export case table runs for k training steps on both engines
and the eager model; outputs and moving statistics must agree after each step,
within the per-dtype tolerances of the case table. Every model in models/ runs on
both engines against the expected outputs its export script stored.
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
    TOLERANCES,
    build,
    resolve_axis,
    sample,
)

MODELS = Path(__file__).parents[2] / "models"
STEPS = 3


def close(actual, expected, dtype, what):
    rtol, atol = TOLERANCES[dtype]
    np.testing.assert_allclose(
        np.asarray(actual).astype(np.float64), np.asarray(expected).astype(np.float64),
        rtol=rtol, atol=atol, equal_nan=True, err_msg=what,
    )  # fmt: skip


def three_way(model, bn, proto, feeds_per_step, training, what):
    engines = {
        "ort": runtime.Session(proto, providers=["CPUExecutionProvider"]),
        "reference": reference.Session(proto),
    }
    for step, feeds in enumerate(feeds_per_step):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # NaN at masked positions
            expected = model(feeds, training=training)
        for name, session in engines.items():
            (y,) = session.run(feeds)
            label = f"{what} step {step} {name}"
            assert y.dtype == expected.dtype, label
            close(y, expected, bn.compute_dtype, label + ": output")
            for variable in bn.non_trainable_weights:
                if variable.path in session.state:
                    close(session.state[variable.path], variable.numpy(), bn.variable_dtype,
                          label + f": {variable.path}")  # fmt: skip


@pytest.mark.parametrize("mode,axis_kind,rank,dtype,affine_kind,opset", PAIRWISE)
def test_case_table_three_ways(mode, axis_kind, rank, dtype, affine_kind, opset):
    rng = np.random.default_rng([SEED, 7, rank, opset])
    shape = SHAPES[rank]
    axis = resolve_axis(axis_kind, rank)
    model, bn = build(shape, axis, mode=mode, dtype=dtype, affine=AFFINE[affine_kind], rng=rng)
    training = mode != "inference"
    proto = export_onnx(model, training=training, opset=opset)
    feeds = [sample(shape, axis, dtype, rng, masked=mode == "masked")[0] for _ in range(STEPS)]
    three_way(model, bn, proto, feeds, training, f"{mode} {axis_kind} rank{rank} {dtype} "
              f"{affine_kind} opset{opset}")  # fmt: skip


def test_another_batch_size_than_exported_with():
    rng = np.random.default_rng(SEED)
    model, bn = build((4, 3, 5), -1, mode="masked", rng=rng)
    proto = export_onnx(model, training=True)
    feeds = [sample((n, 3, 5), -1, "float32", rng, masked=True)[0] for n in (4, 9, 1)]
    three_way(model, bn, proto, feeds, True, "batch sizes 4, 9, 1")


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
    """The expected outputs were computed by the eager model when the files were made."""
    proto = onnx.load(str(model_file))
    inputs = read_tensors(data_dir, "input")
    expected = read_tensors(data_dir, "output")
    names = [i.name for i in proto.graph.input]
    assert len(names) == len(inputs)
    stored = dict(zip(names, inputs))
    # The stored state inputs are the starting state the sessions carry themselves.
    start = onnxbn.initial_state(proto)
    for name, value in start.items():
        np.testing.assert_array_equal(stored.pop(name), value)
    feeds = stored
    outputs = {
        "ort": runtime.Session(proto, providers=["CPUExecutionProvider"]),
        "reference": reference.Session(proto),
    }
    for engine, session in outputs.items():
        got = session.run(feeds)
        got += [session.state[i] for i, _ in session._pairs]  # state outputs follow, in order
        assert len(got) >= len(expected), engine
        for i, (a, b) in enumerate(zip(got, expected)):
            dtype = str(np.asarray(b).dtype)
            close(a, b, dtype if dtype in TOLERANCES else "float32", f"{engine} output {i}")


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
    training = mode != "inference"
    proto = export_onnx(model, training=training, opset=opset)
    # Tiny channels with a large spread: keep outputs O(1) so tolerances are meaningful.
    feeds = [sample(shape, axis, dtype, rng, masked=mode == "masked")[0] for _ in range(2)]
    three_way(model, bn, proto, feeds, training, f"{mode} {shape} axis={axis} {dtype}")
