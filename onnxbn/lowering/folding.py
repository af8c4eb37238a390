"""BatchNormalization folding: an inference-mode BN merged into the Conv/Dense before it.

`export_onnx(..., fold_batchnorm=True)` lowers the pair `producer -> BN` as the
producer alone, with weights

    s = gamma / sqrt(moving_variance + epsilon)
    kernel' = kernel * s            (along the output-channel axis)
    bias'   = (bias - moving_mean) * s + beta

computed in float64 from the layers' variables and rounded once, when the
lowering writes them as constants. The pair is folded only when every one of
these holds (otherwise both layers are lowered as they are):

- the producer is a Dense, Conv1D or Conv2D with a `linear` activation (a
  nonlinearity between the two would not commute with the affine map);
- its output feeds that BatchNormalization and nothing else (no other layer,
  no model output), and it is the BN's input, not its mask;
- the BN's channel axis is the producer's output-channel axis (last for Dense
  and `channels_last`, 1 for `channels_first`);
- no call of the BN in this export uses batch statistics (a training call, or
  a call that reads moving statistics a training call updates in the same
  graph, needs the BN as a separate op), so its moving statistics are the
  constants the fold uses;
- both layers have the same compute dtype (so the folded output is the dtype
  the BN would have delivered).

The decision needs the layer graph (call modes, masks, dtype policies), so it
is taken before lowering rather than by rewriting the ONNX graph. onnxscript's
rewriter has `FuseBatchNormIntoConv` / `FuseBatchNormIntoGemm`, but they match
only a native BatchNormalization node right after a Conv or Gemm, compute in
the initializers' dtype (float32), and would miss the shapes onnxbn emits
(channels-last: `Conv -> Transpose -> Mul -> Add`; Dense on rank > 2: `MatMul
-> Add -> Mul -> Add`). The tests use them as an independent check where they
do apply (a channels-first Conv followed by the native node).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from onnxbn.layers import activation as activations
from onnxbn.layers.batch_normalization import BatchNormalization
from onnxbn.layers.conv import BaseConv
from onnxbn.layers.dense import Dense
from onnxbn.variable import Variable


@dataclass
class FoldedNode:
    """A producer call that stands for `producer -> BN`: what the exporter's loop reads.

    Attributes:
        operation: a copy of the producer layer holding the folded float64 weights.
        call_args: the producer call's positional arguments.
        call_kwargs: the producer call's keyword arguments.
        outputs: the BN call's output tensors (the pair's result is named after them).
        index: the producer call's index (names the nodes like the original call).
        folded: the original `(producer node, BN node)`.
    """

    operation: Any
    call_args: tuple
    call_kwargs: dict
    outputs: list
    index: int
    folded: tuple = field(default=(), repr=False)


def fold_batchnorm_nodes(nodes: list, flags: dict[int, bool], outputs: list) -> list:
    """The nodes to lower, with every foldable `producer -> BN` pair merged.

    Args:
        nodes: the graph's nodes in execution order (`onnxbn.Node`).
        flags: `{id(node): resolved training flag}` of every node taking `training`.
        outputs: the graph's output tensors (an output has a consumer outside).

    Returns:
        `nodes` in the same order, where each folded producer node is replaced
        by a `FoldedNode` and its BN node is left out. Nodes that are not
        folded are the same objects.
    """
    pairs = foldable_pairs(nodes, flags, outputs)
    if not pairs:
        return list(nodes)
    by_producer = {id(producer): bn for producer, bn in pairs}
    skipped = {id(bn) for _, bn in pairs}
    result = []
    for node in nodes:
        if id(node) in skipped:
            continue
        bn_node = by_producer.get(id(node))
        if bn_node is None:
            result.append(node)
            continue
        result.append(
            FoldedNode(
                operation=folded_layer(node.operation, bn_node.operation),
                call_args=node.call_args,
                call_kwargs=node.call_kwargs,
                outputs=list(bn_node.outputs),
                index=node.index,
                folded=(node, bn_node),
            )
        )
    return result


def foldable_pairs(nodes: list, flags: dict[int, bool], outputs: list) -> list[tuple]:
    """`(producer node, BN node)` pairs that may be folded (rules in the module docstring)."""
    uses: dict[int, int] = {}
    for node in nodes:
        for tensor in node.input_tensors:
            uses[id(tensor)] = uses.get(id(tensor), 0) + 1
    for tensor in outputs:
        uses[id(tensor)] = uses.get(id(tensor), 0) + 1
    batch_stats: dict[int, bool] = {}  # id(BN op) -> some call uses batch statistics
    for node in nodes:
        op = node.operation
        if isinstance(op, BatchNormalization):
            uses_batch = op.uses_batch_statistics(flags.get(id(node), False))
            batch_stats[id(op)] = batch_stats.get(id(op), False) or uses_batch
    producers = {id(t): node for node in nodes for t in node.outputs}
    pairs = []
    for node in nodes:
        bn = node.operation
        if not isinstance(bn, BatchNormalization) or batch_stats[id(bn)] or not node.call_args:
            continue
        x = node.call_args[0]
        producer = producers.get(id(x))
        if producer is None or uses.get(id(x)) != 1 or len(producer.outputs) != 1:
            continue
        if can_fold(producer.operation, bn, len(x.shape)):
            pairs.append((producer, node))
    return pairs


def can_fold(producer: Any, bn: BatchNormalization, rank: int) -> bool:
    """True when `bn` (inference) on `producer`'s rank-`rank` output folds into its weights."""
    if not isinstance(producer, (Dense, BaseConv)) or producer.kernel is None:
        return False
    if producer.activation is not activations.linear or bn.moving_mean is None:
        return False
    if producer.compute_dtype != bn.compute_dtype:
        return False
    channel_first = isinstance(producer, BaseConv) and producer.data_format == "channels_first"
    return bn.axis % rank == (1 if channel_first else rank - 1)


