"""InputLayer: a model input becomes a graph input under its own name."""

from __future__ import annotations

from onnxbn.layers.input_layer import InputLayer
from onnxbn.lowering.context import LoweringContext, Value
from onnxbn.lowering.registry import register_lowering
from onnxbn.tensor import SymbolicTensor

BATCH_DIM_PARAM = "batch"


def input_dims(tensor: SymbolicTensor) -> list[int | str]:
    """Static dims as ints, dynamic ones as dim_params (`batch` for axis 0)."""
    dims: list[int | str] = []
    for axis, dim in enumerate(tensor.shape):
        if dim is not None:
            dims.append(dim)
        elif axis == 0:
            dims.append(BATCH_DIM_PARAM)
        else:
            dims.append(f"{tensor.name}_dim{axis}")
    return dims


def declare_input(ctx: LoweringContext, tensor: SymbolicTensor) -> Value:
    """Declares `tensor` as a graph input (name, dtype, dynamic dims as dim_params)."""
    return ctx.add_input(tensor.name, tensor.dtype, input_dims(tensor))


@register_lowering(InputLayer)
def lower_input_layer(ctx: LoweringContext, op: InputLayer) -> Value:
    """The graph input of an `onnxbn.Input` (its node has no operands)."""
    return declare_input(ctx, op.output)
