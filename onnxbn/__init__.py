"""onnxbn: Keras's BatchNormalization, exact, fast and portable in ONNX.

Every public name is loaded on first access (PEP 562), so that importing one
part loads only what that part needs: `import onnxbn.reference` loads neither
onnxruntime nor the layers or the lowering, and `onnxbn.export_onnx` needs no
runtime.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> (module, attribute); attribute None = the module itself
_PUBLIC: dict[str, tuple[str, str | None]] = {
    "DTypePolicy": ("onnxbn.dtypes", "DTypePolicy"),
    "Input": ("onnxbn.layers.input_layer", "Input"),
    "Model": ("onnxbn.model", "Model"),
    "Node": ("onnxbn.node", "Node"),
    "Operation": ("onnxbn.operation", "Operation"),
    "SymbolicTensor": ("onnxbn.tensor", "SymbolicTensor"),
    "Variable": ("onnxbn.variable", "Variable"),
    "distributed": ("onnxbn.distributed", None),
    "export_onnx": ("onnxbn.export", "export_onnx"),
    "initial_state": ("onnxbn.contract", "initial_state"),
    "layers": ("onnxbn.layers", None),
    "losses": ("onnxbn.losses", None),
    "optimizers": ("onnxbn.optimizers", None),
    "recalibrate": ("onnxbn.adapt.recalibrate", "recalibrate"),
    "reference": ("onnxbn.reference", None),
    "reset_names": ("onnxbn.naming", "reset_names"),
    "runtime": ("onnxbn.runtime", None),
    "to_training": ("onnxbn.adapt.to_training", "to_training"),
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        module_name, attribute = _PUBLIC[name]
    elif not name.startswith("_") and importlib.util.find_spec(f"onnxbn.{name}") is not None:
        module_name, attribute = f"onnxbn.{name}", None  # any submodule, as `import onnxbn.x`
    else:
        raise AttributeError(f"module 'onnxbn' has no attribute {name!r}")
    module = importlib.import_module(module_name)
    value = module if attribute is None else getattr(module, attribute)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))


if TYPE_CHECKING:
    from onnxbn import distributed, layers, losses, optimizers, reference, runtime
    from onnxbn.adapt import recalibrate, to_training
    from onnxbn.contract import initial_state
    from onnxbn.dtypes import DTypePolicy
    from onnxbn.export import export_onnx
    from onnxbn.layers.input_layer import Input
    from onnxbn.model import Model
    from onnxbn.naming import reset_names
    from onnxbn.node import Node
    from onnxbn.operation import Operation
    from onnxbn.tensor import SymbolicTensor
    from onnxbn.variable import Variable
