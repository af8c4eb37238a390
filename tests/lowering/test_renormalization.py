"""Batch renormalization exports on every runtime of the portability matrix.

Each case is exported in training mode and run for several steps on
onnxruntime, onnxbn.reference, onnx.reference, OpenVINO and tract, the five
states carried as a user of that runtime would (`tests/runtimes.py`), and
checked at every step against `renorm_oracle` (float64, written from Keras's
formulas); inference and frozen renorm layers are plain BatchNormalization.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import onnxbn
from onnxbn import layers
from onnxbn.export import export_onnx
from tests import runtimes
from tests.oracle import GRAPH_TOLERANCES, renorm_oracle

STATES = ("moving_mean", "moving_variance", "moving_stddev", "renorm_mean", "renorm_stddev")
STEPS = 3
# (shape, axis, masked, clipping, center, scale, dtype policy, momentum, renorm_momentum)
CASES = {
    "2d_unclipped": ((6, 4), -1, False, None, True, True, "float32", 0.9, 0.8),
    "2d_all_keys": ((6, 4), -1, False, {"rmin": 0.8, "rmax": 1.2, "dmax": 0.3}, True, True,
                    "float32", 0.5, 0.7),
    "nchw_rmax": ((2, 3, 4, 5), 1, False, {"rmax": 1.1}, True, True, "float32", 0.99, 0.9),
    "nhwc_masked_dmax": ((3, 4, 2, 5), -1, True, {"dmax": 0.1}, True, True, "float32", 0.9,
                         0.99),
    "inner_masked_rmin": ((3, 4, 5), 1, True, {"rmin": 0.95}, False, True, "float32", 0.8,
                          0.6),
    "no_affine": ((5, 3, 4), -1, False, {"rmin": 0.5, "rmax": 2.0}, False, False, "float32",
                  0.0, 1.0),
    "float64": ((6, 4), 0, False, {"dmax": 0.2}, True, False, "float64", 0.9, 0.9),
    "mixed_float16": ((4, 3, 6), -1, True, {"rmax": 1.3, "dmax": 0.4}, True, True,
                      "mixed_float16", 0.9, 0.95),
}  # fmt: skip
TOLERANCE_DTYPE = {"float32": "float32", "float64": "float64", "mixed_float16": "float16"}


def build(name, rng):
    shape, axis, masked, clipping, center, scale, policy, momentum, renorm_momentum = CASES[name]
    onnxbn.reset_names()
    fixed = axis % len(shape) == 0
    batch = shape[0] if fixed else None
    x = onnxbn.Input(shape[1:], batch_size=batch, name="x")
    inputs, kwargs = [x], {}
    if masked:
        mask = onnxbn.Input(shape[1:-1], batch_size=batch, dtype="bool", name="mask")
        inputs.append(mask)
        kwargs["mask"] = mask
    bn = layers.BatchNormalization(
        axis=axis, momentum=momentum, epsilon=1e-3, center=center, scale=scale, renorm=True,
        renorm_clipping=clipping, renorm_momentum=renorm_momentum, dtype=policy, name="bn",
    )  # fmt: skip
    model = onnxbn.Model(inputs, bn(x, training=True, **kwargs), name="renorm")
    positive = {"moving_variance", "moving_stddev", "renorm_stddev"}
    bn.set_weights([
        rng.uniform(0.3, 2.0, w.shape) if w.name in positive else rng.normal(size=w.shape)
        for w in bn.weights
    ])  # fmt: skip
    return model, bn


def feeds_for(name, rng, batch):
    shape, axis, masked = CASES[name][:3]
    full = (shape[0] if axis % len(shape) == 0 else batch,) + shape[1:]
    channels = full[axis]
    bshape = [1] * len(full)
    bshape[axis] = channels
    x = rng.normal(0.0, 2.0, channels).reshape(bshape) + rng.uniform(
        0.5, 3.0, channels
    ).reshape(bshape) * rng.standard_normal(full)
    feeds = {"x": x.astype(np.float32)}
    if masked:
        mask = rng.random(full[:-1]) < 0.7
        mask.reshape(-1)[0] = False  # a masked-out row first: the shift starts further on
        feeds["mask"] = mask
        feeds["x"] = np.where(np.expand_dims(mask, -1), feeds["x"], np.nan).astype(np.float32)
    return feeds


def expected_steps(bn, feeds_per_step):
    states = {n: getattr(bn, n).numpy().astype(np.float64) for n in STATES}
    stored = np.dtype(bn.variable_dtype)
    compute = np.dtype("float16" if bn.compute_dtype == "float16" else bn.compute_dtype)
    steps = []
    for feeds in feeds_per_step:
        x = feeds["x"].astype(compute).astype(np.float64)  # Keras's autocast
        y, *new = renorm_oracle(
            x, axis=bn.axis, gamma=None if bn.gamma is None else bn.gamma.numpy(),
            beta=None if bn.beta is None else bn.beta.numpy(), **states,
            momentum=bn.momentum, renorm_momentum=bn.renorm_momentum, epsilon=bn.epsilon,
            renorm_clipping=bn.renorm_clipping, training=True, mask=feeds.get("mask"),
        )  # fmt: skip
        states = {n: v.astype(stored).astype(np.float64) for n, v in zip(STATES, new)}
        steps.append((y, dict(states)))
    return steps


def close(actual, expected, dtype, what):
    rtol, atol = GRAPH_TOLERANCES[dtype]
    np.testing.assert_allclose(
        np.asarray(actual, np.float64), expected, rtol=rtol, atol=atol, equal_nan=True,
        err_msg=what,
    )  # fmt: skip


@pytest.mark.parametrize("runtime", runtimes.RUNTIMES)
@pytest.mark.parametrize("case", list(CASES))
def test_renorm_training_on_every_runtime(runtime, case):
    rng = np.random.default_rng([7, list(CASES).index(case)])
    model, bn = build(case, rng)
    proto = export_onnx(model)
    state_inputs = [i.name for i in proto.graph.input[len(model.inputs) :]]
    assert state_inputs == [f"bn/{n}" for n in STATES]
    assert [o.name for o in proto.graph.output[1:]] == [f"bn/{n}/new" for n in STATES]
    assert "BatchNormalization" not in {n.op_type for n in proto.graph.node}
    feeds = [feeds_for(case, rng, batch) for batch in (5, 3, 8)]
    expected = expected_steps(bn, feeds)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        got = runtimes.carry_state(runtime, proto, feeds)
    out_dtype = TOLERANCE_DTYPE[CASES[case][6]]
    state_dtype = "float64" if bn.variable_dtype == "float64" else "float32"
    if runtime == "openvino" and out_dtype == "float64":
        out_dtype = state_dtype = "float32"  # OpenVINO's CPU plugin computes float64 in float32
    if runtime == "openvino" and out_dtype == "float16":
        # OpenVINO folds the autocast's float32 -> float16 -> float32 round trip
        # away (its x is not rounded to float16), so its statistics differ from
        # Keras's by up to float16's rounding of the data.
        state_dtype = "float16"
    for step, ((outputs, state), (y, want)) in enumerate(zip(got, expected)):
        close(outputs[0], y, out_dtype, f"{runtime} {case} step {step}: output")
        assert list(state) == [f"bn/{n}" for n in STATES]
        for n in STATES:
            close(state[f"bn/{n}"], want[n], state_dtype, f"{runtime} {case} step {step}: {n}")


@pytest.mark.parametrize("runtime", runtimes.RUNTIMES)
@pytest.mark.parametrize("frozen", [False, True], ids=["inference", "frozen"])
def test_renorm_inference_and_frozen_are_plain_batch_normalization(runtime, frozen):
    rng = np.random.default_rng(3)
    model, bn = build("nchw_rmax", rng)
    if frozen:
        bn.trainable = False
    proto = export_onnx(model, training=frozen)  # frozen: training=True has no effect
    assert list(onnxbn.initial_state(proto)) == []
    feeds = [feeds_for("nchw_rmax", rng, 4)]
    (outputs, state), = runtimes.carry_state(runtime, proto, feeds)
    y, *_ = renorm_oracle(
        feeds[0]["x"], axis=1, gamma=bn.gamma.numpy(), beta=bn.beta.numpy(),
        **{n: getattr(bn, n).numpy() for n in STATES}, momentum=bn.momentum,
        renorm_momentum=bn.renorm_momentum, epsilon=bn.epsilon,
        renorm_clipping=bn.renorm_clipping, training=False,
    )  # fmt: skip
    close(outputs[0], y, "float32", f"{runtime} frozen={frozen}")
    assert state == {}


@pytest.mark.parametrize("engine", ["runtime", "reference"])
def test_both_sessions_carry_the_five_states(engine):
    rng = np.random.default_rng(5)
    model, bn = build("nhwc_masked_dmax", rng)
    proto = export_onnx(model)
    session = (onnxbn.runtime.Session if engine == "runtime" else onnxbn.reference.Session)(proto)
    feeds = [feeds_for("nhwc_masked_dmax", rng, b) for b in (4, 6)]
    expected = expected_steps(bn, feeds)
    for step, (f, (y, want)) in enumerate(zip(feeds, expected)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            (out,) = session.run(f)
        close(out, y, "float32", f"{engine} step {step}")
        for n in STATES:
            close(session.state[f"bn/{n}"], want[n], "float32", f"{engine} step {step}: {n}")


@pytest.mark.parametrize("engine", ["runtime", "reference"])
def test_synchronized_renorm_export_across_replicas(engine):
    """Three replicas (threads standing in for MPI processes, one with an empty batch) run the
    export with `Session(comm=...)`: every replica normalizes with the global batch's renorm
    correction and ends with the oracle's five states."""
    import threading

    from tests.layers.test_batch_normalization_renorm import ThreadComm

    rng = np.random.default_rng(11)
    onnxbn.reset_names()
    x = onnxbn.Input((4, 3), name="x")
    bn = layers.BatchNormalization(
        momentum=0.6, renorm=True, renorm_clipping={"rmax": 1.2, "dmax": 0.3},
        renorm_momentum=0.5, synchronized=True, name="bn",
    )  # fmt: skip
    model = onnxbn.Model(x, bn(x, training=True))
    positive = {"moving_variance", "moving_stddev", "renorm_stddev"}
    bn.set_weights([rng.uniform(0.3, 2.0, w.shape) if w.name in positive else
                    rng.normal(size=w.shape) for w in bn.weights])  # fmt: skip
    proto = export_onnx(model)
    sizes, steps = [5, 0, 7], 2
    batches = [rng.normal(1.0, 2.0, (sum(sizes), 4, 3)).astype(np.float32) for _ in range(steps)]
    starts = np.cumsum([0] + sizes)
    shared = {"slots": [None] * len(sizes), "barrier": threading.Barrier(len(sizes), timeout=60)}
    make = onnxbn.runtime.Session if engine == "runtime" else onnxbn.reference.Session
    results, errors = [[] for _ in sizes], []

    def run(rank):
        try:
            session = make(proto, comm=ThreadComm(rank, shared))
            for batch in batches:
                (y,) = session.run({"x": batch[starts[rank] : starts[rank + 1]]})
                results[rank].append((y, dict(session.state)))
        except Exception as error:  # reported below, in the test's thread
            errors.append(error)

    threads = [threading.Thread(target=run, args=(r,)) for r in range(len(sizes))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    expected = expected_steps(bn, [{"x": b} for b in batches])
    for step, (y, want) in enumerate(expected):
        for rank in range(len(sizes)):
            got_y, state = results[rank][step]
            part = slice(starts[rank], starts[rank + 1])
            close(got_y, y[part], "float32", f"{engine} rank {rank} step {step}: output")
            for n in STATES:
                close(state[f"bn/{n}"], want[n], "float32", f"{engine} rank {rank} step {step}: {n}")
