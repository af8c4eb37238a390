"""Activation and ReLU, and the precision rule every computing layer lowers with.

Semantics: `layers/activation.py`. The eager layers compute in float64 and
round once to the compute dtype; the lowering computes in the *working* dtype
(float64 for a float64 policy, float32 otherwise, which onnxruntime runs for
every op used here) and casts once to the compute dtype. Before that, a float
input is cast to the compute dtype, exactly as Keras's autocast in
`Layer.__call__` does, so a float32 input of a float16 layer is rounded to
float16 first, as in the eager call.

Every rule emits at least one node, even for an identity: the exporter names a
rule's result after the layer's output, and returning the input value itself
would rename the tensor that produced it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from onnxbn.dtypes import is_float
from onnxbn.gradients import Gradients
from onnxbn.layers import activation as activations
from onnxbn.layers.activation import Activation, ReLU
from onnxbn.lowering import emit
from onnxbn.lowering.context import CallRecord, LoweringContext, Value
from onnxbn.lowering.registry import register_gradient, register_lowering

# ONNX op of each argument-free activation (linear has none).
_ELEMENTWISE = {
    activations.relu: "Relu",
    activations.sigmoid: "Sigmoid",
    activations.tanh: "Tanh",
}


def working_dtype(compute_dtype: str) -> str:
    """The dtype a layer computes in: float64 for float64, float32 otherwise."""
    return "float64" if compute_dtype == "float64" else "float32"


def autocast(ctx: LoweringContext, op: Any, x: Value) -> Value:
    """Keras's autocast: a float input in another dtype becomes the compute dtype."""
    if is_float(x.dtype) and x.dtype != op.compute_dtype:
        return emit.cast(ctx, x, op.compute_dtype, label="autocast")
    return x


def layer_input(ctx: LoweringContext, op: Any, x: Value) -> Value:
    """`x` autocast, then in the layer's working dtype."""
    x = autocast(ctx, op, x)
    return emit.cast(ctx, x, working_dtype(op.compute_dtype), label="input")


def layer_output(ctx: LoweringContext, op: Any, y: Value) -> Value:
    """`y` (a node output) in the layer's compute dtype."""
    return emit.cast(ctx, y, op.compute_dtype, label="output")


def new_value(ctx: LoweringContext, y: Value, x: Value) -> Value:
    """`y`, behind an Identity node when it is the rule's input `x` itself."""
    if y.name != x.name:
        return y
    return ctx.op("Identity", [y], label="Identity", shape=y.shape)


def is_elementwise(fn: Callable[..., Any]) -> bool:
    """True unless the activation mixes elements (softmax reads its whole axis)."""
    return fn is not activations.softmax


def apply_activation(ctx: LoweringContext, fn: Callable[..., Any], x: Value) -> Value:
    """`fn(x)` as ONNX nodes; `linear` returns `x` itself (no node).

    Args:
        ctx: the lowering context.
        fn: one of `onnxbn.layers.activation`'s functions.
        x: a float value.

    Returns:
        The activated value (softmax along the last axis, as Keras's default).

    Raises:
        ValueError: a function with no lowering.
    """
    if fn is activations.linear:
        return x
    if fn is activations.softmax:
        return ctx.op("Softmax", [x], label="softmax", shape=x.shape, axis=-1)
    op_type = _ELEMENTWISE.get(fn)
    if op_type is None:
        raise ValueError(
            f"Activation {getattr(fn, '__name__', fn)!r} has no ONNX lowering; supported: "
            f"{sorted(activations.ACTIVATIONS)}."
        )
    return ctx.op(op_type, [x], label=op_type.lower(), shape=x.shape)


