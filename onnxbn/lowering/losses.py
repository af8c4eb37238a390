"""Losses as ONNX: the scalar loss and its gradient with respect to `y_pred` (semantics: `losses.py`).

`lower_loss` emits the eager computation of `onnxbn.losses` node for node, in
float32 (float64 when `y_pred` is float64), and beside it the gradient:

- Keras's rank alignment of `y_true` and `y_pred` from their static ranks;
- the per-sample losses over the last axis (`ReduceSum` then a division by
  the axis length, so an empty batch never averages nothing);
- probabilities clipped by `Clip` with min/max inputs, the gradient masked by
  `p >= eps and p <= 1 - eps`; `log_softmax` as `x - max - log(sum(exp))`
  (the reference interpreter has no LogSoftmax); sparse ids compared with
  `range(classes)` (`Equal`), so a negative or too large id is a zero row (ONNX
  OneHot would wrap negative ids around);
- the mask weight `total / valid` and the batch divisor by `Where(n == 0, 1, n)`:
  Keras's `divide_no_nan`, without a division by zero anywhere.

Every shape is dynamic except the class count of the sparse loss.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from onnxbn import losses
from onnxbn.lowering import emit
from onnxbn.lowering.context import LoweringContext, Value

Shape = tuple[int | None, ...]
Backward = Callable[[Value], Value]
_CROSS_ENTROPIES = (losses.BinaryCrossentropy, losses.CategoricalCrossentropy)


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
    y_true, pred = _align(ctx, y_true, emit.cast(ctx, y_pred, dtype, "y_pred"))
    values, backward = _RULES[type(loss)](ctx, loss, y_true, pred)
    total, dvalues = _reduce(ctx, loss.name, values, mask)
    grad = backward(dvalues)
    if grad.shape != y_pred.shape:  # undo the rank alignment
        grad = emit.reshape_like(ctx, grad, y_pred, "d_y_pred")
    grad = emit.cast(ctx, grad, y_pred.dtype, "d_y_pred")
    return total, Value(grad.name, y_pred.dtype, y_pred.shape)


# -- shapes -----------------------------------------------------------------------


def _squeeze_last(ctx: LoweringContext, x: Value) -> Value:
    return ctx.op(
        "Squeeze", [x, emit.ints(ctx, [-1], "axes")], label="squeezed", shape=x.shape[:-1]
    )


def _expand_last(ctx: LoweringContext, x: Value) -> Value:
    axes = emit.ints(ctx, [-1], "axes")
    return ctx.op("Unsqueeze", [x, axes], label="expanded", shape=(*x.shape, 1))


def _align(ctx: LoweringContext, x1: Value, x2: Value) -> tuple[Value, Value]:
    """Keras's `squeeze_or_expand_to_same_rank` on static ranks (a dynamic dim is not 1)."""
    if x1.rank == x2.rank + 1 and x1.shape[-1] == 1:
        if x2.rank == 1:
            x2 = _expand_last(ctx, x2)
        else:
            x1 = _squeeze_last(ctx, x1)
    if x2.rank == x1.rank + 1 and x2.shape[-1] == 1:
        if x1.rank == 1:
            x1 = _expand_last(ctx, x1)
        else:
            x2 = _squeeze_last(ctx, x2)
    return x1, x2


def _broadcast_shape(a: Shape, b: Shape, what: str) -> Shape:
    """The static broadcast shape; a dynamic dim is assumed to match the other one."""
    rank = max(len(a), len(b))
    a = (1,) * (rank - len(a)) + tuple(a)
    b = (1,) * (rank - len(b)) + tuple(b)
    out = []
    for da, db in zip(a, b):
        if da is not None and db is not None and da != db and 1 not in (da, db):
            raise ValueError(f"Incompatible shapes for {what}: {a} and {b} do not broadcast.")
        out.append(db if da == 1 else da if db == 1 else da if db is None else db)
    return tuple(out)


