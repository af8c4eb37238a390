"""Readable exports: node names, doc_strings, value_info shapes, and cancelled transposes."""

from __future__ import annotations

import collections
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

import onnxbn
from onnxbn import layers, reference
from onnxbn.lowering.readable import annotate
from onnxbn.lowering.transposes import cancel_transposes

sys.path.insert(0, str(Path(__file__).parents[2]))
from models.real_models import MODELS  # noqa: E402


def masked_training_export():
    onnxbn.reset_names()
    x = onnxbn.Input(shape=(None, 16), name="x")
    m = onnxbn.Input(shape=(None,), dtype="bool", name="mask")
    y = layers.BatchNormalization(momentum=0.9, name="bn")(x, mask=m)
    return onnxbn.export_onnx(onnxbn.Model([x, m], y, name="demo"), training=True)


def valid(model):
    onnx.checker.check_model(model, full_check=True)
    onnx.shape_inference.infer_shapes(model, strict_mode=True, check_type=True)


def test_nodes_are_named_for_what_they_compute():
    model = masked_training_export()
    names = [node.name for node in model.graph.node]
    assert len(set(names)) == len(names)
    assert not [n for n in names if ":node" in n]
    assert all(n.startswith("bn/") for n in names)
    for label in ("bn/batch_mean", "bn/batch_var", "bn/inv_std", "bn/moving_mean/new"):
        assert label in names, label
    producer = {node.output[0]: node.name for node in model.graph.node}
    assert producer["bn/moving_mean/new"] == "bn/moving_mean/new"
    assert producer["bn/moving_variance/new"] == "bn/moving_variance/new"


def test_state_inputs_and_outputs_say_which_layer_and_weight():
    """Viewers shorten `bn/moving_mean/new` to `new`; the doc_strings tell them apart."""
    model = masked_training_export()
    docs = {v.name: v.doc_string for v in list(model.graph.input) + list(model.graph.output)}
    assert docs["bn/moving_mean/new"].startswith("moving_mean of layer 'bn' after this run")
    assert docs["bn/moving_variance/new"].startswith("moving_variance of layer 'bn'")
    assert "'bn/moving_mean'" in docs["bn/moving_mean/new"]
    assert "bn/moving_variance/new" in docs["bn/moving_variance"]
    assert docs["x"] == "" and docs["bn"] == ""
    assert [o.name for o in model.graph.output] == [
        "bn", "bn/moving_mean/new", "bn/moving_variance/new"
    ]  # fmt: skip


def test_annotate_adds_shapes_and_doc_strings_and_keeps_the_model():
    model = masked_training_export()
    before = onnx.ModelProto()
    before.CopyFrom(model)
    annotate(model)
    valid(model)
    shapes = {
        v.name: [d.dim_value or d.dim_param for d in v.type.tensor_type.shape.dim]
        for v in model.graph.value_info
    }
    assert shapes["bn/batch_mean"] == [16] and shapes["bn/inv_std"] == [16]
    assert "Exported by onnxbn; layer calls in training mode" in model.graph.doc_string
    assert "2 state inputs" in model.graph.doc_string
    first = model.graph.node[0]
    assert first.doc_string.startswith("First node of BatchNormalization 'bn' (axis=-1")
    assert "momentum=0.9" in first.doc_string
    assert sum(bool(n.doc_string) for n in model.graph.node) == 1
    assert [n.name for n in model.graph.node] == [n.name for n in before.graph.node]
    feeds = {
        "x": np.random.default_rng(0).normal(size=(3, 5, 16)).astype(np.float32),
        "mask": np.ones((3, 5), bool),
        **onnxbn.initial_state(model),
    }
    for a, b in zip(reference.run(model, feeds), reference.run(before, feeds)):
        np.testing.assert_array_equal(a, b)


def _transposes(model):
    return collections.Counter(n.op_type for n in model.graph.node)["Transpose"]


@pytest.mark.parametrize("training", [False, True])
def test_resnet_transposes_cancel_between_channels_last_convolutions(training):
    import onnxruntime

    model, sample = MODELS["resnet_cnn"]()
    exported = onnxbn.export_onnx(model, training=training)
    rewritten = onnx.ModelProto()
    rewritten.CopyFrom(exported)
    removed = cancel_transposes(rewritten.graph)
    valid(rewritten)
    # export_onnx already ran the pass: a second run finds nothing (idempotent)
    assert removed == 0
    if training:  # training BatchNormalization sits between the transposes: nothing moves
        assert _transposes(exported) == 12
    else:  # only the input's and the pooling's layout changes are left (12 before the pass)
        assert _transposes(exported) == 2
        ops = [n.op_type for n in rewritten.graph.node]
        assert "Transpose" not in ops[2:-5]  # none between the stem and the last block
    assert [o.name for o in rewritten.graph.output] == [o.name for o in exported.graph.output]
    feeds = {**sample, **onnxbn.initial_state(exported)}
    want = reference.run(exported, feeds)
    for got in (
        reference.run(rewritten, feeds),
        onnxruntime.InferenceSession(rewritten.SerializeToString()).run(None, feeds),
    ):
        for a, b in zip(got, want):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_a_graph_output_keeps_its_name_and_layout():
    """A ReLU between two channels-last convolutions that is also a model output."""
    onnxbn.reset_names()
    x = onnxbn.Input((6, 6, 2), name="x")
    h = layers.Conv2D(3, 3, padding="same", name="c1")(x)
    r = layers.ReLU(name="r")(h)
    y = layers.Conv2D(4, 1, name="c2")(r)
    model = onnxbn.Model(x, [r, y])
    rng = np.random.default_rng(1)
    model.set_weights([rng.normal(size=w.shape).astype(np.float32) for w in model.weights])
    exported = onnxbn.export_onnx(model)
    rewritten = onnx.ModelProto()
    rewritten.CopyFrom(exported)
    # export_onnx ran the pass (4 -> 3 Transposes: `r` still leaves as NHWC); a rerun finds none
    assert _transposes(exported) == 3 and cancel_transposes(rewritten.graph) == 0
    valid(rewritten)
    assert [o.name for o in rewritten.graph.output] == ["r", "c2"]
    data = rng.normal(size=(2, 6, 6, 2)).astype(np.float32)
    want = model(data)
    for got, expected in zip(reference.run(rewritten, {"x": data}), want):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
