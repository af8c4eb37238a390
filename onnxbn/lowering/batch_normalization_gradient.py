"""The gradient of one BatchNormalization call as ONNX (the forward: `batch_normalization.py`).

Per channel, with `m` the mean the output was centered by (the batch mean in
training, the moving mean in inference), `c = x - m`, `σ = sqrt(v + ε)` and
`k` the factor of `c` in the output (`γ / σ`; renorm `r·γ / σ`), and the sums
over every position `A = Σ dy`, `B = Σ dy·c`:

- `dβ = A`, `dγ = B / σ` (renorm `B·r / σ + d·A`: `r` and `d` are constants
  of the gradient, Keras's `stop_gradient`);
- inference and frozen layers: `dx = dy·k`;
- training: `m` and `v` are functions of `x` (masked: Keras's formulas of
  `layers/moments.py`, both divided by `D = count + 1e-7`, `v` taken around
  that shrunken `m`; unmasked `D = count`). With `w` = 1 at the positions the
  moments read, `∂L/∂v = -B·k / (2σ²)` and `∂L/∂m = -k·A - ∂L/∂v · 2·Σ_w c / D`,
  where `Σ_w c = 1e-7·m` masked (`Σ_w x = D·m` exactly) and 0 unmasked:
  `dx = dy·k + w·(2·∂L/∂v·c + ∂L/∂m) / D`.

The forward rule saves what this reads (`ctx.save`), so the moments are never
recomputed: `shifted` (the data the output was computed from: `x - shift` in
training, `x` in inference), `mean_shifted` (`m` relative to it), `std` (σ),
`scale` (k); in training also `count`, `valid` (None unmasked), `nonempty`
(None unless the batch may be empty), `batch_mean`, and renorm's `r`, `d`.
`B` comes from the shifted data, `Σ dy·shifted - mean_shifted·A`, whose
magnitude the shift keeps near the spread (no cancellation on `1e4 + N(0, 1)`).

Masked: `Where` keeps masked-out positions (which may hold NaN) out of the
moment terms of `dx`; their `dy·k` still flows, as their output depends on
`x` there. An empty batch gives an empty `dx` and zero `dγ`, `dβ` (the
moments of an empty batch are NaN in the graph: `dγ` is selected by
`nonempty`). The sums over the batch are ReduceSum / MatMul by a ones vector,
as the forward's, which every runtime of the portability matrix evaluates on
an empty batch.

Synchronized layers: the count and moments are the ones the forward used (the
global ones when `synchronize` is fed True), but `A` and `B` are this
process's own sums: an exact multi-process gradient would need them
all-reduced as well, which the graph does not publish. In a single process,
the only train step, local and global are the same.
"""

from __future__ import annotations

from typing import Any

from onnxbn.dtypes import is_float
from onnxbn.gradients import Gradients
from onnxbn.layers.moments import MASK_EPSILON, normalize_axis
from onnxbn.lowering import emit
from onnxbn.lowering.context import LoweringContext, Value
from onnxbn.lowering.moment_nodes import ones_like_rows, zeroed


def backward(
    ctx: LoweringContext, op: Any, saved: dict[str, Any], x: Value, dy: Value
) -> Gradients:
    """The gradients of one call from what its forward saved.

    Args:
        ctx: the lowering context.
        op: the BatchNormalization layer.
        saved: the forward's saved values (see the module docstring), with
            `mean_shifted`, `std` and `scale` present in every mode.
        x: the call's input operand (its dtype is `dx`'s).
        dy: the gradient of the loss with respect to the call's output.

    Returns:
        `Gradients((dx,), weights)`; `dx` is None for an integer or bool input.
    """
    d = saved["shifted"]
    dtype, rank = d.dtype, d.rank
    axis = normalize_axis(op.axis, rank, op.name)
    # dy has the output's shape, the shifted data's: its static dims are known there.
    dy = emit.cast(ctx, Value(dy.name, dy.dtype, d.shape), dtype, "dy")
    weighted = ctx.op("Mul", [dy, d], label="dy_shifted", shape=d.shape)
    total, weighted_sum = _channel_sums(ctx, [dy, weighted], axis, d)
    centered = ctx.op(
        "Sub", [weighted_sum, ctx.op("Mul", [saved["mean_shifted"], total])], label="dy_centered"
    )
    scale = saved["scale"]
    dx = ctx.op("Mul", [dy, _broadcast(ctx, scale, axis, rank)], label="dx_direct", shape=d.shape)
    if saved.get("count") is not None:
        dx = ctx.op(
            "Add", [dx, _through_moments(ctx, saved, total, centered, axis)], label="dx",
            shape=d.shape,
        )  # fmt: skip
    dx = emit.cast(ctx, dx, x.dtype, "dx") if is_float(x.dtype) else None
    return Gradients((dx,), _weight_gradients(ctx, op, saved, total, centered))


