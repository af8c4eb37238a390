"""Convolution as patches: strided slices of the padded channels-last input and MatMuls.

The float64 lowering of Conv1D / Conv2D (onnxruntime has no float64 Conv; see
`lowering/conv.py`), its gradient, and the kernel gradient of every policy.
The input gradient here scatters `dz @ kernel^T` back onto the padded input,
one Pad per kernel offset, summed.
"""

from __future__ import annotations

import itertools

import numpy as np

from onnxbn.layers.conv import BaseConv
from onnxbn.layers.conv_arithmetic import conv_padding
from onnxbn.lowering import emit
from onnxbn.lowering.activation import trainable
from onnxbn.lowering.context import LoweringContext, Value

# Slice end meaning "to the end of the axis".
TO_END = np.iinfo(np.int64).max


def conv_bias(ctx: LoweringContext, op: BaseConv, dtype: str) -> Value | None:
    """The bias read with `ctx.weight`, or None."""
    return None if op.bias is None else ctx.weight(op.bias, "bias", dtype)


def conv_pads(op: BaseConv, spatial: tuple, kernel_size: tuple) -> list[tuple[int, int]] | None:
    """`(before, after)` per spatial axis, or None when they depend on a dynamic size."""
    pads = []
    for size, k, s, d in zip(spatial, kernel_size, op.strides, op.dilation_rate):
        if op.padding == "same" and s > 1 and size is None:
            return None
        # With stride 1, "same" pads span - 1 whatever the size (0 stands in for it).
        pads.append(conv_padding(size or 0, k, s, d, op.padding))
    return pads


def static_pads(op: BaseConv, spatial: tuple, kernel_size: tuple, what: str) -> list:
    pads = conv_pads(op, spatial, kernel_size)
    if pads is None:
        raise ValueError(
            f"Layer {op.name!r}: {what} with padding='same' and strides={op.strides} needs "
            f"static spatial sizes, received {spatial}; fix the input's spatial dims"
            + (" or use a float32 policy." if what.startswith("a float64") else ".")
        )
    return pads


def extract_patches(ctx, op: BaseConv, x: Value, spatial: tuple, kernel_size: tuple) -> Value:
    """`(N, *out, taps * C)`: the input under each kernel offset, offsets outermost."""
    pads = static_pads(op, spatial, kernel_size, "a float64 convolution")
    patches = _offset_slices(ctx, op, x, pads, kernel_size, first_axis=1)
    return patches[0] if len(patches) == 1 else ctx.op("Concat", patches, label="patches", axis=-1)


def _offset_slices(ctx, op: BaseConv, x: Value, pads: list, kernel_size, first_axis: int) -> list:
    """The padded `x` under each kernel offset (spatial axes from `first_axis`), one Slice each."""
    rank = op.rank
    if any(p != (0, 0) for p in pads):
        outer, inner = [0] * first_axis, [0] * (2 - first_axis)
        flat = outer + [p[0] for p in pads] + inner + outer + [p[1] for p in pads] + inner
        x = ctx.op("Pad", [x, emit.ints(ctx, flat, "pads")], label="padded", mode="constant")
    axes = emit.ints(ctx, range(first_axis, first_axis + rank), "axes")
    steps = emit.ints(ctx, op.strides, "steps")
    patches = []
    for offset in itertools.product(*(range(k) for k in kernel_size)):
        starts = [o * d for o, d in zip(offset, op.dilation_rate)]
        # A negative end trims what the last window needs past this offset, so every
        # offset yields the same number of steps, whatever the input size.
        ends = [
            -(d * (k - 1) - start) if d * (k - 1) > start else TO_END
            for k, d, start in zip(kernel_size, op.dilation_rate, starts)
        ]
        patches.append(
            ctx.op(
                "Slice",
                [x, emit.ints(ctx, starts, "starts"), emit.ints(ctx, ends, "ends"), axes, steps],
                label="patch",
            )
        )
    return patches


