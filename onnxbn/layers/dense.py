"""Dense: `activation(inputs @ kernel + bias)` on the last axis (Keras 3 semantics).

How it becomes ONNX lives in `onnxbn/lowering/dense.py`. This module also
creates the kernel and bias that Dense and the convolutions share.
`Dense.vjp` is the call with its pullback (`onnxbn/gradients.py`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from onnxbn import constraints, initializers, regularizers
from onnxbn.dtypes import to_numpy_dtype
from onnxbn.gradients import Gradients, Pullback
from onnxbn.layers import activation as activations
from onnxbn.layers.arguments import check_bool, check_min_ndim, reject_unsupported
from onnxbn.layers.input_spec import InputSpec
from onnxbn.layers.layer import Layer
from onnxbn.operation_registry import register_layer
from onnxbn.tensor import SymbolicTensor


def add_kernel_and_bias(layer: Any, kernel_shape: tuple[int, ...]) -> None:
    """Creates `layer.kernel` and, with `use_bias`, `layer.bias` (size: the last kernel dim).

    Shared by Dense and the convolutions, which carry the same kernel/bias
    initializers, regularizers and constraints in Keras.
    """
    layer.kernel = layer.add_weight(
        tuple(kernel_shape),
        layer.kernel_initializer,
        name="kernel",
        regularizer=layer.kernel_regularizer,
        constraint=layer.kernel_constraint,
    )
    if layer.use_bias:
        layer.bias = layer.add_weight(
            (kernel_shape[-1],),
            layer.bias_initializer,
            name="bias",
            regularizer=layer.bias_regularizer,
            constraint=layer.bias_constraint,
        )


def trainable_paths(layer: Layer) -> list[str]:
    """Paths of the weights `layer` computes gradients for: none once frozen."""
    return [v.path for v in layer.trainable_weights]


@register_layer("keras.layers")
class Dense(Layer):
    """Densely-connected layer (Keras's `Dense`).

    Computes `activation(dot(inputs, kernel) + bias)` along the last axis of
    an input of any rank >= 2; `kernel` has shape `(input_dim, units)`.
    Computed in float64 and returned in the compute dtype.

    Args:
        units: positive int, the size of the last output axis.
        activation: activation name or function (None means `"linear"`).
        use_bias: whether to add a `bias` vector.
        kernel_initializer, bias_initializer: initializers.
        kernel_regularizer, bias_regularizer: optional regularizers.
        kernel_constraint, bias_constraint: optional constraints.
        activity_regularizer, lora_rank, lora_alpha, quantization_config:
            Keras arguments accepted only as None.
        **kwargs: base layer arguments (`name`, `dtype`, `trainable`).

    Call arguments:
        inputs: array of shape `(batch, ..., input_dim)`.

    Returns:
        Array of shape `(batch, ..., units)`. A mask on the input passes
        through unchanged (Keras's `supports_masking`).

    Raises:
        ValueError: `units` not a positive int, an input of rank < 2, an
            undefined or mismatched last axis, an unknown activation.
        NotImplementedError: a non-None activity regularizer, LoRA or
            quantization argument.
    """

    def __init__(
        self,
        units: int,
        activation: Any = None,
        use_bias: bool = True,
        kernel_initializer: Any = "glorot_uniform",
        bias_initializer: Any = "zeros",
        kernel_regularizer: Any = None,
        bias_regularizer: Any = None,
        activity_regularizer: Any = None,
        kernel_constraint: Any = None,
        bias_constraint: Any = None,
        lora_rank: int | None = None,
        lora_alpha: float | None = None,
        quantization_config: Any = None,
        **kwargs: Any,
    ) -> None:
        if (
            isinstance(units, (bool, np.bool_))
            or not isinstance(units, (int, np.integer))
            or units <= 0
        ):
            raise ValueError(
                "Received an invalid value for `units`, expected a positive integer. "
                f"Received: units={units}"
            )
        reject_unsupported(
            "Dense",
            activity_regularizer=activity_regularizer,
            lora_rank=lora_rank,
            lora_alpha=lora_alpha,
            quantization_config=quantization_config,
        )
        super().__init__(**kwargs)
        self.units = int(units)
        self.activation = activations.get(activation)
        self.use_bias = check_bool(use_bias, "use_bias")
        self.kernel_initializer = initializers.get(kernel_initializer)
        self.bias_initializer = initializers.get(bias_initializer)
        self.kernel_regularizer = regularizers.get(kernel_regularizer)
        self.bias_regularizer = regularizers.get(bias_regularizer)
        self.kernel_constraint = constraints.get(kernel_constraint)
        self.bias_constraint = constraints.get(bias_constraint)
        self.supports_masking = True
        self.kernel = self.bias = None

    def build(self, input_shape: tuple[int | None, ...]) -> None:
        check_min_ndim(self, input_shape, 2)
        input_dim = input_shape[-1]
        if input_dim is None:
            raise ValueError(
                f"Layer {self.name!r}: the last axis of the input shape {tuple(input_shape)} "
                "must be defined to create the Dense kernel."
            )
        add_kernel_and_bias(self, (input_dim, self.units))
        self.input_spec = InputSpec(axes={-1: input_dim})
        self.built = True

    def compute_output_spec(self, inputs: SymbolicTensor) -> SymbolicTensor:
        check_min_ndim(self, inputs.shape, 2)
        return SymbolicTensor(inputs.shape[:-1] + (self.units,), self.compute_dtype)

    def call(self, inputs: np.ndarray) -> np.ndarray:
        return self.vjp(inputs)[0]

    def vjp(self, inputs: np.ndarray) -> tuple[np.ndarray, Pullback]:
        check_min_ndim(self, inputs.shape, 2)
        x = inputs.astype(np.float64)
        kernel = self.kernel.value.astype(np.float64)
        z = np.tensordot(x, kernel, axes=([-1], [0]))
        if self.bias is not None:
            z = z + self.bias.value.astype(np.float64)
        y, activation_pullback = activations.apply_with_vjp(self.activation, z)
        trainable = trainable_paths(self)

        def pullback(dy: np.ndarray) -> Gradients:
            dz = activation_pullback(dy)
            axes = tuple(range(dz.ndim - 1))  # all but the units axis
            weights = {}
            if self.kernel.path in trainable:
                weights[self.kernel.path] = np.tensordot(x, dz, axes=(axes, axes))
            if self.bias is not None and self.bias.path in trainable:
                weights[self.bias.path] = dz.sum(axis=axes)
            return Gradients((np.tensordot(dz, kernel, axes=([-1], [1])),), weights)

        return y.astype(to_numpy_dtype(self.compute_dtype)), pullback

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(
            {
                "units": self.units,
                "activation": activations.serialize(self.activation),
                "use_bias": self.use_bias,
                "kernel_initializer": initializers.serialize(self.kernel_initializer),
                "bias_initializer": initializers.serialize(self.bias_initializer),
                "kernel_regularizer": regularizers.serialize(self.kernel_regularizer),
                "bias_regularizer": regularizers.serialize(self.bias_regularizer),
                "kernel_constraint": constraints.serialize(self.kernel_constraint),
                "bias_constraint": constraints.serialize(self.bias_constraint),
                "quantization_config": None,
            }
        )
        return config
