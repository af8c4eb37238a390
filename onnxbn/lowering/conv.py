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

The gradient (train step) follows the same split. The kernel and bias
gradients of both come from the patches of the channels-last input: `patches^T
@ dz` (per group), `sum(dz)`. The float32 input gradient is one Conv of `dz`
dilated by the strides (zeros between its steps) with the flipped kernel, its
in and out channels swapped; it runs on every runtime, where ConvTranspose is
missing from onnxbn.reference and its output sizes need care on the others.
The float64 input gradient scatters `dz @ kernel^T` back onto the padded input,
one Pad per kernel offset, summed (onnxruntime has no float64 Conv). Strides > 1
need static spatial sizes there: the padding of each offset depends on them.

In a train step the kernel is a graph input in Keras's layout; the re-layouts
done in NumPy for a constant kernel become Transpose/Reshape nodes then.
"""

from __future__ import annotations

import itertools

import numpy as np

from onnxbn.gradients import Gradients
from onnxbn.layers.conv import BaseConv
from onnxbn.layers.conv_arithmetic import conv_padding
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
from onnxbn.lowering.dense import check_built, weight64
from onnxbn.lowering.registry import register_gradient, register_lowering

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
    if h.dtype == "float64":
        if not channels_last:
            h = _transpose(ctx, h, _to_last(rank), "channels_last")
        y = _conv_patches(ctx, op, ctx.save("input_last", h), spatial, kernel)
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
def _bias(ctx: LoweringContext, op: BaseConv, dtype: str) -> Value | None:
    return None if op.bias is None else ctx.weight(op.bias, "bias", dtype)


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
    bias = _bias(ctx, op, x.dtype)
    inputs = [x, w] if bias is None else [x, w, bias]
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
def _static_pads(op: BaseConv, spatial: tuple, kernel_size: tuple, what: str) -> list:
    pads = _pads(op, spatial, kernel_size)
    if pads is None:
        raise ValueError(
            f"Layer {op.name!r}: {what} with padding='same' and strides={op.strides} needs "
            f"static spatial sizes, received {spatial}; fix the input's spatial dims"
            + (" or use a float32 policy." if what.startswith("a float64") else ".")
        )
    return pads


def _patches(ctx, op: BaseConv, x: Value, spatial: tuple, kernel_size: tuple) -> Value:
    """`(N, *out, taps * C)`: the input under each kernel offset, offsets outermost."""
    rank = op.rank
    pads = _static_pads(op, spatial, kernel_size, "a float64 convolution")
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
    return patches[0] if len(patches) == 1 else ctx.op("Concat", patches, label="patches", axis=-1)


def _by_group(ctx, op: BaseConv, cat: Value, taps: int, cin_group: int) -> Value:
    """`(.., taps * C)` patches as `(.., groups, 1, taps * C / groups)` rows."""
    rank, groups = op.rank, op.groups
    keep = [0] * (rank + 1)  # Reshape's 0 copies batch and output spatial dims
    grouped = emit.ints(ctx, keep + [taps, groups, cin_group], "shape")
    cat = ctx.op("Reshape", [cat, grouped], label="grouped", allowzero=0)
    perm = list(range(rank + 1)) + [rank + 2, rank + 1, rank + 3]
    cat = ctx.op("Transpose", [cat], label="by_group", perm=perm)
    rows = emit.ints(ctx, keep + [groups, 1, taps * cin_group], "shape")
    return ctx.op("Reshape", [cat, rows], label="rows", allowzero=0)


def _kernel_matrix(ctx, op: BaseConv, kernel, dtype: str) -> Value:
    """The kernel as the MatMul operand: `(taps * C, F)`, or `(groups, taps * C/g, F/g)`."""
    groups, filters = op.groups, kernel.shape[-1]
    taps, cin_group = int(np.prod(kernel.shape[: op.rank])), kernel.shape[-2]
    if not trainable(ctx, op.kernel):
        if groups == 1:
            return ctx.constant(kernel.reshape(taps * cin_group, filters), "kernel", dtype)
        w = kernel.reshape(taps, cin_group, groups, filters // groups).transpose(2, 0, 1, 3)
        return ctx.constant(w.reshape(groups, taps * cin_group, filters // groups), "kernel", dtype)
    w = ctx.weight(op.kernel, "kernel", dtype)
    if groups == 1:
        return emit.reshape(ctx, w, [taps * cin_group, filters], "kernel_matrix")
    w = emit.reshape(ctx, w, [taps, cin_group, groups, filters // groups], "kernel_grouped")
    w = ctx.op("Transpose", [w], label="kernel_by_group", perm=[2, 0, 1, 3])
    return emit.reshape(ctx, w, [groups, taps * cin_group, filters // groups], "kernel_matrix")


def _conv_patches(ctx, op: BaseConv, x: Value, spatial: tuple, kernel) -> Value:
    """Channels-last convolution as strided slices of the padded input and one MatMul."""
    rank, groups = op.rank, op.groups
    kernel_size = tuple(kernel.shape[:rank])
    cin_group, filters = kernel.shape[rank], kernel.shape[rank + 1]
    cat = _patches(ctx, op, x, spatial, kernel_size)
    taps = int(np.prod(kernel_size))
    if groups == 1:
        w = ctx.save("kernel_matrix", _kernel_matrix(ctx, op, kernel, x.dtype))
        y = ctx.op("MatMul", [ctx.save("patches", cat), w], label="MatMul")
    else:
        rows = ctx.save("patches", _by_group(ctx, op, cat, taps, cin_group))
        w = ctx.save("kernel_matrix", _kernel_matrix(ctx, op, kernel, x.dtype))
        y = ctx.op("MatMul", [rows, w], label="MatMul")
        keep = [0] * (rank + 1)
        y = ctx.op("Reshape", [y, emit.ints(ctx, keep + [filters], "shape")], allowzero=0)
    bias = _bias(ctx, op, x.dtype)
    if bias is not None:
        y = ctx.op("Add", [y, bias], label="biased")
    return y


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
    pads = _static_pads(op, spatial, kernel_size, "the gradient of a convolution")
    dy = gradient_input(ctx, op, dy)
    float64 = dy.dtype == "float64"
    # The activation ran in the layer's format, except channels first in a float32
    # channels-last call with an element-wise activation (see lower_conv).
    activated_first = not float64 and (not channels_last or is_elementwise(op.activation))
    if channels_last and activated_first:
        dy = _transpose(ctx, dy, _to_first(rank), "dy_first")
    dz = activation_gradient(ctx, op.activation, dy, saved["pre_activation"], saved["output"])
    if float64 or (channels_last and not activated_first):
        dz_last = dz if channels_last else _transpose(ctx, dz, _to_last(rank), "dz_last")
        dz_first = None if float64 else _transpose(ctx, dz, _to_first(rank), "dz_first")
    else:
        dz_first = dz
        dz_last = _transpose(ctx, dz, _to_last(rank), "dz_last")
    weights = {}
    if trainable(ctx, op.bias):
        axes = list(range(rank + 1))
        weights[op.bias.path] = emit.reduce(
            ctx, "ReduceSum", dz_last, axes, keepdims=False, label="d_bias", shape=op.bias.shape
        )
    if float64:
        dh_last = _patches_input_gradient(ctx, op, saved, dz_last, spatial, pads)
        dh = dh_last if channels_last else _transpose(ctx, dh_last, _to_first(rank), "dx_first")
    else:
        dh = _conv_input_gradient(ctx, op, saved["kernel_oi"], dz_first, spatial, pads)
        if channels_last:
            dh = _transpose(ctx, dh, _to_last(rank), "dx_last")
    if trainable(ctx, op.kernel):
        if float64:
            patches = saved["patches"]
        else:
            h_last = saved.get("input_last")
            if h_last is None:
                h_last = _transpose(ctx, saved["input_first"], _to_last(rank), "input_last")
            patches = _patches(ctx, op, h_last, spatial, kernel_size)
            if op.groups > 1:
                taps = int(np.prod(kernel_size))
                patches = _by_group(ctx, op, patches, taps, op.kernel.shape[-2])
        weights[op.kernel.path] = _kernel_gradient(ctx, op, patches, dz_last)
    return Gradients((operand_gradient(ctx, dh, x),), weights)


def _kernel_gradient(ctx, op: BaseConv, patches: Value, dz: Value) -> Value:
    """`patches^T @ dz` summed over every output position, per group, in Keras's layout."""
    kernel_shape = tuple(op.kernel.shape)
    groups, filters, cin_group = op.groups, kernel_shape[-1], kernel_shape[-2]
    depth = int(np.prod(kernel_shape[:-1]))  # taps * C / groups
    if groups == 1:
        rows = emit.reshape(ctx, patches, [None, depth], "patch_rows")
        d_rows = emit.reshape(ctx, dz, [None, filters], "dz_rows")
        dw = ctx.op("Gemm", [rows, d_rows], label="d_kernel_matrix", alpha=1.0, beta=1.0,
                    transA=1, transB=0)  # fmt: skip
        return emit.reshape(ctx, dw, list(kernel_shape), "d_kernel")
    per_group = filters // groups
    rows = emit.reshape(ctx, patches, [None, groups, depth], "patch_rows")
    rows = ctx.op("Transpose", [rows], label="patch_cols", perm=[1, 2, 0])
    d_rows = emit.reshape(ctx, dz, [None, groups, per_group], "dz_rows")
    d_rows = ctx.op("Transpose", [d_rows], label="dz_by_group", perm=[1, 0, 2])
    dw = ctx.op("MatMul", [rows, d_rows], label="d_kernel_matrix")
    taps = depth // cin_group
    dw = emit.reshape(ctx, dw, [groups, taps, cin_group, per_group], "d_kernel_grouped")
    dw = ctx.op("Transpose", [dw], label="d_kernel_by_tap", perm=[1, 2, 0, 3])
    return emit.reshape(ctx, dw, list(kernel_shape), "d_kernel")


