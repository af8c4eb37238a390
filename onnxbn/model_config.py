"""Keras's functional-model config: writing it from a `Model` and rebuilding a `Model` from it.

A config is data: layer classes come only from the layer registry, and tensor
references (`__keras_tensor__` with `keras_history = [layer, node, index]`)
are resolved against tensors this module created itself.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from onnxbn.layers.input_layer import InputLayer
from onnxbn.layers.registry import deserialize, serialize
from onnxbn.tensor import SymbolicTensor
from onnxbn.tree import map_structure

if TYPE_CHECKING:
    from onnxbn.model import Model

_MODEL_KEYS = {"name", "trainable", "layers", "input_layers", "output_layers"}
_MODEL_CLASS_NAMES = ("Functional", "Model")
_MAX_LAYERS = 100_000


def model_to_config(model: Model) -> dict:
    # Node indices in a config count only the nodes that belong to this model.
    node_ids: dict[int, int] = {}
    per_op: dict[int, int] = {}
    for node in model.nodes:
        node_ids[id(node)] = per_op.get(id(node.operation), 0)
        per_op[id(node.operation)] = node_ids[id(node)] + 1

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
            for node in model.nodes
            if node.operation is op and not isinstance(op, InputLayer)
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


def model_from_config(config: Any, cls: type) -> Model:
    """Rebuilds a functional model; accepts the bare config or the Keras envelope.

    Raises:
        TypeError: values of the wrong type.
        ValueError: unknown keys or classes, dangling tensor references.
    """
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

    ops: dict[str, Any] = {}
    pending: list[tuple[Any, dict]] = []
    for entry in layer_entries:
        if not isinstance(entry, dict):
            raise TypeError(f"Each entry of 'layers' must be a dict, received {entry!r:.80}.")
        op = deserialize(entry)
        name = entry.get("name", op.name)
        if name in ops:
            raise ValueError(f"Duplicate layer name {name!r} in the model config.")
        ops[name] = op
        nodes = entry.get("inbound_nodes", [])
        if not isinstance(nodes, list):
            raise TypeError(f"inbound_nodes of {name!r} must be a list, received {nodes!r:.80}.")
        for node in nodes:
            if not isinstance(node, dict) or set(node) - {"args", "kwargs"}:
                raise ValueError(
                    f"Each inbound node of {name!r} must be {{'args', 'kwargs'}}, received {node!r:.80}."
                )
            pending.append((op, node))

    created: dict[tuple[str, int, int], SymbolicTensor] = {}
    node_counts: dict[str, int] = {}
    for name, op in ops.items():
        if isinstance(op, InputLayer):
            created[(name, 0, 0)] = op.output
            node_counts[name] = 1

    def resolve(value: Any) -> Any:
        if isinstance(value, dict) and value.get("class_name") == "__keras_tensor__":
            history = (
                value.get("config", {}).get("keras_history")
                if isinstance(value.get("config"), dict)
                else None
            )
            if not _is_triplet(history):
                raise ValueError(f"Malformed tensor reference {value!r:.120}.")
            key = tuple(history)
            if key not in created:
                raise LookupError(key)
            return created[key]
        if isinstance(value, list):
            return [resolve(v) for v in value]
        if isinstance(value, dict):
            return {k: resolve(v) for k, v in value.items()}
        return value

    # Nodes may reference tensors of later entries: repeat until no progress.
    while pending:
        progress = False
        remaining = []
        for op, node in pending:
            try:
                args = resolve(node.get("args", []))
                kwargs = resolve(node.get("kwargs", {}))
            except LookupError:
                remaining.append((op, node))
                continue
            if not isinstance(args, list) or not isinstance(kwargs, dict):
                raise TypeError(f"Inbound node of {op.name!r} must have list args and dict kwargs.")
            outputs = op(*args, **kwargs)
            index = node_counts.get(op.name, 0)
            node_counts[op.name] = index + 1
            outs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
            for i, tensor in enumerate(outs):
                created[(op.name, index, i)] = tensor
            progress = True
        if not progress:
            raise ValueError(
                f"Cannot rebuild the model: {len(remaining)} inbound nodes reference tensors "
                f"that no layer produces (first: layer {remaining[0][0].name!r})."
            )
        pending = remaining

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
    name = config.get("name")
    model = cls(inputs=inputs, outputs=outputs, name=name)
    if not trainable:
        model.trainable = False
    return model