def _require_same_shape(name: str, y_true: Value, y_pred: Value) -> None:
    if y_true.rank != y_pred.rank or any(
        a is not None and b is not None and a != b for a, b in zip(y_true.shape, y_pred.shape)
    ):
        raise ValueError(
            f"{name}: `y_true` and `y_pred` must have the same shape. "
            f"Received: y_true.shape={y_true.shape}, y_pred.shape={y_pred.shape}."
        )


def _sum_to_shape(ctx: LoweringContext, grad: Value, shape: Shape) -> Value:
    """`grad` summed over the axes broadcasting stretched `shape` along (static dims of 1)."""
    lead = grad.rank - len(shape)
    if lead:
        grad = emit.reduce(
            ctx,
            "ReduceSum",
            grad,
            range(lead),
            keepdims=False,
            label="d_y_pred",
            shape=grad.shape[lead:],
        )
    axes = [i for i, d in enumerate(shape) if d == 1 and grad.shape[i] != 1]
    if axes:
        grad = emit.reduce(
            ctx, "ReduceSum", grad, axes, keepdims=True, label="d_y_pred", shape=shape
        )
    return grad


# -- small arithmetic ------------------------------------------------------------------


def _scalar(ctx: LoweringContext, value: float, dtype: str, label: str) -> Value:
    """A rank-0 constant: `emit.scalar`, its initializer kept rank 0 (`ctx.constant`
    stores 0-d arrays as `[1]`, which would make the scalar loss `[1]`)."""
    scalar = emit.scalar(ctx, value, dtype, label)
    tensor = ctx.initializers[-1]
    if tensor.name == scalar.name:
        del tensor.dims[:]
    return scalar


def _last_dim(ctx: LoweringContext, x: Value, dtype: str) -> Value:
    """`x.shape[-1]` as a rank-0 `dtype` value (a constant when static)."""
    if x.shape[-1] is not None:
        return _scalar(ctx, float(x.shape[-1]), dtype, "count")
    size = ctx.op("Shape", [x], dtype="int64", label="count", start=-1)
    size = emit.cast(ctx, size, dtype, "count")
    return ctx.op(
        "Reshape", [size, emit.ints(ctx, [], "scalar")], label="count", shape=(), allowzero=0
    )


def _sum_last(ctx: LoweringContext, x: Value, keepdims: bool, label: str) -> Value:
    shape = x.shape[:-1] + ((1,) if keepdims else ())
    return emit.reduce(
        ctx, "ReduceSum", x, [x.rank - 1], keepdims=keepdims, label=label, shape=shape
    )


def _mean_last(ctx: LoweringContext, x: Value, label: str) -> tuple[Value, Value]:
    """`mean(x, -1)` as a sum divided by the axis length, and that length."""
    count = _last_dim(ctx, x, x.dtype)
    total = _sum_last(ctx, x, False, label + "_sum")
    return ctx.op("Div", [total, count], label=label, shape=x.shape[:-1]), count


def _per_element(ctx: LoweringContext, dvalues: Value, count: Value | None = None) -> Value:
    """d(loss)/d(values) broadcast back over the reduced last axis (divided by `count`)."""
    g = _expand_last(ctx, dvalues)
    return g if count is None else ctx.op("Div", [g, count], label="dmean", shape=g.shape)


def _safe_divisor(ctx: LoweringContext, n: Value) -> Value:
    """`n`, or 1 where it is 0 (whatever is divided is then 0: `divide_no_nan`)."""
    zero = _scalar(ctx, 0.0, n.dtype, "zero")
    one = _scalar(ctx, 1.0, n.dtype, "one")
    is_zero = ctx.op("Equal", [n, zero], dtype="bool", label="is_zero", shape=n.shape)
    return ctx.op("Where", [is_zero, one, n], dtype=n.dtype, label="divisor", shape=n.shape)


def _clip(ctx: LoweringContext, p: Value) -> tuple[Value, Value]:
    """`clip(p, eps, 1 - eps)` and the 0/1 factor that lets the gradient through."""
    low = _scalar(ctx, losses.EPSILON, p.dtype, "epsilon")
    high = _scalar(ctx, 1.0 - losses.EPSILON, p.dtype, "one_minus_epsilon")
    clipped = ctx.op("Clip", [p, low, high], label="clipped", shape=p.shape)
    above = ctx.op("GreaterOrEqual", [p, low], dtype="bool", label="above", shape=p.shape)
    below = ctx.op("LessOrEqual", [p, high], dtype="bool", label="below", shape=p.shape)
    inside = ctx.op("And", [above, below], dtype="bool", label="inside", shape=p.shape)
    return clipped, emit.cast(ctx, inside, p.dtype, "inside")