def _through_moments(
    ctx: LoweringContext, saved: dict, total: Value, centered: Value, axis: int
) -> Value:
    """`w·(2·∂L/∂v·c + ∂L/∂m) / D` over the data, as `shifted·slope + intercept`."""
    d, std, scale, n = saved["shifted"], saved["std"], saved["scale"], saved["count"]
    valid, dtype = saved.get("valid"), d.dtype
    # q = B·k / σ² = -2 ∂L/∂v.
    q = ctx.op("Div", [ctx.op("Mul", [centered, scale]), ctx.op("Mul", [std, std])], label="q")
    dmean = ctx.op("Neg", [ctx.op("Mul", [scale, total])], label="dmean")
    if valid is None:
        den = n
    else:
        den = ctx.op("Add", [n, emit.scalar(ctx, MASK_EPSILON, dtype, "count_epsilon")])
        # -∂L/∂v · 2·Σ_w c / D with Σ_w c = 1e-7·m.
        spill = ctx.op(
            "Mul", [q, ctx.op("Mul", [saved["batch_mean"], emit.scalar(ctx, MASK_EPSILON, dtype,
                                                                        "count_epsilon")])]
        )  # fmt: skip
        dmean = ctx.op("Add", [dmean, ctx.op("Div", [spill, den])], label="dmean")
    inv_den = ctx.op("Reciprocal", [den], label="inv_count")
    # (∂L/∂m - q·c) / D = shifted·(-q / D) + (∂L/∂m + q·mean_shifted) / D.
    slope = ctx.op("Neg", [ctx.op("Mul", [q, inv_den])], label="slope")
    intercept = ctx.op(
        "Mul", [ctx.op("Add", [dmean, ctx.op("Mul", [q, saved["mean_shifted"]])]), inv_den],
        label="intercept",
    )  # fmt: skip
    through = ctx.op(
        "Add",
        [ctx.op("Mul", [d, _broadcast(ctx, slope, axis, d.rank)], shape=d.shape),
         _broadcast(ctx, intercept, axis, d.rank)],
        label="dx_moments",
        shape=d.shape,
    )  # fmt: skip
    if valid is None:
        return through
    valid = ctx.op(
        "Unsqueeze", [valid, emit.ints(ctx, [-1], "axes")], dtype="bool", label="valid_e"
    )
    return zeroed(ctx, valid, through, "dx_moments", d.rank)


def _weight_gradients(
    ctx: LoweringContext, op: Any, saved: dict, total: Value, centered: Value
) -> dict[str, Value]:
    trainable = {v.path for v in op.trainable_weights}
    grads = {}
    if op.gamma is not None and op.gamma.path in trainable:
        dgamma = ctx.op("Div", [centered, saved["std"]], label="dgamma")
        if saved.get("r") is not None:
            dgamma = ctx.op(
                "Add",
                [ctx.op("Mul", [dgamma, saved["r"]]), ctx.op("Mul", [saved["d"], total])],
                label="dgamma",
            )
        nonempty = saved.get("nonempty")
        if nonempty is not None:  # an empty batch's moments are NaN; its sums are 0
            zero = emit.scalar(ctx, 0.0, dgamma.dtype, "zero")
            dgamma = ctx.op("Where", [nonempty, dgamma, zero], dtype=dgamma.dtype, label="dgamma")
        grads[op.gamma.path] = dgamma
    if op.beta is not None and op.beta.path in trainable:
        grads[op.beta.path] = total
    return grads


def _channel_sums(
    ctx: LoweringContext, tensors: list[Value], axis: int, shifted: Value
) -> list[Value]:
    """Σ of each tensor (of the same shape) over every axis but `axis`, each `(C,)`.

    Channel last: a MatMul by a ones vector on the `(M, C)` view, as the
    forward's sums (onnxruntime's ReduceSum over leading axes is several times
    slower), the ones taken from the layer's `shifted` data (`ones_like_rows`);
    otherwise ReduceSum over the axes after the channel, then before it.
    """
    shape = tensors[0].shape
    rank, channels = len(shape), shape[axis]
    if axis == rank - 1:
        rows = emit.static_product(shape[:-1])
        views = [
            t if rank == 2 else emit.reshape(ctx, t, [rows, channels], "rows") for t in tensors
        ]
        shifted = shifted if rank == 2 else emit.reshape(ctx, shifted, [rows, channels], "rows")
        ones = ones_like_rows(ctx, shifted)
        return [ctx.op("MatMul", [ones, v], label="sum", shape=(channels,)) for v in views]
    sums = []
    for t in tensors:
        partial = emit.reduce(ctx, "ReduceSum", t, list(range(axis + 1, rank)), keepdims=False)
        if axis > 0:
            partial = emit.reduce(
                ctx, "ReduceSum", partial, list(range(axis)), keepdims=False, label="sum"
            )
        sums.append(partial)
    return sums


def _broadcast(ctx: LoweringContext, value: Value, axis: int, rank: int) -> Value:
    """A `(C,)` value reshaped to `[C, 1, ..., 1]` to broadcast along `axis` (as is when last)."""
    if axis == rank - 1:
        return value
    shape = emit.ints(ctx, [-1] + [1] * (rank - 1 - axis), "param_shape")
    return ctx.op("Reshape", [value, shape], label="per_channel", allowzero=0)
