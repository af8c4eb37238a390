"""BatchNormalization folding (`onnxbn/lowering/folding.py`).

- the decision: which `producer -> BN` pairs fold, and every rule that stops one;
- the arithmetic: the folded layer's eager call equals the pair's inference call,
  and agrees with onnxscript's FuseBatchNormIntoConv / IntoGemm where those apply;
- the export: `fold_batchnorm=True` and `False` give results equal within
  tolerance, and the folded graph has no BN-derived op after the Conv/Gemm/MatMul.

The export checks need `export.py` to call `fold_batchnorm_nodes`; until it imports
it they are strict xfails (they fail for the expected reason, nothing is skipped).
"""

from __future__ import annotations

import functools

import numpy as np
import onnx
import pytest

import onnxbn
from onnxbn import export as export_module
from onnxbn import layers
from onnxbn.export import export_onnx
from onnxbn.lowering.folding import FoldedNode, fold_batchnorm_nodes, foldable_pairs, folded_layer
from onnxbn.runtime import Session
from tests.oracle import GRAPH_TOLERANCES

SEED = 7
WIRED = hasattr(export_module, "fold_batchnorm_nodes")
needs_wiring = pytest.mark.xfail(
    not WIRED, strict=True, reason="export.py does not call folding.fold_batchnorm_nodes yet"
)
# What an inference BatchNormalization lowers to when it is kept.
BN_OPS = {"BatchNormalization", "Mul"}


def _bn(**kwargs):
    return layers.BatchNormalization(name="bn", **kwargs)


def _model(shape, producer, bn, *, after=None, dtype="float32", outputs=None):
    onnxbn.reset_names()
    x = onnxbn.Input(shape, dtype=dtype, name="x")
    h = producer(x)
    y = bn(h)
    if after is not None:
        y = after(y)
    return onnxbn.Model(x, outputs(h, y) if outputs else y, name="m")


# name -> (model builder, folded op types)
FOLDABLE = {
    "dense_rank2": (lambda: _model((5,), layers.Dense(6, name="p"), _bn()), ["Gemm"]),
    "dense_rank3": (
        lambda: _model((3, 5), layers.Dense(6, name="p"), _bn(axis=2)),
        ["MatMul", "Add"],
    ),
    "dense_no_bias_bn_no_affine": (
        lambda: _model(
            (5,), layers.Dense(6, use_bias=False, name="p"), _bn(center=False, scale=False)
        ),
        ["Gemm"],
    ),
    "conv2d_channels_last_relu_after": (
        lambda: _model(
            (7, 6, 3),
            layers.Conv2D(4, 3, padding="same", use_bias=False, name="p"),
            _bn(momentum=0.9),
            after=layers.ReLU(name="relu"),
        ),
        # The Relu runs before the Transpose back (cancel_transposes pushes it down).
        ["Transpose", "Conv", "Relu", "Transpose"],
    ),
    "conv2d_channels_first_strided": (
        lambda: _model(
            (3, 8, 8),
            layers.Conv2D(4, 3, strides=2, data_format="channels_first", name="p"),
            _bn(axis=1),
        ),
        ["Conv"],
    ),
    "conv1d_groups": (
        lambda: _model((9, 4), layers.Conv1D(6, 3, groups=2, padding="causal", name="p"), _bn()),
        ["Transpose", "Conv", "Transpose"],
    ),
    "conv2d_float64": (
        lambda: _model(
            (6, 6, 2), layers.Conv2D(3, 3, dtype="float64", name="p"), _bn(dtype="float64")
        ),
        # float64 convolves by strided slices and one MatMul (onnxruntime has no float64 Conv)
        ["Cast"] + ["Slice"] * 9 + ["Concat", "MatMul", "Add"],
    ),
    "dense_float16": (
        lambda: _model((5,), layers.Dense(6, dtype="float16", name="p"), _bn(dtype="float16")),
        ["Cast", "Cast", "Gemm", "Cast"],
    ),
    "frozen_bn_in_training_export": (
        lambda: _model((5,), layers.Dense(6, name="p"), _bn(trainable=False)),
        ["Gemm"],
    ),
}


