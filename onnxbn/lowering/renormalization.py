"""Batch renormalization in ONNX (semantics: `layers/renormalization.py`).

Training only: inference and frozen renorm layers are plain BatchNormalization.
With μ, σ² the (masked, or global when synchronized) batch moments:
`s = sqrt(σ² + ε)`, `ŝ = max(renorm_stddev, sqrt(ε))`, `r = s / ŝ`,
`d = (μ - renorm_mean) / ŝ`, clipped by the `renorm_clipping` keys present;
`y = (x - μ) · r·γ / s + d·γ + β`. Every max, min and clip is a `Where` on a
comparison, which keeps NaN as NumPy's `maximum` does (runtimes disagree on
Max/Min with NaN).
"""

from __future__ import annotations

import math

from onnxbn.lowering import emit
from onnxbn.lowering.context import LoweringContext, Value


def _at_least(ctx: LoweringContext, value: Value, bound: float, label: str) -> Value:
    """`max(value, bound)` with NaN kept."""
    floor = emit.scalar(ctx, bound, value.dtype, "bound")
    below = ctx.op("Less", [value, floor], dtype="bool")
    return ctx.op("Where", [below, floor, value], dtype=value.dtype, label=label)


def _at_most(ctx: LoweringContext, value: Value, bound: float, label: str) -> Value:
    """`min(value, bound)` with NaN kept."""
    ceiling = emit.scalar(ctx, bound, value.dtype, "bound")
    above = ctx.op("Greater", [value, ceiling], dtype="bool")
    return ctx.op("Where", [above, ceiling, value], dtype=value.dtype, label=label)


def correction(
    ctx: LoweringContext, op, batch_mean: Value, var: Value, states: dict[str, Value]
) -> tuple[Value, Value, Value]:
    """`(s, r, d)` of one training call, each `(C,)` in the data's dtype."""
    dtype = var.dtype
    epsilon = emit.scalar(ctx, op.epsilon, dtype, "epsilon")
    s = ctx.op("Sqrt", [ctx.op("Add", [var, epsilon])], label="batch_stddev")
    floor = _at_least(ctx, states["renorm_stddev"], math.sqrt(op.epsilon), "renorm_floor")
    r = ctx.op("Div", [s, floor], label="r")
    gap = ctx.op("Sub", [batch_mean, states["renorm_mean"]])
    d = ctx.op("Div", [gap, floor], label="d")
    clipping = op.renorm_clipping or {}
    if clipping.get("rmin") is not None:
        r = _at_least(ctx, r, float(clipping["rmin"]), "r")
    if clipping.get("rmax") is not None:
        r = _at_most(ctx, r, float(clipping["rmax"]), "r")
    if clipping.get("dmax") is not None:
        dmax = float(clipping["dmax"])
        d = _at_most(ctx, _at_least(ctx, d, -dmax, "d"), dmax, "d")
    return s, r, d


def affine(
    ctx: LoweringContext, s: Value, r: Value, d: Value, gamma: Value | None, beta: Value | None
) -> tuple[Value, Value]:
    """`(r·γ / s, d·γ + β)`: the scale of `x - μ` and the offset after it."""
    scale = r if gamma is None else ctx.op("Mul", [r, gamma])
    scale = ctx.op("Div", [scale, s], label="inv_std")
    offset = d if gamma is None else ctx.op("Mul", [d, gamma])
    if beta is not None:
        offset = ctx.op("Add", [offset, beta], label="renorm_offset")
    return scale, offset


def updates(
    ctx: LoweringContext, op, batch_mean: Value, s: Value, states: dict[str, Value], ema
) -> dict[str, Value]:
    """The five new states (before the empty-batch guard), by weight name.

    `moving_mean`, `moving_stddev` move toward μ and `s` with `momentum`,
    `renorm_mean`, `renorm_stddev` with `renorm_momentum`; `moving_variance`
    is `relu(moving_stddev² - ε)` of the new `moving_stddev` as stored.
    """
    moving_stddev = ema(ctx, states["moving_stddev"], s, op.momentum)
    stored = emit.cast(ctx, emit.cast(ctx, moving_stddev, op.moving_stddev.dtype), s.dtype)
    squared = ctx.op("Mul", [stored, stored])
    epsilon = emit.scalar(ctx, op.epsilon, s.dtype, "epsilon")
    variance = emit.clamp_negative(
        ctx, ctx.op("Sub", [squared, epsilon]), "moving_variance"
    )
    return {
        "moving_mean": ema(ctx, states["moving_mean"], batch_mean, op.momentum),
        "moving_variance": variance,
        "moving_stddev": moving_stddev,
        "renorm_mean": ema(ctx, states["renorm_mean"], batch_mean, op.renorm_momentum),
        "renorm_stddev": ema(ctx, states["renorm_stddev"], s, op.renorm_momentum),
    }
