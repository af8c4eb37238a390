"""The Keras object envelope, and the checks every config reader shares.

Keras 3 writes a serializable object as
`{"module": ..., "class_name": ..., "config": ..., "registered_name": ...}`.
This module reads and writes that envelope for any registry of classes
(initializers, regularizers, constraints, later layers). Reading never
imports a module or evaluates anything: the `module` string is only checked
against a fixed set, and the class comes from an onnxbn `Registry` (or from
`custom_objects` the caller passes in code).
"""

from __future__ import annotations

import inspect
import math
import numbers
import re
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np

from onnxbn.registry import Registry

# Keys Keras may write next to the envelope's four keys; they carry nothing
# these readers need (build shapes, compile settings, shared-object ids).
_IGNORED_ENVELOPE_KEYS = frozenset({"build_config", "compile_config", "shared_object_id"})
_ENVELOPE_KEYS = frozenset({"module", "class_name", "config", "registered_name"})

# Exceptions that a constructor fed with odd config data might still leak;
# the public contract is ValueError/TypeError only.
_LEAKY_ERRORS = (LookupError, ArithmeticError, AttributeError, RecursionError)


def short_repr(value: Any, limit: int = 200) -> str:
    """`repr(value)` cut to `limit` characters, for error messages."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def to_snake_case(name: str) -> str:
    """Keras's `to_snake_case` (`"GlorotUniform"` -> `"glorot_uniform"`,
    `"L1L2"` -> `"l1l2"`), which names Keras's string aliases."""
    name = re.sub(r"\W+", "", name)
    name = re.sub("(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub("([a-z])([A-Z])", r"\1_\2", name).lower()


def require_dict(value: Any, what: str) -> dict:
    """Returns `value` if it is a dict.

    Args:
        value: The value to check.
        what: What `value` is, for the message (e.g. `"the config of L2"`).

    Returns:
        `value`, unchanged.

    Raises:
        TypeError: if `value` is not a dict.
    """
    if not isinstance(value, dict):
        raise TypeError(
            f"Expected {what} to be a dict. Received: "
            f"{short_repr(value)} of type {type(value).__name__}."
        )
    return value


def check_config_keys(config: Mapping, allowed: Iterable[str], owner: str) -> None:
    """Checks that `config` has no key outside `allowed`.

    Args:
        config: The config dict.
        allowed: The accepted keys.
        owner: Who reads the config, for the message (e.g. `"MaxNorm"`).

    Raises:
        ValueError: naming the unknown keys and listing the accepted ones.
    """
    allowed = set(allowed)
    unknown = [key for key in config if key not in allowed]
    if unknown:
        raise ValueError(
            f"Unknown config key(s) for {owner}: "
            f"{', '.join(short_repr(k, 60) for k in unknown)}. "
            f"Accepted keys: {sorted(allowed)}."
        )


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def require_number(
    value: Any,
    name: str,
    *,
    minimum: float | None = None,
    strict: bool = False,
    finite: bool = True,
) -> int | float:
    """Checks a real number from a config and returns it as a Python number.

    Ints stay ints and floats stay floats (so a config round-trips as Keras
    writes it); NumPy scalars become the matching Python scalar.

    Args:
        value: The value to check.
        name: The argument name, for the message.
        minimum: Optional lower bound.
        strict: Whether `value` must be strictly greater than `minimum`.
        finite: Whether NaN and infinities are rejected.

    Returns:
        The value as a Python `int` or `float`.

    Raises:
        TypeError: if `value` is not a real number (bools are not numbers here).
        ValueError: if it is NaN, infinite (with `finite`) or below `minimum`.
    """
    if not _is_real(value):
        raise TypeError(
            f"Expected `{name}` to be a number. Received: "
            f"{name}={short_repr(value)} of type {type(value).__name__}."
        )
    number = value.item() if isinstance(value, np.generic) else value
    if isinstance(number, int) and abs(number) > sys.float_info.max:
        raise ValueError(
            f"Expected `{name}` within the float64 range. "
            f"Received: {name}={short_repr(number, 60)}."
        )
    if not isinstance(number, int):
        number = float(number)
        if math.isnan(number) or (finite and math.isinf(number)):
            raise ValueError(f"Expected `{name}` to be a finite number. Received: {name}={number}.")
    below = minimum is not None and (number < minimum or (strict and number == minimum))
    if below:
        bound = f"> {minimum}" if strict else f">= {minimum}"
        raise ValueError(f"Expected `{name}` {bound}. Received: {name}={number}.")
    return number


def require_int(value: Any, name: str, *, allow_none: bool = False) -> int | None:
    """Checks an integer from a config (bools are rejected).

    Args:
        value: The value to check.
        name: The argument name, for the message.
        allow_none: Whether `None` is accepted (and returned).

    Returns:
        The value as a Python `int`, or `None`.

    Raises:
        TypeError: if `value` is not an integer (or `None` when allowed).
    """
    if value is None and allow_none:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        expected = "an int or None" if allow_none else "an int"
        raise TypeError(
            f"Expected `{name}` to be {expected}. Received: "
            f"{name}={short_repr(value)} of type {type(value).__name__}."
        )
    return int(value)


def require_choice(value: Any, name: str, allowed: Iterable[str]) -> str:
    """Checks that `value` is one of the strings in `allowed`.

    Raises:
        ValueError: naming the value and listing the allowed ones.
    """
    allowed = sorted(allowed)
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(
            f"Invalid `{name}` argument: {short_repr(value)}. Expected one of {allowed}."
        )
    return value


def accepted_config_keys(cls: type) -> set[str] | None:
    """The config keys `cls.from_config` accepts, from its `__init__` signature.

    Returns:
        The parameter names, or `None` when `__init__` takes `**kwargs`
        (then `from_config` must check the keys itself).
    """
    try:
        params = inspect.signature(cls.__init__).parameters
    except (TypeError, ValueError):
        return None
    keys = set()
    for i, param in enumerate(params.values()):
        if param.kind is inspect.Parameter.VAR_KEYWORD:
            return None
        if i == 0 or param.kind is inspect.Parameter.VAR_POSITIONAL:
            continue  # `self` and *args are not config keys
        keys.add(param.name)
    return keys


def serialize_object(obj: Any, module: str) -> dict:
    """Returns the Keras envelope of `obj`.

    Args:
        obj: An object with `get_config()`.
        module: The Keras module string to record (e.g. `"keras.initializers"`).

    Returns:
        `{"module": module, "class_name": ..., "config": obj.get_config(),
        "registered_name": None}`.

    Raises:
        TypeError: if `obj` has no `get_config()`.
    """
    get_config = getattr(obj, "get_config", None)
    if not callable(get_config):
        raise TypeError(
            f"Cannot serialize {short_repr(obj)} of type {type(obj).__name__}: "
            "expected an object with a `get_config()` method."
        )
    class_name = getattr(type(obj), "class_name", None) or type(obj).__name__
    return {
        "module": module,
        "class_name": class_name,
        "config": get_config(),
        "registered_name": None,
    }


def _resolve_name(
    name: str,
    registry: Registry,
    aliases: Mapping[str, str],
    custom_objects: Mapping[str, Any],
    kind: str,
) -> tuple[Any, bool]:
    """Returns `(class_or_callable, is_custom)` for a class name or alias."""
    if name in custom_objects:
        return custom_objects[name], True
    if name in registry:
        return registry.get(name), False
    if name in aliases and aliases[name] in registry:
        return registry.get(aliases[name]), False
    known = sorted(set(registry.known()) | set(aliases))
    raise ValueError(f"Unknown {kind} {short_repr(name)}. Known {kind}s: {known}.")


def _build(target: Any, config: dict, kind: str, name: str) -> Any:
    """Instantiates `target` from `config`, checking the keys first."""
    if not inspect.isclass(target):
        # A plain function from `custom_objects`: nothing to configure.
        if config:
            raise ValueError(
                f"The custom {kind} {name!r} is a function and takes no config. "
                f"Received: config={short_repr(config)}."
            )
        return target
    keys = accepted_config_keys(target)
    if keys is not None:
        check_config_keys(config, keys, target.__name__)
    from_config = getattr(target, "from_config", None)
    try:
        if from_config is not None:
            return from_config(config)
        return target(**config)
    except _LEAKY_ERRORS as err:
        raise ValueError(
            f"Could not build {kind} {name!r} from config {short_repr(config)}: {err}"
        ) from err


def deserialize_object(
    identifier: Any,
    registry: Registry,
    *,
    kind: str,
    modules: set[str],
    aliases: Mapping[str, str] | None = None,
    custom_objects: Mapping[str, Any] | None = None,
) -> Any:
    """Builds an object from a Keras envelope, a bare config dict or a name.

    Accepted forms:
    - `{"module": ..., "class_name": ..., "config": {...},
      "registered_name": None}` (what Keras 3 writes); `module` must be one of
      `modules` (it is checked, never imported);
    - `{"class_name": ..., "config": {...}}` (older Keras);
    - a class name or alias string (the class with its default arguments).

    Args:
        identifier: The envelope, dict or name. `None` returns `None`.
        registry: Class name -> class.
        kind: What is built, for messages (e.g. `"initializer"`).
        modules: The Keras module strings accepted in `module`.
        aliases: Alias -> class name (e.g. `{"zeros": "Zeros"}`).
        custom_objects: Name -> class or function supplied in code; checked
            before the registry, and exempt from the `module` check.

    Returns:
        The built object.

    Raises:
        TypeError: if `identifier` (or its `config`) has the wrong type.
        ValueError: for an unknown module, class name, `registered_name` or
            config key, or a bad config value.
    """
    aliases = aliases or {}
    custom_objects = custom_objects or {}
    if identifier is None:
        return None
    if isinstance(identifier, str):
        target, _ = _resolve_name(identifier, registry, aliases, custom_objects, kind)
        return _build(target, {}, kind, identifier)
    if not isinstance(identifier, dict):
        raise TypeError(
            f"Could not interpret {kind} identifier {short_repr(identifier)} "
            f"of type {type(identifier).__name__}: expected a dict "
            '(`{"class_name": ..., "config": ...}`) or a string name.'
        )

    check_config_keys(identifier, _ENVELOPE_KEYS | _IGNORED_ENVELOPE_KEYS, f"a {kind} envelope")
    if "class_name" not in identifier:
        raise ValueError(
            f"A {kind} dict needs a 'class_name' key. "
            f"Received keys: {sorted(map(str, identifier))}."
        )
    class_name = identifier["class_name"]
    if not isinstance(class_name, str):
        raise TypeError(
            f"Expected the {kind} 'class_name' to be a str. Received: "
            f"{short_repr(class_name)} of type {type(class_name).__name__}."
        )
    registered_name = identifier.get("registered_name")

    # Custom objects may be keyed by Keras's "package>Name" registered name.
    if isinstance(registered_name, str) and registered_name in custom_objects:
        target, is_custom = custom_objects[registered_name], True
    else:
        if registered_name is not None and registered_name != class_name:
            raise ValueError(
                f"Unknown {kind} registered_name {short_repr(registered_name)} "
                f"for class_name {class_name!r}: expected None or "
                f"{class_name!r} (custom objects must be passed in "
                "`custom_objects`)."
            )
        target, is_custom = _resolve_name(class_name, registry, aliases, custom_objects, kind)

    if "module" in identifier and not is_custom:
        module = identifier["module"]
        if not isinstance(module, str) or module not in modules:
            raise ValueError(
                f"Unknown {kind} module {short_repr(module)} for class "
                f"{class_name!r}. Allowed modules: {sorted(modules)}."
            )

    config = identifier.get("config")
    config = {} if config is None else config
    require_dict(config, f"the config of {kind} {class_name!r}")
    return _build(target, config, kind, class_name)


def get_object(identifier: Any, base: type, deserialize: Callable[[Any], Any], kind: str) -> Any:
    """The `get(identifier)` shared by initializers, regularizers, constraints.

    Args:
        identifier: `None` (returned), an instance of `base` (returned), a
            str or dict (passed to `deserialize`), a subclass of `base`
            (instantiated with defaults) or a plain callable (returned).
        base: The base class of the kind.
        deserialize: The kind's `deserialize` function.
        kind: What is built, for messages.

    Raises:
        TypeError: for any other identifier.
    """
    if identifier is None or isinstance(identifier, base):
        return identifier
    if isinstance(identifier, (str, dict)):
        return deserialize(identifier)
    if inspect.isclass(identifier):
        if issubclass(identifier, base):
            return identifier()
    elif callable(identifier):
        return identifier
    raise TypeError(
        f"Could not interpret {kind} identifier {short_repr(identifier)} of type "
        f"{type(identifier).__name__}: expected None, a str, a dict, "
        f"a {base.__name__} or a callable."
    )
