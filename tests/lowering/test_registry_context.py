"""The lowering registry and context: plugins, naming, explicit attributes."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import onnxbn
from onnxbn import layers
from onnxbn.export import export_onnx
from onnxbn.layers.batch_normalization import BatchNormalization
from onnxbn.lowering import LOWERING_RULES, LoweringContext, lookup_lowering, register_lowering
from onnxbn.lowering.input_layer import lower_input_layer
from onnxbn.operation import Operation


def test_every_layer_module_has_its_rule_registered():
    assert lookup_lowering(BatchNormalization(name="rule_check")).__module__.endswith(
        "lowering.batch_normalization"
    )
    assert LOWERING_RULES.lookup(layers.InputLayer) is lower_input_layer


def test_duplicate_registration_is_an_error():
    with pytest.raises(ValueError, match="Duplicate lowering rule"):
        register_lowering(BatchNormalization)(lambda ctx, op, x: x)


def test_missing_rule_lists_known_operations():
    class Unlowered(Operation):
        pass

    with pytest.raises(ValueError, match="No ONNX lowering for Unlowered.*BatchNormalization"):
        lookup_lowering(Unlowered(name="nothing"))


def test_context_names_are_unique_and_scoped():
    ctx = LoweringContext(18)
    with ctx.scope("bn"):
        a = ctx.fresh("sum")
        b = ctx.fresh("sum")
    assert (a, b) == ("bn/sum", "bn/sum_1")
    with pytest.raises(ValueError, match="used twice"):
        ctx.reserve("bn/sum")


def test_context_writes_schema_defaults_explicitly():
    ctx = LoweringContext(18)
    x = ctx.add_input("x", "float32", ["batch", 3])
    with ctx.scope("layer"):
        ctx.op("ReduceSum", [x, ctx.constant(np.array([0]), "axes")])
        with pytest.raises(ValueError, match="no attributes"):
            ctx.op("Relu", [x], bogus=1)
    attrs = {a.name for a in ctx.nodes[0].attribute}
    assert attrs == {"keepdims", "noop_with_empty_axes"}


def test_names_in_the_graph_carry_the_layer_name():
    onnxbn.reset_names()
    x = onnxbn.Input((5, 3), name="x")
    mask = onnxbn.Input((5,), dtype="bool", name="mask")
    y = layers.BatchNormalization(name="norm")(x, mask=mask, training=True)
    proto = export_onnx(onnxbn.Model([x, mask], y))
    for node in proto.graph.node:
        assert node.name.startswith("norm/"), node.name
        for name in node.output:
            assert name.startswith("norm") or name in ("norm",), name
    for tensor in proto.graph.initializer:
        assert tensor.name.startswith("norm/"), tensor.name


def test_batchnorm_node_attributes_are_explicit():
    onnxbn.reset_names()
    x = onnxbn.Input((3, 4, 4), name="x")
    y = layers.BatchNormalization(axis=1, epsilon=1e-3, momentum=0.99, name="bn")(x)
    proto = export_onnx(onnxbn.Model(x, y))
    (node,) = proto.graph.node
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert set(attrs) == {"epsilon", "momentum", "training_mode"}
    assert attrs["training_mode"] == 0
    assert attrs["momentum"] == pytest.approx(0.99)
