"""Conv1D / Conv2D: how a Keras convolution becomes ONNX (semantics: `layers/conv.py`).

float32 and half policies (computed in float32) lower to one ONNX Conv with
every attribute explicit: `kernel_shape`, `strides`, `dilations`, `group`, and
`pads` as TensorFlow pads them (`same` puts the odd element after, `causal`
pads the start only). `same` with a stride > 1 on a spatial axis whose size is
only known at run time uses `auto_pad="SAME_UPPER"`, which is the same rule.
The kernel is stored as ONNX's `(filters, in_channels // groups, *kernel_size)`.

ONNX's Conv reads channels first. A `channels_last` call therefore emits
`Transpose -> Conv -> Transpose` around the convolution; onnxruntime's layout
optimizer pushes these transposes through element-wise ops (Relu, Add, the
BatchNormalization Mul/Add) and cancels each inverse pair, so a chain of
channels-last convolutions runs channels first and transposes only at its
ends. Measured by `scripts/bench_models.py` (ResNet-style model, batch 32, one
thread): the folded inference export keeps one Transpose (at the input) after
optimization and runs as fast as the same network built channels_first (2.86
vs 2.89 ms); the training export keeps 21, because the BatchNormalization
training lowering reduces over the channels-last layout between the
convolutions, and costs 6.6 ms against 5.3 ms channels_first. The
Transpose-free alternative, the patches + MatMul form below used in float32
too, runs the same inference export in 8.4 ms (2.9x).

float64 policies are computed in float64, which onnxruntime's Conv does not
implement; they lower to patches + MatMul on the channels-last data (Pad, one
strided Slice per kernel offset, Concat, MatMul with the reshaped kernel; a
grouped convolution batches the MatMul over groups), with no Transpose of the
data for `channels_last`.
"""

from __future__ import annotations

import itertools

import numpy as np

from onnxbn.layers.conv import BaseConv
from onnxbn.layers.conv_arithmetic import conv_padding
from onnxbn.lowering import emit
from onnxbn.lowering.activation import (
    apply_activation,
    is_elementwise,
    layer_input,
    layer_output,
)
from onnxbn.lowering.context import LoweringContext, Value
from onnxbn.lowering.dense import check_built, weight64
from onnxbn.lowering.registry import register_lowering

# Slice end meaning "to the end of the axis".
_TO_END = np.iinfo(np.int64).max


@register_lowering(BaseConv)
def lower_conv(ctx: LoweringContext, op: BaseConv, x: Value) -> Value:
    """Lowers one call of a Conv1D or Conv2D layer.

    Args:
        ctx: the lowering context.
        op: the layer.
        x: its input, `(batch, *spatial, channels)` or channels first.

    Returns:
        `activation(conv(x, kernel) + bias)` in the compute dtype and the
        layer's data format.

    Raises:
        ValueError: the layer was never built, an input of the wrong rank or
            channel count, or a float64 `same` convolution with a stride > 1
            on a dynamic spatial axis (its padding would depend on the size).
    """
    check_built(op, "kernel")
    rank = op.rank
    kernel = weight64(op.kernel)
    channels_last = op.data_format == "channels_last"
    if x.shape is None or len(x.shape) != rank + 2:
        raise ValueError(
            f"Layer {op.name!r} ({type(op).__name__}) expects an input of rank {rank + 2}, "
            f"received shape {x.shape}."
        )
    channels = x.shape[-1] if channels_last else x.shape[1]
    if channels != kernel.shape[-2] * op.groups:
        raise ValueError(
            f"Layer {op.name!r}: the input has {channels} channels, the kernel of shape "
            f"{kernel.shape} with groups={op.groups} expects {kernel.shape[-2] * op.groups}."
        )
    spatial = x.shape[1:-1] if channels_last else x.shape[2:]
    h = layer_input(ctx, op, x)
    bias = None if op.bias is None else weight64(op.bias)
    if h.dtype == "float64":
        if not channels_last:
            h = _transpose(ctx, h, _to_last(rank), "channels_last")
        y = _conv_patches(ctx, op, h, spatial, kernel, bias)
        if not channels_last:
            y = _transpose(ctx, y, _to_first(rank), "channels_first")
        return layer_output(ctx, op, apply_activation(ctx, op.activation, y))
    if channels_last:
        h = _transpose(ctx, h, _to_first(rank), "channels_first")
    y = _conv_node(ctx, op, h, spatial, kernel, bias)
    if channels_last and not is_elementwise(op.activation):
        y = _transpose(ctx, y, _to_last(rank), "channels_last")
        y = apply_activation(ctx, op.activation, y)
    else:
        # Relu/Sigmoid/Tanh right after the Conv: onnxruntime fuses them into it.
        y = apply_activation(ctx, op.activation, y)
        if channels_last:
            y = _transpose(ctx, y, _to_last(rank), "channels_last")
    return layer_output(ctx, op, y)


# -- layout ---------------------------------------------------------------------------
def _to_first(rank: int) -> list[int]:
    """Permutation `(N, *S, C) -> (N, C, *S)`."""
    return [0, rank + 1] + list(range(1, rank + 1))


def _to_last(rank: int) -> list[int]:
    """Permutation `(N, C, *S) -> (N, *S, C)`."""
    return [0] + list(range(2, rank + 2)) + [1]


