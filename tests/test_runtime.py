"""onnxbn.runtime.Session: providers, feed checking, bfloat16, state carrying, errors."""

from __future__ import annotations

import threading

import ml_dtypes
import numpy as np
import onnxruntime as ort
import pytest

import onnxbn
from onnxbn import layers
from onnxbn.export import export_onnx
from onnxbn.runtime import Session

CUDA = "CUDAExecutionProvider"
HAS_CUDA = CUDA in ort.get_available_providers()
needs_cuda = pytest.mark.skipif(
    not HAS_CUDA, reason=f"no CUDA: onnxruntime offers only {ort.get_available_providers()}"
)


def training_model(dtype="float32", momentum=0.9):
    onnxbn.reset_names()
    x = onnxbn.Input((4, 3), dtype=dtype, name="x")
    mask = onnxbn.Input((4,), dtype="bool", name="mask")
    bn = layers.BatchNormalization(momentum=momentum, dtype=dtype, name="bn")
    y = bn(x, mask=mask, training=True)
    return onnxbn.Model([x, mask], y), bn


def feeds(rng, batch=2, dtype=np.float32):
    return {
        "x": rng.normal(1.0, 2.0, (batch, 4, 3)).astype(dtype),
        "mask": rng.random((batch, 4)) < 0.8,
    }


def test_default_providers_and_run():
    model, _ = training_model()
    session = Session(export_onnx(model))
    assert "CPUExecutionProvider" in session.providers
    if not HAS_CUDA:
        assert session.providers == ["CPUExecutionProvider"]
    (y,) = session.run(feeds(np.random.default_rng(0)))
    assert y.shape == (2, 4, 3) and y.dtype == np.float32
    assert session.input_names == ["x", "mask"] and session.output_names == ["bn"]


def test_unknown_provider_names_it_and_lists_available():
    model, _ = training_model()
    with pytest.raises(ValueError, match="'TPUExecutionProvider'.*CPUExecutionProvider"):
        Session(export_onnx(model), providers=["TPUExecutionProvider"])
    with pytest.raises(TypeError, match="list of provider names"):
        Session(export_onnx(model), providers="CPUExecutionProvider")
    with pytest.raises(ValueError, match="must not be empty"):
        Session(export_onnx(model), providers=[])


def test_explicit_cpu_is_honoured():
    model, _ = training_model()
    session = Session(export_onnx(model), providers=[("CPUExecutionProvider", {})])
    assert session.providers == ["CPUExecutionProvider"]


def test_bad_feed_dtype_names_both():
    model, _ = training_model()
    session = Session(export_onnx(model))
    bad = feeds(np.random.default_rng(0), dtype=np.float64)
    with pytest.raises(TypeError, match="float64.*float32"):
        session.run(bad)


def test_missing_unknown_and_state_feeds():
    model, _ = training_model()
    session = Session(export_onnx(model))
    good = feeds(np.random.default_rng(0))
    with pytest.raises(ValueError, match=r"Missing feeds \['mask'\]"):
        session.run({"x": good["x"]})
    with pytest.raises(ValueError, match="Unknown feed 'y'"):
        session.run({**good, "y": good["x"]})
    with pytest.raises(ValueError, match="carried by the session"):
        session.run({**good, "bn/moving_mean": np.zeros(3, np.float32)})
    with pytest.raises(ValueError, match="rank"):
        session.run({**good, "x": good["x"][0]})


def test_lists_are_converted_to_the_declared_dtype():
    model, _ = training_model()
    session = Session(export_onnx(model, training=False))
    (y,) = session.run({"x": [[[1, 2, 3]] * 4], "mask": [[1, 1, 0, 1]]})
    assert y.dtype == np.float32 and y.shape == (1, 4, 3)


def test_state_carrying_and_failed_run_leaves_state():
    model, bn = training_model()
    session = Session(export_onnx(model))
    rng = np.random.default_rng(1)
    before = session.state
    np.testing.assert_array_equal(before["bn/moving_mean"], bn.moving_mean.value)
    session.run(feeds(rng))
    after = session.state
    assert not np.allclose(after["bn/moving_mean"], before["bn/moving_mean"])
    bad = feeds(rng)
    bad["mask"] = np.ones((3, 4), bool)  # batch differs from x
    with pytest.raises(ValueError, match="disagree on dim 'batch'"):
        session.run(bad)
    np.testing.assert_array_equal(session.state["bn/moving_mean"], after["bn/moving_mean"])
    session.state = {"bn/moving_mean": np.zeros(3)}
    assert session.state["bn/moving_mean"].dtype == np.float32
    np.testing.assert_array_equal(session.state["bn/moving_mean"], 0)


def test_inference_export_has_no_state():
    model, _ = training_model()
    session = Session(export_onnx(model, training=False))
    assert session.state == {}


