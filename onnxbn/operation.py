"""`Operation`: the base of every op and layer (symbolic or eager call)."""

from __future__ import annotations

import inspect
from typing import Any

import numpy as np

from onnxbn.naming import auto_name
from onnxbn.node import Node
from onnxbn.tensor import SymbolicTensor
from onnxbn.tree import flatten


def is_symbolic_call(args: tuple, kwargs: dict, owner: str) -> bool:
    """True when any argument is symbolic; mixing with NumPy arrays is an error.

    Raises:
        TypeError: symbolic tensors and concrete arrays in the same call.
    """
    leaves = flatten((args, kwargs))
    symbolic = [x for x in leaves if isinstance(x, SymbolicTensor)]
    if not symbolic:
        return False
    concrete = [x for x in leaves if isinstance(x, np.ndarray)]
    if concrete:
        raise TypeError(
            f"{owner} was called with both symbolic tensors ({symbolic[0].name!r}) and "
            f"concrete arrays (shape {concrete[0].shape}). Pass only SymbolicTensors to "
            "build a graph, or only arrays to compute."
        )
    return True


class Operation:
    """Base class of every op and layer.

    `__call__` dispatches: any `SymbolicTensor` argument -> `symbolic_call`
    (shape/dtype inference by `compute_output_spec`, recording a `Node`);
    otherwise `call` runs eagerly on NumPy arrays.

    Args:
        name: unique name; derived from the class name when omitted.
    """

    def __init__(self, name: str | None = None) -> None:
        if name is None:
            name = auto_name(type(self).__name__)
        elif not isinstance(name, str) or not name:
            raise TypeError(f"name must be a non-empty string, received {name!r}.")
        elif "/" in name:
            raise ValueError(f"name must not contain '/', received {name!r}.")
        self.name = name
        self._inbound_nodes: list[Node] = []
        params = inspect.signature(self.call).parameters
        self._call_has_training_arg = "training" in params
        self._call_has_mask_arg = "mask" in params

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if is_symbolic_call(args, kwargs, f"{type(self).__name__} {self.name!r}"):
            return self.symbolic_call(*args, **kwargs)
        return self.call(*args, **kwargs)

    def symbolic_call(self, *args: Any, **kwargs: Any) -> Any:
        """Infers the outputs with `compute_output_spec` and records the call."""
        outputs = self.compute_output_spec(*args, **kwargs)
        Node(self, args, kwargs, outputs)
        return outputs

    def call(self, *args: Any, **kwargs: Any) -> Any:
        """Eager computation on NumPy arrays."""
        raise NotImplementedError(f"{type(self).__name__} does not implement call().")

    def compute_output_spec(self, *args: Any, **kwargs: Any) -> Any:
        """Symbolic output tensor(s) of a call on symbolic tensors."""
        raise NotImplementedError(
            f"{type(self).__name__} does not implement compute_output_spec()."
        )

    def _first_node(self, what: str) -> Node:
        if not self._inbound_nodes:
            raise ValueError(
                f"{type(self).__name__} {self.name!r} has never been called on symbolic "
                f"tensors, so it has no {what}."
            )
        return self._inbound_nodes[0]

    @property
    def input(self) -> Any:
        """Input tensor(s) of the FIRST call (with a mask: `[x, mask]`, as Keras)."""
        tensors = self._first_node("input").input_tensors
        return tensors[0] if len(tensors) == 1 else list(tensors)

    @property
    def output(self) -> Any:
        """Output tensor(s) of the FIRST call."""
        return self._first_node("output").outputs_structure

    def get_config(self) -> dict:
        return {"name": self.name}

    @classmethod
    def from_config(cls, config: dict) -> Operation:
        from onnxbn.serialization import check_config_keys, require_dict

        require_dict(config, f"{cls.__name__} config")
        params = inspect.signature(cls.__init__).parameters
        check_config_keys(config, [p for p in params if p != "self"], cls.__name__)
        return cls(**config)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} name={self.name}>"
