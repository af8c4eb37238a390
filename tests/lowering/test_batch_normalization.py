"""BatchNormalization lowering: onnxruntime vs a float64 oracle vs the eager layer.

The case table covers mode (inference / training / masked / frozen) x axis
(first / middle / last / negative) x rank 2-5 x dtype (float32 / float16 /
bfloat16 / float64) x center/scale x opset {15, 18, newest}. CI runs a pairwise
selection that holds every pair of values at least once; the full cross product
runs with `ONNXBN_FULL=1 pytest -m slow`.

Expected values come from `oracle` below, written from the seed's formulas in
float64 (Keras's masked moments: the mask expanded at the last axis, sums divided
by `count + 1e-7`), independent of onnxbn's own NumPy function.
"""

from __future__ import annotations

import itertools
import os
import warnings

import ml_dtypes
import numpy as np
import onnx
import pytest

import onnxbn
from onnxbn import layers
from onnxbn.export import DEFAULT_OPSET, MIN_OPSET, export_onnx, newest_opset
from onnxbn.runtime import Session
from tests.oracle import GRAPH_TOLERANCES, bn_oracle

SEED = 20240611
FULL = os.environ.get("ONNXBN_FULL") == "1"

HALF = {"float16": np.float16, "bfloat16": ml_dtypes.bfloat16}
SHAPES = {2: (6, 5), 3: (3, 4, 5), 4: (2, 3, 4, 5), 5: (2, 3, 2, 3, 4)}
AXES = {"first": 0, "middle": None, "last": -1, "negative": -2}
AFFINE = {"both": (True, True), "center": (True, False), "scale": (False, True),
          "none": (False, False)}  # fmt: skip
OPSETS = sorted({MIN_OPSET, DEFAULT_OPSET, newest_opset()})
MODES = ["inference", "training", "masked", "frozen"]
DTYPES = ["float32", "float16", "bfloat16", "float64"]


# -- the oracle --------------------------------------------------------------------
def oracle(x, *, axis, gamma, beta, mean, var, momentum, epsilon, training, mask=None):
    """`(y, new_moving_mean, new_moving_variance)` in float64 (see `tests/oracle.py`)."""
    return bn_oracle(
        x, axis=axis, gamma=gamma, beta=beta, moving_mean=mean, moving_variance=var,
        momentum=momentum, epsilon=epsilon, training=training, mask=mask,
    )  # fmt: skip


def assert_close(actual, expected, dtype, what):
    rtol, atol = GRAPH_TOLERANCES[dtype]
    actual = np.asarray(actual).astype(np.float64)
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol, equal_nan=True, err_msg=what)


# -- building a case ---------------------------------------------------------------
def resolve_axis(kind: str, rank: int) -> int:
    return rank // 2 if kind == "middle" else AXES[kind]


def build(shape, axis, *, mode, dtype="float32", affine=(True, True), input_dtype=None,
          mask_dtype="bool", rng=None, momentum=0.9, epsilon=1e-3, name="bn"):  # fmt: skip
    """A model Input -> BatchNormalization(call as `mode`) with seeded weights."""
    onnxbn.reset_names()
    rng = rng or np.random.default_rng(SEED)
    rank = len(shape)
    fixed = axis % rank == 0  # the channel is the batch axis: fix the batch size
    batch = shape[0] if fixed else None
    x = onnxbn.Input(shape[1:], batch_size=batch, dtype=input_dtype or dtype, name="x")
    inputs, kwargs = [x], {}
    if mode == "masked":
        mask = onnxbn.Input(shape[1:-1], batch_size=batch, dtype=mask_dtype, name="mask")
        inputs.append(mask)
        kwargs["mask"] = mask
    center, scale = affine
    bn = layers.BatchNormalization(
        axis=axis, momentum=momentum, epsilon=epsilon, center=center, scale=scale,
        dtype=dtype, name=name,
    )  # fmt: skip
    y = bn(x, training=mode != "inference", **kwargs)
    channels = shape[axis]
    weights = []
    if scale:
        weights.append(rng.uniform(0.5, 1.5, channels))
    if center:
        weights.append(rng.normal(0.0, 1.0, channels))
    weights += [rng.normal(0.0, 1.0, channels), rng.uniform(0.5, 2.0, channels)]
    bn.set_weights(weights)
    if mode == "frozen":
        bn.trainable = False
    return onnxbn.Model(inputs, y, name="case"), bn


