"""Dense: how `activation(inputs @ kernel + bias)` becomes ONNX (semantics: `layers/dense.py`).

A rank-2 input is one Gemm (bias as its `C` input, which onnxruntime adds in
the same pass); a higher rank is MatMul + Add, which broadcasts the kernel over
the leading axes without reshaping the data. The kernel and bias are constants
in the working dtype (float32, float64 for a float64 policy), converted from
the layer's variables once at export; the output is cast to the compute dtype.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from onnxbn.layers.dense import Dense
from onnxbn.lowering.activation import apply_activation, layer_input, layer_output
from onnxbn.lowering.context import LoweringContext, Value
from onnxbn.lowering.registry import register_lowering


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
    h = layer_input(ctx, op, x)
    dtype = h.dtype
    shape = None if x.shape is None else x.shape[:-1] + (op.units,)
    w = ctx.constant(kernel, "kernel", dtype)
    b = None if op.bias is None else ctx.constant(weight64(op.bias), "bias", dtype)
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
    y = apply_activation(ctx, op.activation, y)
    return layer_output(ctx, op, y)
