"""Shape and data-movement kernels: Identity, Constant*, Shape, Size, Reshape, Flatten,
(Un)Squeeze, Expand, Transpose, Concat, Gather, Slice, Split, Range, Tile.

Kernels return views where NumPy does (the interpreter never writes into a
kernel's inputs); every output whose size comes from data (ConstantOfShape,
Expand, Tile, Range, Gather, Concat) is checked against the allocation cap
before it is allocated.
"""

from __future__ import annotations

import math

import numpy as np

from onnxbn.reference.kernels.precision import (
    as_array,
    int_list,
    is_float,
    normalize_axes,
    normalize_axis,
)
from onnxbn.reference.kernels.table import kernel
from onnxbn.reference.limits import check_allocation

_INT64 = np.dtype(np.int64)


@kernel("Identity", 1)
def identity(input: np.ndarray) -> tuple[np.ndarray]:
    return (input,)


@kernel("Constant", 1)
def constant(
    *,
    sparse_value: np.ndarray | None = None,
    value: np.ndarray | None = None,
    value_float: float | None = None,
    value_floats: list[float] | None = None,
    value_int: int | None = None,
    value_ints: list[int] | None = None,
    value_string: str | None = None,
    value_strings: list[str] | None = None,
) -> tuple[np.ndarray]:
    given = {
        name: v
        for name, v in (
            ("sparse_value", sparse_value),
            ("value", value),
            ("value_float", value_float),
            ("value_floats", value_floats),
            ("value_int", value_int),
            ("value_ints", value_ints),
            ("value_string", value_string),
            ("value_strings", value_strings),
        )
        if v is not None
    }
    if len(given) != 1:
        raise ValueError(
            f"Constant needs exactly one value attribute, received {sorted(given) or 'none'}."
        )
    ((name, v),) = given.items()
    if name in ("value", "sparse_value"):
        return (v,)
    if name in ("value_float", "value_floats"):
        return (np.asarray(v, dtype=np.float32),)
    if name in ("value_int", "value_ints"):
        return (np.asarray(v, dtype=np.int64),)
    return (np.asarray(v, dtype=object),)


@kernel("ConstantOfShape", 9)
def constant_of_shape(input: np.ndarray, *, value: np.ndarray | None = None) -> tuple:
    shape = int_list(input, "ConstantOfShape's shape")
    fill = np.zeros(1, np.float32) if value is None else value
    if fill.size != 1:
        raise ValueError(
            f"ConstantOfShape's value must hold one element, received shape {fill.shape}."
        )
    check_allocation("ConstantOfShape output", shape, fill.dtype)
    return (np.full(shape, fill.reshape(())[()], dtype=fill.dtype),)


@kernel("Shape", 1)
def shape_1(data: np.ndarray) -> tuple[np.ndarray]:
    return (np.array(data.shape, dtype=_INT64),)


@kernel("Shape", 15)
def shape_15(data: np.ndarray, *, end: int | None = None, start: int = 0) -> tuple[np.ndarray]:
    # Out-of-range start/end clamp to [0, rank] (spec), which is Python slicing.
    return (np.array(data.shape[start:end], dtype=_INT64),)


@kernel("Size", 1)
def size(data: np.ndarray) -> tuple[np.ndarray]:
    return (np.array(data.size, dtype=_INT64),)


def _reshape_target(data: np.ndarray, shape: list[int], allowzero: int) -> list[int]:
    target = list(shape)
    if not allowzero:
        for i, d in enumerate(target):
            if d == 0:
                if i >= data.ndim:
                    raise ValueError(
                        f"Reshape: shape {shape} copies dimension {i} (a 0) but the input "
                        f"has rank {data.ndim}."
                    )
                target[i] = data.shape[i]
    if target.count(-1) > 1 or any(d < -1 for d in target):
        raise ValueError(f"Reshape: invalid shape {shape} (at most one -1, no other negatives).")
    if allowzero and -1 in target and 0 in target:
        raise ValueError(f"Reshape: shape {shape} has both -1 and 0 with allowzero=1.")
    return target


@kernel("Reshape", 5)
def reshape_5(data: np.ndarray, shape: np.ndarray) -> tuple[np.ndarray]:
    return reshape_14(data, shape)


@kernel("Reshape", 14)
def reshape_14(data: np.ndarray, shape: np.ndarray, *, allowzero: int = 0) -> tuple[np.ndarray]:
    target = _reshape_target(data, int_list(shape, "Reshape's shape"), allowzero)
    return (data.reshape(target),)


@kernel("Flatten", 1)
def flatten(input: np.ndarray, *, axis: int = 1) -> tuple[np.ndarray]:
    if not -input.ndim <= axis <= input.ndim:
        raise ValueError(f"Flatten axis {axis} is out of range for rank {input.ndim}.")
    axis = axis + input.ndim if axis < 0 else axis
    outer = math.prod(input.shape[:axis])
    return (input.reshape(outer, math.prod(input.shape[axis:])),)


