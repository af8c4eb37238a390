"""`Model`: a functional graph of recorded calls, evaluated eagerly or exported."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from onnxbn.dtypes import standardize_dtype, to_numpy_dtype
from onnxbn.layers.input_layer import InputLayer
from onnxbn.layers.layer import Layer, assign_weights, to_array
from onnxbn.node import Node
from onnxbn.operation import Operation
from onnxbn.tensor import SymbolicTensor
from onnxbn.trainer import Trainer
from onnxbn.tree import flatten, map_structure
from onnxbn.variable import Variable


def _check_tensors(structure: Any, what: str) -> list[SymbolicTensor]:
    tensors = flatten(structure)
    if not tensors:
        raise ValueError(f"Model {what} must not be empty.")
    for t in tensors:
        if not isinstance(t, SymbolicTensor) or t.history is None:
            raise TypeError(
                f"Model {what} must be SymbolicTensors produced by onnxbn.Input or a layer "
                f"call, received {t!r}."
            )
    return tensors


def map_graph(
    inputs: list[SymbolicTensor], outputs: list[SymbolicTensor]
) -> tuple[list[Node], list[Operation]]:
    """Keras's `map_graph`: the nodes in execution order and the operations in Keras order.

    A depth-first walk from the outputs (first arguments first) numbers the
    operations; depths count from the outputs, a shared operation taking its
    deepest call's depth. Nodes run by decreasing depth; operations are listed
    by decreasing depth, then walk order — the order Keras writes in configs.

    Raises:
        ValueError: an output depends on an input that is not in `inputs`
            (graph disconnected), or an input does not reach any output.
    """
    input_nodes = {id(t.history[0]._inbound_nodes[t.history[1]]) for t in inputs}
    finished: set[int] = set()
    post_order: list[Node] = []
    op_index: dict[int, int] = {}
    for tensor in outputs:
        stack = [(tensor.history[0]._inbound_nodes[tensor.history[1]], False)]
        while stack:
            node, expanded = stack.pop()
            if expanded:
                finished.add(id(node))
                post_order.append(node)
                continue
            if id(node) in finished:
                continue
            if isinstance(node.operation, InputLayer) and id(node) not in input_nodes:
                raise ValueError(
                    f"Graph disconnected: the outputs depend on input {node.operation.name!r}, "
                    f"which is not one of the model inputs {[t.name for t in inputs]}."
                )
            op_index.setdefault(id(node.operation), len(op_index))
            stack.append((node, True))
            for parent in reversed(node.parent_nodes):
                if id(parent) not in finished:
                    stack.append((parent, False))
    for tensor in inputs:
        if id(tensor.history[0]._inbound_nodes[tensor.history[1]]) not in finished:
            raise ValueError(
                f"Model input {tensor.name!r} is not connected to the outputs "
                f"{[t.name for t in outputs]}."
            )
    node_depth: dict[int, int] = {}
    op_depth: dict[int, int] = {}
    for node in reversed(post_order):
        depth = max(node_depth.setdefault(id(node), 0), op_depth.get(id(node.operation), 0))
        op_depth[id(node.operation)] = node_depth[id(node)] = depth
        for parent in node.parent_nodes:
            node_depth[id(parent)] = max(depth + 1, node_depth.get(id(parent), 0))
    position = {id(n): i for i, n in enumerate(post_order)}
    nodes = sorted(post_order, key=lambda n: (-node_depth[id(n)], position[id(n)]))
    operations: list[Operation] = []
    seen: set[int] = set()
    for node in post_order:
        if id(node.operation) not in seen:
            seen.add(id(node.operation))
            operations.append(node.operation)
    operations.sort(key=lambda op: (-op_depth[id(op)], op_index[id(op)]))
    return nodes, operations


def _describe(op: Operation) -> str:
    calls = len(getattr(op, "_inbound_nodes", ()))
    return f"<{type(op).__name__} name={op.name!r} at 0x{id(op):x}, {calls} call(s)>"


def _check_unique_names(operations: list[Operation]) -> None:
    """Keras's rule: every operation of a model has its own name (weights are found by it)."""
    by_name: dict[str, list[Operation]] = {}
    for op in operations:
        by_name.setdefault(op.name, []).append(op)
    for name, ops in by_name.items():
        if len(ops) > 1:
            raise ValueError(
                f"The name {name!r} is used by {len(ops)} different layers of the model: "
                f"{', '.join(_describe(op) for op in ops)}. Every layer of a model needs its "
                "own name (weight paths, graph names and configs use it); rename one, e.g. "
                f"name={name + '_1'!r}. A layer called twice is shared and counts once."
            )