def folded_weights(
    kernel: np.ndarray, bias: np.ndarray | None, bn: BatchNormalization
) -> tuple[np.ndarray, np.ndarray]:
    """`(kernel', bias')` in float64; the output channels are the kernel's last axis.

    Args:
        kernel: the producer's kernel, `(..., filters)` (Keras layout).
        bias: its bias `(filters,)`, or None.
        bn: the BatchNormalization layer (its current weights are used).
    """
    channels = kernel.shape[-1]

    def weight(variable: Variable | None, fill: float) -> np.ndarray:
        if variable is None:
            return np.full(channels, fill)
        return np.asarray(variable.value, dtype=np.float64)

    scale = weight(bn.gamma, 1.0) / np.sqrt(weight(bn.moving_variance, 1.0) + bn.epsilon)
    kernel64 = np.asarray(kernel, dtype=np.float64) * scale
    bias64 = np.zeros(channels) if bias is None else np.asarray(bias, dtype=np.float64)
    bias64 = (bias64 - weight(bn.moving_mean, 0.0)) * scale + weight(bn.beta, 0.0)
    return kernel64, bias64


def folded_layer(producer: Any, bn: BatchNormalization) -> Any:
    """A shallow copy of `producer` whose kernel and bias are the folded float64 weights.

    The copy has the producer's name and configuration, so the lowering names
    its nodes after the producer; the original layer is not modified.
    """
    kernel, bias = folded_weights(
        producer.kernel.value, None if producer.bias is None else producer.bias.value, bn
    )
    clone = copy.copy(producer)
    clone.kernel = _variable(producer, "kernel", kernel)
    clone.bias = _variable(producer, "bias", bias)
    clone.use_bias = True
    return clone


def _variable(layer: Any, name: str, value: np.ndarray) -> Variable:
    return Variable(value, name=name, path=f"{layer.name}/{name}", dtype="float64")
