"""Small node patterns every rule needs: casts, constants, shapes, reductions.

Each helper folds to a constant when the static shape allows it, so a graph
exported with fixed shapes carries no shape arithmetic at run time.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from onnx import helper

from onnxbn.dtypes import to_numpy_dtype
from onnxbn.lowering.context import LoweringContext, Value, onnx_dtype

# Since these opsets the reduction takes `axes` as an input instead of an attribute.
_AXES_INPUT_SINCE = {"ReduceSum": 13}
_AXES_INPUT_DEFAULT = 18


def cast(ctx: LoweringContext, value: Value, dtype: str, label: str | None = None) -> Value:
    """`value` as `dtype` (no node when it already is)."""
    if value.dtype == dtype:
        return value
    return ctx.op(
        "Cast",
        [value],
        to=onnx_dtype(dtype),
        dtype=dtype,
        shape=value.shape,
        label=label or f"as_{dtype}",
    )


def ints(ctx: LoweringContext, values: Sequence[int], label: str) -> Value:
    """A 1-D int64 initializer."""
    return ctx.constant(np.asarray(list(values), dtype=np.int64), label)


def scalar(ctx: LoweringContext, value: float, dtype: str, label: str) -> Value:
    """A rank-0 initializer of `dtype`."""
    return ctx.constant(np.asarray(value, dtype=to_numpy_dtype(dtype)), label)


def reduce(
    ctx: LoweringContext,
    op_type: str,
    x: Value,
    axes: Sequence[int],
    *,
    keepdims: bool,
    label: str | None = None,
    shape: tuple[int | None, ...] | None = None,
) -> Value:
    """A Reduce* node over `axes`, with `axes` as input or attribute by opset."""
    since = _AXES_INPUT_SINCE.get(op_type, _AXES_INPUT_DEFAULT)
    attrs = {"keepdims": int(keepdims)}
    if ctx.opset >= since:
        return ctx.op(
            op_type,
            [x, ints(ctx, axes, "axes")],
            label=label,
            shape=shape,
            noop_with_empty_axes=0,
            **attrs,
        )
    return ctx.op(op_type, [x], label=label, shape=shape, axes=list(axes), **attrs)


def shape_of(ctx: LoweringContext, x: Value, start: int = 0, end: int | None = None) -> Value:
    """`shape(x)[start:end]` as a 1-D int64 tensor (a constant when static)."""
    if x.shape is not None:
        dims = x.shape[start : x.rank if end is None else end]
        if all(d is not None for d in dims):
            return ints(ctx, dims, "shape")
    attrs = {"start": start}
    if end is not None:
        attrs["end"] = end
    return ctx.op("Shape", [x], dtype="int64", label="shape", **attrs)


def static_product(dims: Sequence[int | None]) -> int | None:
    """Product of `dims`, or None if one is unknown."""
    if any(d is None for d in dims):
        return None
    return math.prod(dims)


def reshape(ctx: LoweringContext, x: Value, dims: Sequence[int | None], label: str) -> Value:
    """`x` reshaped to `dims` (at most one None, which becomes -1)."""
    if tuple(dims) == x.shape and all(d is not None for d in dims):
        return x
    if sum(d is None for d in dims) > 1:
        raise ValueError(f"reshape of {x.name!r} to {tuple(dims)}: more than one unknown dim.")
    target = [-1 if d is None else d for d in dims]
    return ctx.op(
        "Reshape", [x, ints(ctx, target, "shape")], label=label, shape=tuple(dims), allowzero=0
    )


def reshape_like(ctx: LoweringContext, y: Value, like: Value, label: str) -> Value:
    """`y` reshaped to the (run-time) shape of `like`."""
    if y.shape == like.shape and all(d is not None for d in like.shape):
        return y
    return ctx.op("Reshape", [y, shape_of(ctx, like)], label=label, shape=like.shape, allowzero=0)


def count(ctx: LoweringContext, x: Value, axes: Sequence[int], dtype: str) -> Value:
    """Number of elements over `axes` of `x`, as a `[1]`-shaped `dtype` tensor.

    The dims not in `axes` must be static and non-zero (a channel axis).
    """
    static = static_product([x.shape[a] for a in axes])
    if static is not None:
        return ctx.constant(np.asarray([static], dtype=to_numpy_dtype(dtype)), "count")
    kept = static_product([d for a, d in enumerate(x.shape) if a not in axes])
    if not kept:
        raise ValueError(f"count over {tuple(axes)} of {x.name!r}: the other dims must be static.")
    size = cast(ctx, ctx.op("Size", [x], dtype="int64", shape=(), label="size"), dtype)
    # An exact integer quotient of exact integers: Div rounds to it exactly.
    kept_value = ctx.constant(np.asarray([kept], dtype=to_numpy_dtype(dtype)), "channels")
    return ctx.op("Div", [size, kept_value], label="count", shape=(1,))


def constant_of_shape(ctx: LoweringContext, shape: Value, value: float, dtype: str) -> Value:
    """A tensor of `shape` filled with `value` (folded by runtimes when `shape` is constant)."""
    fill = helper.make_tensor("value", onnx_dtype(dtype), [1], [value])
    return ctx.op("ConstantOfShape", [shape], dtype=dtype, label="filled", value=fill)


def concat_ints(ctx: LoweringContext, parts: Sequence[Value], label: str) -> Value:
    """1-D int64 parts joined (a single part is returned as is)."""
    if len(parts) == 1:
        return parts[0]
    return ctx.op("Concat", list(parts), dtype="int64", label=label, axis=0)


def clamp_negative(ctx: LoweringContext, value: Value, label: str) -> Value:
    """`value` with negatives replaced by 0 and NaN kept.

    `Where(value < 0, 0, value)`, not `Max(value, 0)`: runtimes disagree on Max
    with a NaN operand (OpenVINO returns the other one).
    """
    zero = scalar(ctx, 0.0, value.dtype, "zero")
    negative = ctx.op("Less", [value, zero], dtype="bool", label="negative")
    return ctx.op("Where", [negative, zero, value], dtype=value.dtype, label=label)
