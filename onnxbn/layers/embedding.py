"""Embedding: integer indices to dense vectors, with Keras's `mask_zero` implicit mask.

How it becomes ONNX lives in `onnxbn/lowering/embedding.py`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from onnxbn import constraints, initializers, ops, regularizers
from onnxbn.dtypes import to_numpy_dtype
from onnxbn.gradients import Gradients, Pullback
from onnxbn.layers.arguments import check_bool, reject_unsupported
from onnxbn.layers.layer import Layer, to_array
from onnxbn.operation_registry import register_layer
from onnxbn.tensor import SymbolicTensor


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"Expected `{name}` to be an int, received {name}={value!r}.")
    if value <= 0:
        raise ValueError(f"Expected `{name}` to be a positive integer, received {name}={value}.")
    return int(value)


@register_layer("keras.layers")
class Embedding(Layer):
    """Turns non-negative integer indices into vectors (Keras's `Embedding`).

    The output is `embeddings[inputs]`, shape `inputs.shape + (output_dim,)`.
    Float inputs are truncated to int32 first, as Keras casts them. Keras
    leaves out-of-range indices to the backend (TensorFlow raises, JAX
    clamps); here an index outside `[0, input_dim)` raises `ValueError`.

    With `mask_zero=True` the output carries Keras's implicit mask
    `inputs != 0`; in a graph it is recorded as a `NotEqual` op node, exactly
    as Keras records it, so the following layers receive it.

    Args:
        input_dim: vocabulary size (largest index + 1).
        output_dim: size of each vector.
        embeddings_initializer: initializer of the `embeddings` matrix.
        embeddings_regularizer, embeddings_constraint: optional.
        mask_zero: whether index 0 is padding and produces a mask.
        weights: optional initial `(input_dim, output_dim)` matrix (or a
            one-element list holding it); not part of the config.
        input_length: deprecated Keras argument, ignored.
        activity_regularizer, lora_rank, lora_alpha, quantization_config:
            Keras arguments accepted only as None.
        **kwargs: base layer arguments (`name`, `dtype`, `trainable`).

    Call arguments:
        inputs: integer array of any shape.

    Returns:
        Array of shape `inputs.shape + (output_dim,)`, compute dtype.

    Raises:
        ValueError: non-positive dims, indices out of range.
        TypeError: non-int dims, a non-bool `mask_zero`.
        NotImplementedError: a non-None activity regularizer, LoRA or
            quantization argument.
    """

    def __init__(
        self,
        input_dim: int,
        output_dim: int,
        embeddings_initializer: Any = "uniform",
        embeddings_regularizer: Any = None,
        embeddings_constraint: Any = None,
        mask_zero: bool = False,
        weights: Any = None,
        lora_rank: int | None = None,
        lora_alpha: float | None = None,
        quantization_config: Any = None,
        activity_regularizer: Any = None,
        input_length: Any = None,
        **kwargs: Any,
    ) -> None:
        reject_unsupported(
            "Embedding",
            activity_regularizer=activity_regularizer,
            lora_rank=lora_rank,
            lora_alpha=lora_alpha,
            quantization_config=quantization_config,
        )
        super().__init__(**kwargs)
        self.input_dim = _positive_int(input_dim, "input_dim")
        self.output_dim = _positive_int(output_dim, "output_dim")
        self.embeddings_initializer = initializers.get(embeddings_initializer)
        self.embeddings_regularizer = regularizers.get(embeddings_regularizer)
        self.embeddings_constraint = constraints.get(embeddings_constraint)
        self.mask_zero = check_bool(mask_zero, "mask_zero")
        self.supports_masking = self.mask_zero
        self.embeddings = None
        if weights is not None:
            self.build(None)
            self._build_shape = None
            if not (isinstance(weights, list) and len(weights) == 1):
                weights = [weights]
            self.set_weights(weights)

    def build(self, input_shape: Any = None) -> None:
        if self.embeddings is not None:
            return
        self.embeddings = self.add_weight(
            (self.input_dim, self.output_dim),
            self.embeddings_initializer,
            name="embeddings",
            regularizer=self.embeddings_regularizer,
            constraint=self.embeddings_constraint,
        )
        self.built = True

    def compute_output_spec(self, inputs: SymbolicTensor) -> SymbolicTensor:
        return SymbolicTensor(inputs.shape + (self.output_dim,), self.compute_dtype)

    def call(self, inputs: np.ndarray) -> np.ndarray:
        return self.vjp(inputs)[0]

    def vjp(self, inputs: np.ndarray) -> tuple[np.ndarray, Pullback]:
        indices = inputs
        if indices.dtype not in (np.int32, np.int64):
            indices = indices.astype(np.int32)
        bad = (indices < 0) | (indices >= self.input_dim)
        if bad.any():
            raise ValueError(
                f"Layer {self.name!r}: indices must be in [0, {self.input_dim}), received "
                f"{indices[bad].ravel()[:5].tolist()} (input_dim={self.input_dim})."
            )
        y = np.take(self.embeddings.value, indices, axis=0)
        trainable = [v.path for v in self.trainable_weights]

        def pullback(dy: np.ndarray) -> Gradients:
            # Each looked-up row receives its outputs' gradients; repeated ids add up.
            weights = {}
            if self.embeddings.path in trainable:
                table = np.zeros(self.embeddings.shape)
                np.add.at(table, indices, dy)
                weights[self.embeddings.path] = table
            return Gradients((None,), weights)  # none to the integer ids

        return y.astype(to_numpy_dtype(self.compute_dtype)), pullback

    def compute_mask(self, inputs: Any, previous_mask: Any = None) -> Any:
        if not self.mask_zero:
            return None
        if not isinstance(inputs, SymbolicTensor):
            inputs = to_array(inputs, f"Input of layer {self.name!r}")
        return ops.not_equal(inputs, 0)

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(
            {
                "input_dim": self.input_dim,
                "output_dim": self.output_dim,
                "embeddings_initializer": initializers.serialize(self.embeddings_initializer),
                "embeddings_regularizer": regularizers.serialize(self.embeddings_regularizer),
                "activity_regularizer": None,
                "embeddings_constraint": constraints.serialize(self.embeddings_constraint),
                "mask_zero": self.mask_zero,
                "quantization_config": None,
            }
        )
        return config
