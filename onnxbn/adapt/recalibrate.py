"""`recalibrate`: exact BatchNormalization statistics of an existing ONNX model on new data.

Every inference-form BatchNormalization node gets, as its mean and variance,
the float64 mean and population variance (over every axis but 1) of the tensor
that reaches it when the model runs in inference mode with every upstream
BatchNormalization node already recalibrated: after the call, each node
normalizes exactly the distribution it sees ("AdaBN", statistics re-estimation
after pruning or quantization).

Nodes are measured by depth: a node's depth is one more than the deepest
BatchNormalization node among its ancestors, and all nodes of one depth are
measured in the same pass over the data, so a model needs as many passes as
its deepest chain of BatchNormalization nodes (a plain CNN: one pass per BN
layer in sequence; parallel branches share passes).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from onnxbn.adapt.nodes import BatchNormNode, batch_norm_nodes, value_infos
from onnxbn.contract import load_model
from onnxbn.distributed import combine_moments

ENGINES = ("onnxruntime", "reference")


class RunningMoments:
    """Per-channel `(count, mean, M2)` over batches, in float64, merged by Chan et al.

    Each batch's moments are taken two-pass (mean, then squared deviations from
    it); batches combine by `onnxbn.distributed.combine_moments`, never
    `E[x²] - E[x]²`.
    """

    def __init__(self, channels: int) -> None:
        self.count = 0
        self.mean = np.zeros(channels, np.float64)
        self.m2 = np.zeros(channels, np.float64)

    def update(self, x: np.ndarray) -> None:
        """Adds a batch `x` of shape `(N, C, ...)`."""
        x = np.asarray(x, np.float64)
        axes = (0,) + tuple(range(2, x.ndim))
        n = x.size // x.shape[1] if x.shape[1] else 0
        if n == 0:
            return
        mean = x.mean(axis=axes)
        shape = [1, x.shape[1]] + [1] * (x.ndim - 2)
        m2 = np.square(x - mean.reshape(shape)).sum(axis=axes)
        self.count, self.mean, self.m2 = combine_moments(
            (self.count, self.mean, self.m2), (n, mean, m2)
        )

    @property
    def variance(self) -> np.ndarray:
        """The population variance `M2 / count`."""
        return self.m2 / self.count


def depths(model: onnx.ModelProto, nodes: list[BatchNormNode]) -> dict[str, int]:
    """`{node name: depth}`: 0 for a node with no BatchNormalization upstream.

    One forward walk: ONNX graphs list their nodes in topological order.
    """
    names = {n.index: n.name for n in nodes}
    above: dict[str, int] = {}  # tensor name -> deepest BN depth that produced it (-1: none)
    result = {}
    for index, node in enumerate(model.graph.node):
        deepest = max((above.get(name, -1) for name in node.input), default=-1)
        if index in names:
            deepest += 1
            result[names[index]] = deepest
        for name in node.output:
            above[name] = deepest
    return result


def _probe(model: onnx.ModelProto, tensors: list[str], infos: dict) -> onnx.ModelProto:
    """The part of `model` that computes `tensors`, which become its only outputs.

    Nodes past the measured tensors are dropped (less work per batch, and the
    runtime keeps its fusions upstream). Output types come from `infos`
    (`value_infos` of the model; recalibration changes no shape).
    """
    graph = model.graph
    needed, wanted = [], set(tensors)
    for node in reversed(graph.node):  # ONNX lists nodes in topological order
        if wanted & set(node.output):
            needed.append(node)
            wanted.update(name for name in node.input if name)
            for attribute in node.attribute:  # outer-scope names read by subgraphs
                if attribute.type == onnx.AttributeProto.GRAPH:
                    wanted.update(n for sub in attribute.g.node for n in sub.input)
    outputs = [infos.get(name, onnx.ValueInfoProto(name=name)) for name in dict.fromkeys(tensors)]
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.node[:], probe.graph.output[:], probe.graph.value_info[:]
    probe.graph.node.extend(reversed(needed))
    probe.graph.output.extend(outputs)
    kept = [t for t in graph.initializer if t.name in wanted]
    del probe.graph.initializer[:]
    probe.graph.initializer.extend(kept)
    return probe


def _runner(model: onnx.ModelProto, engine: str, outputs: list[str]):
    if engine == "onnxruntime":
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        # Between runs the statistics are NumPy work: spinning pool threads would steal its CPU.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = ort.InferenceSession(
            model.SerializeToString(), options, providers=["CPUExecutionProvider"]
        )
        return lambda feeds: dict(zip(outputs, session.run(outputs, feeds)))
    from onnxbn.reference.interpreter import Interpreter

    interpreter = Interpreter(model)
    return lambda feeds: interpreter.execute(feeds, outputs)


def _check_feeds(model: onnx.ModelProto, feeds: Any, index: int) -> dict[str, np.ndarray]:
    initializers = {t.name for t in model.graph.initializer}
    required = [i.name for i in model.graph.input if i.name not in initializers]
    optional = {i.name for i in model.graph.input if i.name in initializers}
    if not isinstance(feeds, Mapping):
        raise ValueError(
            f"Batch {index} is a {type(feeds).__name__}; expected a dict of input name -> "
            f"array for the model's inputs {required}."
        )
    unknown = sorted(set(feeds) - set(required) - optional)
    missing = [n for n in required if n not in feeds]
    if unknown or missing:
        raise ValueError(
            f"Batch {index} does not match the model's inputs {required}: "
            f"missing {missing}, unknown {unknown}."
        )
    return {k: np.asarray(v) for k, v in feeds.items()}


def recalibrate(
    model_or_path: Any,
    batches: Iterable[Mapping[str, Any]],
    *,
    path: str | os.PathLike | None = None,
    engine: str = "onnxruntime",
) -> onnx.ModelProto:
    """Re-estimates every BatchNormalization node's mean and variance on `batches`.

    Args:
        model_or_path: an `onnx.ModelProto`, a path or bytes; BatchNormalization
            nodes in inference form (any opset).
        batches: feed dicts `{input name: array}`; an iterator is read once
            and kept in memory, a re-iterable (list, dataset) is read once per
            pass.
        path: optional file to write the result to, atomically.
        engine: `"onnxruntime"` (CPU) or `"reference"` (onnxbn.reference).

    Returns:
        A copy of the model where each node's mean and variance initializers
        hold the float64 mean and population variance of the node's input
        (rounded to the initializers' dtype); names, node order, other
        initializers, metadata, opset and IR version are unchanged. A model
        needs one pass over `batches` per depth of BatchNormalization nodes.

    Raises:
        TypeError: `model_or_path` of the wrong type.
        ValueError: naming the node, for a node in training form or whose mean
            or variance is not an initializer of its own; an empty `batches`;
            a batch that does not match the model's inputs; an unknown engine.
    """
    if engine not in ENGINES:
        raise ValueError(f"Unknown engine {engine!r}; expected one of {list(ENGINES)}.")
    source = load_model(model_or_path)
    nodes = batch_norm_nodes(source)
    if iter(batches) is batches:  # a one-shot iterator: every pass needs the data
        batches = list(batches)
    model = copy.deepcopy(source)
    initializers = {t.name: t for t in model.graph.initializer}
    levels = depths(model, nodes)
    infos = value_infos(model)
    passes = max(levels.values()) + 1
    from tqdm import tqdm

    for level in range(passes):
        measured = [n for n in nodes if levels[n.name] == level]
        tensors = [n.x for n in measured]
        run = _runner(_probe(model, tensors, infos), engine, tensors)
        moments: dict[str, RunningMoments] = {}
        seen = 0
        progress = tqdm(batches, desc=f"recalibrate pass {level + 1}/{passes}", disable=None,
                        leave=False, unit="batch")  # fmt: skip
        for index, feeds in enumerate(progress):
            values = run(_check_feeds(model, feeds, index))
            for node in measured:
                x = values[node.x]
                if x.ndim < 2:
                    raise ValueError(
                        f"BatchNormalization node {node.name!r}: its input has shape "
                        f"{x.shape}; expected (N, C, ...)."
                    )
                moments.setdefault(node.name, RunningMoments(x.shape[1])).update(x)
            seen += 1
        if seen == 0:
            raise ValueError("batches is empty; recalibration needs at least one batch.")
        for node in measured:
            stats = moments[node.name]
            if stats.count == 0:
                raise ValueError(
                    f"BatchNormalization node {node.name!r} saw no data (every batch was "
                    "empty); its statistics are undefined."
                )
            for name, value in ((node.mean, stats.mean), (node.var, stats.variance)):
                old = initializers[name]
                dtype = numpy_helper.to_array(old).dtype
                shaped = value.astype(dtype).reshape(tuple(old.dims))
                old.CopyFrom(numpy_helper.from_array(shaped, name))
    if path is not None:
        from onnxbn.model_files import write_atomic

        write_atomic(model, path)
    return model