@kernel("Unsqueeze", 1)
def unsqueeze_1(data: np.ndarray, *, axes: list[int]) -> tuple[np.ndarray]:
    return unsqueeze_13(data, np.asarray(axes, _INT64))


@kernel("Unsqueeze", 13)
def unsqueeze_13(data: np.ndarray, axes: np.ndarray) -> tuple[np.ndarray]:
    rank = data.ndim + len(int_list(axes, "Unsqueeze's axes"))
    positions = sorted(normalize_axes(int_list(axes, "Unsqueeze's axes"), rank, "Unsqueeze axis"))
    shape = list(data.shape)
    for axis in positions:
        shape.insert(axis, 1)
    return (data.reshape(shape),)


@kernel("Squeeze", 1)
def squeeze_1(data: np.ndarray, *, axes: list[int] | None = None) -> tuple[np.ndarray]:
    return squeeze_13(data, None if axes is None else np.asarray(axes, _INT64))


@kernel("Squeeze", 13)
def squeeze_13(data: np.ndarray, axes: np.ndarray | None = None) -> tuple[np.ndarray]:
    if axes is None:
        return (data.reshape([d for d in data.shape if d != 1]),)
    positions = normalize_axes(int_list(axes, "Squeeze's axes"), data.ndim, "Squeeze axis")
    for axis in positions:
        if data.shape[axis] != 1:
            raise ValueError(
                f"Squeeze axis {axis} has size {data.shape[axis]}, expected 1 "
                f"(input shape {data.shape})."
            )
    return (np.squeeze(data, axis=positions),)


@kernel("Expand", 8)
def expand(input: np.ndarray, shape: np.ndarray) -> tuple[np.ndarray]:
    requested = int_list(shape, "Expand's shape")
    if any(d < 0 for d in requested):
        raise ValueError(f"Expand's shape {requested} has a negative dimension.")
    try:
        target = np.broadcast_shapes(input.shape, tuple(requested))
    except ValueError:
        raise ValueError(
            f"Expand: input shape {input.shape} does not broadcast with shape {requested}."
        ) from None
    check_allocation("Expand output", target, input.dtype)
    return (np.broadcast_to(input, target).copy(),)


@kernel("Transpose", 1)
def transpose(data: np.ndarray, *, perm: list[int] | None = None) -> tuple[np.ndarray]:
    if perm is not None and sorted(normalize_axes(perm, data.ndim, "Transpose perm")) != list(
        range(data.ndim)
    ):
        raise ValueError(f"Transpose perm {perm} is not a permutation of rank {data.ndim}.")
    return (np.transpose(data, perm),)


@kernel("Concat", 4)
def concat(*inputs: np.ndarray, axis: int) -> tuple[np.ndarray]:
    if not inputs:
        raise ValueError("Concat needs at least one input, received none.")
    rank = inputs[0].ndim
    axis = normalize_axis(axis, rank, "Concat axis")
    if any(x.ndim != rank for x in inputs):
        raise ValueError(f"Concat inputs differ in rank: {[x.shape for x in inputs]}.")
    shape = list(inputs[0].shape)
    shape[axis] = sum(x.shape[axis] for x in inputs)
    check_allocation("Concat output", shape, np.result_type(*inputs))
    return (np.concatenate(inputs, axis=axis),)


@kernel("Gather", 1)
def gather(data: np.ndarray, indices: np.ndarray, *, axis: int = 0) -> tuple[np.ndarray]:
    axis = normalize_axis(axis, data.ndim, "Gather axis")
    if indices.dtype.kind not in "iu":
        raise TypeError(f"Gather indices must be int32 or int64, received {indices.dtype}.")
    out_shape = data.shape[:axis] + indices.shape + data.shape[axis + 1 :]
    check_allocation("Gather output", out_shape, data.dtype)
    n = data.shape[axis]
    if indices.size and (indices.min() < -n or indices.max() >= n):
        raise ValueError(
            f"Gather indices must lie in [{-n}, {n}) for axis {axis} of shape {data.shape}."
        )
    return (np.take(data, indices, axis=axis),)


@kernel("Slice", 1)
def slice_1(
    data: np.ndarray, *, axes: list[int] | None = None, ends: list[int], starts: list[int]
) -> tuple[np.ndarray]:
    return slice_10(
        data,
        np.asarray(starts, _INT64),
        np.asarray(ends, _INT64),
        None if axes is None else np.asarray(axes, _INT64),
    )


@kernel("Slice", 10)
def slice_10(
    data: np.ndarray,
    starts: np.ndarray,
    ends: np.ndarray,
    axes: np.ndarray | None = None,
    steps: np.ndarray | None = None,
) -> tuple[np.ndarray]:
    starts_, ends_ = int_list(starts, "Slice starts"), int_list(ends, "Slice ends")
    n = len(starts_)
    axes_ = list(range(n)) if axes is None else int_list(axes, "Slice axes")
    steps_ = [1] * n if steps is None else int_list(steps, "Slice steps")
    if not len(ends_) == len(axes_) == len(steps_) == n:
        raise ValueError(
            f"Slice starts, ends, axes and steps must have one length, received "
            f"{n}, {len(ends_)}, {len(axes_)}, {len(steps_)}."
        )
    if 0 in steps_:
        raise ValueError(f"Slice steps must be nonzero, received {steps_}.")
    index = [slice(None)] * data.ndim
    # Python slices clamp out-of-range starts/ends exactly as the spec describes.
    for axis, start, end, step in zip(
        normalize_axes(axes_, data.ndim, "Slice axis"), starts_, ends_, steps_
    ):
        index[axis] = slice(start, end, step)
    return (data[tuple(index)],)


