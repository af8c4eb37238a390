"""`onnxbn.reference.Session`: the state-carrying session on the NumPy interpreter."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from onnxbn.contract import state_pairs
from onnxbn.reference.interpreter import Interpreter
from onnxbn.reference.limits import DEFAULT_MAX_BYTES, DEFAULT_MAX_DEPTH
from onnxbn.session import StatefulSession


class Session(StatefulSession):
    """Runs an exported model on the reference interpreter.

    Same interface as `onnxbn.runtime.Session`: `run(feeds)` returns the
    model's outputs; in a training export it feeds the moving statistics and
    keeps their updates in `.state`. A failed run leaves `.state` unchanged;
    concurrent runs apply every update exactly once.

    Args:
        model_or_path: a `ModelProto`, a path to a `.onnx` file, or bytes.
        comm: an mpi4py communicator for a training export with synchronized
            BatchNormalization layers (default: `COMM_WORLD` under `mpiexec`).
        base_dir: folder of the external data of an in-memory model.
        max_bytes: allocation cap in bytes (default 4 GiB).
        max_depth: graph nesting cap.

    Raises:
        NotImplementedError: an unsupported op.
        ValueError: a malformed or unsafe model.
    """

    def __init__(
        self,
        model_or_path: onnx.ModelProto | str | os.PathLike | bytes,
        *,
        comm: Any = None,
        base_dir: str | os.PathLike | None = None,
        max_bytes: int = DEFAULT_MAX_BYTES,
        max_depth: int = DEFAULT_MAX_DEPTH,
    ) -> None:
        self._interpreter = Interpreter(
            model_or_path, base_dir=base_dir, max_bytes=max_bytes, max_depth=max_depth
        )
        super().__init__(_description(self._interpreter), comm=comm)

    @property
    def interpreter(self) -> Interpreter:
        """The compiled model (e.g. for `run_all`)."""
        return self._interpreter

    def _execute(self, feeds: dict[str, np.ndarray], output_names: list[str]) -> dict[str, Any]:
        return self._interpreter.execute(feeds, output_names)


def _description(interpreter: Interpreter) -> onnx.ModelProto:
    """A data-free copy of the model's interface for `StatefulSession`.

    Initializers keep names, types and dims but no data (so nothing external
    is read again), except the initializers of state inputs (files written
    before the `onnxbn:initial_state` metadata), whose loaded values are
    inlined; the metadata is kept.
    """
    source = interpreter.model.graph
    state = {name for name, _ in state_pairs(source)}
    graph = onnx.GraphProto(name=source.name)
    graph.input.extend(source.input)
    graph.output.extend(source.output)
    for tensor in source.initializer:
        if tensor.name in state:
            graph.initializer.append(
                numpy_helper.from_array(np.asarray(interpreter.constant(tensor.name)), tensor.name)
            )
        else:
            graph.initializer.append(
                onnx.TensorProto(name=tensor.name, data_type=tensor.data_type, dims=tensor.dims)
            )
    model = onnx.ModelProto(ir_version=interpreter.model.ir_version, graph=graph)
    model.opset_import.extend(interpreter.model.opset_import)
    model.metadata_props.extend(interpreter.model.metadata_props)
    return model
