"""Embedding: a Gather of rows of the table (semantics: `layers/embedding.py`).

Indices become int64 for Gather. Float indices are first autocast to the
compute dtype and truncated to int32, as the eager layer does. The eager layer
raises on an index outside `[0, input_dim)`; Gather raises on one past the end
but wraps a negative one around, so negative indices are mapped to `input_dim`
first, which makes onnxruntime fail instead of reading a wrong row. The table
is stored in the compute dtype (the eager layer rounds the gathered rows to it),
so the gathered rows need no cast. With `mask_zero=True` the mask is the
`NotEqual(inputs, 0)` node Keras records, lowered by `lowering/numpy_ops.py`.
"""

from __future__ import annotations

import numpy as np

from onnxbn.dtypes import is_float
from onnxbn.layers.embedding import Embedding
from onnxbn.lowering import emit
from onnxbn.lowering.activation import autocast
from onnxbn.lowering.context import LoweringContext, Value
from onnxbn.lowering.dense import check_built
from onnxbn.lowering.registry import register_lowering


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
    table = ctx.constant(np.asarray(op.embeddings.value), "embeddings", op.compute_dtype)
    shape = None if x.shape is None else x.shape + (op.output_dim,)
    return ctx.op("Gather", [table, indices], label="Gather", shape=shape, axis=0)
