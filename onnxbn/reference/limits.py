"""Resource limits for running untrusted models: the allocation cap and the nesting cap.

The cap on a single allocation lives in a context variable that the
interpreter sets for the duration of a run, so kernels keep their ONNX
signature and concurrent runs with different caps do not interfere.
"""

from __future__ import annotations

import contextvars
import math
from collections.abc import Sequence

import numpy as np

DEFAULT_MAX_BYTES = 4 * 2**30
DEFAULT_MAX_DEPTH = 8

_max_bytes: contextvars.ContextVar[int] = contextvars.ContextVar(
    "onnxbn_reference_max_bytes", default=DEFAULT_MAX_BYTES
)


def set_max_bytes(limit: int) -> contextvars.Token[int]:
    """Sets the cap for the current context; returns the token to reset it."""
    return _max_bytes.set(limit)


def reset_max_bytes(token: contextvars.Token[int]) -> None:
    _max_bytes.reset(token)


def max_bytes() -> int:
    """The allocation cap (bytes) in force in the current context."""
    return _max_bytes.get()


def check_max_bytes(value: object) -> int:
    """Validates a user-given cap.

    Raises:
        ValueError: `value` is not a positive int.
    """
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"max_bytes must be a positive int, received {value!r}.")
    return int(value)


def check_allocation(what: str, shape: Sequence[int], dtype: np.dtype | type) -> None:
    """Refuses an array of `shape` and `dtype` larger than the cap, before allocating it.

    Args:
        what: who allocates, for the message (e.g. `"Expand output"`).
        shape: the predicted shape (Python ints, so no overflow).
        dtype: the element type.

    Raises:
        ValueError: a negative dimension, or more bytes than the cap.
    """
    dims = [int(d) for d in shape]
    if any(d < 0 for d in dims):
        raise ValueError(f"{what}: shape {tuple(dims)} has a negative dimension.")
    nbytes = math.prod(dims) * np.dtype(dtype).itemsize
    limit = _max_bytes.get()
    if nbytes > limit:
        raise ValueError(
            f"{what}: shape {tuple(dims)} of {np.dtype(dtype)} needs {nbytes} bytes, "
            f"over the allocation cap of {limit} bytes (raise it with max_bytes=)."
        )


def check_broadcast(what: str, *arrays: np.ndarray) -> None:
    """Refuses a broadcast result over the cap.

    The product of the input sizes bounds the output size, so the exact shape
    is only computed when that bound exceeds the cap.

    Raises:
        ValueError: the broadcast result needs more bytes than the cap.
    """
    bound = 16
    for a in arrays:
        bound *= max(a.size, 1)
    if bound <= _max_bytes.get():
        return
    try:
        shape = np.broadcast_shapes(*(a.shape for a in arrays))
    except ValueError:
        return  # the kernel raises NumPy's own shape error
    check_allocation(what, shape, np.result_type(*arrays))
