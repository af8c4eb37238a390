"""Add: the elementwise sum of a list of inputs (semantics: `layers/add.py`).

Each input is autocast, brought to the working dtype and, when its rank is
below the largest, given size-1 axes at position 1 as Keras's merge layers
expand them; a chain of Add nodes then broadcasts as NumPy does. The output
mask (Keras's LogicalOr of the input masks) is recorded as separate op nodes,
lowered by `lowering/numpy_ops.py`.
"""

from __future__ import annotations

from onnxbn.layers.add import Add
from onnxbn.lowering import emit
from onnxbn.lowering.activation import layer_input, layer_output, new_value
from onnxbn.lowering.context import LoweringContext, Value
from onnxbn.lowering.registry import register_lowering


@register_lowering(Add)
def lower_add(ctx: LoweringContext, op: Add, inputs: list[Value]) -> Value:
    """Lowers one call of an Add layer.

    Args:
        ctx: the lowering context.
        op: the layer.
        inputs: the list of input values (at least one).

    Returns:
        Their broadcast sum in the compute dtype.

    Raises:
        ValueError: an empty input list.
    """
    if not inputs:
        raise ValueError(f"Layer {op.name!r}: Add needs at least one input, received none.")
    rank = max(v.rank for v in inputs)
    total = None
    for v in inputs:
        h = layer_input(ctx, op, v)
        if h.rank < rank:
            missing = list(range(1, 1 + rank - h.rank))
            shape = h.shape[:1] + (1,) * len(missing) + h.shape[1:]
            h = ctx.op(
                "Unsqueeze", [h, emit.ints(ctx, missing, "axes")], label="expanded", shape=shape
            )
        total = h if total is None else ctx.op("Add", [total, h], label="sum")
    return new_value(ctx, layer_output(ctx, op, total), inputs[0])