def _tails(op: BaseConv, spatial: tuple, pads: list, kernel_size: tuple) -> list[int]:
    """Per spatial axis, the padded input's elements past the last window (0 at stride 1)."""
    return [
        0 if s == 1 else (size + before + after - d * (k - 1) - 1) % s
        for size, (before, after), k, s, d in zip(
            spatial, pads, kernel_size, op.strides, op.dilation_rate
        )
    ]


def _dilate(ctx, x: Value, dims: list, axes: list[int], strides) -> Value:
    """`x` (of static `dims` but the batch) with `stride - 1` zeros between its steps on `axes`."""
    dims = list(dims)
    for axis, s in zip(axes, strides):
        if s == 1:
            continue
        # (.., n, ..) -> (.., n, 1, ..) -> Pad -> (.., n, s, ..) -> (.., n*s, ..) -> first n*s-s+1
        n = dims[axis]
        x = ctx.op("Unsqueeze", [x, emit.ints(ctx, [axis + 1], "axes")], label="spread")
        flat = [0] * (2 * (len(dims) + 1))
        flat[len(dims) + 1 + axis + 1] = s - 1
        x = ctx.op("Pad", [x, emit.ints(ctx, flat, "pads")], label="spread", mode="constant")
        target = [0] + dims[1:axis] + [n * s] + dims[axis + 1 :]  # Reshape's 0: the batch
        x = ctx.op("Reshape", [x, emit.ints(ctx, target, "shape")], label="spread", allowzero=0)
        ends = emit.ints(ctx, [n * s - s + 1], "ends")
        x = ctx.op("Slice", [x, emit.ints(ctx, [0], "starts"), ends, emit.ints(ctx, [axis], "axes")],
                   label="dilated")  # fmt: skip
        dims[axis] = n * s - s + 1
    return x


