"""The kernel table: one NumPy function per (ONNX op type, since-version).

A kernel's signature is the op's ONNX schema: inputs positional in schema
order (optional ones default to `None`), attributes keyword-only with the
spec's defaults; it returns a tuple of outputs. The interpreter picks, for a
model importing opset `k` of the default domain, the newest registered
since-version `<= k`, so a kernel is registered only where the op's meaning
changed (a since-version that only widened the type list needs no new kernel).
"""

from __future__ import annotations

import bisect
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from onnxbn.registry import Registry

# The newest opset of the default domain whose schemas this table was checked
# against (tests/reference/test_kernel_table.py checks every kernel at every
# opset up to it). A model importing a newer opset is refused: an op may have
# changed meaning there without a kernel of that since-version existing here.
NEWEST_OPSET = 28

# Keyword a kernel declares (`wants_output_count=True`) to learn how many
# outputs the node names: BatchNormalization-9 and Split depend on it.
OUTPUT_COUNT_KEYWORD = "_num_node_outputs"


@dataclass(frozen=True)
class Kernel:
    """A registered kernel and what the interpreter needs to know to call it.

    Attributes:
        op_type: ONNX op type (default domain).
        since_version: the opset version this kernel implements from.
        fn: the NumPy function.
        min_inputs: number of leading inputs without a default.
        max_inputs: most inputs accepted (`None` for variadic).
        attributes: `{attribute name: default}`; `inspect.Parameter.empty`
            marks a required attribute.
        wants_output_count: pass `_num_node_outputs=` to `fn`.
    """

    op_type: str
    since_version: int
    fn: Callable[..., tuple[Any, ...]]
    min_inputs: int
    max_inputs: int | None
    attributes: dict[str, Any] = field(default_factory=dict)
    wants_output_count: bool = False

    @property
    def required_attributes(self) -> list[str]:
        return [k for k, v in self.attributes.items() if v is inspect.Parameter.empty]


KERNELS: Registry[tuple[str, int], Kernel] = Registry("reference kernel")
_VERSIONS: dict[str, list[int]] = {}


def _describe(
    op_type: str, since_version: int, fn: Callable[..., Any], wants_count: bool
) -> Kernel:
    min_inputs, max_inputs, attributes = 0, 0, {}
    for param in inspect.signature(fn).parameters.values():
        if param.kind is param.POSITIONAL_OR_KEYWORD or param.kind is param.POSITIONAL_ONLY:
            max_inputs += 1
            if param.default is param.empty:
                min_inputs = max_inputs
        elif param.kind is param.VAR_POSITIONAL:
            max_inputs = None
        elif param.kind is param.KEYWORD_ONLY and param.name != OUTPUT_COUNT_KEYWORD:
            attributes[param.name] = param.default
    return Kernel(op_type, since_version, fn, min_inputs, max_inputs, attributes, wants_count)


def kernel(
    op_type: str, since_version: int, *, wants_output_count: bool = False
) -> Callable[[Callable[..., tuple[Any, ...]]], Callable[..., tuple[Any, ...]]]:
    """Decorator registering a NumPy kernel for `op_type` from `since_version`.

    Args:
        op_type: ONNX op type of the default domain, e.g. `"ReduceMean"`.
        since_version: the since-version of the ONNX schema it implements.
        wants_output_count: the kernel takes a keyword `_num_node_outputs`
            (how many outputs the node names).

    Returns:
        The decorator; it returns the function unchanged.

    Raises:
        ValueError: `(op_type, since_version)` is already registered.
    """

    def decorator(fn: Callable[..., tuple[Any, ...]]) -> Callable[..., tuple[Any, ...]]:
        entry = _describe(op_type, since_version, fn, wants_output_count)
        KERNELS.add((op_type, since_version), entry)
        bisect.insort(_VERSIONS.setdefault(op_type, []), since_version)
        return fn

    return decorator


def select(op_type: str, opset: int) -> Kernel:
    """The kernel for `op_type` in a model importing `opset` of the default domain.

    Raises:
        NotImplementedError: naming the op type and opset, and what exists.
    """
    versions = _VERSIONS.get(op_type)
    if not versions:
        raise NotImplementedError(
            f"The reference interpreter has no kernel for op type {op_type!r} "
            f"(opset {opset}); supported op types: {sorted(_VERSIONS)}."
        )
    index = bisect.bisect_right(versions, opset)
    if index == 0:
        raise NotImplementedError(
            f"The reference interpreter has no kernel for {op_type!r} at opset "
            f"{opset}; it implements since-versions {versions}."
        )
    return KERNELS.lookup((op_type, versions[index - 1]))


def supported_ops() -> dict[str, list[int]]:
    """`{op_type: [since_version, ...]}` of every registered kernel, sorted."""
    return {op: list(_VERSIONS[op]) for op in sorted(_VERSIONS)}
