"""Small builders shared by the reference-interpreter tests."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxbn.reference import Interpreter


def single_node_model(
    op_type: str,
    inputs: Sequence[np.ndarray | None],
    n_outputs: int = 1,
    opset: int = 18,
    **attributes: Any,
) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """A model of one node whose inputs are graph inputs; `None` leaves an input out.

    Returns:
        The model and its feeds.
    """
    names, values, feeds = [], [], {}
    for i, value in enumerate(inputs):
        if value is None:
            names.append("")
            continue
        name = f"in{i}"
        names.append(name)
        values.append(
            helper.make_tensor_value_info(
                name, helper.np_dtype_to_tensor_dtype(value.dtype), value.shape
            )
        )
        feeds[name] = value
    outputs = [f"out{i}" for i in range(n_outputs)]
    node = helper.make_node(op_type, names, outputs, **attributes)
    graph = helper.make_graph(
        [node], op_type, values, [helper.make_empty_tensor_value_info(o) for o in outputs]
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    return model, feeds


def run_node(
    op_type: str,
    inputs: Sequence[np.ndarray | None],
    n_outputs: int = 1,
    opset: int = 18,
    **attributes: Any,
) -> list[np.ndarray]:
    """Runs one node through the interpreter and returns its outputs."""
    model, feeds = single_node_model(op_type, inputs, n_outputs, opset, **attributes)
    return Interpreter(model).run(feeds)


def tensor(name: str, value: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value), name)
