"""Fixtures of the adaptation tests and their float64 oracles (independent of onnxbn).

The oracles evaluate a float64 copy of a model with `onnx.reference` (not
onnxbn's interpreter, not onnxruntime): recalibration statistics are the
float64 mean and population variance of each BatchNormalization input over
every batch concatenated, nodes taken in graph order; the training form is
the model with each BatchNormalization node computing `tests.oracle.bn_oracle`
in training mode.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun

from tests.oracle import bn_oracle

TORCH = Path(__file__).parents[1] / "fixtures" / "torch"
FLOATS = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16)


# -- hand-built graphs ------------------------------------------------------------------
def _init(name, array, dtype=np.float32):
    return numpy_helper.from_array(np.asarray(array, dtype), name)


def conv_bn_relu_conv_bn(opset: int, seed: int = 0) -> onnx.ModelProto:
    """x -> Conv -> BN -> Relu -> Conv -> BN (the second BN measured in a second pass)."""
    rng = np.random.default_rng(seed)
    c = 4
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("BatchNormalization", ["c1", "g1", "b1", "m1", "v1"], ["n1"],
                         name="bn1", epsilon=1e-3, momentum=0.8),
        helper.make_node("Relu", ["n1"], ["r1"], name="relu"),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1], name="conv2"),
        helper.make_node("BatchNormalization", ["c2", "g2", "b2", "m2", "v2"], ["y"], name="bn2"),
    ]  # fmt: skip
    inits = [
        _init("w1", rng.normal(0, 0.5, (c, 3, 3, 3))), _init("w2", rng.normal(0, 0.3, (c, c, 3, 3))),
        _init("g1", rng.uniform(0.5, 1.5, c)), _init("b1", rng.normal(size=c)),
        _init("m1", rng.normal(size=c)), _init("v1", rng.uniform(0.5, 2, c)),
        _init("g2", rng.uniform(0.5, 1.5, c)), _init("b2", rng.normal(size=c)),
        _init("m2", rng.normal(size=c)), _init("v2", rng.uniform(0.5, 2, c)),
    ]  # fmt: skip
    graph = helper.make_graph(
        nodes, "conv_bn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", c, 6, 6])], inits,
    )  # fmt: skip
    ids = [helper.make_opsetid("", opset)]
    model = helper.make_model(graph, opset_imports=ids, ir_version=helper.find_min_ir_version_for(ids))
    onnx.checker.check_model(model, full_check=True)
    return model


def rank3_bn(opset: int = 18, seed: int = 1) -> onnx.ModelProto:
    """A BN over (N, C, L) feeding a second BN through Add (two depths)."""
    rng = np.random.default_rng(seed)
    c = 5
    nodes = [
        helper.make_node("BatchNormalization", ["x", "g", "b", "m", "v"], ["n"], name="bn_a",
                         epsilon=1e-5),
        helper.make_node("Add", ["n", "x"], ["s"]),
        helper.make_node("BatchNormalization", ["s", "g2", "b2", "m2", "v2"], ["y"], name="bn_b"),
    ]  # fmt: skip
    inits = [_init("g", rng.uniform(0.5, 1.5, c)), _init("b", rng.normal(size=c)),
             _init("m", rng.normal(size=c)), _init("v", rng.uniform(0.5, 2, c)),
             _init("g2", rng.uniform(0.5, 1.5, c)), _init("b2", rng.normal(size=c)),
             _init("m2", rng.normal(size=c)), _init("v2", rng.uniform(0.5, 2, c))]  # fmt: skip
    graph = helper.make_graph(
        nodes, "rank3", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", c, "L"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", c, "L"])], inits,
    )  # fmt: skip
    ids = [helper.make_opsetid("", opset)]
    return helper.make_model(graph, opset_imports=ids, ir_version=helper.find_min_ir_version_for(ids))


def torch_fixture(name: str) -> onnx.ModelProto:
    return onnx.load(str(TORCH / f"{name}.onnx"))


TORCH_FIXTURES = sorted(p.stem for p in TORCH.glob("*.onnx"))


def _fixtures():
    yield pytest.param(lambda: conv_bn_relu_conv_bn(15), id="conv_bn_relu_conv_bn_opset15")
    yield pytest.param(lambda: conv_bn_relu_conv_bn(18), id="conv_bn_relu_conv_bn_opset18")
    yield pytest.param(lambda: rank3_bn(18), id="rank3_bn")
    for name in TORCH_FIXTURES:
        yield pytest.param(lambda name=name: torch_fixture(name), id=name)


# Every model the adaptation tests run on: hand-built graphs and torch.onnx exports.
FIXTURES = list(_fixtures())


def batches_for(model: onnx.ModelProto, count: int, batch: int, seed: int = 0) -> list[dict]:
    """Seeded float32 feeds with an offset and a scale per batch (new data, other statistics)."""
    rng = np.random.default_rng(seed)
    (x,) = [i for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    dims = [d.dim_value if d.HasField("dim_value") else 7 for d in x.type.tensor_type.shape.dim]
    dims[0] = batch
    return [
        {x.name: (rng.normal(1.5, 2.0, dims) * (1 + 0.1 * k) + 0.3 * k).astype(np.float32)}
        for k in range(count)
    ]


# -- the float64 oracles ---------------------------------------------------------------
def float64_copy(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with every float tensor, input, output and cast target in float64."""
    m = copy.deepcopy(model)
    del m.graph.value_info[:]
    for i, tensor in enumerate(m.graph.initializer):
        if tensor.data_type in FLOATS:
            array = numpy_helper.to_array(tensor).astype(np.float64)
            m.graph.initializer[i].CopyFrom(numpy_helper.from_array(array, tensor.name))
    for info in list(m.graph.input) + list(m.graph.output):
        if info.type.tensor_type.elem_type in FLOATS:
            info.type.tensor_type.elem_type = TensorProto.DOUBLE
    for node in m.graph.node:
        for attribute in node.attribute:
            if node.op_type == "Cast" and attribute.name == "to" and attribute.i in FLOATS:
                attribute.i = TensorProto.DOUBLE
            if attribute.type == onnx.AttributeProto.TENSOR and attribute.t.data_type in FLOATS:
                array = numpy_helper.to_array(attribute.t).astype(np.float64)
                attribute.t.CopyFrom(numpy_helper.from_array(array, attribute.t.name))
    return m