def _smooth(ctx: LoweringContext, t: Value, factor: float, offset: Value) -> Value:
    """`t * (1 - factor) + offset` (label smoothing)."""
    keep = _scalar(ctx, 1.0 - factor, t.dtype, "keep")
    scaled = ctx.op("Mul", [t, keep], label="smoothed", shape=t.shape)
    return ctx.op("Add", [scaled, offset], label="smoothed", shape=t.shape)


# -- the per-sample losses ---------------------------------------------------------------


def _elementwise_error(
    ctx: LoweringContext, loss: Any, y_true: Value, y_pred: Value, squared: bool
) -> tuple[Value, Backward]:
    shape = _broadcast_shape(y_true.shape, y_pred.shape, f"{loss.name} (y_true and y_pred)")
    diff = ctx.op("Sub", [y_pred, y_true], label="error", shape=shape)
    if squared:
        error = ctx.op("Mul", [diff, diff], label="squared_error", shape=shape)
    else:
        error = ctx.op("Abs", [diff], label="absolute_error", shape=shape)
    values, count = _mean_last(ctx, error, "values")

    def backward(dvalues: Value) -> Value:
        g = _per_element(ctx, dvalues, count)
        if squared:
            two = _scalar(ctx, 2.0, diff.dtype, "two")
            slope = ctx.op("Mul", [diff, two], label="slope", shape=shape)
        else:  # sign(diff), 0 at 0, by comparisons (the reference interpreter has no Sign)
            zero = _scalar(ctx, 0.0, diff.dtype, "zero")
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
        return _sum_to_shape(ctx, grad, y_pred.shape)

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
    _require_same_shape(loss.name, t, y_pred)
    shape, dtype = y_pred.shape, y_pred.dtype
    if loss.label_smoothing:
        half = _scalar(ctx, 0.5 * loss.label_smoothing, dtype, "half_smoothing")
        t = _smooth(ctx, t, loss.label_smoothing, half)
    one = _scalar(ctx, 1.0, dtype, "one")
    p = _sigmoid(ctx, y_pred, one) if loss.from_logits else y_pred
    c, inside = _clip(ctx, p)
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
    values, count = _mean_last(ctx, elementwise, "values")

    def backward(dvalues: Value) -> Value:
        g = _per_element(ctx, dvalues, count)
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
        total = _sum_last(ctx, exp, True, "sum_exp")
        log_total = ctx.op("Log", [total], label="log_sum_exp", shape=total.shape)
        log_prob = ctx.op("Sub", [shifted, log_total], label="log_prob", shape=shape)
    else:
        norm = _sum_last(ctx, y_pred, True, "norm")
        q = ctx.op("Div", [y_pred, norm], label="probability", shape=shape)
        c, inside = _clip(ctx, q)
        log_prob = ctx.op("Log", [c], label="log_prob", shape=shape)
    product = ctx.op("Mul", [t, log_prob], label="target_log_prob", shape=shape)
    values = ctx.op(
        "Neg", [_sum_last(ctx, product, False, "sum")], label="values", shape=shape[:-1]
    )

    def backward(dvalues: Value) -> Value:
        g = _per_element(ctx, dvalues)
        if from_logits:  # softmax * sum(t) - t
            softmax = ctx.op("Div", [exp, total], label="softmax", shape=shape)
            mass = _sum_last(ctx, t, True, "target_mass")
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
        along = _sum_last(ctx, ctx.op("Mul", [dq, q], label="dq_q", shape=shape), True, "dq_q")
        centered = ctx.op("Sub", [dq, along], label="dq_centered", shape=shape)
        return ctx.op("Div", [centered, norm], label="d_y_pred", shape=shape)

    return values, backward


