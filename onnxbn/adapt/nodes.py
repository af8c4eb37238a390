"""The BatchNormalization nodes of an existing ONNX model, checked for adaptation.

Recalibration and `to_training` rewrite what an inference-form node holds: its
mean and variance must be initializers of its own, so that they can be
replaced (or turned into state) without touching any other node.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx
from onnx import helper

# ONNX's defaults for the BatchNormalization attributes.
DEFAULT_EPSILON = 1e-5
DEFAULT_MOMENTUM = 0.9


@dataclass(frozen=True)
class BatchNormNode:
    """One inference-form BatchNormalization node of a graph.

    Attributes:
        index: position in `graph.node`.
        name: the node's name (its output's name when it has none).
        x, scale, bias, mean, var, y: tensor names of its inputs and output.
        epsilon, momentum: its attributes (ONNX's defaults where absent).
    """

    index: int
    name: str
    x: str
    scale: str
    bias: str
    mean: str
    var: str
    y: str
    epsilon: float
    momentum: float


def default_opset(model: onnx.ModelProto) -> int:
    """The model's default-domain opset.

    Raises:
        ValueError: the model imports no opset of the default domain.
    """
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    raise ValueError("The model imports no opset of the default ONNX domain.")


def value_infos(model: onnx.ModelProto) -> dict[str, onnx.ValueInfoProto]:
    """Every typed tensor of the main graph (inputs, outputs, inferred intermediates), by name."""
    inferred = onnx.shape_inference.infer_shapes(model)
    graph = inferred.graph
    infos = list(graph.input) + list(graph.value_info) + list(graph.output)
    return {v.name: v for v in infos if v.type.tensor_type.elem_type}


def batch_norm_nodes(model: onnx.ModelProto) -> list[BatchNormNode]:
    """Every BatchNormalization node of the main graph, in graph order, checked.

    Raises:
        ValueError: naming the node, for a node in training form (training_mode=1
            or more than one output), a mean or variance that is not an
            initializer, or an initializer another node also reads; or when the
            model has no BatchNormalization node at all.
    """
    graph = model.graph
    initializers = {t.name for t in graph.initializer}
    readers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    graph_outputs = {o.name for o in graph.output}
    found = []
    for index, node in enumerate(graph.node):
        if node.op_type != "BatchNormalization" or node.domain not in ("", "ai.onnx"):
            continue
        name = node.name or node.output[0]
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if int(attrs.get("training_mode", 0)) != 0 or len([o for o in node.output if o]) > 1:
            raise ValueError(
                f"BatchNormalization node {name!r} is in training form (training_mode=1 or "
                "running-statistic outputs); expected the inference form."
            )
        x, scale, bias, mean, var = list(node.input) + [""] * (5 - len(node.input))
        for role, tensor in (("mean", mean), ("variance", var)):
            if tensor not in initializers:
                raise ValueError(
                    f"BatchNormalization node {name!r}: its {role} {tensor!r} is not an "
                    "initializer (computed in the graph or a graph input); only an "
                    "initializer can be replaced."
                )
            if readers.get(tensor, 0) > 1 or tensor in graph_outputs or mean == var:
                raise ValueError(
                    f"BatchNormalization node {name!r}: its {role} initializer {tensor!r} is "
                    "shared with another node or output; replacing it would change them too."
                )
        found.append(
            BatchNormNode(
                index=index,
                name=name,
                x=x,
                scale=scale,
                bias=bias,
                mean=mean,
                var=var,
                y=node.output[0],
                epsilon=float(attrs.get("epsilon", DEFAULT_EPSILON)),
                momentum=float(attrs.get("momentum", DEFAULT_MOMENTUM)),
            )
        )
    if not found:
        raise ValueError("The model has no BatchNormalization node to adapt.")
    return found
