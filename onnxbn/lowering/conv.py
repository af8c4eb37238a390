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
Transpose-free alternative, the patches + MatMul form of float64 used in
float32 too, runs the same inference export in 8.4 ms (2.9x).

float64 policies are computed in float64, which onnxruntime's Conv does not
implement; they lower to patches + MatMul on the channels-last data (Pad, one
strided Slice per kernel offset, Concat, MatMul with the reshaped kernel; a
grouped convolution batches the MatMul over groups), with no Transpose of the
data for `channels_last` (`lowering/conv_patches.py`).

The gradient (train step) follows the same split. The bias gradient is
`sum(dz)`. The kernel gradient comes from patches of the channels-last input:
float64 reuses the forward's, `patches^T @ dz` per group; float32 stacks them
offset by offset, `dz^T @ patches` (see `stacked_patches_kernel_gradient`).
The float32 input gradient with stride 1 is one Conv of `dz` with the flipped kernel, its in and out channels swapped; with a
stride > 1 it is ConvTranspose with the forward kernel and geometry
(`output_padding` for the rows past the last window), one per group. Measured
on onnxruntime (batch 32, 3x3): ConvTranspose takes twice the Conv's time at
stride 1, and at stride 2 half the time of the Conv on `dz` dilated by the
strides, whose zeros the Conv multiplies (the dilation's Pad alone took 12% of
the ResNet-style train step). The float64 input gradient scatters `dz @ kernel^T` back onto the padded input,
one Pad per kernel offset, summed (onnxruntime has no float64 Conv). With a
stride > 1 the gradient needs static spatial sizes: the zeros spread between
the steps of `dz` are laid out for a known length.