def _as64(feeds: dict) -> dict:
    return {k: v.astype(np.float64) if v.dtype.kind == "f" else v for k, v in feeds.items()}


def bn_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.op_type == "BatchNormalization"]


def expected_statistics(model: onnx.ModelProto, batches: list[dict]) -> dict[str, tuple]:
    """`{node name: (mean, variance)}` recalibrated node by node, in graph order, in float64."""
    m64 = float64_copy(model)
    inits = {t.name: i for i, t in enumerate(m64.graph.initializer)}
    result = {}
    for node in bn_nodes(m64):
        evaluator = ReferenceEvaluator(m64)
        xs = [evaluator.run([node.input[0]], _as64(f))[0] for f in batches]
        x = np.concatenate(xs, axis=0)
        axes = (0,) + tuple(range(2, x.ndim))
        mean, var = x.mean(axis=axes), x.var(axis=axes)
        for name, value in ((node.input[3], mean), (node.input[4], var)):
            m64.graph.initializer[inits[name]].CopyFrom(numpy_helper.from_array(value, name))
        result[node.name] = (mean, var)
    return result


class _TrainingBatchNormalization(OpRun):
    """BatchNormalization in training mode by `bn_oracle`, recording the new running stats."""

    op_domain = ""
    updates: dict[str, np.ndarray] = {}
    momentum_override: float | None = None

    def _run(self, x, scale, bias, mean, var, epsilon=None, momentum=None, training_mode=None):
        rate = momentum if self.momentum_override is None else self.momentum_override
        y, new_mean, new_var = bn_oracle(
            x, axis=1, gamma=scale, beta=bias, moving_mean=mean, moving_variance=var,
            momentum=0.9 if rate is None else rate,
            epsilon=1e-5 if epsilon is None else epsilon, training=True,
        )  # fmt: skip
        names = self.onnx_node.input
        type(self).updates[names[3]] = new_mean
        type(self).updates[names[4]] = new_var
        return (y,)


_TrainingBatchNormalization.__name__ = "BatchNormalization"


def training_steps(model: onnx.ModelProto, feeds_per_step: list[dict], momentum=None) -> list:
    """`[(outputs, {state: new value})]` per step of the model with every BN in training mode."""
    m64 = float64_copy(model)
    inits = {t.name: i for i, t in enumerate(m64.graph.initializer)}
    _TrainingBatchNormalization.momentum_override = momentum
    steps = []
    for feeds in feeds_per_step:
        _TrainingBatchNormalization.updates = {}
        evaluator = ReferenceEvaluator(m64, new_ops=[_TrainingBatchNormalization])
        outputs = evaluator.run(None, _as64(feeds))
        updates = dict(_TrainingBatchNormalization.updates)
        for name, value in updates.items():
            rounded = value.astype(np.float32).astype(np.float64)  # the state is stored in float32
            m64.graph.initializer[inits[name]].CopyFrom(numpy_helper.from_array(rounded, name))
        steps.append((outputs, updates))
    return steps
