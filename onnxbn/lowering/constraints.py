"""Weight constraints as ONNX nodes: the projection a train step applies after the update.

Each constraint of `onnxbn/constraints.py` computes the same formula as its
eager `__call__` (norms over the same axes, Keras's fuzz factor 1e-7), in the
weight's dtype, or in float32 for a 16-bit weight (a sum of squares overflows
float16) with the result cast back. Clipping is `Where` on comparisons, never
`Max`/`Min`: runtimes disagree on those when an operand is NaN.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from onnxbn import constraints as eager
from onnxbn.lowering import emit
from onnxbn.lowering.context import LoweringContext, Value


def working_dtype(dtype: str) -> str:
    """The dtype an update or penalty of a `dtype` weight is computed in."""
    return dtype if dtype in ("float32", "float64") else "float32"


def normalized_axes(axis: int | list[int], rank: int) -> list[int]:
    """`axis` (an int or a list) as non-negative axes of a rank-`rank` weight.

    Raises:
        ValueError: an axis out of range (the eager constraint's message).
    """
    axes = axis if isinstance(axis, list) else [axis]
    for a in axes:
        if not -rank <= a < rank:
            raise ValueError(f"Constraint axis {axis} is out of range for a weight of rank {rank}.")
    return sorted(a % rank for a in axes)


def _norms(ctx: LoweringContext, w: Value, axis: int | list[int]) -> Value:
    """L2 norms of `w` along `axis`, kept as size-1 dims."""
    axes = normalized_axes(axis, w.rank)
    squares = ctx.op("Mul", [w, w], label="squares", shape=w.shape)
    shape = tuple(1 if i in axes else d for i, d in enumerate(w.shape))
    total = emit.reduce(
        ctx, "ReduceSum", squares, axes, keepdims=True, label="square_sum", shape=shape
    )
    return ctx.op("Sqrt", [total], label="norms", shape=shape)


def _clip(ctx: LoweringContext, x: Value, low: float | None, high: float | None) -> Value:
    """`clip(x, low, high)` by `Where` (NaN stays NaN)."""
    if high is not None:
        bound = emit.scalar(ctx, high, x.dtype, "max_value")
        above = ctx.op("Greater", [x, bound], dtype="bool", label="above")
        x = ctx.op("Where", [above, bound, x], dtype=x.dtype, label="clipped", shape=x.shape)
    if low is not None:
        bound = emit.scalar(ctx, low, x.dtype, "min_value")
        below = ctx.op("Less", [x, bound], dtype="bool", label="below")
        x = ctx.op("Where", [below, bound, x], dtype=x.dtype, label="clipped", shape=x.shape)
    return x


def _rescale(ctx: LoweringContext, w: Value, desired: Value, norms: Value) -> Value:
    """`w * (desired / (epsilon + norms))`."""
    epsilon = emit.scalar(ctx, eager.EPSILON, w.dtype, "epsilon")
    denominator = ctx.op("Add", [norms, epsilon], label="fuzzed_norms", shape=norms.shape)
    ratio = ctx.op("Div", [desired, denominator], label="ratio", shape=norms.shape)
    return ctx.op("Mul", [w, ratio], label="projected", shape=w.shape)


def _max_norm(ctx: LoweringContext, c: eager.MaxNorm, w: Value) -> Value:
    norms = _norms(ctx, w, c.axis)
    return _rescale(ctx, w, _clip(ctx, norms, None, c.max_value), norms)


def _unit_norm(ctx: LoweringContext, c: eager.UnitNorm, w: Value) -> Value:
    norms = _norms(ctx, w, c.axis)
    epsilon = emit.scalar(ctx, eager.EPSILON, w.dtype, "epsilon")
    denominator = ctx.op("Add", [norms, epsilon], label="fuzzed_norms", shape=norms.shape)
    return ctx.op("Div", [w, denominator], label="projected", shape=w.shape)


def _min_max_norm(ctx: LoweringContext, c: eager.MinMaxNorm, w: Value) -> Value:
    norms = _norms(ctx, w, c.axis)
    clipped = _clip(ctx, norms, c.min_value, c.max_value)
    rate = emit.scalar(ctx, c.rate, w.dtype, "rate")
    keep = emit.scalar(ctx, 1 - c.rate, w.dtype, "one_minus_rate")
    desired = ctx.op(
        "Add",
        [
            ctx.op("Mul", [rate, clipped], label="strict", shape=norms.shape),
            ctx.op("Mul", [keep, norms], label="loose", shape=norms.shape),
        ],
        label="desired",
        shape=norms.shape,
    )
    return _rescale(ctx, w, desired, norms)


def _non_neg(ctx: LoweringContext, c: eager.NonNeg, w: Value) -> Value:
    # `Where(w < 0, 0, w)`, not `Max(w, 0)`: NaN stays NaN, as `np.maximum` keeps it.
    zero = emit.scalar(ctx, 0.0, w.dtype, "zero")
    negative = ctx.op("Less", [w, zero], dtype="bool", label="negative")
    return ctx.op("Where", [negative, zero, w], label="projected", shape=w.shape)


def _identity(ctx: LoweringContext, c: eager.Constraint, w: Value) -> Value:
    return w


# Exact classes: a subclass may override `__call__`, so it has no lowering here.
_RULES: dict[type, Callable[[LoweringContext, Any, Value], Value]] = {
    eager.Constraint: _identity,
    eager.MaxNorm: _max_norm,
    eager.UnitNorm: _unit_norm,
    eager.MinMaxNorm: _min_max_norm,
    eager.NonNeg: _non_neg,
}


def lower_constraint(ctx: LoweringContext, constraint: Any, w: Value) -> Value:
    """The projected weight `constraint(w)` as ONNX nodes.

    Args:
        ctx: The lowering context.
        constraint: A constraint of `onnxbn.constraints` (or `None`: no
            projection).
        w: The weight, a floating value of static rank.

    Returns:
        The projected weight, of `w`'s dtype and shape.

    Raises:
        TypeError: a constraint without a lowering (a custom callable or
            subclass).
        ValueError: an axis out of range for `w`.
    """
    if constraint is None:
        return w
    rule = _RULES.get(type(constraint))
    if rule is None:
        raise TypeError(
            f"Cannot export the constraint {constraint!r} of type {type(constraint).__name__}: "
            f"only {sorted(c.__name__ for c in _RULES)} from onnxbn.constraints have an ONNX "
            "lowering."
        )
    dtype = working_dtype(w.dtype)
    projected = rule(ctx, constraint, emit.cast(ctx, w, dtype))
    return emit.cast(ctx, projected, w.dtype, label="projected")


__all__ = ["lower_constraint", "normalized_axes", "working_dtype"]
