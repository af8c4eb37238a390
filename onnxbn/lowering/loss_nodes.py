"""Node helpers of the loss lowerings: rank alignment, shape checks, clipping, reductions.

What `onnxbn/lowering/losses.py` builds the losses from, each the ONNX form of a
step of `onnxbn/loss.py`: Keras's rank alignment on static ranks, `Clip` with
min/max inputs and the 0/1 factor that lets its gradient through, sums and
means over the last axis (`ReduceSum` then a division by the axis length, so
an empty batch never averages nothing), and `sum_over_batch_size` with the
mask weight `total / valid` and the batch divisor `Where(n == 0, 1, n)`:
Keras's `divide_no_nan`, without a division by zero anywhere.
"""

from __future__ import annotations

from onnxbn.loss import EPSILON
from onnxbn.lowering import emit
from onnxbn.lowering.context import LoweringContext, Value

Shape = tuple[int | None, ...]


# -- shapes -----------------------------------------------------------------------


def squeeze_last(ctx: LoweringContext, x: Value) -> Value:
    """`x` without its last axis (of size 1)."""
    return ctx.op(
        "Squeeze", [x, emit.ints(ctx, [-1], "axes")], label="squeezed", shape=x.shape[:-1]
    )


def expand_last(ctx: LoweringContext, x: Value) -> Value:
    """`x` with a new last axis of size 1."""
    axes = emit.ints(ctx, [-1], "axes")
    return ctx.op("Unsqueeze", [x, axes], label="expanded", shape=(*x.shape, 1))


def align(ctx: LoweringContext, x1: Value, x2: Value) -> tuple[Value, Value]:
    """Keras's `squeeze_or_expand_to_same_rank` on static ranks (a dynamic dim is not 1)."""
    if x1.rank == x2.rank + 1 and x1.shape[-1] == 1:
        if x2.rank == 1:
            x2 = expand_last(ctx, x2)
        else:
            x1 = squeeze_last(ctx, x1)
    if x2.rank == x1.rank + 1 and x2.shape[-1] == 1:
        if x1.rank == 1:
            x1 = expand_last(ctx, x1)
        else:
            x2 = squeeze_last(ctx, x2)
    return x1, x2


def broadcast_shape(a: Shape, b: Shape, what: str) -> Shape:
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


def require_same_shape(name: str, y_true: Value, y_pred: Value) -> None:
    """Raises a `ValueError` naming the loss unless the static shapes can be equal."""
    if y_true.rank != y_pred.rank or any(
        a is not None and b is not None and a != b for a, b in zip(y_true.shape, y_pred.shape)
    ):
        raise ValueError(
            f"{name}: `y_true` and `y_pred` must have the same shape. "
            f"Received: y_true.shape={y_true.shape}, y_pred.shape={y_pred.shape}."
        )


def sum_to_shape(ctx: LoweringContext, grad: Value, shape: Shape) -> Value:
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


def last_dim(ctx: LoweringContext, x: Value, dtype: str) -> Value:
    """`x.shape[-1]` as a rank-0 `dtype` value (a constant when static)."""
    if x.shape[-1] is not None:
        return emit.scalar(ctx, float(x.shape[-1]), dtype, "count")
    size = ctx.op("Shape", [x], dtype="int64", label="count", start=-1)
    size = emit.cast(ctx, size, dtype, "count")
    return ctx.op(
        "Reshape", [size, emit.ints(ctx, [], "scalar")], label="count", shape=(), allowzero=0
    )


def sum_last(ctx: LoweringContext, x: Value, keepdims: bool, label: str) -> Value:
    """`sum(x, -1)`, the axis kept (as 1) with `keepdims`."""
    shape = x.shape[:-1] + ((1,) if keepdims else ())
    return emit.reduce(
        ctx, "ReduceSum", x, [x.rank - 1], keepdims=keepdims, label=label, shape=shape
    )


def mean_last(ctx: LoweringContext, x: Value, label: str) -> tuple[Value, Value]:
    """`mean(x, -1)` as a sum divided by the axis length, and that length."""
    count = last_dim(ctx, x, x.dtype)
    total = sum_last(ctx, x, False, label + "_sum")
    return ctx.op("Div", [total, count], label=label, shape=x.shape[:-1]), count