def stacked_patches_kernel_gradient(
    ctx, op: BaseConv, x: Value, channels_first: bool, dz: Value, spatial: tuple
) -> Value:
    """The kernel gradient from `x` (either layout) and the channels-first `dz`, Keras's layout.

    The patches of the channels-last `x` are stacked offset by offset on a new
    first axis, `(taps, N * out, C)`: whole blocks per offset, where
    concatenating them on the channel axis interleaves a few channels per
    position (measured: that Concat took 8% of the ResNet-style train step).
    One MatMul of the `(F, N * out)` `dz` broadcast over the offsets gives every
    (offset, filter, channel); a grouped convolution keeps each group's block.
    """
    rank, groups = op.rank, op.groups
    kernel_shape = tuple(op.kernel.shape)
    kernel_size, cin_group, filters = kernel_shape[:rank], kernel_shape[-2], kernel_shape[-1]
    taps, channels = int(np.prod(kernel_size)), cin_group * groups
    pads = static_pads(op, spatial, kernel_size, "the gradient of a convolution")
    if channels_first:
        perm = [0] + list(range(2, rank + 2)) + [1]
        x = ctx.op("Transpose", [x], label="input_last", perm=perm)
    patches = _offset_slices(ctx, op, x, pads, kernel_size, first_axis=1)
    if len(patches) > 1:
        patches = [ctx.op("Concat", patches, label="patches", axis=0)]
    rows = emit.reshape(ctx, patches[0], [taps, None, channels], "patch_rows")
    dz = ctx.op("Transpose", [dz], label="dz_fn", perm=[1, 0] + list(range(2, rank + 2)))
    d_cols = emit.reshape(ctx, dz, [filters, None], "dz_cols")
    dw = ctx.op("MatMul", [d_cols, rows], label="d_kernel_matrix")  # (taps, F, C)
    if groups > 1:
        per_group = filters // groups
        dw = emit.reshape(ctx, dw, [taps, groups, per_group, groups, cin_group], "d_kernel_pairs")
        same = np.eye(groups, dtype=bool).reshape(1, groups, 1, groups, 1)
        # Where, not a Mul by the mask: the other groups' sums may be inf.
        zero = emit.scalar(ctx, 0.0, dw.dtype, "zero")
        dw = ctx.op("Where", [ctx.constant(same, "same_group"), dw, zero], label="d_kernel_blocks",
                    dtype=dw.dtype)  # fmt: skip
        dw = emit.reduce(ctx, "ReduceSum", dw, [3], keepdims=False, label="d_kernel_grouped")
        dw = ctx.op("Transpose", [dw], label="d_kernel_by_tap", perm=[0, 3, 1, 2])
    else:
        dw = ctx.op("Transpose", [dw], label="d_kernel_by_tap", perm=[0, 2, 1])
    return emit.reshape(ctx, dw, list(kernel_shape), "d_kernel")


def by_group(ctx, op: BaseConv, cat: Value, taps: int, cin_group: int) -> Value:
    """`(.., taps * C)` patches as `(.., groups, 1, taps * C / groups)` rows."""
    rank, groups = op.rank, op.groups
    keep = [0] * (rank + 1)  # Reshape's 0 copies batch and output spatial dims
    grouped = emit.ints(ctx, keep + [taps, groups, cin_group], "shape")
    cat = ctx.op("Reshape", [cat, grouped], label="grouped", allowzero=0)
    perm = list(range(rank + 1)) + [rank + 2, rank + 1, rank + 3]
    cat = ctx.op("Transpose", [cat], label="by_group", perm=perm)
    rows = emit.ints(ctx, keep + [groups, 1, taps * cin_group], "shape")
    return ctx.op("Reshape", [cat, rows], label="rows", allowzero=0)


def kernel_matrix(ctx, op: BaseConv, kernel, dtype: str) -> Value:
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


def conv_patches(ctx, op: BaseConv, x: Value, spatial: tuple, kernel) -> Value:
    """Channels-last convolution as strided slices of the padded input and one MatMul."""
    rank, groups = op.rank, op.groups
    kernel_size = tuple(kernel.shape[:rank])
    cin_group, filters = kernel.shape[rank], kernel.shape[rank + 1]
    cat = extract_patches(ctx, op, x, spatial, kernel_size)
    taps = int(np.prod(kernel_size))
    if groups == 1:
        w = ctx.save("kernel_matrix", kernel_matrix(ctx, op, kernel, x.dtype))
        y = ctx.op("MatMul", [ctx.save("patches", cat), w], label="MatMul")
    else:
        rows = ctx.save("patches", by_group(ctx, op, cat, taps, cin_group))
        w = ctx.save("kernel_matrix", kernel_matrix(ctx, op, kernel, x.dtype))
        y = ctx.op("MatMul", [rows, w], label="MatMul")
        keep = [0] * (rank + 1)
        y = ctx.op("Reshape", [y, emit.ints(ctx, keep + [filters], "shape")], allowzero=0)
    bias = conv_bias(ctx, op, x.dtype)
    if bias is not None:
        y = ctx.op("Add", [y, bias], label="biased")
    return y


def kernel_gradient(ctx, op: BaseConv, patches: Value, dz: Value) -> Value:
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


def axis_tails(op: BaseConv, spatial: tuple, pads: list, kernel_size: tuple) -> list[int]:
    """Per spatial axis, the padded input's elements past the last window (0 at stride 1)."""
    return [
        0 if s == 1 else (size + before + after - d * (k - 1) - 1) % s
        for size, (before, after), k, s, d in zip(
            spatial, pads, kernel_size, op.strides, op.dilation_rate
        )
    ]


def dilate(ctx, x: Value, dims: list, axes: list[int], strides) -> Value:
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


def out_sizes(op: BaseConv, spatial: tuple, pads: list, kernel_size: tuple) -> list:
    return [
        None if size is None else (size + before + after - d * (k - 1) - 1) // s + 1
        for size, (before, after), k, s, d in zip(
            spatial, pads, kernel_size, op.strides, op.dilation_rate
        )
    ]


def patches_input_gradient(ctx, op: BaseConv, saved: dict, dz: Value, spatial, pads) -> Value:
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
    outs = out_sizes(op, spatial, pads, kernel_size)
    dp = dilate(ctx, dp, [None, *outs, taps * channels], list(range(1, rank + 1)), op.strides)
    tails = axis_tails(op, spatial, pads, kernel_size)
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
    ends = [-after if after else TO_END for _, after in pads]
    return ctx.op(
        "Slice",
        [total, emit.ints(ctx, starts, "starts"), emit.ints(ctx, ends, "ends"),
         emit.ints(ctx, range(1, rank + 1), "axes")],
        label="d_input",
    )  # fmt: skip