def activation_gradient(
    ctx: LoweringContext, fn: Callable[..., Any], dy: Value, z: Value, y: Value
) -> Value:
    """The gradient with respect to `z` of `y = fn(z)`, given `dy` (all in one dtype).

    Args:
        ctx: the lowering context.
        fn: one of `onnxbn.layers.activation`'s functions, as `apply_activation` took it.
        dy: gradient with respect to `y`.
        z: the activation's input.
        y: its output (what `apply_activation` returned).

    Returns:
        `dy * fn'(z)`; softmax (last axis) `y * (dy - sum(dy * y))`. The derivative
        of relu at 0 is taken as 0.

    Raises:
        ValueError: a function with no lowering.
    """
    if fn is activations.linear:
        return dy
    if fn is activations.relu:
        return relu_gradient(ctx, dy, z)
    if fn is activations.sigmoid:
        one = emit.scalar(ctx, 1.0, y.dtype, "one")
        slope = ctx.op("Mul", [y, ctx.op("Sub", [one, y], label="one_minus")], label="slope")
    elif fn is activations.tanh:
        one = emit.scalar(ctx, 1.0, y.dtype, "one")
        slope = ctx.op("Sub", [one, ctx.op("Mul", [y, y], label="squared")], label="slope")
    elif fn is activations.softmax:
        weighted = ctx.op("Mul", [dy, y], label="weighted", shape=y.shape)
        total = emit.reduce(ctx, "ReduceSum", weighted, [-1], keepdims=True, label="dot")
        centered = ctx.op("Sub", [dy, total], label="centered", shape=y.shape)
        return ctx.op("Mul", [y, centered], label="d_softmax", shape=y.shape)
    else:
        raise ValueError(
            f"Activation {getattr(fn, '__name__', fn)!r} has no gradient lowering; supported: "
            f"{sorted(activations.ACTIVATIONS)}."
        )
    return ctx.op("Mul", [dy, slope], label="d_activation", shape=dy.shape)


def relu_gradient(
    ctx: LoweringContext,
    dy: Value,
    x: Value,
    *,
    negative_slope: float = 0.0,
    max_value: float | None = None,
    threshold: float = 0.0,
) -> Value:
    """The gradient of `relu` (same arguments) with respect to `x`, given `dy`.

    `dy` where the output rises with `x` (`threshold < x`, and `0 < x < max_value`
    under a clip), plus `negative_slope * dy` where `x <= threshold`: the eager
    rule in `onnxbn/layers/activation.py`, kinks included. `dy` is multiplied by
    the 0/1 masks, as TensorFlow's ReluGrad does (a Where is about 5x slower on
    onnxruntime CPU).
    """
    dtype = x.dtype
    limit = emit.scalar(ctx, threshold, dtype, "threshold")
    rising = ctx.op("Greater", [x, limit], label="rising", dtype="bool")
    if max_value is not None:
        zero = emit.scalar(ctx, 0.0, dtype, "zero")
        positive = ctx.op("Greater", [x, zero], label="positive", dtype="bool")
        below_max = ctx.op(
            "Less", [x, emit.scalar(ctx, max_value, dtype, "max")], label="unclipped", dtype="bool"
        )
        inside = ctx.op("And", [positive, below_max], label="inside", dtype="bool")
        rising = ctx.op("And", [rising, inside], label="rising", dtype="bool")
    dx = ctx.op("Mul", [dy, emit.cast(ctx, rising, dtype, label="slope")], label="d_relu",
                shape=dy.shape)  # fmt: skip
    if negative_slope == 0:
        return dx
    damped = ctx.op("LessOrEqual", [x, limit], label="damped", dtype="bool")
    leak = ctx.op("Mul", [emit.cast(ctx, damped, dtype, label="damped"),
                          emit.scalar(ctx, negative_slope, dtype, "slope")], label="leak")  # fmt: skip
    leaked = ctx.op("Mul", [dy, leak], label="leaked", shape=dy.shape)
    return ctx.op("Add", [dx, leaked], label="d_relu", shape=dy.shape)


def gradient_input(ctx: LoweringContext, op: Any, dy: Value) -> Value:
    """The output gradient `dy` in the layer's working dtype."""
    return emit.cast(ctx, dy, working_dtype(op.compute_dtype), label="dy")


def operand_gradient(ctx: LoweringContext, g: Value, x: Value) -> Value | None:
    """`g` as the gradient of operand `x`: in `x`'s dtype; None for a non-float operand."""
    if not is_float(x.dtype):
        return None
    return new_value(ctx, emit.cast(ctx, g, x.dtype, label="dx"), x)


def trainable(ctx: LoweringContext, variable: Any) -> bool:
    """True when `variable` is a train-step state input, so its gradient is wanted."""
    return variable is not None and variable.path in ctx.trainable_paths


