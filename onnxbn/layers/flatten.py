"""Flatten: every axis but the batch axis into one (Keras 3 semantics).

How it becomes ONNX lives in `onnxbn/lowering/flatten.py`.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from onnxbn.dtypes import is_float
from onnxbn.gradients import Gradients, Pullback
from onnxbn.layers.arguments import check_min_ndim
from onnxbn.layers.conv import standardize_data_format
from onnxbn.layers.layer import Layer
from onnxbn.operation_registry import register_layer
from onnxbn.tensor import SymbolicTensor


@register_layer("keras.layers")
class Flatten(Layer):
    """Flattens the input, keeping the batch axis (Keras's `Flatten`).

    With `data_format="channels_first"` the channel axis is moved last before
    flattening, so the element order is that of the channels-last layout. An
    input of shape `(batch,)` becomes `(batch, 1)`.

    Args:
        data_format: `"channels_last"` (default) or `"channels_first"`.
        **kwargs: base layer arguments (`name`, `dtype`, `trainable`).

    Call arguments:
        inputs: array of rank >= 1.

    Returns:
        `(batch, prod(other dims))` (None when a dim is unknown). The dtype is
        the input's (float inputs are first cast to the compute dtype, as every
        layer does). The layer does not support masking: a mask is dropped.

    Raises:
        ValueError: a rank-0 input, an unknown `data_format`.
    """

    def __init__(self, data_format: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.data_format = standardize_data_format(data_format)

    def compute_output_shape(self, input_shape: tuple) -> tuple:
        check_min_ndim(self, input_shape, 1)
        rest = input_shape[1:]
        if not rest:
            flat = 1
        elif any(d is None for d in rest):
            flat = None
        else:
            flat = math.prod(rest)
        return (input_shape[0], flat)

    def compute_output_spec(self, inputs: SymbolicTensor) -> SymbolicTensor:
        dtype = self.compute_dtype if is_float(inputs.dtype) else inputs.dtype
        return SymbolicTensor(self.compute_output_shape(inputs.shape), dtype)

    def call(self, inputs: np.ndarray) -> np.ndarray:
        return self.vjp(inputs)[0]

    def vjp(self, inputs: np.ndarray) -> tuple[np.ndarray, Pullback]:
        shape = self.compute_output_shape(inputs.shape)
        x = inputs
        moved = self.data_format == "channels_first" and x.ndim > 1
        if moved:
            x = np.moveaxis(x, 1, -1)
        moved_shape = x.shape

        def pullback(dy: np.ndarray) -> Gradients:
            dx = dy.reshape(moved_shape)
            return Gradients((np.moveaxis(dx, -1, 1) if moved else dx,))

        return np.ascontiguousarray(x).reshape(shape), pullback

    def get_config(self) -> dict:
        config = super().get_config()
        config["data_format"] = self.data_format
        return config