def sample(shape, axis, dtype, rng, *, masked=False, mask_dtype="bool", loc=None):
    """Per-channel offset/scale data; masked-out positions hold NaN (floats)."""
    channels = shape[axis]
    bshape = [1] * len(shape)
    bshape[axis] = channels
    offset = rng.normal(0.0, 2.0, channels) if loc is None else np.full(channels, loc)
    spread = rng.uniform(0.5, 2.0, channels)
    x = offset.reshape(bshape) + spread.reshape(bshape) * rng.standard_normal(shape)
    feeds = {}
    mask = None
    if masked:
        mask = rng.random(shape[:-1]) < 0.7
        if np.dtype(_np(dtype)).kind == "f" or dtype == "bfloat16":
            x = np.where(np.expand_dims(mask, -1), x, np.nan)
        feeds["mask"] = mask.astype(_np(mask_dtype))
    feeds["x"] = x.astype(_np(dtype))
    return feeds, mask


def _np(dtype):
    return HALF.get(dtype, dtype)


def seen(x, compute_dtype):
    """What the layer computes on (float inputs autocast to the compute dtype, as Keras)."""
    x = np.asarray(x)
    if x.dtype.kind == "f" or x.dtype.name == "bfloat16":
        x = x.astype(_np(compute_dtype))
    return x.astype(np.float64)


def expected_steps(bn, feeds_per_step, *, axis, updates, masked, epsilon=None):
    """Oracle outputs and state per step, the state carried in float64 rounded as stored.

    `epsilon` overrides the layer's (e.g. as a graph's float32 attribute holds it).
    """
    mean = np.asarray(bn.moving_mean.value, np.float64)
    var = np.asarray(bn.moving_variance.value, np.float64)
    stored = np.dtype(_np(bn.variable_dtype))
    steps = []
    for feeds in feeds_per_step:
        mask = feeds.get("mask") if masked else None
        y, new_mean, new_var = bn_oracle(
            seen(feeds["x"], bn.compute_dtype), axis=axis,
            gamma=None if bn.gamma is None else bn.gamma.value,
            beta=None if bn.beta is None else bn.beta.value,
            moving_mean=mean, moving_variance=var, momentum=bn.momentum,
            epsilon=bn.epsilon if epsilon is None else epsilon, training=updates, mask=mask,
        )  # fmt: skip
        mean = new_mean.astype(stored).astype(np.float64)
        var = new_var.astype(stored).astype(np.float64)
        steps.append((y, {"bn/moving_mean": mean, "bn/moving_variance": var}))
    return steps


def eager(model, layer, feeds, training):
    """The eager model's output and the layer's moving statistics after the call."""
    saved = layer.get_weights()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # NaN at masked positions
        y = model(feeds, training=training)
    stats = (layer.moving_mean.numpy(), layer.moving_variance.numpy())
    layer.set_weights(saved)
    return y, stats


def strict_check(proto):
    onnx.checker.check_model(proto, full_check=True)
    onnx.shape_inference.infer_shapes(proto, strict_mode=True, check_type=True)


def seen_values(layer, feeds, compute_dtype):
    """What the layer computes on: float inputs autocast to the compute dtype (Keras)."""
    x = feeds["x"]
    if x.dtype.kind == "f" or x.dtype == ml_dtypes.bfloat16:
        x = x.astype(_np(compute_dtype))
    return x.astype(np.float64)


def check_structure(proto, mode):
    types = [n.op_type for n in proto.graph.node]
    assert "Transpose" not in types
    assert all(n.domain in ("", "ai.onnx") for n in proto.graph.node)
    for node in proto.graph.node:
        if node.op_type == "BatchNormalization":
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            assert attrs["training_mode"] == 0 and len(node.output) == 1
            assert {"epsilon", "momentum"} <= set(attrs)
    if mode in ("inference", "frozen"):
        assert not any(t.startswith("Reduce") or t == "MatMul" for t in types), types
        data_ops = [t for t in types if t in ("Mul", "Add", "BatchNormalization")]
        assert data_ops == ["BatchNormalization"], types
    else:
        assert "ReduceSum" in types or "MatMul" in types
        # Portable: no native node fed computed statistics, no control flow.
        assert "BatchNormalization" not in types and "If" not in types, types


