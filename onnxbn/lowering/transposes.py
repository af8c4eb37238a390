"""Cancelling layout transposes around element-wise ops between channels-last layers.

A channels-last Conv lowers to `Transpose -> Conv -> Transpose` (ONNX's Conv is
channels-first), so `Conv2D -> ReLU -> Conv2D` exports as

    Conv -> Transpose(to NHWC) -> Relu -> Transpose(to NCHW) -> Conv

An element-wise unary op commutes with any transpose, so the Relu can run on
the channels-first tensor and the two transposes cancel:

    Conv -> Relu -> Conv

`cancel_transposes` repeats two rewrites until neither applies:

- push down: an element-wise op whose every input is a Transpose by the same
  permutation, read by nothing else, runs on the untransposed inputs and one
  Transpose follows it (never more transposes than before; a residual `Add`
  of two transposed branches saves one);
- cancel: a Transpose read by a Transpose of the inverse permutation is
  skipped; a Transpose nobody reads any more goes.

A tensor that is a graph output keeps its name and layout. onnxscript's
rewriter has `TransposeTranspose` but no rule that moves a transpose across an
element-wise op, and onnxruntime does it only inside its own session; this pass
makes the file itself lean for every runtime.
"""

from __future__ import annotations

import onnx
from onnx import helper

# Element-wise ops without a layout-dependent attribute (binary ones broadcast per axis,
# so transposing both inputs alike commutes with them).
ELEMENTWISE = frozenset(
    {"Relu", "LeakyRelu", "Sigmoid", "Tanh", "Elu", "Selu", "Softplus", "Softsign",
     "HardSigmoid", "HardSwish", "Abs", "Neg", "Exp", "Log", "Sqrt", "Erf", "Identity",
     "Gelu", "Mish", "Celu", "ThresholdedRelu", "Add", "Sub", "Mul", "Div", "Max", "Min"}
)  # fmt: skip


def _perm(node: onnx.NodeProto) -> list[int] | None:
    for attribute in node.attribute:
        if attribute.name == "perm":
            return list(attribute.ints)
    return None  # default: reverse the axes; not produced by onnxbn, left alone


def _inverse(perm: list[int]) -> list[int]:
    inverse = [0] * len(perm)
    for i, p in enumerate(perm):
        inverse[p] = i
    return inverse


def _fresh(base: str, taken: set[str]) -> str:
    name, k = base, 0
    while name in taken:
        k += 1
        name = f"{base}_{k}"
    taken.add(name)
    return name


def cancel_transposes(graph: onnx.GraphProto) -> int:
    """Pushes transposes below element-wise ops and cancels inverse pairs, in place.

    Args:
        graph: a topologically sorted graph (as onnxbn exports it).

    Returns:
        How many Transpose nodes fewer the graph has.
    """
    before = sum(node.op_type == "Transpose" for node in graph.node)
    while _cancel_pairs(graph) or _push_down(graph):
        pass
    return before - sum(node.op_type == "Transpose" for node in graph.node)


class _Index:
    """Producers, readers and taken names of a graph (rebuilt after every rewrite)."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.nodes = list(graph.node)
        self.producer = {out: node for node in self.nodes for out in node.output}
        self.readers: dict[str, list[onnx.NodeProto]] = {}
        for node in self.nodes:
            for name in _reads(node):
                self.readers.setdefault(name, []).append(node)
        self.outputs = {o.name for o in graph.output}
        self.taken = (
            set(self.producer)
            | {i.name for i in graph.input}
            | {t.name for t in graph.initializer}
            | {node.name for node in self.nodes}
        )

    def transpose_of(self, name: str) -> onnx.NodeProto | None:
        node = self.producer.get(name)
        if node is None or node.op_type != "Transpose" or _perm(node) is None:
            return None
        return node

    def only_reader(self, name: str, node: onnx.NodeProto) -> bool:
        readers = self.readers.get(name, [])
        return name not in self.outputs and all(r is node for r in readers)


def _reads(node: onnx.NodeProto) -> list[str]:
    """Every name a node reads, its subgraphs' outer-scope reads included."""
    names = [n for n in node.input if n]
    for attribute in node.attribute:
        if attribute.type == onnx.AttributeProto.GRAPH:
            for inner in attribute.g.node:
                names += _reads(inner)
    return names


def _cancel_pairs(graph: onnx.GraphProto) -> bool:
    index = _Index(graph)
    for first in index.nodes:
        if index.transpose_of(first.output[0]) is not first:
            continue
        inverse = _inverse(_perm(first))
        cancelling = [
            reader
            for reader in index.readers.get(first.output[0], [])
            if reader.op_type == "Transpose"
            and _perm(reader) == inverse
            and reader.output[0] not in index.outputs
        ]
        if not cancelling:
            continue
        drop = {id(reader) for reader in cancelling}
        for reader in cancelling:
            _rename_reads(index.nodes, reader.output[0], first.input[0])
        remaining = [r for r in index.readers.get(first.output[0], []) if id(r) not in drop]
        if not remaining and first.output[0] not in index.outputs:
            drop.add(id(first))
        _replace(graph, [n for n in index.nodes if id(n) not in drop])
        return True
    return False


def _push_down(graph: onnx.GraphProto) -> bool:
    index = _Index(graph)
    for op in index.nodes:
        if op.op_type not in ELEMENTWISE or len(op.output) != 1 or not op.input:
            continue
        sources = [index.transpose_of(name) for name in op.input]
        if any(s is None or not index.only_reader(s.output[0], op) for s in sources):
            continue
        perm = _perm(sources[0])
        if any(_perm(s) != perm for s in sources):
            continue
        result = op.output[0]
        moved = _fresh(f"{result}/channels_first", index.taken)
        for i, source in enumerate(sources):
            op.input[i] = source.input[0]
        op.output[0] = moved
        back = helper.make_node(
            "Transpose", [moved], [result], name=_fresh(f"{result}/transpose", index.taken),
            perm=perm,
        )
        drop = {id(s) for s in sources}
        position = index.nodes.index(op)
        nodes = index.nodes[:position] + [op, back] + index.nodes[position + 1 :]
        _replace(graph, [n for n in nodes if id(n) not in drop])
        return True
    return False


def _replace(graph: onnx.GraphProto, nodes: list[onnx.NodeProto]) -> None:
    copies = []
    for node in nodes:
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        copies.append(copy)
    del graph.node[:]
    graph.node.extend(copies)


def _rename_reads(nodes, old: str, new: str) -> None:
    for node in nodes:
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                _rename_reads(list(attribute.g.node), old, new)
