"""`Input` and `InputLayer`, the operation behind it (as in Keras's `input_layer.py`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from onnxbn.dtypes import standardize_dtype
from onnxbn.layers.layer import Layer
from onnxbn.node import Node
from onnxbn.operation_registry import register_layer
from onnxbn.tensor import SymbolicTensor, standardize_shape


@register_layer("keras.layers")
class InputLayer(Layer):
    """Holds a model input placeholder; its node has no inputs.

    Args:
        batch_shape: full shape including the batch axis (`None` = dynamic).
        dtype: input dtype name (a tensor dtype, not a policy).
        name: input name.
    """

    def __init__(
        self,
        batch_shape: Any = None,
        dtype: Any = "float32",
        name: str | None = None,
        *,
        shape: Any = None,
        batch_size: int | None = None,
        sparse: bool = False,
        ragged: bool = False,
        optional: bool = False,
        input_tensor: Any = None,
    ) -> None:
        if sparse or ragged:
            raise ValueError(
                f"InputLayer {name!r}: sparse/ragged inputs are not supported "
                f"(received sparse={sparse}, ragged={ragged})."
            )
        if optional:
            raise ValueError(f"InputLayer {name!r}: optional inputs are not supported.")
        if input_tensor is not None:
            raise ValueError(f"InputLayer {name!r}: input_tensor is not supported.")
        if batch_shape is None:
            if shape is None:
                raise ValueError("InputLayer needs `batch_shape` or `shape`.")
            batch_shape = (batch_size,) + standardize_shape(shape)
        super().__init__(name=name)
        self.batch_shape = standardize_shape(batch_shape, "batch_shape")
        self.input_dtype = standardize_dtype(dtype)
        self.built = True
        tensor = SymbolicTensor(self.batch_shape, self.input_dtype, name=self.name)
        Node(self, (), {}, tensor)

    def call(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError(f"InputLayer {self.name!r} cannot be called.")

    def get_config(self) -> dict:
        return {
            "batch_shape": list(self.batch_shape),
            "dtype": self.input_dtype,
            "sparse": False,
            "ragged": False,
            "name": self.name,
            "optional": False,
        }


def Input(  # noqa: N802 - Keras's name
    shape: Sequence[int | None],
    batch_size: int | None = None,
    dtype: Any = "float32",
    name: str | None = None,
) -> SymbolicTensor:
    """Creates a model input (Keras's `keras.Input`).

    Args:
        shape: shape without the batch axis; `None` for unknown dims.
        batch_size: optional fixed batch size (dynamic when `None`).
        dtype: input dtype name.
        name: input name (also the ONNX graph input name).

    Returns:
        The `SymbolicTensor` output of a new `InputLayer`.
    """
    if batch_size is not None and (
        isinstance(batch_size, bool) or not hasattr(batch_size, "__index__")
    ):
        raise TypeError(f"batch_size must be an int or None, received {batch_size!r}.")
    layer = InputLayer(batch_shape=(batch_size,) + standardize_shape(shape), dtype=dtype, name=name)
    return layer.output
