"""One small registry class shared by layers, lowering rules and reference kernels."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator
from typing import Any, Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class Registry(Generic[K, V]):
    """A name -> object table filled by a decorator at each definition.

    Registering a key twice is an error (a silent override hides bugs), and a
    failed lookup lists what is known so the caller can see the typo.

    Args:
        name: What the registry holds, used in error messages
            (e.g. `"lowering rule"`).
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._entries: dict[K, V] = {}

    def register(self, key: K) -> Callable[[V], V]:
        """Decorator registering the decorated object under `key`.

        Raises:
            ValueError: if `key` is already registered.
        """

        def decorator(obj: V) -> V:
            self.add(key, obj)
            return obj

        return decorator

    def add(self, key: K, obj: V) -> None:
        """Registers `obj` under `key`; a duplicate key raises `ValueError`."""
        if key in self._entries:
            raise ValueError(
                f"Duplicate {self.name} {key!r}: already registered as "
                f"{self._entries[key]!r}, received {obj!r}."
            )
        self._entries[key] = obj

    def lookup(self, key: K) -> V:
        """Returns the object registered under `key`.

        Raises:
            KeyError: naming `key` and listing the known keys.
        """
        try:
            return self._entries[key]
        except (KeyError, TypeError):
            raise RegistryLookupError(
                f"Unknown {self.name} {key!r}. Known: {self.known()}."
            ) from None

    def get(self, key: K, default: Any = None) -> V | Any:
        try:
            return self._entries.get(key, default)
        except TypeError:  # unhashable key from config data
            return default

    def known(self) -> list[str]:
        """Sorted string forms of the registered keys (for messages)."""
        return sorted(str(k) for k in self._entries)

    def __contains__(self, key: object) -> bool:
        try:
            return key in self._entries
        except TypeError:
            return False

    def __iter__(self) -> Iterator[K]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def items(self) -> list[tuple[K, V]]:
        return list(self._entries.items())


class RegistryLookupError(KeyError, ValueError):
    """A failed registry lookup: both a `KeyError` and a `ValueError`.

    `str()` gives the plain message (a bare `KeyError` would quote it).
    """

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""