def _out_sizes(op: BaseConv, spatial: tuple, pads: list, kernel_size: tuple) -> list:
    return [
        None if size is None else (size + before + after - d * (k - 1) - 1) // s + 1
        for size, (before, after), k, s, d in zip(
            spatial, pads, kernel_size, op.strides, op.dilation_rate
        )
    ]


def _conv_input_gradient(ctx, op: BaseConv, w: Value, dz: Value, spatial, pads) -> Value:
    """Channels first: a Conv of the dilated `dz` with the flipped, channel-swapped kernel."""
    rank, groups = op.rank, op.groups
    kernel_size = tuple(op.kernel.shape[:rank])
    cin_group, filters = op.kernel.shape[rank], op.kernel.shape[rank + 1]
    # (F, C/g, *k) -> (C, F/g, *k): each group's in and out channels swapped, offsets reversed.
    w = emit.reshape(ctx, w, [groups, filters // groups, cin_group, *kernel_size], "kernel_g")
    w = ctx.op("Transpose", [w], label="kernel_swapped", perm=[0, 2, 1] + list(range(3, rank + 3)))
    w = emit.reshape(ctx, w, [groups * cin_group, filters // groups, *kernel_size], "kernel_io")
    for axis, k in enumerate(kernel_size):
        if k > 1:
            flipped = emit.ints(ctx, range(k - 1, -1, -1), "flipped")
            w = ctx.op("Gather", [w, flipped], label="kernel_flipped", axis=axis + 2)
    dims = [None, filters] + _out_sizes(op, spatial, pads, kernel_size)
    dz = _dilate(ctx, dz, dims, list(range(2, rank + 2)), op.strides)
    front, back = [], []
    for k, d, (before, after), tail in zip(
        kernel_size, op.dilation_rate, pads, _tails(op, spatial, pads, kernel_size)
    ):
        front.append(d * (k - 1) - before)
        back.append(d * (k - 1) + tail - after)
    return ctx.op(
        "Conv",
        [dz, w],
        label="d_input",
        kernel_shape=list(kernel_size),
        strides=[1] * rank,
        dilations=list(op.dilation_rate),
        group=groups,
        auto_pad="NOTSET",
        pads=front + back,
    )


def _patches_input_gradient(ctx, op: BaseConv, saved: dict, dz: Value, spatial, pads) -> Value:
    """Channels last: `dz @ kernel^T` per offset, padded back to its window and summed."""
    rank, groups = op.rank, op.groups
    kernel_size = tuple(op.kernel.shape[:rank])
    cin_group, filters = op.kernel.shape[rank], op.kernel.shape[rank + 1]
    channels, taps = cin_group * groups, int(np.prod(kernel_size))
    w = saved["kernel_matrix"]
    keep = [0] * (rank + 1)  # Reshape's 0 copies batch and output spatial dims
    if groups == 1:
        wt = ctx.op("Transpose", [w], label="kernel_t", perm=[1, 0])
        dp = ctx.op("MatMul", [dz, wt], label="d_patches")
    else:
        dzg = ctx.op("Reshape", [dz, emit.ints(ctx, keep + [groups, 1, filters // groups],
                     "shape")], label="dz_grouped", allowzero=0)  # fmt: skip
        wt = ctx.op("Transpose", [w], label="kernel_t", perm=[0, 2, 1])
        dp = ctx.op("MatMul", [dzg, wt], label="d_rows")
        dp = ctx.op("Reshape", [dp, emit.ints(ctx, keep + [groups, taps, cin_group], "shape")],
                    label="d_grouped", allowzero=0)  # fmt: skip
        perm = list(range(rank + 1)) + [rank + 2, rank + 1, rank + 3]
        dp = ctx.op("Transpose", [dp], label="d_by_tap", perm=perm)
        dp = ctx.op("Reshape", [dp, emit.ints(ctx, keep + [taps * channels], "shape")],
                    label="d_patches", allowzero=0)  # fmt: skip
    outs = _out_sizes(op, spatial, pads, kernel_size)
    dp = _dilate(ctx, dp, [None, *outs, taps * channels], list(range(1, rank + 1)), op.strides)
    tails = _tails(op, spatial, pads, kernel_size)
    pieces = []
    for t, offset in enumerate(itertools.product(*(range(k) for k in kernel_size))):
        piece = ctx.op(
            "Slice",
            [dp, emit.ints(ctx, [t * channels], "starts"),
             emit.ints(ctx, [(t + 1) * channels], "ends"), emit.ints(ctx, [-1], "axes")],
            label="d_patch",
        )  # fmt: skip
        front = [o * d for o, d in zip(offset, op.dilation_rate)]
        back = [
            d * (k - 1) - f + tail
            for k, d, f, tail in zip(kernel_size, op.dilation_rate, front, tails)
        ]
        if any(front) or any(back):
            flat = [0] + front + [0, 0] + back + [0]
            piece = ctx.op("Pad", [piece, emit.ints(ctx, flat, "pads")], label="d_window",
                           mode="constant")  # fmt: skip
        pieces.append(piece)
    total = pieces[0] if len(pieces) == 1 else ctx.op("Sum", pieces, label="d_padded")
    if all(p == (0, 0) for p in pads):
        return total
    starts = [before for before, _ in pads]
    ends = [-after if after else _TO_END for _, after in pads]
    return ctx.op(
        "Slice",
        [total, emit.ints(ctx, starts, "starts"), emit.ints(ctx, ends, "ends"),
         emit.ints(ctx, range(1, rank + 1), "axes")],
        label="d_input",
    )  # fmt: skip
