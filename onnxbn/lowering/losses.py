"""Losses as ONNX: `lower_loss` and the per-sample loss rules (semantics: `losses.py`).

`lower_loss` emits the eager computation of `onnxbn.losses` node for node, in
float32 (float64 when `y_pred` is float64), and beside it the gradient. The
shared nodes (rank alignment, clipping, last-axis means, the masked
`sum_over_batch_size`) come from `onnxbn/lowering/loss_nodes.py`; here are the
per-sample losses: `log_softmax` as `x - max - log(sum(exp))` (the reference
interpreter has no LogSoftmax); sparse ids compared with `range(classes)`
(`Equal`), so a negative or too large id is a zero row (ONNX OneHot would wrap
negative ids around).

Every shape is dynamic except the class count of the sparse loss.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from onnxbn import losses
from onnxbn.lowering import emit
from onnxbn.lowering.context import LoweringContext, Value
from onnxbn.lowering.loss_nodes import (
    align,
    broadcast_shape,
    clip,
    expand_last,
    last_dim,
    mean_last,
    per_element,
    require_same_shape,
    squeeze_last,
    sum_last,
    sum_over_batch_size,
    sum_to_shape,
)

Backward = Callable[[Value], Value]


def lower_loss(
    ctx: LoweringContext,
    loss: Any,
    y_true: Value,
    y_pred: Value,
    mask: Value | None = None,
) -> tuple[Value, Value]:
    """Lowers `loss(y_true, y_pred)` (reduction `sum_over_batch_size`) and its gradient.

    Args:
        ctx: the lowering context (names take its current scope).
        loss: a loss of `onnxbn.losses`, or anything `onnxbn.losses.get` accepts.
        y_true: the targets (class ids of any numeric dtype for the sparse loss).
        y_pred: the predictions (float).
        mask: optional mask of `y_pred`, shaped like the per-sample losses;
            non-zero means valid.

    Returns:
        `(loss, grad)`: the scalar loss (float32, float64 for a float64
        `y_pred`) and d(loss)/d(y_pred) with `y_pred`'s dtype and shape.

    Raises:
        ValueError: for unknown ranks, incompatible static shapes, or a
            dynamic class count for the sparse loss.
        TypeError: for a loss that is not one of `onnxbn.losses`.
    """
    loss = losses.get(loss)
    if not isinstance(loss, losses.Loss) or type(loss) not in _RULES:
        raise TypeError(
            f"Cannot lower the loss {loss!r}: expected one of "
            f"{sorted(cls.__name__ for cls in _RULES)}."
        )
    for value, what in ((y_true, "y_true"), (y_pred, "y_pred"), (mask, "mask")):
        if value is not None and value.shape is None:
            raise ValueError(f"{loss.name}: the rank of {what} ({value.name!r}) must be known.")
    if y_pred.rank < 1:
        raise ValueError(f"{loss.name}: `y_pred` must be at least rank 1. Received a scalar.")
    dtype = "float64" if y_pred.dtype == "float64" else "float32"
    if not isinstance(loss, losses.SparseCategoricalCrossentropy):
        y_true = emit.cast(ctx, y_true, dtype, "y_true")
    y_true, pred = align(ctx, y_true, emit.cast(ctx, y_pred, dtype, "y_pred"))
    values, backward = _RULES[type(loss)](ctx, loss, y_true, pred)
    total, dvalues = sum_over_batch_size(ctx, loss.name, values, mask)
    grad = backward(dvalues)
    if grad.shape != y_pred.shape:  # undo the rank alignment
        grad = emit.reshape_like(ctx, grad, y_pred, "d_y_pred")
    grad = emit.cast(ctx, grad, y_pred.dtype, "d_y_pred")
    return total, Value(grad.name, y_pred.dtype, y_pred.shape)


def _smooth(ctx: LoweringContext, t: Value, factor: float, offset: Value) -> Value:
    """`t * (1 - factor) + offset` (label smoothing)."""
    keep = emit.scalar(ctx, 1.0 - factor, t.dtype, "keep")
    scaled = ctx.op("Mul", [t, keep], label="smoothed", shape=t.shape)
    return ctx.op("Add", [scaled, offset], label="smoothed", shape=t.shape)


# -- the per-sample losses ---------------------------------------------------------------


def _elementwise_error(
    ctx: LoweringContext, loss: Any, y_true: Value, y_pred: Value, squared: bool
) -> tuple[Value, Backward]:
    shape = broadcast_shape(y_true.shape, y_pred.shape, f"{loss.name} (y_true and y_pred)")
    diff = ctx.op("Sub", [y_pred, y_true], label="error", shape=shape)
    if squared:
        error = ctx.op("Mul", [diff, diff], label="squared_error", shape=shape)
    else:
        error = ctx.op("Abs", [diff], label="absolute_error", shape=shape)
    values, count = mean_last(ctx, error, "values")

    def backward(dvalues: Value) -> Value:
        g = per_element(ctx, dvalues, count)
        if squared:
            two = emit.scalar(ctx, 2.0, diff.dtype, "two")
            slope = ctx.op("Mul", [diff, two], label="slope", shape=shape)
        else:  # sign(diff), 0 at 0, by comparisons (the reference interpreter has no Sign)
            zero = emit.scalar(ctx, 0.0, diff.dtype, "zero")
            pos = emit.cast(
                ctx,
                ctx.op("Greater", [diff, zero], dtype="bool", label="positive"),
                diff.dtype,
                "positive",
            )
            neg = emit.cast(
                ctx,
                ctx.op("Less", [diff, zero], dtype="bool", label="negative"),
                diff.dtype,
                "negative",
            )
            slope = ctx.op("Sub", [pos, neg], label="sign", shape=shape)
        grad = ctx.op("Mul", [g, slope], label="d_y_pred", shape=shape)
        return sum_to_shape(ctx, grad, y_pred.shape)

    return values, backward


def _mean_squared_error(ctx, loss, y_true, y_pred):
    return _elementwise_error(ctx, loss, y_true, y_pred, squared=True)


def _mean_absolute_error(ctx, loss, y_true, y_pred):
    return _elementwise_error(ctx, loss, y_true, y_pred, squared=False)


def _sigmoid(ctx: LoweringContext, x: Value, one: Value) -> Value:
    """`1 / (1 + exp(-x))`, the NumPy backend's formula (tract has no float64 Sigmoid)."""
    exp = ctx.op(
        "Exp", [ctx.op("Neg", [x], label="neg_logits", shape=x.shape)], label="exp", shape=x.shape
    )
    denominator = ctx.op("Add", [one, exp], label="denominator", shape=x.shape)
    return ctx.op("Div", [one, denominator], label="probability", shape=x.shape)


