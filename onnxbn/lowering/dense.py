"""Dense: how `activation(inputs @ kernel + bias)` becomes ONNX (semantics: `layers/dense.py`).

A rank-2 input is one Gemm (bias as its `C` input, which onnxruntime adds in
the same pass); a higher rank is MatMul + Add, which broadcasts the kernel over
the leading axes without reshaping the data. The kernel and bias are constants
in the working dtype (float32, float64 for a float64 policy), converted from
the layer's variables once at export; the output is cast to the compute dtype.

The gradient (train step) reuses the saved input and activation values:
`dz = dy * activation'`, `dx = dz @ kernel^T`, `dkernel = x^T dz` over every
leading axis (a Gemm of the rows), `dbias = sum(dz)`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from onnxbn.gradients import Gradients
from onnxbn.layers.dense import Dense
from onnxbn.lowering import emit
from onnxbn.lowering.activation import (
    activation_gradient,
    apply_activation,
    gradient_input,
    layer_input,
    layer_output,
    operand_gradient,
    trainable,
)
from onnxbn.lowering.context import CallRecord, LoweringContext, Value
from onnxbn.lowering.registry import register_gradient, register_lowering


def check_built(op: Any, *weights: str) -> None:
    """A layer whose weights do not exist yet cannot be exported.

    Raises:
        ValueError: naming the layer and the missing weight.
    """
    for name in weights:
        if getattr(op, name, None) is None:
            raise ValueError(
                f"Layer {op.name!r} has no {name!r} weight: it was never built (call it on "
                "an input first)."
            )


def weight64(variable: Any) -> np.ndarray:
    """A weight's value in float64 (folded weights may already be float64)."""
    return np.asarray(variable.value, dtype=np.float64)


@register_lowering(Dense)
def lower_dense(ctx: LoweringContext, op: Dense, x: Value) -> Value:
    """Lowers one call of a Dense layer.

    Args:
        ctx: the lowering context.
        op: the layer.
        x: its input, of rank >= 2 with a static last axis.

    Returns:
        `activation(x @ kernel + bias)` in the compute dtype.

    Raises:
        ValueError: the layer was never built, or the input's last axis does
            not match the kernel.
    """
    check_built(op, "kernel")
    kernel = weight64(op.kernel)
    if x.shape is not None and x.shape[-1] not in (None, kernel.shape[0]):
        raise ValueError(
            f"Layer {op.name!r}: the input's last axis is {x.shape[-1]}, the kernel expects "
            f"{kernel.shape[0]} (kernel shape {kernel.shape})."
        )
    h = ctx.save("input", layer_input(ctx, op, x))
    dtype = h.dtype
    shape = None if x.shape is None else x.shape[:-1] + (op.units,)
    w = ctx.save("kernel", ctx.weight(op.kernel, "kernel", dtype))
    b = None if op.bias is None else ctx.weight(op.bias, "bias", dtype)
    if x.shape is not None and len(x.shape) == 2:
        y = ctx.op(
            "Gemm",
            [h, w] if b is None else [h, w, b],
            label="Gemm",
            shape=shape,
            alpha=1.0,
            beta=1.0,
            transA=0,
            transB=0,
        )
    else:
        y = ctx.op("MatMul", [h, w], label="MatMul", shape=shape)
        if b is not None:
            y = ctx.op("Add", [y, b], label="biased", shape=shape)
    ctx.save("pre_activation", y)
    y = ctx.save("output", apply_activation(ctx, op.activation, y))
    return layer_output(ctx, op, y)


@register_gradient(Dense)
def dense_gradient(ctx: LoweringContext, op: Dense, call: CallRecord, dy: Value) -> Gradients:
    """The gradients of one Dense call with respect to its input, kernel and bias.

    Args:
        ctx: the lowering context.
        op: the layer.
        call: the forward call (saved input, kernel, activation values).
        dy: the output gradient.

    Returns:
        The input gradient in the input's dtype; the kernel and bias gradients
        (working dtype) when they are train-step state.
    """
    saved = call.saved
    h, w = saved["input"], saved["kernel"]
    dz = activation_gradient(
        ctx, op.activation, gradient_input(ctx, op, dy), saved["pre_activation"], saved["output"]
    )
    if h.rank == 2:
        dh = ctx.op("Gemm", [dz, w], label="dx", shape=h.shape, alpha=1.0, beta=1.0,
                    transA=0, transB=1)  # fmt: skip
        rows, drows = h, dz
    else:
        wt = ctx.op("Transpose", [w], label="kernel_t", perm=[1, 0])
        dh = ctx.op("MatMul", [dz, wt], label="dx", shape=h.shape)
        # Every leading axis is a row of the kernel's sum; -1 is the row count (static
        # last axes, so an empty batch gives 0 rows).
        rows = emit.reshape(ctx, h, [None, w.shape[0]], "rows")
        drows = emit.reshape(ctx, dz, [None, w.shape[1]], "d_rows")
    weights = {}
    if trainable(ctx, op.kernel):
        weights[op.kernel.path] = ctx.op(
            "Gemm", [rows, drows], label="d_kernel", shape=w.shape, alpha=1.0, beta=1.0,
            transA=1, transB=0,
        )  # fmt: skip
    if trainable(ctx, op.bias):
        weights[op.bias.path] = emit.reduce(
            ctx, "ReduceSum", drows, [0], keepdims=False, label="d_bias", shape=(op.units,)
        )
    return Gradients((operand_gradient(ctx, dh, call.operands[0]),), weights)
