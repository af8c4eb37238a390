"""NotEqual, Any, LogicalOr: the Keras ops that carry implicit masks (semantics: `ops/numpy.py`).

Keras records these ops when a layer builds a mask (`Embedding(mask_zero=True)`
records `NotEqual(x, 0)`, `Masking` records `Any(NotEqual(x, v), axis=-1)`, a
merge layer joins masks with `LogicalOr`), so in an exported graph the mask is
an ordinary bool value that flows to every layer whose call took it.

Comparisons follow NumPy's promotion (NEP 50: a Python scalar takes the array's
dtype), so `NotEqual` compares exactly what the eager op compares; bfloat16,
which onnxruntime's Equal lacks, is compared in float32, which holds every
bfloat16 exactly. `Any` has no ONNX reduction: the values become bool, then
uint8, then ReduceMax (bool ReduceMax only exists since opset 20).
"""

from __future__ import annotations

from typing import Any as AnyType

import numpy as np

from onnxbn.dtypes import standardize_dtype, to_numpy_dtype
from onnxbn.lowering import emit
from onnxbn.lowering.context import LoweringContext, Value
from onnxbn.lowering.registry import register_lowering
from onnxbn.ops.numpy import Any, LogicalOr, NotEqual, _normalize_axes, reduce_shape

# Dtypes onnxruntime cannot compare, and the exact stand-in they are compared in.
_COMPARED_AS = {"bfloat16": "float32"}


def _like(operand: AnyType) -> AnyType:
    """What `np.result_type` needs to promote `operand` as the eager op does."""
    if isinstance(operand, Value):
        return np.empty(0, to_numpy_dtype(operand.dtype))
    return operand


def _as_value(ctx: LoweringContext, operand: AnyType, dtype: str, label: str) -> Value:
    if isinstance(operand, Value):
        return emit.cast(ctx, operand, dtype, label=label)
    return ctx.constant(np.asarray(operand), label, dtype)


def _check_operand(owner: str, operand: AnyType) -> None:
    if isinstance(operand, Value):
        return
    if isinstance(operand, (bool, int, float, np.generic, np.ndarray)):
        return
    raise TypeError(
        f"{owner}: operands must be tensors or numeric constants, received "
        f"{type(operand).__name__} {operand!r:.100}."
    )


def not_equal(ctx: LoweringContext, x1: AnyType, x2: AnyType, owner: str = "NotEqual") -> Value:
    """`x1 != x2` with NumPy's promotion and broadcasting, as a bool value.

    Args:
        ctx: the lowering context.
        x1, x2: values or numeric constants (Python or NumPy scalars, arrays).
        owner: name used in error messages.

    Raises:
        TypeError: an operand that is neither a value nor a numeric constant.
    """
    for operand in (x1, x2):
        _check_operand(owner, operand)
    common = standardize_dtype(np.result_type(_like(x1), _like(x2)))
    compared = _COMPARED_AS.get(common, common)
    a = _as_value(ctx, x1, common, "lhs")
    b = _as_value(ctx, x2, common, "rhs")
    a, b = emit.cast(ctx, a, compared, "lhs"), emit.cast(ctx, b, compared, "rhs")
    equal = ctx.op("Equal", [a, b], label="equal", dtype="bool")
    return ctx.op("Not", [equal], label="not_equal", dtype="bool")


def any_of(
    ctx: LoweringContext, x: Value, axes: tuple[int, ...], keepdims: bool, label: str = "any"
) -> Value:
    """OR-reduction of `x` (non-zero is True) over `axes` (non-negative), as bool."""
    truth = emit.cast(ctx, x, "bool", label="truth")
    if not axes:  # a rank-0 input: nothing to reduce
        return ctx.op("Identity", [truth], label=label, dtype="bool")
    counts = emit.cast(ctx, truth, "uint8", label="as_uint8")
    reduced = emit.reduce(ctx, "ReduceMax", counts, axes, keepdims=keepdims, label="max")
    return emit.cast(ctx, reduced, "bool", label=label)


@register_lowering(NotEqual)
def lower_not_equal(ctx: LoweringContext, op: NotEqual, x1: AnyType, x2: AnyType) -> Value:
    """`x1 != x2` (one of them may be a constant, e.g. the 0 of `mask_zero`)."""
    return not_equal(ctx, x1, x2, owner=f"NotEqual {op.name!r}")


@register_lowering(Any)
def lower_any(ctx: LoweringContext, op: Any, x: Value) -> Value:
    """`any(x, axis, keepdims)` as a bool value."""
    axes = _normalize_axes(op.axis, x.rank, f"Any {op.name!r}")
    if axes is None:
        axes = tuple(range(x.rank))
    y = any_of(ctx, x, tuple(sorted(axes)), op.keepdims)
    return Value(y.name, "bool", reduce_shape(x.shape, axes, op.keepdims))


@register_lowering(LogicalOr)
def lower_logical_or(ctx: LoweringContext, op: LogicalOr, x1: AnyType, x2: AnyType) -> Value:
    """`x1 or x2` (non-zero is True), broadcast."""
    owner = f"LogicalOr {op.name!r}"
    for operand in (x1, x2):
        _check_operand(owner, operand)
    a = _as_value(ctx, x1, "bool", "lhs") if isinstance(x1, Value) else _bool_constant(ctx, x1)
    b = _as_value(ctx, x2, "bool", "rhs") if isinstance(x2, Value) else _bool_constant(ctx, x2)
    return ctx.op("Or", [a, b], label="or", dtype="bool")


def _bool_constant(ctx: LoweringContext, value: AnyType) -> Value:
    return ctx.constant(np.asarray(value) != 0, "constant", "bool")