def run_case(mode, axis_kind, rank, dtype, affine_kind, opset):
    rng = np.random.default_rng([SEED, MODES.index(mode), rank, DTYPES.index(dtype), opset])
    shape = SHAPES[rank]
    axis = resolve_axis(axis_kind, rank)
    model, bn = build(shape, axis, mode=mode, dtype=dtype, affine=AFFINE[affine_kind], rng=rng)
    training = mode != "inference"
    proto = export_onnx(model, training=training, opset=opset)
    strict_check(proto)
    check_structure(proto, mode)
    state_names = [i.name for i in proto.graph.input[len(model.inputs) :]]
    updates = mode in ("training", "masked")
    assert state_names == (["bn/moving_mean", "bn/moving_variance"] if updates else [])
    feeds, mask = sample(shape, axis, dtype, rng, masked=mode == "masked")
    session = Session(proto, providers=["CPUExecutionProvider"])
    (y,) = session.run(feeds)
    assert y.dtype == np.dtype(_np(bn.compute_dtype)) and y.shape == shape
    expected, new_mean, new_var = oracle(
        seen_values(bn, feeds, bn.compute_dtype), axis=axis,
        gamma=None if bn.gamma is None else bn.gamma.value,
        beta=None if bn.beta is None else bn.beta.value,
        mean=bn.moving_mean.value, var=bn.moving_variance.value,
        momentum=bn.momentum, epsilon=bn.epsilon, training=updates, mask=mask,
    )  # fmt: skip
    what = f"{mode} axis={axis} rank={rank} {dtype} {affine_kind} opset={opset}"
    assert_close(y, expected, bn.compute_dtype, what + ": output vs oracle")
    y_eager, (eager_mean, eager_var) = eager(model, bn, feeds, training)
    assert_close(y, y_eager.astype(np.float64), bn.compute_dtype, what + ": output vs eager")
    if updates:
        state = session.state
        for got, want, eager_value in (
            (state["bn/moving_mean"], new_mean, eager_mean),
            (state["bn/moving_variance"], new_var, eager_var),
        ):
            assert got.dtype == np.dtype(_np(bn.variable_dtype))
            assert_close(got, want, bn.variable_dtype, what + ": state vs oracle")
            assert_close(got, eager_value.astype(np.float64), bn.variable_dtype, what + ": state")


# -- the case table ------------------------------------------------------------------
DIMENSIONS = {
    "mode": MODES,
    "axis": list(AXES),
    "rank": list(SHAPES),
    "dtype": DTYPES,
    "affine": list(AFFINE),
    "opset": OPSETS,
}


def valid(case: dict) -> bool:
    return not (case.get("axis") == "middle" and case.get("rank", 3) < 3)


def pairwise(dimensions: dict) -> list[tuple]:
    """A deterministic greedy selection holding every valid pair of values once or more."""
    names = list(dimensions)
    every = [dict(zip(names, values)) for values in itertools.product(*dimensions.values())]
    every = [c for c in every if valid(c)]

    def pairs(case):
        return {(a, case[a], b, case[b]) for a, b in itertools.combinations(names, 2)}

    uncovered = set().union(*(pairs(c) for c in every))
    chosen = []
    while uncovered:
        best = max(every, key=lambda c: len(pairs(c) & uncovered))
        uncovered -= pairs(best)
        chosen.append(tuple(best[n] for n in names))
    return chosen


PAIRWISE = pairwise(DIMENSIONS)
EVERY = [
    c
    for c in itertools.product(*DIMENSIONS.values())
    if valid(dict(zip(DIMENSIONS, c))) and c not in PAIRWISE
]


def test_pairwise_selection_covers_every_value_pair():
    names = list(DIMENSIONS)
    for (i, a), (j, b) in itertools.combinations(enumerate(names), 2):
        for va, vb in itertools.product(DIMENSIONS[a], DIMENSIONS[b]):
            if valid({a: va, b: vb}):
                assert any(c[i] == va and c[j] == vb for c in PAIRWISE), (a, va, b, vb)


@pytest.mark.parametrize("mode,axis_kind,rank,dtype,affine_kind,opset", PAIRWISE)
def test_case_table(mode, axis_kind, rank, dtype, affine_kind, opset):
    run_case(mode, axis_kind, rank, dtype, affine_kind, opset)


@pytest.mark.slow
@pytest.mark.skipif(not FULL, reason="full sweep of the case table: set ONNXBN_FULL=1")
def test_case_table_full_sweep():
    failures = []
    for case in EVERY:
        try:
            run_case(*case)
        except AssertionError as error:
            failures.append(f"{case}: {str(error).splitlines()[0]}")
    assert not failures, f"{len(failures)} of {len(EVERY)} cases failed:\n" + "\n".join(failures)