def _binary_crossentropy(
    ctx: LoweringContext, loss: Any, t: Value, y_pred: Value
) -> tuple[Value, Backward]:
    require_same_shape(loss.name, t, y_pred)
    shape, dtype = y_pred.shape, y_pred.dtype
    if loss.label_smoothing:
        half = emit.scalar(ctx, 0.5 * loss.label_smoothing, dtype, "half_smoothing")
        t = _smooth(ctx, t, loss.label_smoothing, half)
    one = emit.scalar(ctx, 1.0, dtype, "one")
    p = _sigmoid(ctx, y_pred, one) if loss.from_logits else y_pred
    c, inside = clip(ctx, p)
    not_t = ctx.op("Sub", [one, t], label="not_target", shape=shape)
    not_c = ctx.op("Sub", [one, c], label="not_clipped", shape=shape)
    log_c = ctx.op("Log", [c], label="log_p", shape=shape)
    log_not_c = ctx.op("Log", [not_c], label="log_not_p", shape=shape)
    both = ctx.op(
        "Add",
        [
            ctx.op("Mul", [t, log_c], label="pos_term", shape=shape),
            ctx.op("Mul", [not_t, log_not_c], label="neg_term", shape=shape),
        ],
        label="log_likelihood",
        shape=shape,
    )
    elementwise = ctx.op("Neg", [both], label="bce", shape=shape)
    values, count = mean_last(ctx, elementwise, "values")

    def backward(dvalues: Value) -> Value:
        g = per_element(ctx, dvalues, count)
        if loss.from_logits:  # through the sigmoid: p - t where not clipped
            slope = ctx.op("Sub", [p, t], label="slope", shape=shape)
        else:  # (1 - t) / (1 - c) - t / c
            slope = ctx.op(
                "Sub",
                [
                    ctx.op("Div", [not_t, not_c], label="neg_slope", shape=shape),
                    ctx.op("Div", [t, c], label="pos_slope", shape=shape),
                ],
                label="slope",
                shape=shape,
            )
        slope = ctx.op("Mul", [slope, inside], label="slope", shape=shape)
        return ctx.op("Mul", [g, slope], label="d_y_pred", shape=shape)

    return values, backward


