"""Accurate float sums (and sums of squares) without a float64 copy of the data.

`np.add.reduce(x, dtype=np.float64)` is exact to float32 precision but pays
a cast of every element; a plain float32 reduce is twice as fast but adds the
rows of an outer-axis reduction one at a time, which drifts over millions of
rows. `float_sum` gets both: float32 arithmetic on cache-sized blocks, in an
order whose rounding error grows with the logarithm of the block length, and
float64 for the (few) block partials:

- a reduced run of trailing axes is summed along its contiguous memory by
  NumPy's pairwise summation, in chunks of at most `CHUNK` elements;
- reduced leading axes before kept trailing ones (`(rows, C)`) are summed in
  groups of `GROUP` rows in float32, the group sums in float64; for narrow rows
  (C < `GROUP`) each block of rows is halved in place (a pairwise tree).

Anything else (other layouts, dtypes, small tensors) takes the float64 path.
"""

from __future__ import annotations

import math

import numpy as np

from onnxbn.reference.kernels.precision import LOW_PRECISION

# Below this many elements the float64 cast costs less than the bookkeeping.
MIN_ELEMENTS = 1 << 15
# Shortest trailing run summed along memory (shorter runs: NumPy loops per row).
MIN_RUN = 16
# Longest run summed in float32 before its partial goes to float64.
CHUNK = 1 << 12
# Elements per block (a block of squares or of halved rows stays in L2).
BLOCK_ELEMENTS = 1 << 16
_F32 = np.dtype(np.float32)
_F64 = np.dtype(np.float64)


