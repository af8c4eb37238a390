"""Automatic unique names (`batch_normalization`, `batch_normalization_1`, ...)."""

from __future__ import annotations

import re
import threading
from collections import defaultdict

_counts: dict[str, int] = defaultdict(int)
_lock = threading.Lock()


def to_snake_case(name: str) -> str:
    """Keras's rule: `BatchNormalization` -> `batch_normalization`, `Conv1D` -> `conv1d`."""
    name = re.sub(r"\W+", "", name)
    name = re.sub("(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub("([a-z])([A-Z])", r"\1_\2", name).lower()


def uniquify(prefix: str) -> str:
    """`prefix` the first time, then `prefix_1`, `prefix_2`, ... (as Keras)."""
    with _lock:
        count = _counts[prefix]
        _counts[prefix] += 1
    return prefix if count == 0 else f"{prefix}_{count}"


def auto_name(class_name: str) -> str:
    return uniquify(to_snake_case(class_name))


def reset_names() -> None:
    """Forgets every generated name (like `keras.backend.clear_session()`)."""
    with _lock:
        _counts.clear()