def _categorical(
    ctx: LoweringContext, t: Value, y_pred: Value, from_logits: bool
) -> tuple[Value, Backward]:
    """`-sum(t * log_prob, -1)` and its pullback (`t` has `y_pred`'s shape)."""
    shape = y_pred.shape
    if from_logits:
        top = emit.reduce(
            ctx,
            "ReduceMax",
            y_pred,
            [y_pred.rank - 1],
            keepdims=True,
            label="max",
            shape=shape[:-1] + (1,),
        )
        shifted = ctx.op("Sub", [y_pred, top], label="shifted", shape=shape)
        exp = ctx.op("Exp", [shifted], label="exp", shape=shape)
        total = sum_last(ctx, exp, True, "sum_exp")
        log_total = ctx.op("Log", [total], label="log_sum_exp", shape=total.shape)
        log_prob = ctx.op("Sub", [shifted, log_total], label="log_prob", shape=shape)
    else:
        norm = sum_last(ctx, y_pred, True, "norm")
        q = ctx.op("Div", [y_pred, norm], label="probability", shape=shape)
        c, inside = clip(ctx, q)
        log_prob = ctx.op("Log", [c], label="log_prob", shape=shape)
    product = ctx.op("Mul", [t, log_prob], label="target_log_prob", shape=shape)
    values = ctx.op("Neg", [sum_last(ctx, product, False, "sum")], label="values", shape=shape[:-1])

    def backward(dvalues: Value) -> Value:
        g = per_element(ctx, dvalues)
        if from_logits:  # softmax * sum(t) - t
            softmax = ctx.op("Div", [exp, total], label="softmax", shape=shape)
            mass = sum_last(ctx, t, True, "target_mass")
            scaled = ctx.op("Mul", [softmax, mass], label="scaled_softmax", shape=shape)
            slope = ctx.op("Sub", [scaled, t], label="slope", shape=shape)
            return ctx.op("Mul", [g, slope], label="d_y_pred", shape=shape)
        # dq = -g * t / c where not clipped; dp = (dq - sum(dq * q)) / norm
        ratio = ctx.op(
            "Mul",
            [ctx.op("Div", [t, c], label="ratio", shape=shape), inside],
            label="ratio",
            shape=shape,
        )
        dq = ctx.op(
            "Neg", [ctx.op("Mul", [g, ratio], label="dq", shape=shape)], label="dq", shape=shape
        )
        along = sum_last(ctx, ctx.op("Mul", [dq, q], label="dq_q", shape=shape), True, "dq_q")
        centered = ctx.op("Sub", [dq, along], label="dq_centered", shape=shape)
        return ctx.op("Div", [centered, norm], label="d_y_pred", shape=shape)

    return values, backward


def _categorical_crossentropy(ctx, loss, t, y_pred):
    require_same_shape(loss.name, t, y_pred)
    if loss.label_smoothing:
        classes = last_dim(ctx, t, t.dtype)
        share = ctx.op(
            "Div",
            [emit.scalar(ctx, loss.label_smoothing, t.dtype, "smoothing"), classes],
            label="smoothing_share",
            shape=(),
        )
        t = _smooth(ctx, t, loss.label_smoothing, share)
    return _categorical(ctx, t, y_pred, loss.from_logits)


def _sparse_categorical_crossentropy(ctx, loss, ids, y_pred):
    if ids.rank == y_pred.rank and ids.shape[-1] == 1:
        ids = squeeze_last(ctx, ids)
    if ids.rank != y_pred.rank - 1 or any(
        a is not None and b is not None and a != b for a, b in zip(ids.shape, y_pred.shape)
    ):
        raise ValueError(
            f"{loss.name}: `y_true` must have the shape of `y_pred` without its last axis. "
            f"Received: y_true.shape={ids.shape}, y_pred.shape={y_pred.shape}."
        )
    classes = y_pred.shape[-1]
    if classes is None:
        raise ValueError(f"{loss.name}: the class count (last dim of `y_pred`) must be static.")
    ids = expand_last(ctx, emit.cast(ctx, ids, "int64", "class_id"))  # floats truncate
    arange = ctx.constant(np.arange(classes, dtype=np.int64), "classes")
    hit = ctx.op("Equal", [ids, arange], dtype="bool", label="one_hot", shape=y_pred.shape)
    return _categorical(ctx, emit.cast(ctx, hit, y_pred.dtype, "one_hot"), y_pred, loss.from_logits)


_RULES: dict[type, Callable[..., tuple[Value, Backward]]] = {
    losses.MeanSquaredError: _mean_squared_error,
    losses.MeanAbsoluteError: _mean_absolute_error,
    losses.BinaryCrossentropy: _binary_crossentropy,
    losses.CategoricalCrossentropy: _categorical_crossentropy,
    losses.SparseCategoricalCrossentropy: _sparse_categorical_crossentropy,
}
