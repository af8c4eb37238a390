"""The registry of layer and op classes, and Keras-envelope `serialize` / `deserialize`.

It sits below `layers/` and `ops/` (both register here) and imports neither.

Config data can only name classes registered here; nothing is ever imported
from a config's `module` field, which is checked against the Keras module the
class is known under.
"""

from __future__ import annotations

from typing import Any

from onnxbn.registry import Registry

# class name -> (class, Keras module it is serialized under)
LAYERS: Registry[str, tuple[type, str]] = Registry("layer class")


def register_layer(module: str, registered_name: str | None = None):
    """Class decorator registering an `Operation` subclass for configs.

    Args:
        module: the Keras module written in the envelope (`"keras.layers"`).
        registered_name: value of the envelope's `registered_name` (None for
            built-in Keras layers; the class name for Keras ops such as `NotEqual`).
    """

    def decorator(cls: type) -> type:
        LAYERS.add(cls.__name__, (cls, module))
        cls._keras_module = module
        cls._registered_name = registered_name
        return cls

    return decorator


def serialize(layer: Any) -> dict:
    """The Keras envelope of a layer or registered operation.

    Returns:
        `{"module", "class_name", "config", "registered_name"}` plus
        `"build_config"` for a built layer, as Keras writes it.
    """
    cls = type(layer)
    if LAYERS.get(cls.__name__, (None,))[0] is not cls:
        raise TypeError(f"Cannot serialize {layer!r}: {cls.__name__} is not a registered layer.")
    envelope = {
        "module": cls._keras_module,
        "class_name": cls.__name__,
        "config": layer.get_config(),
        "registered_name": cls._registered_name,
    }
    build_config = getattr(layer, "build_config", None)
    if build_config is not None:
        envelope["build_config"] = build_config
    return envelope


_ENVELOPE_KEYS = {
    "module",
    "class_name",
    "config",
    "registered_name",
    "build_config",
    "compile_config",
    "name",
    "inbound_nodes",
}


def lookup_class(envelope: dict) -> type:
    """The registered class an envelope names (module and registered_name checked)."""
    class_name = envelope.get("class_name")
    if not isinstance(class_name, str):
        raise TypeError(f"A layer config's 'class_name' must be a string, received {class_name!r}.")
    if class_name not in LAYERS:
        raise ValueError(
            f"Unknown layer class {class_name!r}. Known layer classes: {LAYERS.known()}."
        )
    cls, module = LAYERS.lookup(class_name)
    given = envelope.get("module", module)
    if given is not None and not isinstance(given, str):
        raise TypeError(f"A layer config's 'module' must be a string, received {given!r:.80}.")
    if given not in (module, None) and not (
        module == "keras.layers" and given.startswith("keras.src.layers")
    ):
        raise ValueError(
            f"Layer class {class_name!r} is expected under module {module!r}, "
            f"received module {given!r}."
        )
    registered = envelope.get("registered_name")
    if registered not in (None, class_name, cls._registered_name):
        raise ValueError(
            f"Unknown registered_name {registered!r} for class {class_name!r}; "
            "custom objects are not loaded from configs."
        )
    return cls


def deserialize(config: Any) -> Any:
    """Builds a layer from its Keras envelope (and builds it if `build_config` is present).

    Raises:
        TypeError: `config` is not a dict or has values of the wrong type.
        ValueError: unknown class, module, keys or values.
    """
    if not isinstance(config, dict):
        raise TypeError(f"A layer config must be a dict, received {type(config).__name__}.")
    unknown = sorted(str(k) for k in set(config) - _ENVELOPE_KEYS)
    if unknown:
        raise ValueError(
            f"Unknown keys {unknown} in a layer envelope; expected {sorted(_ENVELOPE_KEYS)}."
        )
    cls = lookup_class(config)
    inner = config.get("config", {})
    if not isinstance(inner, dict):
        raise TypeError(f"A layer's 'config' must be a dict, received {type(inner).__name__}.")
    layer = cls.from_config(inner)
    build_config = config.get("build_config")
    if build_config is not None and hasattr(layer, "build_from_config"):
        layer.build_from_config(build_config)  # e.g. merge layers: a list of shapes
    elif build_config is not None and hasattr(layer, "build"):
        if not isinstance(build_config, dict) or set(build_config) != {"input_shape"}:
            raise ValueError(
                f"build_config must be {{'input_shape': [...]}}, received {build_config!r}."
            )
        from onnxbn.tensor import standardize_shape

        shape = standardize_shape(build_config["input_shape"], "build_config input_shape")
        layer.build(shape)
        layer.built = True
        layer._build_shape = shape
    return layer
