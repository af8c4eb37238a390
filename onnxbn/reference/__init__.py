"""onnxbn.reference: an independent NumPy interpreter of ONNX graphs.

- `Session(model_or_path)`: the `run(feeds)` / `.state` interface of
  `onnxbn.runtime.Session`, on the reference kernels.
- `run(model, feeds)`: runs a plain ONNX model once; returns all outputs.
- `supported_ops()`: `{op_type: [since_version, ...]}` from the kernel table.
- `backend`: an `onnx.backend.base.Backend` for ONNX's backend test suite.
- `Interpreter`: the compiled model, with `run_all` for every intermediate value.
"""

from onnxbn.reference import backend
from onnxbn.reference.interpreter import Interpreter, run
from onnxbn.reference.kernels import supported_ops
from onnxbn.reference.session import Session

__all__ = ["Interpreter", "Session", "backend", "run", "supported_ops"]