In a train step the kernel is a graph input in Keras's layout; the re-layouts
done in NumPy for a constant kernel become Transpose/Reshape nodes then.
"""

from __future__ import annotations

import numpy as np

from onnxbn.gradients import Gradients
from onnxbn.layers.conv import BaseConv
from onnxbn.lowering import emit
from onnxbn.lowering.activation import (
    activation_gradient,
    apply_activation,
    gradient_input,
    is_elementwise,
    layer_input,
    layer_output,
    operand_gradient,
    trainable,
)
from onnxbn.lowering.context import CallRecord, LoweringContext, Value
from onnxbn.lowering.conv_patches import (
    axis_tails,
    conv_bias,
    conv_pads,
    conv_patches,
    kernel_gradient,
    patches_input_gradient,
    stacked_patches_kernel_gradient,
    static_pads,
)
from onnxbn.lowering.dense import check_built, weight64
from onnxbn.lowering.registry import register_gradient, register_lowering


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
    if h.dtype == "float64":
        if not channels_last:
            h = _transpose(ctx, h, _to_last(rank), "channels_last")
        y = conv_patches(ctx, op, ctx.save("input_last", h), spatial, kernel)
        if not channels_last:
            y = _transpose(ctx, y, _to_first(rank), "channels_first")
        return layer_output(ctx, op, _activate(ctx, op, y))
    ctx.save("input_last" if channels_last else "input_first", h)
    if channels_last:
        h = _transpose(ctx, h, _to_first(rank), "channels_first")
    y = _conv_node(ctx, op, h, spatial, kernel)
    if channels_last and not is_elementwise(op.activation):
        y = _transpose(ctx, y, _to_last(rank), "channels_last")
        y = _activate(ctx, op, y)
    else:
        # Relu/Sigmoid/Tanh right after the Conv: onnxruntime fuses them into it.
        y = _activate(ctx, op, y)
        if channels_last:
            y = _transpose(ctx, y, _to_last(rank), "channels_last")
    return layer_output(ctx, op, y)


def _activate(ctx: LoweringContext, op: BaseConv, z: Value) -> Value:
    ctx.save("pre_activation", z)
    return ctx.save("output", apply_activation(ctx, op.activation, z))


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


# -- float32: one Conv node --------------------------------------------------------------
def _conv_node(ctx, op: BaseConv, x: Value, spatial: tuple, kernel) -> Value:
    rank = op.rank
    kernel_size = tuple(kernel.shape[:rank])
    # Keras (*k, in/groups, filters) -> ONNX (filters, in/groups, *k).
    perm = [rank + 1, rank] + list(range(rank))
    if trainable(ctx, op.kernel):
        w = ctx.weight(op.kernel, "kernel", x.dtype)
        w = ctx.op("Transpose", [w], label="kernel_oi", perm=perm)
    else:
        w = ctx.constant(np.transpose(kernel, perm), "kernel", x.dtype)
    ctx.save("kernel_oi", w)
    bias = conv_bias(ctx, op, x.dtype)
    inputs = [x, w] if bias is None else [x, w, bias]
    pads = conv_pads(op, spatial, kernel_size)
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


# -- gradient -------------------------------------------------------------------------------
@register_gradient(BaseConv)
def conv_gradient(ctx: LoweringContext, op: BaseConv, call: CallRecord, dy: Value) -> Gradients:
    """The gradients of one Conv1D/Conv2D call with respect to its input, kernel and bias.

    Args:
        ctx: the lowering context.
        op: the layer.
        call: the forward call (saved input, kernel and activation values).
        dy: the output gradient, in the layer's data format.

    Returns:
        The input gradient in the input's dtype and data format; the kernel
        (Keras's layout) and bias gradients in the working dtype when they are
        train-step state.

    Raises:
        ValueError: a stride > 1 on a spatial axis whose size is only known at run time.
    """
    rank, saved = op.rank, call.saved
    x = call.operands[0]
    channels_last = op.data_format == "channels_last"
    spatial = x.shape[1:-1] if channels_last else x.shape[2:]
    kernel_size = tuple(op.kernel.shape[:rank])
    if any(s > 1 for s in op.strides) and None in spatial:
        # The zeros spread between the steps of dz are laid out for a known length.
        raise ValueError(
            f"Layer {op.name!r}: the gradient of a convolution with strides={op.strides} "
            f"needs static spatial sizes, received {spatial}."
        )
    pads = static_pads(op, spatial, kernel_size, "the gradient of a convolution")
    dy = gradient_input(ctx, op, dy)
    float64 = dy.dtype == "float64"
    # The activation ran in the layer's format, except channels first in a float32
    # channels-last call with an element-wise activation (see lower_conv).
    activated_first = not float64 and (not channels_last or is_elementwise(op.activation))
    if channels_last and activated_first:
        dy = _transpose(ctx, dy, _to_first(rank), "dy_first")
    dz = activation_gradient(ctx, op.activation, dy, saved["pre_activation"], saved["output"])
    # float64 works channels last (patches), float32 channels first (Conv).
    if float64:
        dz_last = dz if channels_last else _transpose(ctx, dz, _to_last(rank), "dz_last")
    else:
        dz_first = dz if activated_first else _transpose(ctx, dz, _to_first(rank), "dz_first")
    weights = {}
    if trainable(ctx, op.bias):
        axes = list(range(rank + 1)) if float64 else [0, *range(2, rank + 2)]
        source = dz_last if float64 else dz_first
        weights[op.bias.path] = emit.reduce(
            ctx, "ReduceSum", source, axes, keepdims=False, label="d_bias", shape=op.bias.shape
        )
    if float64:
        dh_last = patches_input_gradient(ctx, op, saved, dz_last, spatial, pads)
        dh = dh_last if channels_last else _transpose(ctx, dh_last, _to_first(rank), "dx_first")
    else:
        dh = _conv_input_gradient(ctx, op, saved["kernel_oi"], dz_first, spatial, pads)
        if channels_last:
            dh = _transpose(ctx, dh, _to_last(rank), "dx_last")
    if trainable(ctx, op.kernel):
        if float64:
            dw = kernel_gradient(ctx, op, saved["patches"], dz_last)
        else:
            first = "input_first" in saved
            h = saved["input_first" if first else "input_last"]
            dw = stacked_patches_kernel_gradient(ctx, op, h, first, dz_first, spatial)
        weights[op.kernel.path] = dw
    return Gradients((operand_gradient(ctx, dh, x),), weights)


def _conv_input_gradient(ctx, op: BaseConv, w: Value, dz: Value, spatial, pads) -> Value:
    """Channels first: the adjoint of the forward Conv, from `dz` and its `(F, C/g, *k)` kernel."""
    rank, groups = op.rank, op.groups
    kernel_size = tuple(op.kernel.shape[:rank])
    geometry = {"kernel_shape": list(kernel_size), "dilations": list(op.dilation_rate),
                "group": groups, "auto_pad": "NOTSET"}  # fmt: skip
    tails = axis_tails(op, spatial, pads, kernel_size)
    if any(s > 1 for s in op.strides):
        # ConvTranspose skips the zeros a strided gradient would spread between the steps
        # of dz; `output_padding` restores the input rows past the last window. One per
        # group: onnx.reference's grouped ConvTranspose drops all but one channel per group.
        geometry.update(group=1, strides=list(op.strides), output_padding=tails,
                        pads=[p[0] for p in pads] + [p[1] for p in pads])  # fmt: skip
        if groups == 1:
            return ctx.op("ConvTranspose", [dz, w], label="d_input", **geometry)
        sizes = emit.ints(ctx, [op.kernel.shape[rank + 1] // groups] * groups, "split")
        dzs = ctx.op("Split", [dz, sizes], label="dz_group", outputs=groups, axis=1)
        ws = ctx.op("Split", [w, sizes], label="kernel_group", outputs=groups, axis=0)
        parts = [
            ctx.op("ConvTranspose", [d, k], label="d_input_group", **geometry)
            for d, k in zip(dzs, ws)
        ]
        return ctx.op("Concat", parts, label="d_input", axis=1)
    # Stride 1: a Conv of dz with the flipped kernel, its in and out channels swapped (twice
    # as fast as ConvTranspose on onnxruntime).
    cin_group, filters = op.kernel.shape[rank], op.kernel.shape[rank + 1]
    # (F, C/g, *k) -> (C, F/g, *k): each group's in and out channels swapped, offsets reversed.
    w = emit.reshape(ctx, w, [groups, filters // groups, cin_group, *kernel_size], "kernel_g")
    w = ctx.op("Transpose", [w], label="kernel_swapped", perm=[0, 2, 1] + list(range(3, rank + 3)))
    w = emit.reshape(ctx, w, [groups * cin_group, filters // groups, *kernel_size], "kernel_io")
    for axis, k in enumerate(kernel_size):
        if k > 1:
            flipped = emit.ints(ctx, range(k - 1, -1, -1), "flipped")
            w = ctx.op("Gather", [w, flipped], label="kernel_flipped", axis=axis + 2)
    front = [d * (k - 1) - before for k, d, (before, _) in zip(kernel_size, op.dilation_rate, pads)]
    back = [d * (k - 1) - after for k, d, (_, after) in zip(kernel_size, op.dilation_rate, pads)]
    return ctx.op("Conv", [dz, w], label="d_input", strides=[1] * rank, pads=front + back,
                  **geometry)  # fmt: skip