def _float64_sum(x: np.ndarray, axes: tuple[int, ...], keepdims: bool, square: bool) -> np.ndarray:
    if not square:
        return np.add.reduce(x, axis=axes, dtype=_F64, keepdims=keepdims)
    work = x.astype(_F32) if x.dtype in LOW_PRECISION else x
    if work.dtype.kind != "f" or work.ndim == 0 or not len(work):
        return np.add.reduce(work * work, axis=axes, dtype=_F64, keepdims=keepdims)
    # Squares block by block along axis 0: no x-sized temporary.
    step = max(1, BLOCK_ELEMENTS // max(work[0].size, 1))
    parts = [
        np.add.reduce(np.square(work[i : i + step]), axis=axes, dtype=_F64, keepdims=keepdims)
        for i in range(0, len(work), step)
    ]
    if 0 in axes:
        total = parts[0]
        for part in parts[1:]:
            total = total + part
        return total
    return np.concatenate(parts, axis=0)


def _merged(shape: tuple[int, ...], axes: tuple[int, ...]) -> tuple[list[int], list[bool]]:
    """Adjacent axes of the same kind (reduced or kept) merged; size-1 axes dropped."""
    sizes: list[int] = []
    reduced: list[bool] = []
    for axis, size in enumerate(shape):
        if size == 1:
            continue
        kind = axis in axes
        if reduced and reduced[-1] == kind:
            sizes[-1] *= size
        else:
            sizes.append(size)
            reduced.append(kind)
    return sizes, reduced


def _chunk_square_sums(lines: np.ndarray) -> np.ndarray:
    """float32 sums of squares of each row of a contiguous (n, chunk) array, in blocks."""
    count, chunk = lines.shape
    rows = max(1, BLOCK_ELEMENTS // chunk)
    partial = np.empty(count, _F32)
    buffer = np.empty((min(rows, count), chunk), _F32)
    for start in range(0, count, rows):
        block = lines[start : start + rows]
        squares = np.square(block, out=buffer[: len(block)])
        np.add.reduce(squares, axis=-1, out=partial[start : start + rows])
    return partial


def _trailing_sum(x: np.ndarray, outer: int, run: int, square: bool) -> np.ndarray:
    """float64 sums of the `run`-long rows of `x` viewed as (outer, run), shape (outer,)."""
    flat = x.reshape(outer, run)
    main = run - run % CHUNK if run > CHUNK else run
    chunk = min(run, CHUNK)
    pieces = flat[:, :main].reshape(outer, main // chunk, chunk)
    if not square:
        partial = np.add.reduce(pieces, axis=-1)
    elif main == run:
        partial = _chunk_square_sums(pieces.reshape(-1, chunk)).reshape(outer, -1)
    else:
        partial = np.stack([_chunk_square_sums(row) for row in pieces])
    total = np.add.reduce(partial, axis=-1, dtype=_F64)
    if main < run:
        tail = flat[:, main:]
        total += np.add.reduce(tail * tail if square else tail, axis=-1, dtype=_F64)
    return total


# Rows added in float32 (one after another) before their sum goes to float64.
GROUP = 16


def _grouped_sum(x: np.ndarray, rows: int, width: int, square: bool) -> np.ndarray:
    """float64 column sums of `x` viewed as (rows, width), shape (width,): groups of
    `GROUP` rows are added in float32 (vectorized along the rows), the group sums in float64."""
    flat = x.reshape(rows, width)
    groups = rows // GROUP
    view = flat[: groups * GROUP].reshape(groups, GROUP, width)
    if square:
        partial = np.empty((groups, width), _F32)
        step = max(1, BLOCK_ELEMENTS // (GROUP * width))
        buffer = np.empty((min(step, groups), GROUP, width), _F32)
        for start in range(0, groups, step):
            block = view[start : start + step]
            squares = np.square(block, out=buffer[: len(block)])
            np.add.reduce(squares, axis=1, out=partial[start : start + step])
    else:
        partial = np.add.reduce(view, axis=1)
    total = np.add.reduce(partial, axis=0, dtype=_F64)
    tail = flat[groups * GROUP :]
    if len(tail):
        total += np.add.reduce(tail * tail if square else tail, axis=0, dtype=_F64)
    return total


def _tree_sum(x: np.ndarray, rows: int, width: int, square: bool) -> np.ndarray:
    """float64 column sums of `x` viewed as (rows, width), shape (width,), for narrow
    rows: each block of rows is halved in place (a pairwise tree) in float32."""
    flat = x.reshape(rows, width)
    # Rows per block: a power of two, so each halving splits evenly.
    block = 1 << max(1, min(12, (BLOCK_ELEMENTS // max(width, 1)).bit_length() - 1))
    blocks = rows // block
    partial = np.empty((blocks, width), _F32)
    buffer = np.empty((block // 2, width), _F32)
    spare = np.empty((block // 2, width), _F32) if square else buffer
    for b in range(blocks):
        rows_b = flat[b * block : (b + 1) * block]
        half = block // 2
        if square:
            # Squares of both halves, added: the first level of the tree.
            np.square(rows_b[:half], out=buffer)
            buffer += np.square(rows_b[half:], out=spare)
        else:
            np.add(rows_b[:half], rows_b[half:], out=buffer)
        while half > 1:
            half //= 2
            np.add(buffer[:half], buffer[half : 2 * half], out=buffer[:half])
        partial[b] = buffer[0]
    total = np.add.reduce(partial, axis=0, dtype=_F64)
    tail = flat[blocks * block :]
    if len(tail):
        total += np.add.reduce(tail * tail if square else tail, axis=0, dtype=_F64)
    return total


def float_sum(
    x: np.ndarray, axes: tuple[int, ...], keepdims: bool = False, square: bool = False
) -> np.ndarray:
    """The float64 sum of `x` (or of `x * x`) over `axes`, accurate to float64 rounding
    of float32 blocks (relative error ~1e-7 log2(CHUNK), independent of the length).

    Args:
        x: a float array.
        axes: distinct non-negative axes.
        keepdims: keep reduced axes as size 1.
        square: sum the squares of `x`.

    Returns:
        A float64 array.
    """
    if x.dtype != _F32 or x.size < MIN_ELEMENTS or not x.flags.c_contiguous:
        return _float64_sum(x, axes, keepdims, square)
    sizes, reduced = _merged(x.shape, axes)
    kept_shape = tuple(1 if a in axes else n for a, n in enumerate(x.shape))
    if not keepdims:
        kept_shape = tuple(n for a, n in enumerate(x.shape) if a not in axes)
    if reduced and reduced[-1] and sizes[-1] >= MIN_RUN:
        # Trailing reduced run: pairwise along memory, then the other reduced axes in float64.
        run = sizes[-1]
        outer = x.size // run
        partial = _trailing_sum(x, outer, run, square)
        if len(sizes) > 1:
            partial = partial.reshape(sizes[:-1])
            inner = tuple(i for i, r in enumerate(reduced[:-1]) if r)
            partial = np.add.reduce(partial, axis=inner) if inner else partial
        return partial.reshape(kept_shape)
    if len(sizes) == 2 and reduced[0] and sizes[0] >= 64:
        # (rows, C) with the rows reduced: a pairwise tree over blocks of rows.
        rows, width = sizes
        how = _grouped_sum if width >= GROUP else _tree_sum
        return how(x, rows, width, square).reshape(kept_shape)
    return _float64_sum(x, axes, keepdims, square)


def float_mean(x: np.ndarray, axes: tuple[int, ...], keepdims: bool = False) -> np.ndarray:
    """The float64 mean over `axes` (NaN for an empty set, as sum / count gives)."""
    count = math.prod(x.shape[a] for a in axes)
    return np.true_divide(float_sum(x, axes, keepdims), np.float64(count))
