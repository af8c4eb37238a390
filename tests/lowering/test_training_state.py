"""Training exports: state carried over k runs, the raw onnxruntime contract, masks, dtypes."""

from __future__ import annotations

import base64
import json

import numpy as np
import onnxruntime as ort
import pytest

import onnxbn
from onnxbn import layers, reference
from onnxbn.export import export_onnx
from onnxbn.runtime import Session
from tests.lowering.test_batch_normalization import (
    SEED,
    _np,
    assert_close,
    build,
    eager,
    oracle,
    sample,
    seen_values,
    strict_check,
)

# (shape, axis, masked): channel last / inner / first, with and without a mask.
LAYOUTS = [
    ((5, 4), -1, False),
    ((4, 6, 3), -1, True),
    ((3, 4, 5, 6), 1, False),
    ((3, 4, 5, 6), 1, True),
    ((2, 3, 4, 5), 2, True),
    ((4, 3, 5), 0, False),
]


@pytest.mark.parametrize("shape,axis,masked", LAYOUTS)
def test_state_after_k_runs_matches_eager(shape, axis, masked):
    rng = np.random.default_rng(SEED)
    mode = "masked" if masked else "training"
    model, bn = build(shape, axis, mode=mode, rng=rng)
    proto = export_onnx(model)
    session = Session(proto)
    for step in range(4):
        feeds, _ = sample(shape, axis, "float32", rng, masked=masked)
        (y,) = session.run(feeds)
        y_eager = model(feeds, training=True)  # updates the eager layer's state
        assert_close(y, y_eager.astype(np.float64), "float32", f"step {step}")
        state = session.state
        assert_close(state["bn/moving_mean"], bn.moving_mean.value, "float32", f"mean {step}")
        assert_close(
            state["bn/moving_variance"], bn.moving_variance.value, "float32", f"var {step}"
        )


@pytest.mark.parametrize("shape,axis,masked", [c for c in LAYOUTS if c[1] != 0])
@pytest.mark.parametrize("batch", [1, 9])
def test_other_batch_size_than_exported(shape, axis, masked, batch):
    rng = np.random.default_rng(SEED + batch)
    model, bn = build(shape, axis, mode="masked" if masked else "training", rng=rng)
    session = Session(export_onnx(model))
    other = (batch,) + shape[1:]
    feeds, mask = sample(other, axis, "float32", rng, masked=masked)
    (y,) = session.run(feeds)
    expected, new_mean, _ = oracle(
        feeds["x"], axis=axis, gamma=bn.gamma.value, beta=bn.beta.value,
        mean=bn.moving_mean.value, var=bn.moving_variance.value, momentum=bn.momentum,
        epsilon=bn.epsilon, training=True, mask=mask,
    )  # fmt: skip
    assert_close(y, expected, "float32", "output")
    assert_close(session.state["bn/moving_mean"], new_mean, "float32", "state")


def read_initial_state(session: ort.InferenceSession) -> dict:
    """The README's recipe: the starting state from plain onnxruntime, json, base64, NumPy."""
    entries = json.loads(session.get_modelmeta().custom_metadata_map["onnxbn:initial_state"])
    return {
        e["name"]: np.frombuffer(base64.b64decode(e["data"]), dtype="<" + np.dtype(e["dtype"]).str[1:])
        .reshape(e["shape"])
        for e in entries
    }


