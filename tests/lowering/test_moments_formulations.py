"""The faster moments formulations on edge cases, on onnxruntime and the reference interpreter.

Masked channels-last sums replace masked-out rows by the first valid one (a
Gather), masked channel-inner shifts come from the first valid row of each
channel, `x - shift` on the `(M, C)` view is a native BatchNormalization node,
and channels-last normalization runs the native node on the `(M, C)` view: each
must match the float64 oracle with NaN at masked-out positions, masks whose
valid positions come late or not at all, and dynamic batch sizes.
"""

from __future__ import annotations

import numpy as np
import pytest

from onnxbn import reference
from onnxbn.export import MIN_OPSET, export_onnx, newest_opset
from onnxbn.runtime import Session
from tests.lowering.test_batch_normalization import SEED, build, oracle

ENGINES = {"ort": Session, "reference": reference.Session}

# (shape, axis): channels last of rank 2-4, channel first / middle / at 0.
LAYOUTS = [
    ((7, 5), -1),
    ((4, 6, 5), -1),
    ((3, 4, 5, 6), -1),
    ((4, 5, 3, 6), 1),
    ((3, 4, 5, 6), 2),
    ((5, 4, 7), 0),
]


def _mask(kind: str, shape, rng):
    mshape = shape[:-1]
    if kind == "random":
        return rng.random(mshape) < 0.6
    if kind == "none_valid":
        return np.zeros(mshape, bool)
    if kind == "last_only":  # the only valid position is the very last one
        mask = np.zeros(mshape, bool)
        mask.reshape(-1)[-1] = True
        return mask
    if kind == "late":  # leading positions masked out along every axis
        mask = rng.random(mshape) < 0.5
        mask.reshape(-1)[: mask.size // 2] = False
        return mask
    raise ValueError(kind)


def _check(shape, axis, mask, opset, x=None):
    rng = np.random.default_rng(SEED)
    model, bn = build(shape, axis, mode="masked" if mask is not None else "training", rng=rng)
    proto = export_onnx(model, opset=opset)
    if x is None:
        x = (rng.normal(3.0, 2.0, shape)).astype(np.float32)
    feeds = {"x": x}
    if mask is not None:
        feeds["x"] = np.where(np.expand_dims(mask, -1), x, np.nan).astype(np.float32)
        feeds["mask"] = mask
    expected, new_mean, new_var = oracle(
        feeds["x"], axis=axis, gamma=bn.gamma.value, beta=bn.beta.value,
        mean=bn.moving_mean.value, var=bn.moving_variance.value, momentum=bn.momentum,
        epsilon=bn.epsilon, training=True, mask=mask,
    )  # fmt: skip
    for name, engine in ENGINES.items():
        session = engine(proto)
        (y,) = session.run(feeds)
        what = f"{name} shape={shape} axis={axis} opset={opset}"
        np.testing.assert_allclose(y, expected, rtol=2e-5, atol=2e-5, equal_nan=True, err_msg=what)
        state = session.state
        np.testing.assert_allclose(state["bn/moving_mean"], new_mean, rtol=2e-5, atol=2e-5,
                                   err_msg=what)  # fmt: skip
        np.testing.assert_allclose(state["bn/moving_variance"], new_var, rtol=2e-5, atol=2e-5,
                                   err_msg=what)  # fmt: skip


@pytest.mark.parametrize("shape,axis", LAYOUTS)
@pytest.mark.parametrize("kind", ["random", "none_valid", "last_only", "late"])
def test_masked_edge_cases(shape, axis, kind):
    rng = np.random.default_rng([SEED, len(shape), axis % len(shape)])
    _check(shape, axis, _mask(kind, shape, rng), newest_opset())


@pytest.mark.parametrize("shape,axis", LAYOUTS)
@pytest.mark.parametrize("opset", [MIN_OPSET, newest_opset()])
def test_training_and_masked_at_opsets(shape, axis, opset):
    rng = np.random.default_rng([SEED, opset])
    _check(shape, axis, None, opset)
    _check(shape, axis, _mask("random", shape, rng), opset)


@pytest.mark.parametrize("shape", [(2, 3000, 4), (1500, 3)])
def test_shift_takes_leading_rows_only(shape):
    """More rows than SHIFT_SAMPLES, channels last, on data far from zero."""
    rng = np.random.default_rng(SEED)
    x = (1e4 + rng.standard_normal(shape)).astype(np.float32)
    _check(shape, -1, None, newest_opset(), x=x)


def test_long_rows_channel_first_masked():
    """Channel-inner rows longer than SHIFT_SAMPLES: the head row is cut."""
    shape = (3, 2, 2, 1500)
    rng = np.random.default_rng(SEED)
    x = (1e4 + rng.standard_normal(shape)).astype(np.float32)
    mask = np.array([[[False, False], [False, True]], [[True, False], [True, True]],
                     [[False, True], [True, False]]])  # fmt: skip
    _check(shape, 1, mask, newest_opset(), x=x)


def test_subtract_node_is_exact():
    """The native node with scale 1, variance 1, epsilon 0 subtracts bit for bit."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(SEED)
    x = (1e4 + rng.standard_normal((64, 8))).astype(np.float32)
    shift = x[:3].mean(axis=0).astype(np.float32)
    ones, zeros = np.ones(8, np.float32), np.zeros(8, np.float32)
    inits = [numpy_helper.from_array(v, n) for v, n in
             ((ones, "one"), (zeros, "zero"), (shift, "shift"))]  # fmt: skip
    node = helper.make_node(
        "BatchNormalization", ["x", "one", "zero", "shift", "one"], ["d"], epsilon=0.0
    )
    graph = helper.make_graph(
        [node], "sub", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [64, 8])],
        [helper.make_tensor_value_info("d", TensorProto.FLOAT, [64, 8])], inits,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])
    import onnxruntime as ort

    (d,) = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})
    np.testing.assert_array_equal(d, x - shift)


@pytest.mark.parametrize("shape,axis", [((4, 3, 5, 40), 1), ((2, 3, 4, 2, 33), 1), ((3, 4, 64), 0)])
def test_squares_over_the_last_axis_first(shape, axis):
    """Channel not last with rows of SQUARES_LAST_AXIS_MIN or more: two-level Σd²."""
    from onnxbn.lowering import moments

    assert shape[-1] >= moments.SQUARES_LAST_AXIS_MIN
    rng = np.random.default_rng(SEED)
    _check(shape, axis, None, newest_opset())
    _check(shape, axis, None, MIN_OPSET)
    x = (1e4 + rng.standard_normal(shape)).astype(np.float32)
    _check(shape, axis, None, newest_opset(), x=x)
