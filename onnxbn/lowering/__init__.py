"""How onnxbn operations become ONNX: one rule module per op, registered by decorator.

Importing this package imports every rule module, so every rule is registered
before `onnxbn.export_onnx` looks one up. Adding an op = one module here with
the same file name as its layer module, imported below.
"""

from onnxbn.lowering import (  # noqa: F401 - registers rules  # noqa: F401 - registers rules
    activation,
    add,
    batch_normalization,
    conv,
    dense,
    dropout,
    embedding,
    flatten,
    global_average_pooling,
    input_layer,
    masking,
    numpy_ops,
)
from onnxbn.lowering.context import LoweringContext, Value
from onnxbn.lowering.registry import LOWERING_RULES, lookup_lowering, register_lowering

__all__ = [
    "LOWERING_RULES",
    "LoweringContext",
    "Value",
    "lookup_lowering",
    "register_lowering",
]