@pytest.mark.parametrize("shape,axis,masked", LAYOUTS[:4])
def test_raw_onnxruntime_state_contract(shape, axis, masked, tmp_path):
    """A caller with nothing but onnxruntime carries the state by feeding `/new` back."""
    rng = np.random.default_rng(SEED + 7)
    model, bn = build(shape, axis, mode="masked" if masked else "training", rng=rng)
    path = tmp_path / "bn.onnx"
    export_onnx(model, path)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    # State inputs are plain inputs: nothing a runtime could fold into a constant.
    assert session.get_overridable_initializers() == []
    outputs = [o.name for o in session.get_outputs()]
    state_in = ["bn/moving_mean", "bn/moving_variance"]
    assert [i.name for i in session.get_inputs()][-2:] == state_in
    assert outputs[-2:] == [s + "/new" for s in state_in]
    state = read_initial_state(session)
    assert list(state) == state_in
    mean, var = bn.moving_mean.numpy(), bn.moving_variance.numpy()
    np.testing.assert_array_equal(state["bn/moving_mean"], mean)
    np.testing.assert_array_equal(state["bn/moving_variance"], var)
    for step in range(3):
        feeds, mask = sample(shape, axis, "float32", rng, masked=masked)
        y, new_mean, new_var = session.run(None, {**feeds, **state})
        state = {"bn/moving_mean": new_mean, "bn/moving_variance": new_var}
        expected, mean, var = oracle(
            feeds["x"], axis=axis, gamma=bn.gamma.value, beta=bn.beta.value, mean=mean,
            var=var, momentum=bn.momentum, epsilon=bn.epsilon, training=True, mask=mask,
        )  # fmt: skip
        assert_close(y, expected, "float32", f"step {step}")
        assert_close(new_mean, mean, "float32", f"mean {step}")
        assert_close(new_var, var, "float32", f"var {step}")


def test_initial_state_matches_the_layer_and_both_sessions_start_from_it(tmp_path):
    rng = np.random.default_rng(SEED + 8)
    model, bn = build((5, 4), -1, mode="training", rng=rng)
    path = tmp_path / "bn.onnx"
    proto = export_onnx(model, path)
    assert not {t.name for t in proto.graph.initializer} & {"bn/moving_mean", "bn/moving_variance"}
    expected = {"bn/moving_mean": bn.moving_mean.numpy(), "bn/moving_variance": bn.moving_variance.numpy()}
    for source in (proto, path, str(path), proto.SerializeToString()):
        state = onnxbn.initial_state(source)
        assert list(state) == list(expected)
        for name, value in expected.items():
            assert state[name].dtype == value.dtype and state[name].shape == value.shape
            np.testing.assert_array_equal(state[name], value)
    for session in (Session(proto), reference.Session(proto)):
        assert list(session.state) == list(expected)
        for name, value in expected.items():
            np.testing.assert_array_equal(session.state[name], value)
    inference = export_onnx(model, training=False)
    assert onnxbn.initial_state(inference) == {}


def test_initial_state_errors(tmp_path):
    with pytest.raises(TypeError, match="received int"):
        onnxbn.initial_state(3)
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="Not a valid ONNX model"):
        onnxbn.initial_state(bad)
    model, _ = build((5, 4), -1, mode="training")
    proto = export_onnx(model)
    for entry in proto.metadata_props:
        if entry.key == "onnxbn:initial_state":
            entry.value = "[{\"name\": 1}]"
    with pytest.raises(ValueError, match="onnxbn:initial_state"):
        onnxbn.initial_state(proto)
    del proto.metadata_props[:]
    with pytest.raises(ValueError, match="no starting value"):
        onnxbn.initial_state(proto)


def test_shared_layer_has_one_state_pair_updated_twice():
    onnxbn.reset_names()
    rng = np.random.default_rng(SEED)
    x = onnxbn.Input((4, 3), name="x")
    bn = layers.BatchNormalization(momentum=0.8, name="shared")
    y = bn(bn(x, training=True), training=True)
    model = onnxbn.Model(x, y)
    bn.set_weights([rng.uniform(0.5, 1.5, 3), rng.normal(size=3), rng.normal(size=3),
                    rng.uniform(0.5, 2, 3)])  # fmt: skip
    proto = export_onnx(model)
    strict_check(proto)
    assert [i.name for i in proto.graph.input] == ["x", "shared/moving_mean",
                                                   "shared/moving_variance"]  # fmt: skip
    assert [o.name for o in proto.graph.output] == [
        "shared_1", "shared/moving_mean/new", "shared/moving_variance/new"]  # fmt: skip
    feeds = {"x": rng.normal(2.0, 3.0, (5, 4, 3)).astype(np.float32)}
    session = Session(proto)
    (out,) = session.run(feeds)
    y_eager, (mean, var) = eager(model, bn, feeds, training=True)
    assert_close(out, y_eager, "float32", "output")
    assert_close(session.state["shared/moving_mean"], mean, "float32", "mean")
    assert_close(session.state["shared/moving_variance"], var, "float32", "var")


