"""Dropout: the identity in every export (semantics: `layers/dropout.py`).

An inference call is the identity, as in Keras. A training call is exported as
the identity too: ONNX's Dropout and RandomUniform draw from a runtime's own
generator, so an exported graph could not reproduce the eager layer's seeded
draws, and a graph that silently drops different values on every run is worse
than one that does not drop. onnxbn offers no opt-in for random dropping in
exports; a caller who wants it adds it outside the exported graph.

The node is an Identity, or a Cast when the input is not in the compute dtype
(the eager layer returns `inputs.astype(compute_dtype)`, integers included).
"""

from __future__ import annotations

from onnxbn.gradients import Gradients
from onnxbn.layers.dropout import Dropout
from onnxbn.lowering import emit
from onnxbn.lowering.activation import new_value, operand_gradient
from onnxbn.lowering.context import CallRecord, LoweringContext, Value
from onnxbn.lowering.registry import register_gradient, register_lowering


@register_lowering(Dropout)
def lower_dropout(ctx: LoweringContext, op: Dropout, x: Value, *, training: bool = False) -> Value:
    """Lowers one call of a Dropout layer as the identity (cast to the compute dtype).

    Args:
        ctx: the lowering context.
        op: the layer.
        x: its input.
        training: the call's resolved training flag; the export is the identity
            either way (see the module docstring).

    Returns:
        `x` in the compute dtype, as a new value.
    """
    del training  # never random in an export; documented above
    y = emit.cast(ctx, x, op.compute_dtype, label="Identity")
    return new_value(ctx, y, x)


@register_gradient(Dropout)
def dropout_gradient(ctx: LoweringContext, op: Dropout, call: CallRecord, dy: Value) -> Gradients:
    """The identity's gradient: `dy` in the input's dtype (None for a non-float input)."""
    return Gradients((operand_gradient(ctx, dy, call.operands[0]),))
