"""`onnxbn.reference.Session` on a hand-built training-style graph with state."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from onnx import TensorProto, helper

from onnxbn.reference import Session
from tests.reference.helpers import tensor

C, EPSILON, MOMENTUM = 4, 1e-3, 0.9
INITIAL_MEAN = np.array([0.5, -1.0, 0.0, 2.0], np.float32)
INITIAL_VAR = np.array([1.0, 2.0, 0.5, 4.0], np.float32)


def _training_model():
    """Batch statistics over axis 0, y normalized with them, moving statistics updated."""
    n = helper.make_node
    nodes = [
        n("ReduceMean", ["x", "axes"], ["bn/mean"], keepdims=0),
        n("Sub", ["x", "bn/mean"], ["bn/centered"]),
        n("Mul", ["bn/centered", "bn/centered"], ["bn/squared"]),
        n("ReduceMean", ["bn/squared", "axes"], ["bn/var"], keepdims=0),
        n("Add", ["bn/var", "epsilon"], ["bn/var_eps"]),
        n("Sqrt", ["bn/var_eps"], ["bn/std"]),
        n("Div", ["bn/centered", "bn/std"], ["y"]),
        n("Mul", ["bn/moving_mean", "momentum"], ["bn/mean_kept"]),
        n("Mul", ["bn/mean", "one_minus_momentum"], ["bn/mean_added"]),
        n("Add", ["bn/mean_kept", "bn/mean_added"], ["bn/moving_mean/new"]),
        n("Mul", ["bn/moving_variance", "momentum"], ["bn/var_kept"]),
        n("Mul", ["bn/var", "one_minus_momentum"], ["bn/var_added"]),
        n("Add", ["bn/var_kept", "bn/var_added"], ["bn/moving_variance/new"]),
    ]
    f32 = np.float32
    initializers = [
        tensor("axes", np.array([0], np.int64)),
        tensor("epsilon", f32(EPSILON)),
        tensor("momentum", f32(MOMENTUM)),
        tensor("one_minus_momentum", f32(1 - MOMENTUM)),
        tensor("bn/moving_mean", INITIAL_MEAN),
        tensor("bn/moving_variance", INITIAL_VAR),
    ]

    def value(name, shape):
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)

    inputs = [value("x", [None, C]), value("bn/moving_mean", [C]), value("bn/moving_variance", [C])]
    outputs = [
        value("y", [None, C]),
        value("bn/moving_mean/new", [C]),
        value("bn/moving_variance/new", [C]),
    ]
    graph = helper.make_graph(nodes, "training", inputs, outputs, initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _batches(count: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [(rng.normal(size=(16, C)) * 2 + 1).astype(np.float32) for _ in range(count)]


def _expected_state(batches):
    mean, var = INITIAL_MEAN.astype(np.float64), INITIAL_VAR.astype(np.float64)
    for x in batches:
        x = x.astype(np.float64)
        mean = mean * MOMENTUM + x.mean(axis=0) * (1 - MOMENTUM)
        var = var * MOMENTUM + x.var(axis=0) * (1 - MOMENTUM)
    return mean, var


def test_interface_hides_state():
    session = Session(_training_model())
    assert session.input_names == ["x"]
    assert session.output_names == ["y"]
    assert set(session.state) == {"bn/moving_mean", "bn/moving_variance"}
    np.testing.assert_array_equal(session.state["bn/moving_mean"], INITIAL_MEAN)


@pytest.mark.parametrize("runs", [1, 3, 10])
def test_state_is_carried_across_runs(runs, tmp_path):
    path = tmp_path / "training.onnx"
    path.write_bytes(_training_model().SerializeToString())
    session = Session(str(path))
    batches = _batches(runs)
    for x in batches:
        (y,) = session.run({"x": x})
        expected_y = (x - x.mean(axis=0)) / np.sqrt(x.var(axis=0) + EPSILON)
        np.testing.assert_allclose(y, expected_y, rtol=1e-5, atol=1e-5)
    mean, var = _expected_state(batches)
    # float32 updates, rounded once per run: a few ulps per run.
    np.testing.assert_allclose(session.state["bn/moving_mean"], mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(session.state["bn/moving_variance"], var, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "feeds, error",
    [
        ({"x": np.ones((4, C), np.float64)}, TypeError),
        ({"x": np.ones((4, C + 1), np.float32)}, ValueError),
        ({"x": np.ones((4, C), np.float32), "bn/moving_mean": INITIAL_MEAN}, ValueError),
        ({}, ValueError),
    ],
)
def test_failed_run_leaves_state_unchanged(feeds, error):
    session = Session(_training_model())
    session.run({"x": _batches(1)[0]})
    before = session.state
    with pytest.raises(error):
        session.run(feeds)
    for name, value in session.state.items():
        np.testing.assert_array_equal(value, before[name])


def test_failure_during_execution_leaves_state_unchanged(monkeypatch):
    session = Session(_training_model())
    before = session.state
    calls = []

    def failing(feeds, output_names):
        calls.append(sorted(feeds))
        raise ValueError("node failed")

    monkeypatch.setattr(session.interpreter, "execute", failing)
    with pytest.raises(ValueError, match="node failed"):
        session.run({"x": _batches(1)[0]})
    assert calls == [["bn/moving_mean", "bn/moving_variance", "x"]]
    for name, value in session.state.items():
        np.testing.assert_array_equal(value, before[name])


def test_concurrent_runs_apply_every_update_once():
    threads, runs_per_thread = 8, 5
    x = _batches(1, seed=3)[0]
    session = Session(_training_model())
    errors = []
    barrier = threading.Barrier(threads)

    def work():
        try:
            barrier.wait()
            for _ in range(runs_per_thread):
                session.run({"x": x})
        except Exception as error:  # surfaced by the assertion below
            errors.append(error)

    pool = [threading.Thread(target=work) for _ in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    assert not errors
    sequential = Session(_training_model())
    for _ in range(threads * runs_per_thread):
        sequential.run({"x": x})
    # Same updates in the same float32 arithmetic: bit-identical.
    for name, value in session.state.items():
        np.testing.assert_array_equal(value, sequential.state[name])
    mean, _ = _expected_state([x] * threads * runs_per_thread)
    np.testing.assert_allclose(session.state["bn/moving_mean"], mean, rtol=1e-5, atol=1e-6)


def test_state_can_be_set():
    session = Session(_training_model())
    session.state = {"bn/moving_mean": np.zeros(C, np.float32)}
    session.run({"x": _batches(1)[0]})
    assert not np.array_equal(session.state["bn/moving_mean"], np.zeros(C))
    with pytest.raises(ValueError, match="Unknown state names"):
        session.state = {"other": np.zeros(C)}


class _Comm:
    def __init__(self, size: int) -> None:
        self.size = size

    def Get_size(self) -> int:  # noqa: N802 (mpi4py's name)
        return self.size


def test_single_process_communicator_changes_nothing():
    plain = Session(_training_model())
    with_comm = Session(_training_model(), comm=_Comm(1))
    assert plain.state.keys() == with_comm.state.keys()
