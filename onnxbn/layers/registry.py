"""`onnxbn.layers.serialize` / `deserialize` and `register_layer`, as the layers see them.

The registry itself is `onnxbn/operation_registry.py` (below both `layers/` and
`ops/`); this module only names it inside the layers package.
"""

from onnxbn.operation_registry import LAYERS, deserialize, lookup_class, register_layer, serialize

__all__ = ["LAYERS", "deserialize", "lookup_class", "register_layer", "serialize"]
