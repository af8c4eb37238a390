"""`to_training`: any exporter's inference BatchNormalization nodes in onnxbn's training form.

Each inference-form node becomes onnxbn's portable training lowering (the one
training exports use, `onnxbn/lowering/batch_normalization.py`): batch
statistics over every axis but 1, normalization by a per-channel Mul and Add,
and the node's running statistics as graph state under the state contract of
`onnxbn/contract.py` (plain inputs named after the node's mean and variance
initializers, `<name>/new` outputs, starting values in the metadata). The
result adapts at test time on onnxruntime, OpenVINO, tract and both reference
engines.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxbn.adapt.nodes import BatchNormNode, batch_norm_nodes, default_opset, value_infos
from onnxbn.contract import INITIAL_STATE_KEY, encode_initial_state, load_model
from onnxbn.dtypes import standardize_dtype
from onnxbn.lowering import emit, moments
from onnxbn.lowering.batch_normalization import (
    inverse_std,
    moving_average,
    normalized,
    write_updates,
)
from onnxbn.lowering.context import LoweringContext, Value
from onnxbn.model_files import validate

# The opsets the training lowering writes nodes for (the exporter's range floor).
MIN_OPSET = 13


def _checked_momentum(momentum: Any) -> float | None:
    if momentum is None:
        return None
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float, np.number)):
        raise TypeError(f"momentum must be a number or None, received {momentum!r}.")
    if not math.isfinite(float(momentum)) or not 0.0 <= float(momentum) <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], received {momentum!r}.")
    return float(momentum)


def _types(model: onnx.ModelProto) -> dict[str, tuple[str, int | None]]:
    """`{tensor: (dtype name, rank or None)}` of every typed tensor and initializer."""
    result = {}
    for name, info in value_infos(model).items():
        tensor_type = info.type.tensor_type
        dtype = standardize_dtype(helper.tensor_dtype_to_np_dtype(tensor_type.elem_type))
        rank = len(tensor_type.shape.dim) if tensor_type.HasField("shape") else None
        result[name] = (dtype, rank)
    for tensor in model.graph.initializer:
        dtype = standardize_dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type))
        result.setdefault(tensor.name, (dtype, len(tensor.dims)))
    return result


def _lower(ctx, node: BatchNormNode, types: dict, arrays: dict, momentum: float):
    """Emits the training form of one node into `ctx`; returns the output value."""
    x_dtype, rank = types[node.x]
    mean0, var0 = arrays[node.mean], arrays[node.var]
    channels = int(mean0.size)
    shape = (None, channels) + (None,) * (rank - 2)
    x = Value(node.x, x_dtype, shape)
    compute = "float64" if x_dtype == "float64" else "float32"
    x = emit.cast(ctx, x, compute, "input")
    states = {}
    for name, value in ((node.mean, mean0), (node.var, var0)):
        dtype = standardize_dtype(value.dtype)
        current = ctx.read_state(name, value.reshape(channels), dtype)
        states[name] = (dtype, emit.cast(ctx, current, compute, "state"))
    stats = moments.batch_moments(ctx, x, 1, None)
    batch_mean = ctx.op("Add", [stats.shift, stats.mean_shifted], label="batch_mean")
    gamma = _param(ctx, node.scale, types, channels, compute, "scale")
    beta = _param(ctx, node.bias, types, channels, compute, "bias")
    inv = inverse_std(ctx, stats.var, gamma, node.epsilon, compute)
    y = normalized(ctx, stats, inv, beta, 1, rank, channels)
    updates = []
    for name, batch in ((node.mean, batch_mean), (node.var, stats.var)):
        dtype, current = states[name]
        updates.append((name, dtype, current, moving_average(ctx, current, batch, momentum)))
    write_updates(ctx, stats, updates)
    return emit.cast(ctx, y, x_dtype, "output")


def _param(ctx, name: str, types: dict, channels: int, dtype: str, label: str):
    """The node's scale or B as a `(C,)` value of `dtype`, read from the tensor itself."""
    source, _ = types[name]
    flat = ctx.op(
        "Reshape", [Value(name, source), emit.ints(ctx, [channels], "channels")],
        label=label, shape=(channels,), allowzero=0,
    )  # fmt: skip
    return emit.cast(ctx, flat, dtype, label)


