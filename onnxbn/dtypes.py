"""Dtype names and dtype policies (Keras's `DTypePolicy`)."""

from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np

FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")
INT_DTYPES = ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64")
ALL_DTYPES = FLOAT_DTYPES + INT_DTYPES + ("bool",)

_NUMPY = {name: np.dtype(name) for name in ALL_DTYPES if name != "bfloat16"}
_NUMPY["bfloat16"] = np.dtype(ml_dtypes.bfloat16)


def standardize_dtype(dtype: Any) -> str:
    """Canonical name (`"float32"`, `"bfloat16"`, `"bool"`, ...) of a dtype-like.

    Raises:
        TypeError: `dtype` is not a supported numeric or bool dtype.
    """
    if isinstance(dtype, str) and dtype in _NUMPY:
        return dtype
    try:
        np_dtype = np.dtype(dtype)
    except TypeError:
        raise TypeError(
            f"Unsupported dtype {dtype!r}; expected one of {list(ALL_DTYPES)}."
        ) from None
    for name, candidate in _NUMPY.items():
        if np_dtype == candidate:
            return name
    raise TypeError(f"Unsupported dtype {dtype!r}; expected one of {list(ALL_DTYPES)}.")


def to_numpy_dtype(dtype: Any) -> np.dtype:
    """NumPy dtype of a dtype-like (`ml_dtypes.bfloat16` for bfloat16)."""
    return _NUMPY[standardize_dtype(dtype)]


def is_float(dtype: Any) -> bool:
    return standardize_dtype(dtype) in FLOAT_DTYPES


_POLICIES = {
    "float16": ("float16", "float16"),
    "bfloat16": ("bfloat16", "bfloat16"),
    "float32": ("float32", "float32"),
    "float64": ("float64", "float64"),
    "mixed_float16": ("float16", "float32"),
    "mixed_bfloat16": ("bfloat16", "float32"),
}
_POLICY_CLASS_NAMES = ("DTypePolicy", "FloatDTypePolicy")
_POLICY_MODULES = ("keras", "keras.dtype_policies", "keras.mixed_precision")


class DTypePolicy:
    """A layer's compute and variable dtypes, named as in Keras.

    `mixed_float16` / `mixed_bfloat16` keep variables in float32 and compute in
    the half type; the plain names use one dtype for both.

    Args:
        name: one of `float16`, `bfloat16`, `float32`, `float64`,
            `mixed_float16`, `mixed_bfloat16`.

    Raises:
        ValueError: unknown policy name.
    """

    def __init__(self, name: str = "float32") -> None:
        if not isinstance(name, str):
            raise TypeError(f"DTypePolicy name must be a string, received {name!r}.")
        if name not in _POLICIES:
            raise ValueError(f"Unknown dtype policy {name!r}; expected one of {sorted(_POLICIES)}.")
        self.name = name
        self.compute_dtype, self.variable_dtype = _POLICIES[name]

    def __repr__(self) -> str:
        return f'<DTypePolicy "{self.name}">'

    def __eq__(self, other: object) -> bool:
        return isinstance(other, DTypePolicy) and other.name == self.name

    def __hash__(self) -> int:
        return hash(self.name)

    def get_config(self) -> dict:
        return {"name": self.name}

    def serialize(self) -> dict:
        """The Keras envelope Keras 3 writes in a layer's `dtype` config entry."""
        return {
            "module": "keras",
            "class_name": "DTypePolicy",
            "config": {"name": self.name},
            "registered_name": None,
        }

    @classmethod
    def get(cls, identifier: Any) -> DTypePolicy:
        """Policy from `None` (float32), a name, a NumPy dtype, a policy or its envelope.

        Raises:
            TypeError, ValueError: anything else, naming the received value.
        """
        if identifier is None:
            return cls("float32")
        if isinstance(identifier, DTypePolicy):
            return identifier
        if isinstance(identifier, dict):
            class_name = identifier.get("class_name")
            if class_name not in _POLICY_CLASS_NAMES:
                raise ValueError(
                    f"Unknown dtype policy class {class_name!r}; expected one of "
                    f"{list(_POLICY_CLASS_NAMES)}."
                )
            module = identifier.get("module", "keras")
            if module not in _POLICY_MODULES:
                raise ValueError(
                    f"Unknown dtype policy module {module!r}; expected one of "
                    f"{list(_POLICY_MODULES)}."
                )
            config = identifier.get("config")
            if not isinstance(config, dict) or set(config) - {"name"}:
                raise ValueError(
                    f"Dtype policy config must be {{'name': str}}, received {config!r}."
                )
            return cls(config.get("name", "float32"))
        if isinstance(identifier, str):
            return cls(identifier)
        try:
            return cls(standardize_dtype(identifier))
        except TypeError:
            raise TypeError(
                f"dtype must be a policy name, a dtype or a DTypePolicy config, "
                f"received {identifier!r}."
            ) from None
