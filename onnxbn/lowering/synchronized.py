"""Synchronized BatchNormalization in ONNX: partial moments out, global moments in.

The contract, language-neutral (any runtime, any all-reduce):

- each synchronized layer call in training mode has an output
  `<layer>/partial_moments` and an input `<layer>/global_moments`, both float64
  of shape `[3, C]`: rows `count`, `mean`, `M2 = Σ (x - mean)²` per channel
  (masked calls count valid positions only);
- a bool scalar input `synchronize` (default False) selects the statistics:
  False = this process's own batch (a plain run, nothing to do), True = the
  `global_moments` inputs;
- a driver with P processes runs, for each synchronized call k in graph order,
  the graph with `synchronize = True` and the global moments 1..k-1 found so
  far, fetching `partial_moments` k; it combines the P partials with Chan et
  al.'s formula (n = Σ n_i; mean = Σ n_i mean_i / n; M2 = Σ M2_i + Σ n_i
  (mean_i - mean)²) and feeds the result as `global_moments` k. A last run with
  every global fed gives the outputs and the `/new` moving statistics.

`onnxbn.runtime.Session(model, comm=...)` and `onnxbn.reference.Session` drive
it with mpi4py. The graph finishes the moments exactly as the eager layer
(`layers/moments.py`): Keras's `count + 1e-7` for masked calls.
"""

from __future__ import annotations

import numpy as np

from onnxbn.contract import GLOBAL_SUFFIX, PARTIAL_SUFFIX, SYNC_FLAG
from onnxbn.layers.moments import MASK_EPSILON
from onnxbn.lowering import emit
from onnxbn.lowering.context import LoweringContext, Value

F64 = "float64"


def _row(ctx: LoweringContext, moments: Value, index: int, label: str, channels: int) -> Value:
    index_value = ctx.constant(np.array([index], np.int64), "row", "int64")
    row = ctx.op("Gather", [moments, index_value], axis=0, shape=(1, channels), dtype=F64)
    return emit.reshape(ctx, row, [channels], label)


def exchanged_moments(
    ctx: LoweringContext,
    shift: Value,
    s1: Value,
    s2: Value,
    n: Value,
    channels: int,
    masked: bool,
) -> tuple[Value, Value, Value]:
    """Mean (relative to `shift`), variance and count, local or global per `synchronize`.

    Args:
        shift: the per-channel shift of the data (`(C,)`).
        s1, s2: Σ d and Σ d² of the shifted data `d = x - shift` (`(C,)`).
        n: the count (`(1,)` or `(C,)`).
        channels: C.
        masked: Keras's masked finish (`count + 1e-7`).

    Returns:
        `(mean - shift, variance, count)` in the data's dtype, each `(C,)`.
    """
    dtype = s1.dtype
    shape_c = emit.ints(ctx, [channels], "channels")
    n64 = ctx.op("Expand", [emit.cast(ctx, n, F64), shape_c], label="count", dtype=F64)
    shift64 = emit.cast(ctx, shift, F64, "shift")
    s1_64 = emit.cast(ctx, s1, F64, "sum")
    s2_64 = emit.cast(ctx, s2, F64, "sum_sq")
    one = emit.scalar(ctx, 1.0, F64, "one")
    mean_d = ctx.op("Div", [s1_64, ctx.op("Max", [n64, one])], label="local_mean_shifted")
    mean = ctx.op("Add", [shift64, mean_d], label="local_mean")
    m2 = emit.clamp_negative(ctx, ctx.op("Sub", [s2_64, ctx.op("Mul", [s1_64, mean_d])]), "m2")
    rows = [
        ctx.op("Unsqueeze", [v, emit.ints(ctx, [0], "axes")], dtype=F64) for v in (n64, mean, m2)
    ]
    partial = ctx.op("Concat", rows, label="partial", axis=0, dtype=F64, shape=(3, channels))
    partial, global_moments, flag = ctx.exchange(partial, PARTIAL_SUFFIX, GLOBAL_SUFFIX, SYNC_FLAG)
    chosen = ctx.op(
        "Where", [flag, global_moments, partial], label="moments", dtype=F64, shape=(3, channels)
    )
    count = _row(ctx, chosen, 0, "global_count", channels)
    mean = _row(ctx, chosen, 1, "global_mean", channels)
    m2 = _row(ctx, chosen, 2, "global_m2", channels)
    if masked:
        den = ctx.op("Add", [count, emit.scalar(ctx, MASK_EPSILON, F64, "count_epsilon")])
        keras_mean = ctx.op("Div", [ctx.op("Mul", [mean, count]), den], label="keras_mean")
        gap = ctx.op("Sub", [mean, keras_mean])
        spread = ctx.op("Add", [m2, ctx.op("Mul", [count, ctx.op("Mul", [gap, gap])])])
        var = ctx.op("Div", [spread, den], label="variance")
        mean = keras_mean
    else:
        var = ctx.op("Div", [m2, ctx.op("Max", [count, one])], label="variance")
    mean_shifted = emit.cast(ctx, ctx.op("Sub", [mean, shift64]), dtype, "mean_shifted")
    return mean_shifted, emit.cast(ctx, var, dtype, "batch_var"), emit.cast(ctx, count, dtype)