@pytest.mark.parametrize("axis", [1, -1])
def test_training_call_then_inference_call_reads_updated_state(axis):
    onnxbn.reset_names()
    rng = np.random.default_rng(SEED)
    x = onnxbn.Input((4, 6), name="x")
    bn = layers.BatchNormalization(axis=axis, momentum=0.5, name="bn")
    y = bn(bn(x, training=True), training=False)
    model = onnxbn.Model(x, y)
    proto = export_onnx(model)
    strict_check(proto)
    feeds = {"x": rng.normal(1.0, 2.0, (3, 4, 6)).astype(np.float32)}
    session = Session(proto)
    (out,) = session.run(feeds)
    y_eager, (mean, _) = eager(model, bn, feeds, training=None)
    assert_close(out, y_eager, "float32", "output")
    assert_close(session.state["bn/moving_mean"], mean, "float32", "mean")


def test_default_masked_export_has_no_control_flow():
    model, _ = build((3, 4, 5), -1, mode="masked")
    assert "If" not in {n.op_type for n in export_onnx(model).graph.node}


@pytest.mark.parametrize("axis", [1, -1])
def test_empty_batch(axis):
    rng = np.random.default_rng(SEED)
    for mode in ("training", "masked"):
        model, bn = build((3, 4, 5), axis, mode=mode, rng=rng)
        session = Session(export_onnx(model))
        feeds = {"x": np.zeros((0, 4, 5), np.float32)}
        if mode == "masked":
            feeds["mask"] = np.zeros((0, 4), bool)
        (y,) = session.run(feeds)
        assert y.shape == (0, 4, 5)
        _, (mean, var) = eager(model, bn, feeds, training=True)
        # Unmasked: no statistics, state unchanged; masked: Keras's count + 1e-7 gives 0, 0.
        assert_close(session.state["bn/moving_mean"], mean, "float32", mode)
        assert_close(session.state["bn/moving_variance"], var, "float32", mode)
        if mode == "training":
            np.testing.assert_array_equal(session.state["bn/moving_mean"], bn.moving_mean.value)


@pytest.mark.parametrize("axis", [1, -1])
def test_all_false_mask_gives_zero_statistics(axis):
    rng = np.random.default_rng(SEED)
    model, bn = build((3, 4, 5), axis, mode="masked", rng=rng)
    session = Session(export_onnx(model))
    feeds = {"x": rng.normal(size=(3, 4, 5)).astype(np.float32), "mask": np.zeros((3, 4), bool)}
    old_mean = bn.moving_mean.value.astype(np.float64)
    (y,) = session.run(feeds)
    assert_close(session.state["bn/moving_mean"], old_mean * bn.momentum, "float32", "mean")
    expected, _, _ = oracle(
        feeds["x"], axis=axis, gamma=bn.gamma.value, beta=bn.beta.value, mean=old_mean,
        var=bn.moving_variance.value, momentum=bn.momentum, epsilon=bn.epsilon,
        training=True, mask=feeds["mask"],
    )  # fmt: skip
    assert_close(y, expected, "float32", "output")


@pytest.mark.parametrize("axis", [1, 2, -1])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, 3e38])
def test_masked_out_nan_and_inf_do_not_leak(axis, bad):
    rng = np.random.default_rng(SEED)
    model, bn = build((4, 3, 5, 6), axis, mode="masked", rng=rng)
    proto = export_onnx(model)
    strict_check(proto)
    session = Session(proto)
    feeds, mask = sample((4, 3, 5, 6), axis, "float32", rng, masked=True)
    feeds["x"] = np.where(np.expand_dims(mask, -1), feeds["x"], np.float32(bad))
    session.run(feeds)
    for name, value in session.state.items():
        assert np.all(np.isfinite(value)), name
    _, (mean, var) = eager(model, bn, feeds, training=True)
    assert_close(session.state["bn/moving_mean"], mean, "float32", "mean")
    assert_close(session.state["bn/moving_variance"], var, "float32", "var")


