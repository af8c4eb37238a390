"""Show a model's inputs, outputs, state pairs, op counts, opset and metadata."""

from __future__ import annotations

import argparse
import collections

import onnx

from onnxbn.cli.files import load_model
from onnxbn.contract import state_pairs
from onnxbn.session import value_info_spec

NAME = "inspect"
HELP = "describe an ONNX model (inputs, outputs, state, ops, opset, metadata)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="path of the .onnx file")


def _shape(spec) -> str:
    if spec.shape is None:
        return "?"
    return "(" + ", ".join("?" if d is None else str(d) for d in spec.shape) + ")"


def describe(model: onnx.ModelProto) -> str:
    graph = model.graph
    pairs = state_pairs(graph)
    state_in = {p[0] for p in pairs}
    state_out = {p[1] for p in pairs}
    lines = [f"model: {graph.name or '(unnamed)'}"]
    lines.append(
        "opset: "
        + ", ".join(f"{o.domain or 'ai.onnx'} {o.version}" for o in model.opset_import)
        + f"; IR version {model.ir_version}; producer {model.producer_name} {model.producer_version}"
    )
    lines.append("inputs:")
    for vi in graph.input:
        if vi.name in state_in:
            continue
        spec = value_info_spec(vi)
        lines.append(f"  {vi.name}: {spec.dtype} {_shape(spec)}")
    lines.append("outputs:")
    for vi in graph.output:
        if vi.name in state_out:
            continue
        spec = value_info_spec(vi)
        lines.append(f"  {vi.name}: {spec.dtype} {_shape(spec)}")
    lines.append(f"state pairs: {len(pairs)}")
    for source, target in pairs:
        lines.append(f"  {source} -> {target}")
    counts = collections.Counter(node.op_type for node in graph.node)
    lines.append(f"ops: {sum(counts.values())} nodes")
    for op_type, count in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        lines.append(f"  {op_type}: {count}")
    if model.metadata_props:
        lines.append("metadata:")
        for prop in model.metadata_props:
            value = prop.value if len(prop.value) <= 100 else prop.value[:97] + "..."
            lines.append(f"  {prop.key}: {value}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    print(describe(load_model(args.model)))
    return 0