def _split(data: np.ndarray, split: list[int] | None, axis: int, count: int) -> tuple:
    axis = normalize_axis(axis, data.ndim, "Split axis")
    length = data.shape[axis]
    if split is None:
        if count <= 0 or length % count:
            raise ValueError(
                f"Split of a dimension of {length} into {count} equal outputs is not possible; "
                "give 'split'."
            )
        split = [length // count] * count
    if any(s < 0 for s in split) or sum(split) != length:
        raise ValueError(f"Split sizes {split} must be >= 0 and sum to {length} (axis {axis}).")
    bounds = np.cumsum(split)[:-1]
    return tuple(np.split(data, bounds, axis=axis))


@kernel("Split", 2, wants_output_count=True)
def split_2(
    input: np.ndarray,
    *,
    axis: int = 0,
    split: list[int] | None = None,
    _num_node_outputs: int,
) -> tuple[np.ndarray, ...]:
    return _split(input, split, axis, _num_node_outputs)


@kernel("Split", 13, wants_output_count=True)
def split_13(
    input: np.ndarray,
    split: np.ndarray | None = None,
    *,
    axis: int = 0,
    _num_node_outputs: int,
) -> tuple[np.ndarray, ...]:
    sizes = None if split is None else int_list(split, "Split sizes")
    return _split(input, sizes, axis, _num_node_outputs)


@kernel("Split", 18, wants_output_count=True)
def split_18(
    input: np.ndarray,
    split: np.ndarray | None = None,
    *,
    axis: int = 0,
    num_outputs: int | None = None,
    _num_node_outputs: int,
) -> tuple[np.ndarray, ...]:
    if split is not None and num_outputs is not None:
        raise ValueError("Split takes either the 'split' input or 'num_outputs', not both.")
    if num_outputs is None:
        sizes = None if split is None else int_list(split, "Split sizes")
        return _split(input, sizes, axis, _num_node_outputs)
    length = input.shape[normalize_axis(axis, input.ndim, "Split axis")]
    if num_outputs < 1:
        raise ValueError(f"Split num_outputs must be >= 1, received {num_outputs}.")
    # Uneven splits: every chunk has ceil(length / n) elements, the last one the rest.
    chunk = -(-length // num_outputs)
    sizes = [min(chunk, max(length - i * chunk, 0)) for i in range(num_outputs)]
    return _split(input, sizes, axis, num_outputs)


@kernel("Range", 11)
def range_11(start: np.ndarray, limit: np.ndarray, delta: np.ndarray) -> tuple[np.ndarray]:
    return range_27(start, limit, delta, stash_type=0)


@kernel("Range", 27)
def range_27(
    start: np.ndarray, limit: np.ndarray, delta: np.ndarray, *, stash_type: int = 1
) -> tuple[np.ndarray]:
    dtype = start.dtype
    s, lim, d = (np.asarray(v).reshape(()) for v in (start, limit, delta))
    if d == 0:
        raise ValueError("Range delta must be nonzero, received 0.")
    if is_float(dtype) and not all(np.isfinite(v) for v in (s, lim, d)):
        raise ValueError(f"Range needs finite start, limit and delta, received {s}, {lim}, {d}.")
    low = is_float(dtype) and dtype.itemsize < 4
    work = np.dtype(np.float32) if stash_type == 1 and low else dtype
    if dtype.kind in "iu":
        count = max(-(-(int(lim) - int(s)) // int(d)), 0)
    else:
        count = max(math.ceil((float(lim) - float(s)) / float(d)), 0)
    check_allocation("Range output", [count], dtype)
    if dtype.kind in "iu":
        return (np.arange(count, dtype=dtype) * dtype.type(d) + dtype.type(s),)
    # output[i] = start + i * delta (spec), not repeated addition.
    values = work.type(s) + np.arange(count, dtype=work) * work.type(d)
    return (as_array(values, dtype),)


@kernel("Tile", 6)
def tile(input: np.ndarray, repeats: np.ndarray) -> tuple[np.ndarray]:
    reps = int_list(repeats, "Tile repeats")
    if len(reps) != input.ndim or any(r < 0 for r in reps):
        raise ValueError(
            f"Tile repeats {reps} must have one non-negative entry per input axis "
            f"(input shape {input.shape})."
        )
    check_allocation("Tile output", [d * r for d, r in zip(input.shape, reps)], input.dtype)
    return (np.tile(input, reps),)