class Model(Trainer, Operation):
    """A functional model: the graph of calls between `inputs` and `outputs`.

    Args:
        inputs: a `SymbolicTensor` from `onnxbn.Input`, or a list of them.
        outputs: a symbolic output tensor, or a list of them.
        name: model name.
        trainable: initial `trainable` flag of every layer.

    Call arguments:
        *arrays: one array per input, in order (or a single list, or a dict
            keyed by input name).
        training: None keeps what each call recorded; True/False applies to
            every layer call (Keras's `model(x, training=...)`).

    Returns:
        The output array(s), in the structure of `outputs`.

    Raises:
        TypeError: inputs/outputs that are not symbolic tensors.
        ValueError: inputs not connected to the outputs, outputs that need
            an input the model does not have, or two different layers with the
            same name.
    """

    def __init__(self, inputs: Any, outputs: Any, name: str | None = None, trainable: bool = True):
        self._inputs_struct = inputs
        self._outputs_struct = outputs
        self.inputs = _check_tensors(inputs, "inputs")
        self.outputs = _check_tensors(outputs, "outputs")
        for t in self.inputs:
            if not isinstance(t.history[0], InputLayer):
                raise ValueError(
                    f"Model inputs must come from onnxbn.Input(); {t.name!r} is produced by "
                    f"{t.history[0].name!r}."
                )
        if len({id(t) for t in self.inputs}) != len(self.inputs):
            raise ValueError("Model inputs must be distinct tensors.")
        self._nodes, self._operations = map_graph(self.inputs, self.outputs)
        _check_unique_names(self._operations)
        super().__init__(name=name)
        if not trainable:
            self.trainable = False

    @property
    def nodes(self) -> list[Node]:
        """The model's nodes in topological order (input nodes included)."""
        return list(self._nodes)

    @property
    def operations(self) -> list[Operation]:
        """Every operation of the graph, once each, in Keras's layer order."""
        return list(self._operations)

    @property
    def layers(self) -> list[Layer]:
        """The model's layers (InputLayers included, as Keras 3)."""
        return [op for op in self.operations if isinstance(op, Layer)]

    def get_layer(self, name: str) -> Layer:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise ValueError(f"No layer named {name!r}; layers: {[l.name for l in self.layers]}.")

    # -- weights --------------------------------------------------------------
    @property
    def trainable(self) -> bool:
        """The model's own flag, as Keras's: setting it sets every layer's; a frozen layer
        inside a trainable model leaves it True (and its config says so)."""
        return getattr(self, "_trainable", True)

    @trainable.setter
    def trainable(self, value: bool) -> None:
        if not isinstance(value, (bool, np.bool_)):
            raise TypeError(f"trainable must be a bool, received {value!r}.")
        self._trainable = bool(value)
        for layer in self.layers:
            layer.trainable = value

    @property
    def weights(self) -> list[Variable]:
        return [w for layer in self.layers for w in layer.weights]

    @property
    def trainable_weights(self) -> list[Variable]:
        return [w for layer in self.layers for w in layer.trainable_weights]

    @property
    def non_trainable_weights(self) -> list[Variable]:
        return [w for layer in self.layers for w in layer.non_trainable_weights]

    @property
    def losses(self) -> list[float]:
        return [loss for layer in self.layers for loss in layer.losses]

    def get_weights(self) -> list[np.ndarray]:
        return [w.numpy() for w in self.weights]

    def set_weights(self, weights: Sequence[Any]) -> None:
        """Sets every weight from a list in Keras order (checked before any assignment)."""
        if isinstance(weights, (list, tuple)) and len(weights) == len(self.weights):
            for variable, value in zip(self.weights, weights):
                variable.check(value)  # e.g. a negative variance, before anything changes
        assign_weights(self.weights, weights, f"model '{self.name}'")

    # -- eager evaluation -----------------------------------------------------
    def _feed_values(self, args: tuple) -> list[np.ndarray]:
        if len(args) == 1 and len(self.inputs) > 1 and isinstance(args[0], (list, tuple)):
            args = tuple(args[0])
        if len(args) == 1 and isinstance(args[0], Mapping):
            feeds = args[0]
            unknown = sorted(set(feeds) - {t.name for t in self.inputs})
            if unknown:
                raise ValueError(
                    f"Unknown inputs {unknown}; model {self.name!r} has inputs "
                    f"{[t.name for t in self.inputs]}."
                )
            missing = [t.name for t in self.inputs if t.name not in feeds]
            if missing:
                raise ValueError(f"Missing inputs {missing} for model {self.name!r}.")
            args = tuple(feeds[t.name] for t in self.inputs)
        if len(args) != len(self.inputs):
            raise ValueError(
                f"Model {self.name!r} expects {len(self.inputs)} inputs "
                f"{[t.name for t in self.inputs]}, received {len(args)}."
            )
        values = []
        for tensor, value in zip(self.inputs, args):
            array = to_array(value, f"Input {tensor.name!r}")
            if array.ndim != tensor.ndim or any(
                d is not None and d != a for d, a in zip(tensor.shape, array.shape)
            ):
                raise ValueError(
                    f"Input {tensor.name!r} expects shape {tensor.shape}, received an array "
                    f"of shape {array.shape}."
                )
            if standardize_dtype(array.dtype) != tensor.dtype:
                array = array.astype(to_numpy_dtype(tensor.dtype))
            values.append(array)
        return values

    def __call__(self, *args: Any, training: bool | None = None) -> Any:
        if any(isinstance(x, SymbolicTensor) for x in flatten(args)):
            raise TypeError(
                f"Model {self.name!r} cannot be called on symbolic tensors (nested models are "
                "not supported); call its layers instead."
            )
        if training is not None and not isinstance(training, (bool, np.bool_)):
            raise TypeError(f"training must be a bool or None, received {training!r}.")
        values: dict[int, Any] = {id(t): v for t, v in zip(self.inputs, self._feed_values(args))}

        def resolve(x: Any) -> Any:
            return values[id(x)] if isinstance(x, SymbolicTensor) else x

        for node in self._nodes:
            op = node.operation
            if isinstance(op, InputLayer):
                continue
            call_args = map_structure(resolve, node.call_args)
            call_kwargs = map_structure(resolve, node.call_kwargs)
            if training is not None and op._call_has_training_arg:
                call_kwargs["training"] = training
            result = op(*call_args, **call_kwargs)
            for tensor, value in zip(node.outputs, flatten(result)):
                values[id(tensor)] = value
        return map_structure(resolve, self._outputs_struct)

    # -- config ---------------------------------------------------------------
    def get_config(self) -> dict:
        """Keras's functional-model config (`layers`, `input_layers`, `output_layers`)."""
        from onnxbn.model_config import model_to_config

        return model_to_config(self)

    @classmethod
    def from_config(cls, config: dict) -> Model:
        """Rebuilds a model from its own config or one written by Keras 3."""
        from onnxbn.model_config import model_from_config

        return model_from_config(config, cls)
