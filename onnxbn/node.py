"""`Node`: one recorded call of an `Operation` on symbolic tensors."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from onnxbn.tensor import SymbolicTensor
from onnxbn.tree import flatten

if TYPE_CHECKING:
    from onnxbn.operation import Operation


class Node:
    """Records `operation(*call_args, **call_kwargs) -> outputs`.

    Each call of an operation on symbolic tensors makes one node; a shared layer
    called twice has two nodes (indices 0 and 1) and one set of weights.
    Creating the node stamps every output tensor with its history
    `(operation, node index, output index)` and a graph-unique name.

    Args:
        operation: the called `Operation`.
        call_args: positional arguments as passed (symbolic tensors and constants).
        call_kwargs: keyword arguments as passed.
        outputs: the symbolic output tensor(s).
    """

    def __init__(
        self,
        operation: Operation,
        call_args: tuple,
        call_kwargs: dict[str, Any],
        outputs: Any,
    ) -> None:
        self.operation = operation
        self.call_args = tuple(call_args)
        self.call_kwargs = dict(call_kwargs)
        self.outputs_structure = outputs
        self.outputs: list[SymbolicTensor] = flatten(outputs)
        self.index = len(operation._inbound_nodes)
        operation._inbound_nodes.append(self)
        self.input_tensors: list[SymbolicTensor] = [
            t for t in flatten((self.call_args, self.call_kwargs)) if isinstance(t, SymbolicTensor)
        ]
        suffix = "" if self.index == 0 else f"_{self.index}"
        for i, tensor in enumerate(self.outputs):
            name = operation.name + suffix
            if len(self.outputs) > 1:
                name += f"_{i}"
            tensor._record((operation, self.index, i), name)

    @property
    def parent_nodes(self) -> list[Node]:
        """Nodes that produced this node's symbolic inputs (deduplicated, in order)."""
        parents: list[Node] = []
        for tensor in self.input_tensors:
            op, node_index, _ = tensor.history
            parent = op._inbound_nodes[node_index]
            if parent not in parents:
                parents.append(parent)
        return parents

    def __repr__(self) -> str:
        return f"<Node {self.operation.name}#{self.index}>"