def _not_foldable():
    def shared_with_training_call():
        onnxbn.reset_names()
        x = onnxbn.Input((5,), name="x")
        bn = _bn()
        a = bn(layers.Dense(5, name="p")(x))
        return onnxbn.Model(x, bn(a, training=True), name="m")

    return {
        "producer_activation": lambda: _model((5,), layers.Dense(6, activation="relu"), _bn()),
        "producer_output_is_model_output": lambda: _model(
            (5,), layers.Dense(6), _bn(), outputs=lambda h, y: [y, h]
        ),
        "producer_output_used_twice": lambda: _model(
            (5,), layers.Dense(6), _bn(), outputs=lambda h, y: layers.Add()([y, h])
        ),
        "bn_in_training": lambda: _model((5,), layers.Dense(6), lambda h: _bn()(h, training=True)),
        "bn_shared_with_a_training_call": shared_with_training_call,
        "bn_axis_not_the_channels": lambda: _model((3, 5), layers.Dense(6), _bn(axis=1)),
        "channels_first_conv_bn_last_axis": lambda: _model(
            (3, 6, 6), layers.Conv2D(4, 3, data_format="channels_first"), _bn(axis=-1)
        ),
        "different_compute_dtypes": lambda: _model(
            (5,), layers.Dense(6), _bn(dtype="mixed_float16")
        ),
        "bn_after_non_kernel_layer": lambda: _model((5,), layers.ReLU(), _bn()),
    }


NOT_FOLDABLE = _not_foldable()


@functools.cache
def built(name: str):
    """The case's model with seeded non-trivial weights, and a feed."""
    model = {**{k: v[0] for k, v in FOLDABLE.items()}, **NOT_FOLDABLE}[name]()
    rng = np.random.default_rng([SEED, sum(map(ord, name))])
    model.set_weights(
        [
            rng.uniform(0.5, 2.0, w.shape) if w.name in ("gamma", "moving_variance")
            else rng.normal(0.0, 0.8, w.shape)
            for w in model.weights
        ]
    )  # fmt: skip
    shape = model.inputs[0].shape
    x = rng.normal(0.5, 1.5, (4, *shape[1:])).astype(np.float32)
    return model, {"x": x}


def _training(name: str) -> bool | None:
    return True if name == "frozen_bn_in_training_export" else None


def _flags(nodes: list, training: bool | None) -> dict[int, bool]:
    """Each call's training flag as export_onnx resolves it (`training` wins, else recorded)."""
    flags = {}
    for node in nodes:
        if node.operation._call_has_training_arg:
            recorded = node.call_kwargs.get("training")
            flags[id(node)] = bool(training if training is not None else recorded)
    return flags


# -- decision ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", FOLDABLE)
def test_pair_is_found(name):
    model, _ = built(name)
    nodes = model.nodes
    flags = _flags(nodes, _training(name))
    pairs = foldable_pairs(nodes, flags, model.outputs)
    assert [(p.operation.name, b.operation.name) for p, b in pairs] == [("p", "bn")]
    lowered = fold_batchnorm_nodes(nodes, flags, model.outputs)
    assert len(lowered) == len(nodes) - 1
    (folded,) = [n for n in lowered if isinstance(n, FoldedNode)]
    assert folded.outputs == pairs[0][1].outputs and folded.index == pairs[0][0].index


@pytest.mark.parametrize("name", NOT_FOLDABLE)
def test_pair_is_not_folded(name):
    model, _ = built(name)
    nodes = model.nodes
    flags = _flags(nodes, None)
    assert foldable_pairs(nodes, flags, model.outputs) == []
    assert fold_batchnorm_nodes(nodes, flags, model.outputs) == nodes


