"""A tiny graph from a `LoweringContext`, to test one lowering helper on runtimes.

Declare inputs with `ctx.add_input` / `ctx.read_state`, emit the nodes, then
`model(ctx, outputs)` returns a model whose outputs are `outputs` followed by
every state's `/new`, and `run(runtime, model, feeds)` its outputs by name.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
from onnx import helper

from onnxbn.lowering.context import LoweringContext, Value, onnx_dtype
from tests.runtimes import load


def model(ctx: LoweringContext, outputs: Sequence[Value] = ()) -> onnx.ModelProto:
    """The checked model of everything `ctx` holds."""
    infos = [
        helper.make_tensor_value_info(v.name, onnx_dtype(v.dtype), list(v.shape)) for v in outputs
    ]
    graph = helper.make_graph(
        ctx.nodes, "standalone", ctx.inputs, infos + ctx.state_outputs(), ctx.initializers
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", ctx.opset)])
    proto.ir_version = 8
    onnx.checker.check_model(proto, full_check=True)
    return proto


def run(runtime: str, proto: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict:
    """`{output name: array}` of one run of `proto` on `runtime` (see tests/runtimes.py)."""
    names = [o.name for o in proto.graph.output]
    return dict(zip(names, (np.asarray(r) for r in load(runtime, proto)(feeds))))