def to_training(model_or_path: Any, *, momentum: float | None = None) -> onnx.ModelProto:
    """The model with every inference BatchNormalization node in onnxbn's training form.

    Args:
        model_or_path: an `onnx.ModelProto`, a path or bytes, from any exporter.
        momentum: the running statistics' momentum for every node
            (`running = running * momentum + batch * (1 - momentum)`); None
            takes each node's own `momentum` attribute (0.9 where absent, as
            ONNX defines it).

    Returns:
        A new model: each node's mean and variance initializers become plain
        state inputs of the same names, with `<name>/new` outputs after the
        model's outputs and starting values in the `onnxbn:initial_state`
        metadata (`onnxbn.initial_state` reads them; both Sessions carry them).
        Everything else (other nodes, initializers, metadata, opset, IR
        version) is kept.

    Raises:
        TypeError: a bad `model_or_path` or `momentum` type.
        ValueError: naming the node, for a node in training form, a mean or
            variance that is not an initializer of its own, an input of
            unknown rank or below rank 2; a model already holding state; an
            opset below 13.
    """
    momentum = _checked_momentum(momentum)
    source = load_model(model_or_path)
    if INITIAL_STATE_KEY in {p.key for p in source.metadata_props}:
        raise ValueError("The model already holds training state (onnxbn:initial_state).")
    opset = default_opset(source)
    if opset < MIN_OPSET:
        raise ValueError(f"to_training reads opsets {MIN_OPSET} and newer; the model has {opset}.")
    nodes = batch_norm_nodes(source)
    model = copy.deepcopy(source)
    graph = model.graph
    types = _types(model)
    running = {n.mean for n in nodes} | {n.var for n in nodes}
    # Only the running statistics are read as arrays (the other weights stay in the graph).
    arrays = {t.name: numpy_helper.to_array(t) for t in graph.initializer if t.name in running}
    ctx = LoweringContext(opset)
    for name in _all_names(graph) - running:  # the running statistics become state inputs
        ctx.reserve(name)
    replaced: dict[int, list[onnx.NodeProto]] = {}
    for node in nodes:
        _, rank = types.get(node.x, (None, None))
        if rank is None or rank < 2:
            raise ValueError(
                f"BatchNormalization node {node.name!r}: the rank of its input {node.x!r} is "
                f"{'unknown' if rank is None else rank}; expected a known rank of 2 or more."
            )
        start = len(ctx.nodes)
        with ctx.scope(node.name):
            rate = node.momentum if momentum is None else momentum
            y = _lower(ctx, node, types, arrays, rate)
        ctx.rename(y.name, node.y)
        replaced[node.index] = ctx.nodes[start:]
    outputs = ctx.state_outputs()
    # The running statistics leave the initializers and become plain state inputs.
    kept = [t for t in graph.initializer if t.name not in running]
    del graph.initializer[:]
    graph.initializer.extend(kept + ctx.initializers)
    graph.input.extend(ctx.inputs)
    new_nodes = []  # every state is written, so state_outputs added no Identity node
    for index, original in enumerate(graph.node):
        new_nodes.extend(replaced.get(index, [original]))
    del graph.node[:]
    graph.node.extend(new_nodes)
    graph.output.extend(outputs)
    props = {p.key: p.value for p in model.metadata_props}
    props[INITIAL_STATE_KEY] = encode_initial_state(ctx.initial_state())
    helper.set_model_props(model, props)
    validate(model)
    return model


def _all_names(graph: onnx.GraphProto) -> set[str]:
    names = {i.name for i in graph.input} | {o.name for o in graph.output}
    names |= {t.name for t in graph.initializer}
    for node in graph.node:
        names.update(n for n in node.output if n)
        names.update(n for n in node.input if n)
        if node.name:
            names.add(node.name)
    return names