# -- arithmetic ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", FOLDABLE)
def test_folded_layer_equals_the_pair_eagerly(name):
    model, feeds = built(name)
    producer, bn = model.get_layer("p"), model.get_layer("bn")
    kernel_before = producer.kernel.numpy()
    clone = folded_layer(producer, bn)
    x = feeds["x"]
    want = bn(producer(x), training=False).astype(np.float64)
    got = clone(x).astype(np.float64)
    rtol, atol = GRAPH_TOLERANCES[bn.compute_dtype]
    np.testing.assert_allclose(got, want, rtol=rtol, atol=atol)
    np.testing.assert_array_equal(producer.kernel.numpy(), kernel_before)  # untouched
    assert clone.kernel.dtype == "float64" and clone.name == producer.name


@pytest.mark.parametrize(
    ("name", "rule"),
    [("conv2d_channels_first_strided", "conv"), ("dense_rank2", "gemm")],
)
def test_agrees_with_onnxscript_fusion(name, rule):
    """onnxscript fuses the native BN that onnxbn emits after a channels-first Conv or a Gemm."""
    from onnxscript import rewriter
    from onnxscript.rewriter.rules import common

    model, feeds = built(name)
    proto = export_onnx(model, fold_batchnorm=False)
    fused = rewriter.rewrite(
        proto, pattern_rewrite_rules=[getattr(common, f"fuse_batchnorm_into_{rule}_rule")]
    )
    assert "BatchNormalization" not in [n.op_type for n in fused.graph.node]
    producer = next(n for n in fused.graph.node if n.op_type in ("Conv", "Gemm"))
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in fused.graph.initializer}
    theirs = weights[producer.input[1]]
    ours = folded_layer(model.get_layer("p"), model.get_layer("bn")).kernel.numpy()
    if rule == "conv":
        ours = np.transpose(ours, (3, 2, 0, 1))
    np.testing.assert_allclose(theirs, ours, rtol=1e-6, atol=1e-6)
    want = Session(proto).run(feeds)[0]
    np.testing.assert_allclose(Session(fused).run(feeds)[0], want, rtol=2e-5, atol=2e-5)


# -- export ------------------------------------------------------------------------------------
@needs_wiring
@pytest.mark.parametrize("name", FOLDABLE)
def test_export_folds(name):
    model, feeds = built(name)
    training = _training(name)
    folded = export_onnx(model, training=training)
    kept = export_onnx(model, training=training, fold_batchnorm=False)
    for proto in (folded, kept):
        onnx.checker.check_model(proto, full_check=True)
    types = [n.op_type for n in folded.graph.node]
    assert types == FOLDABLE[name][1]
    assert BN_OPS & {n.op_type for n in kept.graph.node}
    assert [o.name for o in folded.graph.output] == [o.name for o in kept.graph.output]
    eager = model(feeds, training=training)
    dtype = model.get_layer("bn").compute_dtype
    rtol, atol = GRAPH_TOLERANCES[dtype]
    a, b = Session(folded).run(feeds)[0], Session(kept).run(feeds)[0]
    for got in (a, b):
        np.testing.assert_allclose(
            got.astype(np.float64), eager.astype(np.float64), rtol=rtol, atol=atol
        )


@pytest.mark.parametrize("name", NOT_FOLDABLE)
def test_export_keeps_unfoldable_pairs(name):
    model, feeds = built(name)
    folded = export_onnx(model)
    kept = export_onnx(model, fold_batchnorm=False)
    assert [n.op_type for n in folded.graph.node] == [n.op_type for n in kept.graph.node]
    for got, want in zip(Session(folded).run(feeds), Session(kept).run(feeds)):
        np.testing.assert_array_equal(got, want)


@needs_wiring
def test_folded_names_carry_the_producer_and_outputs_the_bn():
    model, _ = built("conv2d_channels_last_relu_after")
    proto = export_onnx(model)
    assert {n.name.split("/")[0] for n in proto.graph.node} == {"p", "relu"}
    (conv,) = [n for n in proto.graph.node if n.op_type == "Conv"]
    (relu,) = [n for n in proto.graph.node if n.op_type == "Relu"]
    assert relu.input[0] == conv.output[0]  # the folded pair feeds the Relu directly
    assert [o.name for o in proto.graph.output] == ["relu"]
