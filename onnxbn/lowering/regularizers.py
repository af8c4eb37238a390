"""Weight regularizers as ONNX nodes: the penalty and its gradient, for a train step.

Same formulas as `onnxbn/regularizers.py` (`__call__` and `gradient`),
computed in the weight's dtype, or in float32 for a 16-bit weight (a sum of
squares overflows float16). `sign` is `(w > 0) - (w < 0)`: 0 at the kink of
`abs`, as the eager gradient; the penalty of a zero factor is skipped, as
Keras does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from onnxbn import regularizers as eager
from onnxbn.dtypes import to_numpy_dtype
from onnxbn.lowering import emit
from onnxbn.lowering.constraints import working_dtype
from onnxbn.lowering.context import LoweringContext, Value, onnx_dtype

Terms = tuple[Value | None, Value | None]  # (penalty, gradient); None where zero


def _total(ctx: LoweringContext, x: Value, op_type: str, label: str) -> Value:
    """`op_type` (ReduceSum, ReduceSumSquare) over every axis of `x`, as a scalar."""
    if x.rank == 0:
        return ctx.op("Mul", [x, x], label=label, shape=()) if op_type == "ReduceSumSquare" else x
    return emit.reduce(ctx, op_type, x, range(x.rank), keepdims=False, label=label, shape=())


def _sign(ctx: LoweringContext, x: Value) -> Value:
    zero = emit.scalar(ctx, 0.0, x.dtype, "zero")
    cast = {"to": onnx_dtype(x.dtype), "dtype": x.dtype, "shape": x.shape}
    positive = ctx.op(
        "Cast", [ctx.op("Greater", [x, zero], dtype="bool")], label="positive", **cast
    )
    negative = ctx.op("Cast", [ctx.op("Less", [x, zero], dtype="bool")], label="negative", **cast)
    return ctx.op("Sub", [positive, negative], label="sign", shape=x.shape)


def _scaled(ctx: LoweringContext, factor: float, x: Value, label: str) -> Value:
    return ctx.op(
        "Mul", [emit.scalar(ctx, factor, x.dtype, "factor"), x], label=label, shape=x.shape
    )


def _l1(ctx: LoweringContext, l1: float, w: Value) -> Terms:
    if l1 == 0.0:
        return None, None
    absolute = ctx.op("Abs", [w], label="abs", shape=w.shape)
    penalty = _scaled(ctx, l1, _total(ctx, absolute, "ReduceSum", "l1_sum"), "l1_penalty")
    return penalty, _scaled(ctx, l1, _sign(ctx, w), "l1_gradient")


def _l2(ctx: LoweringContext, l2: float, w: Value) -> Terms:
    if l2 == 0.0:
        return None, None
    penalty = _scaled(ctx, l2, _total(ctx, w, "ReduceSumSquare", "l2_sum"), "l2_penalty")
    return penalty, _scaled(ctx, 2.0 * l2, w, "l2_gradient")


def _sum(ctx: LoweringContext, *terms: Terms) -> Terms:
    penalty = gradient = None
    for p, g in terms:
        if p is None:
            continue
        penalty = p if penalty is None else ctx.op("Add", [penalty, p], label="penalty", shape=())
        gradient = (
            g if gradient is None else ctx.op("Add", [gradient, g], label="gradient", shape=g.shape)
        )
    return penalty, gradient


def _orthogonal(ctx: LoweringContext, r: eager.OrthogonalRegularizer, w: Value) -> Terms:
    """`eager.OrthogonalRegularizer.__call__` and `.gradient`, node for node."""
    if w.rank != 2 or None in w.shape:
        raise ValueError(
            f"Inputs to OrthogonalRegularizer must have rank 2 and a static shape. "
            f"Received: inputs.shape={w.shape}"
        )
    columns = r.mode == "columns"
    rows = (
        ctx.op("Transpose", [w], label="rows", shape=w.shape[::-1], perm=[1, 0]) if columns else w
    )
    size = rows.shape[0]
    if size < 2:
        raise ValueError(
            f"OrthogonalRegularizer(mode={r.mode!r}) needs at least 2 {r.mode}. "
            f"Received: inputs.shape={w.shape}"
        )
    dtype = rows.dtype
    squares = ctx.op("Mul", [rows, rows], label="squares", shape=rows.shape)
    square_sum = emit.reduce(
        ctx, "ReduceSum", squares, [1], keepdims=True, label="square_sum", shape=(size, 1)
    )
    rsqrt = ctx.op("Reciprocal", [ctx.op("Sqrt", [square_sum], label="norms")], label="rsqrt")
    cap = emit.scalar(ctx, eager._INV_EPSILON, dtype, "cap")
    uncapped = ctx.op("Less", [rsqrt, cap], dtype="bool", label="uncapped")
    scale = ctx.op("Where", [uncapped, rsqrt, cap], label="inverse_norms", shape=(size, 1))
    unit = ctx.op("Mul", [rows, scale], label="unit_rows", shape=rows.shape)
    unit_t = ctx.op("Transpose", [unit], label="unit_rows_t", shape=unit.shape[::-1], perm=[1, 0])
    gram = ctx.op("MatMul", [unit, unit_t], label="gram", shape=(size, size))
    off = ctx.constant(1.0 - np.eye(size), "off_diagonal", dtype)
    off_gram = ctx.op("Mul", [gram, off], label="off_diagonal_gram", shape=gram.shape)
    k = r.factor * 0.5 / (size * (size - 1.0) / 2.0)
    absolute = ctx.op("Abs", [off_gram], label="abs", shape=gram.shape)
    penalty = _scaled(ctx, k, _total(ctx, absolute, "ReduceSum", "abs_sum"), "penalty")
    # Gradient: see `eager.OrthogonalRegularizer.gradient`.
    d_gram = _scaled(ctx, 2.0 * k, _sign(ctx, off_gram), "d_gram")
    d_unit = ctx.op("MatMul", [d_gram, unit], label="d_unit_rows", shape=rows.shape)
    radial = emit.reduce(
        ctx,
        "ReduceSum",
        ctx.op("Mul", [d_unit, unit], label="d_unit_dot"),
        [1],
        keepdims=True,
        label="radial",
        shape=(size, 1),
    )
    radial = ctx.op(
        "Where",
        [uncapped, radial, emit.scalar(ctx, 0.0, dtype, "zero")],
        label="radial_uncapped",
        shape=(size, 1),
    )
    along = ctx.op("Mul", [radial, unit], label="along_rows", shape=rows.shape)
    tangent = ctx.op("Sub", [d_unit, along], label="tangent", shape=rows.shape)
    gradient = ctx.op("Mul", [scale, tangent], label="gradient", shape=rows.shape)
    if columns:
        gradient = ctx.op("Transpose", [gradient], label="gradient_t", shape=w.shape, perm=[1, 0])
    return penalty, gradient


_RULES: dict[type, Callable[[LoweringContext, Any, Value], Terms]] = {
    eager.Regularizer: lambda ctx, r, w: (None, None),
    eager.L1: lambda ctx, r, w: _l1(ctx, r.l1, w),
    eager.L2: lambda ctx, r, w: _l2(ctx, r.l2, w),
    eager.L1L2: lambda ctx, r, w: _sum(ctx, _l1(ctx, r.l1, w), _l2(ctx, r.l2, w)),
    eager.OrthogonalRegularizer: _orthogonal,
}


def lower_regularizer(ctx: LoweringContext, regularizer: Any, w: Value) -> tuple[Value, Value]:
    """The penalty of `w` and its gradient, as ONNX nodes.

    Args:
        ctx: The lowering context.
        regularizer: A regularizer of `onnxbn.regularizers`.
        w: The weight: a floating value of static shape.

    Returns:
        `(penalty, gradient)`: the penalty is a scalar of the working dtype
        (`w`'s, float32 for a 16-bit `w`); the gradient has `w`'s dtype and
        shape.

    Raises:
        TypeError: a regularizer without a lowering (a custom callable or
            subclass).
        ValueError: a weight the regularizer rejects (OrthogonalRegularizer:
            not rank 2, or fewer than 2 rows / columns).
    """
    rule = _RULES.get(type(regularizer))
    if rule is None:
        raise TypeError(
            f"Cannot export the regularizer {regularizer!r} of type "
            f"{type(regularizer).__name__}: only {sorted(c.__name__ for c in _RULES)} from "
            "onnxbn.regularizers have an ONNX lowering."
        )
    if w.shape is None or None in w.shape:
        raise ValueError(f"Cannot regularize {w.name!r}: its shape {w.shape} is not static.")
    dtype = working_dtype(w.dtype)
    with ctx.scope(ctx.fresh("regularizer")):
        penalty, gradient = rule(ctx, regularizer, emit.cast(ctx, w, dtype))
        if penalty is None:  # a zero penalty: constants, never `0 * w` (NaN for inf)
            penalty = emit.scalar(ctx, 0.0, dtype, "penalty")
            gradient = ctx.constant(np.zeros(w.shape, to_numpy_dtype(w.dtype)), "gradient")
        return penalty, emit.cast(ctx, gradient, w.dtype, label="gradient")
