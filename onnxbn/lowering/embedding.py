"""Embedding: a Gather of rows of the table (semantics: `layers/embedding.py`).

Indices become int64 for Gather. Float indices are first autocast to the
compute dtype and truncated to int32, as the eager layer does. The eager layer
raises on an index outside `[0, input_dim)`; Gather raises on one past the end
but wraps a negative one around, so negative indices are mapped to `input_dim`
first, which makes onnxruntime fail instead of reading a wrong row. The table
is stored in the compute dtype (the eager layer rounds the gathered rows to it),
so the gathered rows need no cast. With `mask_zero=True` the mask is the
`NotEqual(inputs, 0)` node Keras records, lowered by `lowering/numpy_ops.py`.

The table's gradient (train step) is `onehot(indices)^T @ dy`: an Equal of
the indices against `arange(input_dim)`, cast, and one Gemm. ScatterND with
`reduction="add"` would touch only the gathered rows, but it needs opset 16,
onnxbn.reference lacks it and its support elsewhere is uneven; the one-hot
MatMul runs everywhere, at the cost of a `(indices, input_dim)` matrix. In a
train step the table is gathered in the working dtype and the rows cast to the
compute dtype (the same values: the variable's dtype holds them exactly), so
the gradient is accumulated in the working dtype.
"""

from __future__ import annotations

import numpy as np

from onnxbn.dtypes import is_float
from onnxbn.gradients import Gradients
from onnxbn.layers.embedding import Embedding
from onnxbn.lowering import emit
from onnxbn.lowering.activation import autocast, gradient_input, trainable, working_dtype
from onnxbn.lowering.context import CallRecord, LoweringContext, Value
from onnxbn.lowering.dense import check_built
from onnxbn.lowering.registry import register_gradient, register_lowering


@register_lowering(Embedding)
def lower_embedding(ctx: LoweringContext, op: Embedding, x: Value) -> Value:
    """Lowers one call of an Embedding layer.

    Args:
        ctx: the lowering context.
        op: the layer.
        x: the indices, of any shape (integer, or float truncated as Keras does).

    Returns:
        `embeddings[x]`, shape `x.shape + (output_dim,)`, compute dtype.

    Raises:
        ValueError: the layer was never built.
        TypeError: bool indices.
    """
    check_built(op, "embeddings")
    if x.dtype == "bool":
        raise TypeError(
            f"Layer {op.name!r}: Embedding indices must be integers or floats, received bool."
        )
    indices = autocast(ctx, op, x)
    if is_float(indices.dtype):
        indices = emit.cast(ctx, indices, "int32", label="truncated")
    indices = emit.cast(ctx, indices, "int64", label="indices")
    negative = ctx.op(
        "Less", [indices, emit.scalar(ctx, 0, "int64", "zero")], label="negative", dtype="bool"
    )
    indices = ctx.op(
        "Where",
        [negative, emit.scalar(ctx, op.input_dim, "int64", "out_of_range"), indices],
        label="checked",
        dtype="int64",
    )
    ctx.save("indices", indices)
    shape = None if x.shape is None else x.shape + (op.output_dim,)
    if not trainable(ctx, op.embeddings):
        table = ctx.weight(op.embeddings, "embeddings", op.compute_dtype)
        return ctx.op("Gather", [table, indices], label="Gather", shape=shape, axis=0)
    table = ctx.weight(op.embeddings, "embeddings", working_dtype(op.compute_dtype))
    rows = ctx.op("Gather", [table, indices], label="Gather", shape=shape, axis=0)
    return emit.cast(ctx, rows, op.compute_dtype, label="output")


@register_gradient(Embedding)
def embedding_gradient(
    ctx: LoweringContext, op: Embedding, call: CallRecord, dy: Value
) -> Gradients:
    """The table's gradient: each output row's `dy` added to its index's row.

    Returns:
        None for the indices; the `(input_dim, output_dim)` table gradient in the
        working dtype when the table is train-step state.
    """
    if not trainable(ctx, op.embeddings):
        return Gradients((None,))
    g = gradient_input(ctx, op, dy)
    flat = emit.reshape(ctx, call.saved["indices"], [None, 1], "index_column")
    vocabulary = ctx.constant(np.arange(op.input_dim, dtype=np.int64)[None, :], "vocabulary")
    onehot = ctx.op("Equal", [flat, vocabulary], label="onehot", dtype="bool")
    onehot = emit.cast(ctx, onehot, g.dtype, label="onehot")
    rows = emit.reshape(ctx, g, [None, op.output_dim], "dy_rows")
    table = ctx.op("Gemm", [onehot, rows], label="d_embeddings",
                   shape=(op.input_dim, op.output_dim), alpha=1.0, beta=1.0, transA=1, transB=0)  # fmt: skip
    return Gradients((None,), {op.embeddings.path: table})
