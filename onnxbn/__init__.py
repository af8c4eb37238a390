"""onnxbn: Keras's BatchNormalization, exact, fast and portable in ONNX."""

from onnxbn import distributed, layers, reference, runtime
from onnxbn.contract import initial_state
from onnxbn.dtypes import DTypePolicy
from onnxbn.export import export_onnx
from onnxbn.model import Model
from onnxbn.naming import reset_names
from onnxbn.node import Node
from onnxbn.operation import Operation
from onnxbn.tensor import Input, SymbolicTensor
from onnxbn.variable import Variable

__version__ = "0.1.0"

__all__ = [
    "DTypePolicy",
    "Input",
    "Model",
    "Node",
    "Operation",
    "SymbolicTensor",
    "Variable",
    "distributed",
    "export_onnx",
    "initial_state",
    "layers",
    "reference",
    "reset_names",
    "runtime",
]
