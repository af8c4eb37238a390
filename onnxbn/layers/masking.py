"""Masking: marks timesteps whose features all equal `mask_value` (Keras 3 semantics).

In a graph the layer's output carries Keras's implicit mask, recorded as the
op nodes Keras records (`NotEqual` then `Any`), so that a following layer with
a `mask` argument (e.g. `BatchNormalization`) receives it without being told.
How it becomes ONNX lives in `onnxbn/lowering/masking.py`.
"""

from __future__ import annotations

from numbers import Real
from typing import Any

import numpy as np

from onnxbn import ops
from onnxbn.dtypes import to_numpy_dtype
from onnxbn.gradients import Gradients, Pullback
from onnxbn.layers.layer import Layer
from onnxbn.operation_registry import register_layer
from onnxbn.tensor import SymbolicTensor


@register_layer("keras.layers")
class Masking(Layer):
    """Masks timesteps equal to `mask_value` in every feature (Keras's `Masking`).

    A timestep (all axes but the last) is valid when any of its features
    differs from `mask_value`. The output is the input with invalid timesteps
    multiplied by 0, and its mask is `any(inputs != mask_value, axis=-1)`.

    Args:
        mask_value: the padding value (a number).
        **kwargs: base layer arguments (`name`, `dtype`, `trainable`).

    Call arguments:
        inputs: array of shape `(batch, timesteps, ..., features)`.

    Returns:
        Same shape as `inputs`, in the compute dtype; in a graph, the output's
        implicit mask has the input's shape without the last axis.

    Raises:
        TypeError: a non-numeric `mask_value`.
    """

    def __init__(self, mask_value: float = 0.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if isinstance(mask_value, (bool, np.bool_)) or not isinstance(mask_value, Real):
            raise TypeError(f"Expected `mask_value` to be a number, received {mask_value!r}.")
        self.mask_value = mask_value.item() if isinstance(mask_value, np.generic) else mask_value
        self.supports_masking = True
        self.built = True  # no weights: Keras builds it at construction

    def compute_mask(self, inputs: Any, previous_mask: Any = None) -> Any:
        return ops.any(ops.not_equal(inputs, self.mask_value), axis=-1)

    def compute_output_spec(self, inputs: SymbolicTensor) -> SymbolicTensor:
        return SymbolicTensor(inputs.shape, self.compute_dtype)

    def call(self, inputs: np.ndarray) -> np.ndarray:
        return self.vjp(inputs)[0]

    def vjp(self, inputs: np.ndarray) -> tuple[np.ndarray, Pullback]:
        keep = np.any(np.not_equal(inputs, self.mask_value), axis=-1, keepdims=True)
        # A product, as Keras computes it (so inf and NaN at masked steps give NaN).
        with np.errstate(invalid="ignore"):
            y = inputs.astype(np.float64) * keep
        # The mask is a comparison: no gradient flows through it, none to masked steps.
        return y.astype(to_numpy_dtype(self.compute_dtype)), lambda dy: Gradients((dy * keep,))

    def get_config(self) -> dict:
        config = super().get_config()
        config["mask_value"] = self.mask_value
        return config