@pytest.mark.parametrize("mask_dtype", ["float32", "int32", "uint8", "float16"])
def test_numeric_masks(mask_dtype):
    rng = np.random.default_rng(SEED)
    model, bn = build((4, 5, 3), -1, mode="masked", mask_dtype=mask_dtype, rng=rng)
    session = Session(export_onnx(model))
    feeds, _ = sample((4, 5, 3), -1, "float32", rng, masked=True, mask_dtype=mask_dtype)
    values = rng.choice([0.0, 1.0, 2.0, -1.0], size=(4, 5))
    if mask_dtype.startswith("float"):
        values[0, 0] = np.nan  # non-zero: valid, as numpy's `mask != 0`
    if mask_dtype == "uint8":
        values = np.abs(values)
    feeds["mask"] = values.astype(mask_dtype)
    feeds["x"] = np.nan_to_num(feeds["x"], nan=0.5)
    (y,) = session.run(feeds)
    y_eager, (mean, _) = eager(model, bn, feeds, training=True)
    assert_close(y, y_eager, "float32", "output")
    assert_close(session.state["bn/moving_mean"], mean, "float32", "mean")


# Keras casts float inputs to the compute dtype first; ints and bools are computed in float32.
AUTOCAST = [
    ("float16", "float32"),
    ("float32", "float64"),
    ("float64", "float32"),
    ("float32", "int32"),
    ("float32", "bool"),
    ("float64", "int64"),
    ("mixed_float16", "float32"),
    ("mixed_bfloat16", "bfloat16"),
    ("bfloat16", "float16"),
]


@pytest.mark.parametrize("policy,input_dtype", AUTOCAST)
@pytest.mark.parametrize("mode", ["inference", "training"])
def test_autocast_and_policies(policy, input_dtype, mode):
    rng = np.random.default_rng(SEED)
    shape, axis = (4, 3, 5), 1
    model, bn = build(shape, axis, mode=mode, dtype=policy, input_dtype=input_dtype, rng=rng)
    proto = export_onnx(model)
    strict_check(proto)
    session = Session(proto)
    raw = rng.normal(1.0, 2.0, shape)
    if input_dtype == "bool":
        raw = raw > 1.0
    elif input_dtype.startswith("int"):
        raw = np.round(raw * 3)
    feeds = {"x": raw.astype(_np(input_dtype))}
    (y,) = session.run(feeds)
    assert y.dtype == np.dtype(_np(bn.compute_dtype))
    y_eager, (mean, var) = eager(model, bn, feeds, training=mode == "training")
    expected, new_mean, new_var = oracle(
        seen_values(bn, feeds, bn.compute_dtype), axis=axis, gamma=bn.gamma.value,
        beta=bn.beta.value, mean=bn.moving_mean.value, var=bn.moving_variance.value,
        momentum=bn.momentum, epsilon=bn.epsilon, training=mode == "training",
    )  # fmt: skip
    # Integer and bool inputs are computed in float32 even by a float64 layer.
    computed = (
        "float32"
        if bn.compute_dtype == "float64" and "float" not in input_dtype
        else (bn.compute_dtype)
    )
    assert_close(y, expected, computed, "output vs oracle")
    assert_close(y, y_eager.astype(np.float64), computed, "output vs eager")
    if mode == "training":
        state = session.state
        assert state["bn/moving_mean"].dtype == np.dtype(_np(bn.variable_dtype))
        stored = computed if bn.variable_dtype == "float64" else bn.variable_dtype
        assert_close(state["bn/moving_mean"], new_mean, stored, "mean vs oracle")
        assert_close(state["bn/moving_variance"], new_var, stored, "var vs oracle")
        assert_close(state["bn/moving_mean"], mean.astype(np.float64), stored, "mean")
        assert_close(state["bn/moving_variance"], var.astype(np.float64), stored, "var")