def _categorical_crossentropy(ctx, loss, t, y_pred):
    _require_same_shape(loss.name, t, y_pred)
    if loss.label_smoothing:
        classes = _last_dim(ctx, t, t.dtype)
        share = ctx.op(
            "Div",
            [_scalar(ctx, loss.label_smoothing, t.dtype, "smoothing"), classes],
            label="smoothing_share",
            shape=(),
        )
        t = _smooth(ctx, t, loss.label_smoothing, share)
    return _categorical(ctx, t, y_pred, loss.from_logits)


def _sparse_categorical_crossentropy(ctx, loss, ids, y_pred):
    if ids.rank == y_pred.rank and ids.shape[-1] == 1:
        ids = _squeeze_last(ctx, ids)
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
    ids = _expand_last(ctx, emit.cast(ctx, ids, "int64", "class_id"))  # floats truncate
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


# -- reduction -----------------------------------------------------------------------------


def _sum_all(ctx: LoweringContext, x: Value, label: str) -> Value:
    """The sum of every element of `x` (rank >= 1) as a scalar, 0 when `x` is empty.

    A rank-1 `x` is summed as `(1, n)`: tract panics on a ReduceSum over the
    only axis of an empty vector (a division by zero in its kernel).
    """
    if x.rank == 1:
        x = ctx.op("Unsqueeze", [x, emit.ints(ctx, [0], "axes")], label=label, shape=(1, *x.shape))
    return emit.reduce(
        ctx, "ReduceSum", x, list(range(x.rank)), keepdims=False, label=label, shape=()
    )


def _reduce(
    ctx: LoweringContext, name: str, values: Value, mask: Value | None
) -> tuple[Value, Value]:
    """`sum_over_batch_size` with an optional mask, and d(loss)/d(values)."""
    dtype = values.dtype
    weight = None
    aligned = values
    if mask is not None:
        valid = mask if mask.dtype == "bool" else emit.cast(ctx, mask, "bool", "mask")
        aligned, valid = _align(ctx, values, valid)
        if aligned.rank != valid.rank or any(
            a is not None and b is not None and a != b for a, b in zip(aligned.shape, valid.shape)
        ):
            raise ValueError(
                f"{name}: the mask must have the shape of the per-sample losses "
                f"{values.shape}. Received: mask.shape={mask.shape}."
            )
        # Keras's apply_mask: valid entries weigh total / valid (0 when none is valid).
        flags = emit.cast(ctx, valid, dtype, "valid")
        total = emit.cast(
            ctx, ctx.op("Size", [valid], dtype="int64", label="total", shape=()), dtype, "total"
        )
        count = _sum_all(ctx, flags, "valid_count") if flags.rank else flags
        mask_weight = ctx.op(
            "Div", [total, _safe_divisor(ctx, count)], label="mask_weight", shape=()
        )
        zero = _scalar(ctx, 0.0, dtype, "zero")
        weight = ctx.op("Where", [valid, mask_weight, zero], label="weight", shape=valid.shape)
        weighted = ctx.op("Mul", [aligned, weight], label="weighted", shape=aligned.shape)
    else:
        weighted = values
    if weighted.rank == 0:  # Keras returns a scalar unreduced
        one = _scalar(ctx, 1.0, dtype, "one")
        return weighted, (one if weight is None else weight)
    size = emit.cast(
        ctx, ctx.op("Size", [weighted], dtype="int64", label="size", shape=()), dtype, "size"
    )
    divisor = _safe_divisor(ctx, size)
    total_loss = _sum_all(ctx, weighted, "loss_sum")
    loss = ctx.op("Div", [total_loss, divisor], label="mean_loss", shape=())
    if weight is None:
        inverse = ctx.op("Reciprocal", [divisor], label="dloss", shape=())
        dvalues = emit.reshape(ctx, inverse, [1] * values.rank, "dloss")
    else:
        dvalues = ctx.op("Div", [weight, divisor], label="dloss", shape=weight.shape)
        if aligned.shape != values.shape:
            dvalues = emit.reshape_like(ctx, dvalues, values, "dloss")
    return loss, dvalues
