"""Keras's functional-model config: writing it from a `Model` and rebuilding a `Model` from it.

A config is data: layer classes come only from the layer registry, and tensor
references (`__keras_tensor__` with `keras_history = [layer, node, index]`)
are resolved against tensors this module created itself.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from onnxbn.layers.input_layer import InputLayer
from onnxbn.operation_registry import deserialize, serialize
from onnxbn.tensor import SymbolicTensor
from onnxbn.tree import map_structure

if TYPE_CHECKING:
    from onnxbn.model import Model

_MODEL_KEYS = {"name", "trainable", "layers", "input_layers", "output_layers"}
_MODEL_CLASS_NAMES = ("Functional", "Model")
_MAX_LAYERS = 100_000


def model_to_config(model: Model) -> dict:
    # A layer's node index counts its calls in call order, skipping calls outside this
    # model (Keras's node re-indexing), so index 0 is the call `layer.output` refers to.
    in_model = {id(node) for node in model.nodes}
    node_ids: dict[int, int] = {}
    own_nodes: dict[int, list] = {}
    for op in model.operations:
        kept = [node for node in op._inbound_nodes if id(node) in in_model]
        own_nodes[id(op)] = kept
        node_ids.update((id(node), index) for index, node in enumerate(kept))

    def history(tensor: SymbolicTensor) -> list:
        op, index, out = tensor.history
        return [op.name, node_ids[id(op._inbound_nodes[index])], out]

    def arg(value: Any) -> Any:
        if isinstance(value, SymbolicTensor):
            return {
                "class_name": "__keras_tensor__",
                "config": {
                    "shape": list(value.shape),
                    "dtype": value.dtype,
                    "keras_history": history(value),
                },
            }
        if isinstance(value, np.generic):
            return value.item()
        return value

    layers = []
    for op in model.operations:
        entry = serialize(op)
        entry["name"] = op.name
        entry["inbound_nodes"] = [
            {
                "args": list(map_structure(arg, node.call_args)),
                "kwargs": map_structure(arg, node.call_kwargs),
            }
            for node in own_nodes[id(op)]
            if not isinstance(op, InputLayer)
        ]
        layers.append(entry)

    def endpoints(structure: Any) -> Any:
        if isinstance(structure, SymbolicTensor):
            return history(structure)
        return [history(t) for t in structure]

    return {
        "name": model.name,
        "trainable": model.trainable,
        "layers": layers,
        "input_layers": endpoints(model._inputs_struct),
        "output_layers": endpoints(model._outputs_struct),
    }


def _is_triplet(value: Any) -> bool:
    return (
        isinstance(value, list)
        and len(value) == 3
        and isinstance(value[0], str)
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value[1:])
    )


class _UnresolvedError(Exception):
    """A node references a tensor that no node has produced yet."""


def _model_entries(config: Any) -> dict:
    """The bare functional config (the Keras envelope removed), its keys checked."""
    if isinstance(config, dict) and "class_name" in config and "config" in config:
        if config["class_name"] not in _MODEL_CLASS_NAMES:
            raise ValueError(
                f"Expected a functional model config (class_name in {list(_MODEL_CLASS_NAMES)}), "
                f"received class_name {config['class_name']!r}."
            )
        config = config["config"]
    if not isinstance(config, dict):
        raise TypeError(f"A model config must be a dict, received {type(config).__name__}.")
    unknown = sorted(str(k) for k in set(config) - _MODEL_KEYS)
    if unknown:
        raise ValueError(
            f"Unknown keys {unknown} in a model config; expected {sorted(_MODEL_KEYS)}."
        )
    layer_entries = config.get("layers")
    if not isinstance(layer_entries, list) or len(layer_entries) > _MAX_LAYERS:
        raise TypeError(
            f"A model config's 'layers' must be a list, received {layer_entries!r:.80}."
        )
    return config


def _deserialize_layers(layer_entries: list) -> tuple[dict[str, Any], dict[str, list[dict]]]:
    """Each layer by name, in config order, with its inbound nodes in config order."""
    ops: dict[str, Any] = {}
    nodes: dict[str, list[dict]] = {}
    for entry in layer_entries:
        if not isinstance(entry, dict):
            raise TypeError(f"Each entry of 'layers' must be a dict, received {entry!r:.80}.")
        op = deserialize(entry)
        name = entry.get("name", op.name)
        if name in ops:
            raise ValueError(f"Duplicate layer name {name!r} in the model config.")
        ops[name] = op
        inbound = entry.get("inbound_nodes", [])
        if not isinstance(inbound, list):
            raise TypeError(f"inbound_nodes of {name!r} must be a list, received {inbound!r:.80}.")
        for node in inbound:
            if not isinstance(node, dict) or set(node) - {"args", "kwargs"}:
                raise ValueError(
                    f"Each inbound node of {name!r} must be {{'args', 'kwargs'}}, received {node!r:.80}."
                )
        nodes[name] = list(inbound)
    return ops, nodes


def _resolve(value: Any, created: dict[tuple[str, int, int], SymbolicTensor]) -> Any:
    """`value` with every `__keras_tensor__` reference replaced by its tensor.

    Raises:
        ValueError: a malformed reference.
        _UnresolvedError: a reference to a tensor not created yet.
    """
    if isinstance(value, dict) and value.get("class_name") == "__keras_tensor__":
        inner = value.get("config")
        history = inner.get("keras_history") if isinstance(inner, dict) else None
        if not _is_triplet(history):
            raise ValueError(f"Malformed tensor reference {value!r:.120}.")
        key = tuple(history)
        if key not in created:
            raise _UnresolvedError(key)
        return created[key]
    if isinstance(value, list):
        return [_resolve(v, created) for v in value]
    if isinstance(value, dict):
        return {k: _resolve(v, created) for k, v in value.items()}
    return value


def _call_node(
    name: str, op: Any, index: int, node: dict, created: dict[tuple[str, int, int], Any]
) -> None:
    """Calls `op` on the node's resolved arguments; records its outputs as node `index`."""
    args = _resolve(node.get("args", []), created)
    kwargs = _resolve(node.get("kwargs", {}), created)
    if not isinstance(args, list) or not isinstance(kwargs, dict):
        raise TypeError(f"Inbound node of {name!r} must have list args and dict kwargs.")
    outputs = op(*args, **kwargs)
    for i, tensor in enumerate(outputs if isinstance(outputs, (list, tuple)) else [outputs]):
        created[(name, index, i)] = tensor