def _transpose(ctx: LoweringContext, x: Value, perm: list[int], label: str) -> Value:
    shape = None if x.shape is None else tuple(x.shape[p] for p in perm)
    return ctx.op("Transpose", [x], label=label, shape=shape, perm=perm)


def _pads(op: BaseConv, spatial: tuple, kernel_size: tuple) -> list[tuple[int, int]] | None:
    """`(before, after)` per spatial axis, or None when they depend on a dynamic size."""
    pads = []
    for size, k, s, d in zip(spatial, kernel_size, op.strides, op.dilation_rate):
        if op.padding == "same" and s > 1 and size is None:
            return None
        # With stride 1, "same" pads span - 1 whatever the size (0 stands in for it).
        pads.append(conv_padding(size or 0, k, s, d, op.padding))
    return pads


# -- float32: one Conv node --------------------------------------------------------------
def _conv_node(ctx, op: BaseConv, x: Value, spatial: tuple, kernel, bias) -> Value:
    rank = op.rank
    kernel_size = tuple(kernel.shape[:rank])
    # Keras (*k, in/groups, filters) -> ONNX (filters, in/groups, *k).
    w = ctx.constant(np.transpose(kernel, [rank + 1, rank] + list(range(rank))), "kernel", x.dtype)
    inputs = [x, w] if bias is None else [x, w, ctx.constant(bias, "bias", x.dtype)]
    pads = _pads(op, spatial, kernel_size)
    if pads is None:
        padding = {"auto_pad": "SAME_UPPER"}
    else:
        padding = {"auto_pad": "NOTSET", "pads": [p[0] for p in pads] + [p[1] for p in pads]}
    return ctx.op(
        "Conv",
        inputs,
        label="Conv",
        kernel_shape=list(kernel_size),
        strides=list(op.strides),
        dilations=list(op.dilation_rate),
        group=op.groups,
        **padding,
    )


# -- float64: patches + MatMul, channels last -----------------------------------------------
def _conv_patches(ctx, op: BaseConv, x: Value, spatial: tuple, kernel, bias) -> Value:
    """Channels-last convolution as strided slices of the padded input and one MatMul."""
    rank, groups = op.rank, op.groups
    kernel_size = tuple(kernel.shape[:rank])
    cin_group, filters = kernel.shape[rank], kernel.shape[rank + 1]
    pads = _pads(op, spatial, kernel_size)
    if pads is None:
        raise ValueError(
            f"Layer {op.name!r}: a float64 convolution with padding='same' and "
            f"strides={op.strides} needs static spatial sizes, received {spatial}; fix the "
            "input's spatial dims or use a float32 policy."
        )
    if any(p != (0, 0) for p in pads):
        flat = [0] + [p[0] for p in pads] + [0, 0] + [p[1] for p in pads] + [0]
        x = ctx.op("Pad", [x, emit.ints(ctx, flat, "pads")], label="padded", mode="constant")
    axes = emit.ints(ctx, range(1, rank + 1), "axes")
    steps = emit.ints(ctx, op.strides, "steps")
    patches = []
    for offset in itertools.product(*(range(k) for k in kernel_size)):
        starts = [o * d for o, d in zip(offset, op.dilation_rate)]
        # A negative end trims what the last window needs past this offset, so every
        # offset yields the same number of steps, whatever the input size.
        ends = [
            -(d * (k - 1) - start) if d * (k - 1) > start else _TO_END
            for k, d, start in zip(kernel_size, op.dilation_rate, starts)
        ]
        patches.append(
            ctx.op(
                "Slice",
                [x, emit.ints(ctx, starts, "starts"), emit.ints(ctx, ends, "ends"), axes, steps],
                label="patch",
            )
        )
    taps = len(patches)
    cat = patches[0] if taps == 1 else ctx.op("Concat", patches, label="patches", axis=-1)
    keep = [0] * (rank + 1)  # Reshape's 0 copies batch and output spatial dims
    if groups == 1:
        w = ctx.constant(kernel.reshape(taps * cin_group, filters), "kernel", x.dtype)
        y = ctx.op("MatMul", [cat, w], label="MatMul")
    else:
        # (.., taps, groups, cin/g) -> (.., groups, 1, taps * cin/g) @ (groups, taps * cin/g, f/g)
        grouped = emit.ints(ctx, keep + [taps, groups, cin_group], "shape")
        cat = ctx.op("Reshape", [cat, grouped], label="grouped", allowzero=0)
        perm = list(range(rank + 1)) + [rank + 2, rank + 1, rank + 3]
        cat = ctx.op("Transpose", [cat], label="by_group", perm=perm)
        rows = emit.ints(ctx, keep + [groups, 1, taps * cin_group], "shape")
        cat = ctx.op("Reshape", [cat, rows], label="rows", allowzero=0)
        w = kernel.reshape(taps, cin_group, groups, filters // groups).transpose(2, 0, 1, 3)
        w = ctx.constant(w.reshape(groups, taps * cin_group, filters // groups), "kernel", x.dtype)
        y = ctx.op("MatMul", [cat, w], label="MatMul")
        y = ctx.op("Reshape", [y, emit.ints(ctx, keep + [filters], "shape")], allowzero=0)
    if bias is not None:
        y = ctx.op("Add", [y, ctx.constant(bias, "bias", x.dtype)], label="biased")
    return y