def relu(
    ctx: LoweringContext,
    x: Value,
    *,
    negative_slope: float = 0.0,
    max_value: float | None = None,
    threshold: float = 0.0,
) -> Value:
    """Keras's parametrized `relu` (see `layers.activation.relu`) on a float value."""
    dtype = x.dtype
    if threshold == 0:
        if max_value is None and negative_slope == 0:
            return ctx.op("Relu", [x], label="relu", shape=x.shape)
        if max_value is None and dtype != "float64":
            # max(x, 0) - slope * max(-x, 0) is x above 0 and slope * x below; LeakyRelu's
            # alpha is a float32 attribute, so float64 takes the general form below.
            return ctx.op(
                "LeakyRelu", [x], label="leaky_relu", shape=x.shape, alpha=float(negative_slope)
            )
        if max_value is None:
            y = ctx.op("Relu", [x], label="relu", shape=x.shape)
        else:
            y = ctx.op(
                "Clip",
                [
                    x,
                    emit.scalar(ctx, 0.0, dtype, "zero"),
                    emit.scalar(ctx, max_value, dtype, "max"),
                ],
                label="clipped",
                shape=x.shape,
            )
    else:
        # Keras multiplies by the comparison, so NaN or -inf below it give NaN.
        above = ctx.op(
            "Greater", [x, emit.scalar(ctx, threshold, dtype, "threshold")], dtype="bool"
        )
        y = ctx.op("Mul", [x, emit.cast(ctx, above, dtype, "above")], label="kept", shape=x.shape)
        if max_value is not None:
            y = ctx.op(
                "Clip",
                [
                    y,
                    emit.scalar(ctx, 0.0, dtype, "zero"),
                    emit.scalar(ctx, max_value, dtype, "max"),
                ],
                label="clipped",
                shape=x.shape,
            )
    if negative_slope == 0:
        return y
    below = ctx.op(
        "Relu",
        [ctx.op("Sub", [emit.scalar(ctx, threshold, dtype, "threshold"), x], label="below")],
        label="below",
    )
    leak = ctx.op("Mul", [below, emit.scalar(ctx, negative_slope, dtype, "slope")], label="leak")
    return ctx.op("Sub", [y, leak], label="relu", shape=x.shape)


@register_lowering(Activation)
def lower_activation(ctx: LoweringContext, op: Activation, x: Value) -> Value:
    """`activation(x)` in the working dtype, returned in the compute dtype."""
    h = ctx.save("input", layer_input(ctx, op, x))
    y = ctx.save("output", apply_activation(ctx, op.activation, h))
    return new_value(ctx, layer_output(ctx, op, y), x)


@register_gradient(Activation)
def activation_layer_gradient(
    ctx: LoweringContext, op: Activation, call: CallRecord, dy: Value
) -> Gradients:
    """`dy * activation'(x)`, in the input's dtype."""
    saved = call.saved
    g = activation_gradient(
        ctx, op.activation, gradient_input(ctx, op, dy), saved["input"], saved["output"]
    )
    return Gradients((operand_gradient(ctx, g, call.operands[0]),))


@register_lowering(ReLU)
def lower_relu(ctx: LoweringContext, op: ReLU, x: Value) -> Value:
    """Keras's `ReLU` layer: `relu` with the layer's slope, ceiling and threshold."""
    h = ctx.save("input", layer_input(ctx, op, x))
    y = relu(
        ctx,
        h,
        negative_slope=op.negative_slope,
        max_value=op.max_value,
        threshold=op.threshold,
    )
    return layer_output(ctx, op, y)


@register_gradient(ReLU)
def relu_layer_gradient(ctx: LoweringContext, op: ReLU, call: CallRecord, dy: Value) -> Gradients:
    """`dy` times the slope of the layer's `relu` at the input, in the input's dtype."""
    g = relu_gradient(
        ctx,
        gradient_input(ctx, op, dy),
        call.saved["input"],
        negative_slope=op.negative_slope,
        max_value=op.max_value,
        threshold=op.threshold,
    )
    return Gradients((operand_gradient(ctx, g, call.operands[0]),))