def test_concurrent_runs_apply_every_update():
    model, _ = training_model(momentum=0.5)
    proto = export_onnx(model)
    batch = feeds(np.random.default_rng(2))
    sequential = Session(proto)
    for _ in range(16):
        sequential.run(batch)
    concurrent = Session(proto)
    threads = [threading.Thread(target=lambda: [concurrent.run(batch) for _ in range(4)])
               for _ in range(4)]  # fmt: skip
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for name, value in sequential.state.items():
        np.testing.assert_allclose(concurrent.state[name], value, rtol=1e-6, atol=1e-7)


def test_bfloat16_in_and_out():
    model, bn = training_model(dtype="bfloat16")
    session = Session(export_onnx(model))
    batch = feeds(np.random.default_rng(3), dtype=ml_dtypes.bfloat16)
    (y,) = session.run(batch)
    assert y.dtype == np.dtype(ml_dtypes.bfloat16)
    assert session.state["bn/moving_mean"].dtype == np.dtype(ml_dtypes.bfloat16)
    expected = model(batch, training=True)
    np.testing.assert_allclose(y.astype(np.float32), expected.astype(np.float32), atol=3e-2,
                               rtol=3e-2)  # fmt: skip


def test_load_from_path_bytes_and_errors(tmp_path):
    model, _ = training_model()
    path = tmp_path / "m.onnx"
    proto = export_onnx(model, path)
    batch = feeds(np.random.default_rng(4))
    expected = Session(proto).run(batch)[0]
    for source in (path, str(path), proto.SerializeToString()):
        np.testing.assert_array_equal(Session(source).run(batch)[0], expected)
    with pytest.raises(ValueError, match="Not a valid ONNX model"):
        Session(b"\x00garbage")
    with pytest.raises(FileNotFoundError):
        Session(tmp_path / "missing.onnx")
    with pytest.raises(TypeError, match="ModelProto, a path or bytes"):
        Session(3)


@needs_cuda
def test_cuda_is_picked_and_keeps_state_on_device():
    model, bn = training_model()
    session = Session(export_onnx(model))
    assert session.providers[0] == CUDA
    rng = np.random.default_rng(5)
    for _ in range(3):
        batch = feeds(rng)
        (y,) = session.run(batch)
        expected = model(batch, training=True)
        np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(session.state["bn/moving_mean"], bn.moving_mean.value,
                               rtol=1e-5, atol=1e-6)  # fmt: skip


@needs_cuda
def test_cuda_state_setter_uploads():
    model, _ = training_model()
    session = Session(export_onnx(model), providers=[CUDA, "CPUExecutionProvider"])
    session.state = {"bn/moving_mean": np.full(3, 2.0)}
    np.testing.assert_array_equal(session.state["bn/moving_mean"], 2.0)


def _both_sessions(model):
    from onnxbn import reference

    return [("ort", Session(model)), ("reference", reference.Session(model))]


def test_state_is_read_only_and_points_at_the_setter(tmp_path):
    model, bn = training_model()
    proto = export_onnx(model, training=True)
    for engine, session in _both_sessions(proto):
        state = session.state
        assert isinstance(state, dict) and list(state) == ["bn/moving_mean", "bn/moving_variance"]
        with pytest.raises(TypeError, match=r"read-only.*session\.state = \{"):
            state["bn/moving_mean"] = np.ones(3, np.float32)
        for mutate in (
            lambda s: s.update({}),
            lambda s: s.pop("bn/moving_mean"),
            lambda s: s.clear(),
            lambda s: s.__delitem__("bn/moving_mean"),
        ):
            with pytest.raises(TypeError, match="read-only"):
                mutate(state)
        with pytest.raises(ValueError, match="read-only"):
            state["bn/moving_mean"][0] = 5.0  # the arrays too: a change would be lost
        np.testing.assert_array_equal(session.state["bn/moving_mean"], np.zeros(3), engine)
        # The setter works, also with a partial dict; plain copies are editable.
        session.state = {"bn/moving_mean": np.full(3, 2.0, np.float32)}
        np.testing.assert_array_equal(session.state["bn/moving_mean"], np.full(3, 2.0))
        np.testing.assert_array_equal(session.state["bn/moving_variance"], np.ones(3))
        editable = dict(session.state)
        editable["bn/moving_mean"] = np.zeros(3, np.float32)
        session.state = editable
        np.testing.assert_array_equal(session.state["bn/moving_mean"], np.zeros(3))
        np.savez(tmp_path / f"{engine}.npz", **session.state)
        import copy
        import pickle

        assert type(pickle.loads(pickle.dumps(session.state))) is dict
        assert type(copy.deepcopy(session.state)) is dict


def test_feeds_sharing_a_dim_param_must_agree():
    model, _ = training_model()
    proto = export_onnx(model, training=True)
    rng = np.random.default_rng(0)
    good = feeds(rng, batch=3)
    for engine, session in _both_sessions(proto):
        before = session.state
        bad = {"x": good["x"], "mask": good["mask"][:2]}
        with pytest.raises(ValueError) as info:
            session.run(bad)
        message = str(info.value)
        assert "'x' (shape (3, 4, 3))" in message and "'mask' (shape (2, 4))" in message
        assert "dim 'batch': 3 vs 2" in message, engine
        for name, value in before.items():
            np.testing.assert_array_equal(session.state[name], value)
        session.run(good)
