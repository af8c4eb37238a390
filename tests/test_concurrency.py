"""Sessions under threads: training updates applied exactly once, inference in parallel."""

from __future__ import annotations

import threading

import numpy as np
import pytest

import onnxbn
from onnxbn import layers, reference, runtime

THREADS = 8
CALLS = 4


def training_export():
    x = onnxbn.Input(shape=(6, 3), name="x")
    bn = layers.BatchNormalization(momentum=0.6, name="bn")
    return onnxbn.export_onnx(onnxbn.Model(x, bn(x, training=True)), training=True), bn


@pytest.mark.parametrize("engine", [runtime.Session, reference.Session])
def test_training_updates_apply_once_in_completion_order(engine):
    proto, _ = training_export()
    rng = np.random.default_rng(0)
    batches = {
        (t, c): (rng.normal(size=(5, 6, 3)) * (1 + t) + c).astype(np.float32)
        for t in range(THREADS)
        for c in range(CALLS)
    }
    session = engine(proto)
    applied = []
    execute = session._execute

    def recording(feeds, names):  # runs under the session's lock: records the update order
        applied.append(next(k for k, b in batches.items() if b is feeds["x"]))
        return execute(feeds, names)

    session._execute = recording
    outputs = {}
    barrier = threading.Barrier(THREADS)

    def worker(t):
        barrier.wait()
        for c in range(CALLS):
            outputs[(t, c)] = session.run({"x": batches[(t, c)]})[0]

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert sorted(applied) == sorted(batches)  # every call applied exactly once
    serial = engine(proto)
    for key in applied:
        (y,) = serial.run({"x": batches[key]})
        np.testing.assert_array_equal(y, outputs[key])
    for name, value in serial.state.items():
        np.testing.assert_array_equal(session.state[name], value)


@pytest.mark.parametrize("engine", [runtime.Session, reference.Session])
def test_inference_sessions_run_in_parallel(engine):
    x = onnxbn.Input(shape=(4,), name="x")
    bn = layers.BatchNormalization(name="bn")
    model = onnxbn.Model(x, bn(x))
    rng = np.random.default_rng(1)
    bn.set_weights([rng.uniform(0.5, 2, 4) for _ in range(4)])
    session = engine(onnxbn.export_onnx(model))
    assert session.state == {}
    batches = [rng.normal(size=(64, 4)).astype(np.float32) for _ in range(THREADS)]
    results = [None] * THREADS

    def worker(i):
        for _ in range(CALLS):
            results[i] = session.run({"x": batches[i]})[0]

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    for batch, y in zip(batches, results):
        np.testing.assert_allclose(y, model(batch), rtol=2e-6, atol=2e-6)