def _rebuild_nodes(ops: dict[str, Any], nodes: dict[str, list[dict]]) -> dict:
    """Calls every layer on its inbound nodes, each layer's nodes in config order.

    As in Keras's `functional_from_config`: passes over the layers in config
    order, each taking a layer's pending nodes until one needs a tensor not
    made yet; node `k` of a layer is always its `k`-th call, so references
    `[layer, k, i]` mean what the writer meant even when a layer's first call
    depends on a layer listed after it.

    Returns:
        `{(layer name, node index, output index): tensor}`.

    Raises:
        ValueError: a pass that makes no progress (a dangling reference).
    """
    created: dict[tuple[str, int, int], SymbolicTensor] = {}
    done: dict[str, int] = {}
    for name, op in ops.items():
        if isinstance(op, InputLayer):
            created[(name, 0, 0)] = op.output
            done[name] = 1
    pending = {name: nodes[name] for name in ops if nodes[name] and name not in done}
    while pending:
        progress = False
        blocked: dict[str, list] = {}
        for name in list(pending):
            queue = pending[name]
            while queue:
                index = done.get(name, 0)
                try:
                    _call_node(name, ops[name], index, queue[0], created)
                except _UnresolvedError as missing:
                    blocked[name] = list(missing.args[0])
                    break
                queue.pop(0)
                done[name] = index + 1
                progress = True
            if not queue:
                del pending[name]
        if not progress:
            name, reference = next(iter(blocked.items()))
            raise ValueError(
                f"Cannot rebuild the model: node {done.get(name, 0)} of layer {name!r} "
                f"references tensor {reference}, which no layer produces."
            )
    return created


def model_from_config(config: Any, cls: type) -> Model:
    """Rebuilds a functional model; accepts the bare config or the Keras envelope.

    Raises:
        TypeError: values of the wrong type.
        ValueError: unknown keys or classes, dangling tensor references.
    """
    config = _model_entries(config)
    ops, nodes = _deserialize_layers(config["layers"])
    created = _rebuild_nodes(ops, nodes)

    def endpoints(value: Any, what: str) -> Any:
        if _is_triplet(value):
            key = tuple(value)
            if key not in created:
                raise ValueError(f"{what} references unknown tensor {value!r}.")
            return created[key]
        if isinstance(value, list) and value and all(_is_triplet(v) for v in value):
            return [endpoints(v, what) for v in value]
        raise ValueError(
            f"{what} must be [name, node, index] or a list of them, received {value!r:.80}."
        )

    inputs = endpoints(config.get("input_layers"), "input_layers")
    outputs = endpoints(config.get("output_layers"), "output_layers")
    trainable = config.get("trainable", True)
    if not isinstance(trainable, bool):
        raise TypeError(f"Model 'trainable' must be a bool, received {trainable!r}.")
    model = cls(inputs=inputs, outputs=outputs, name=config.get("name"))
    if not trainable:
        model.trainable = False
    return model