def per_element(ctx: LoweringContext, dvalues: Value, count: Value | None = None) -> Value:
    """d(loss)/d(values) broadcast back over the reduced last axis (divided by `count`)."""
    g = expand_last(ctx, dvalues)
    return g if count is None else ctx.op("Div", [g, count], label="dmean", shape=g.shape)


def safe_divisor(ctx: LoweringContext, n: Value) -> Value:
    """`n`, or 1 where it is 0 (whatever is divided is then 0: `divide_no_nan`)."""
    zero = emit.scalar(ctx, 0.0, n.dtype, "zero")
    one = emit.scalar(ctx, 1.0, n.dtype, "one")
    is_zero = ctx.op("Equal", [n, zero], dtype="bool", label="is_zero", shape=n.shape)
    return ctx.op("Where", [is_zero, one, n], dtype=n.dtype, label="divisor", shape=n.shape)


def clip(ctx: LoweringContext, p: Value) -> tuple[Value, Value]:
    """`clip(p, eps, 1 - eps)` and the 0/1 factor that lets the gradient through."""
    low = emit.scalar(ctx, EPSILON, p.dtype, "epsilon")
    high = emit.scalar(ctx, 1.0 - EPSILON, p.dtype, "one_minus_epsilon")
    clipped = ctx.op("Clip", [p, low, high], label="clipped", shape=p.shape)
    above = ctx.op("GreaterOrEqual", [p, low], dtype="bool", label="above", shape=p.shape)
    below = ctx.op("LessOrEqual", [p, high], dtype="bool", label="below", shape=p.shape)
    inside = ctx.op("And", [above, below], dtype="bool", label="inside", shape=p.shape)
    return clipped, emit.cast(ctx, inside, p.dtype, "inside")


# -- reduction -----------------------------------------------------------------------------


def sum_all(ctx: LoweringContext, x: Value, label: str) -> Value:
    """The sum of every element of `x` (rank >= 1) as a scalar, 0 when `x` is empty.

    A rank-1 `x` is summed as `(1, n)`: tract panics on a ReduceSum over the
    only axis of an empty vector (a division by zero in its kernel).
    """
    if x.rank == 1:
        x = ctx.op("Unsqueeze", [x, emit.ints(ctx, [0], "axes")], label=label, shape=(1, *x.shape))
    return emit.reduce(
        ctx, "ReduceSum", x, list(range(x.rank)), keepdims=False, label=label, shape=()
    )


def sum_over_batch_size(
    ctx: LoweringContext, name: str, values: Value, mask: Value | None
) -> tuple[Value, Value]:
    """Keras's `sum_over_batch_size` of `values` with an optional mask, and d(loss)/d(values)."""
    dtype = values.dtype
    weight = None
    aligned = values
    if mask is not None:
        valid = mask if mask.dtype == "bool" else emit.cast(ctx, mask, "bool", "mask")
        aligned, valid = align(ctx, values, valid)
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
        count = sum_all(ctx, flags, "valid_count") if flags.rank else flags
        mask_weight = ctx.op(
            "Div", [total, safe_divisor(ctx, count)], label="mask_weight", shape=()
        )
        zero = emit.scalar(ctx, 0.0, dtype, "zero")
        weight = ctx.op("Where", [valid, mask_weight, zero], label="weight", shape=valid.shape)
        weighted = ctx.op("Mul", [aligned, weight], label="weighted", shape=aligned.shape)
    else:
        weighted = values
    if weighted.rank == 0:  # Keras returns a scalar unreduced
        one = emit.scalar(ctx, 1.0, dtype, "one")
        return weighted, (one if weight is None else weight)
    size = emit.cast(
        ctx, ctx.op("Size", [weighted], dtype="int64", label="size", shape=()), dtype, "size"
    )
    divisor = safe_divisor(ctx, size)
    total_loss = sum_all(ctx, weighted, "loss_sum")
    loss = ctx.op("Div", [total_loss, divisor], label="mean_loss", shape=())
    if weight is None:
        inverse = ctx.op("Reciprocal", [divisor], label="dloss", shape=())
        dvalues = emit.reshape(ctx, inverse, [1] * values.rank, "dloss")
    else:
        dvalues = ctx.op("Div", [weight, divisor], label="dloss", shape=weight.shape)
        if aligned.shape != values.shape:
            dvalues = emit.reshape_like(ctx, dvalues, values, "dloss")
    return loss, dvalues
