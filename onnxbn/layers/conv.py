"""Conv1D and Conv2D: Keras 3 convolution semantics on NumPy, sharing `BaseConv`.

The kernel has Keras's layout `kernel_size + (input_channels // groups, filters)`
and the weights are `kernel` then `bias`. `vjp` is the call with its pullback
(`onnxbn/gradients.py`). How a convolution becomes ONNX lives in
`onnxbn/lowering/conv.py`.
"""

from __future__ import annotations

import inspect
from typing import Any

import numpy as np

from onnxbn import constraints, initializers, regularizers
from onnxbn.dtypes import to_numpy_dtype
from onnxbn.gradients import Gradients, Pullback
from onnxbn.layers import activation as activations
from onnxbn.layers.arguments import check_bool, check_min_ndim, reject_unsupported
from onnxbn.layers.conv_arithmetic import (
    conv_output_size,
    conv_padding,  # noqa: F401 - re-exported
    convolve_vjp,
)
from onnxbn.layers.dense import add_kernel_and_bias, trainable_paths
from onnxbn.layers.input_spec import InputSpec
from onnxbn.layers.layer import BASE_CONFIG_KEYS, Layer
from onnxbn.operation_registry import register_layer
from onnxbn.tensor import SymbolicTensor


def standardize_tuple(value: Any, n: int, name: str) -> tuple[int, ...]:
    """Keras's `standardize_tuple`: an int or `n` ints, each > 0."""
    error = f"The `{name}` argument must be a tuple of {n} integers. Received {name}={value}"
    if isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)):
        values = (int(value),) * n
    else:
        try:
            values = tuple(value)
        except TypeError:
            raise ValueError(error) from None
        if len(values) != n or not all(
            isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_)) for v in values
        ):
            raise ValueError(error)
        values = tuple(int(v) for v in values)
    bad = {v for v in values if v <= 0}
    if bad:
        raise ValueError(f"{error}, including values {bad} that do not satisfy `value > 0`")
    return values


def standardize_padding(value: Any, allow_causal: bool) -> str:
    allowed = {"valid", "same", "causal"} if allow_causal else {"valid", "same"}
    padding = value.lower() if isinstance(value, str) else value
    if padding not in allowed:
        raise ValueError(
            f"The `padding` argument must be one of {sorted(allowed)}. Received: {value!r}"
        )
    return padding


def standardize_data_format(value: Any) -> str:
    """Keras's `standardize_data_format` (None means `"channels_last"`)."""
    if value is None:
        return "channels_last"
    data_format = str(value).lower()
    if data_format not in ("channels_first", "channels_last"):
        raise ValueError(
            "The `data_format` argument must be one of {'channels_first', 'channels_last'}. "
            f"Received: data_format={data_format}"
        )
    return data_format


class BaseConv(Layer):
    """N-D convolution (cross-correlation) layer, the base of `Conv1D` and `Conv2D`.

    Args:
        rank: number of spatial axes.
        filters: positive int, output channels.
        kernel_size: int or `rank` ints.
        strides: int or `rank` ints; `> 1` excludes `dilation_rate > 1`.
        padding: `"valid"`, `"same"` (and `"causal"` for rank 1), any case.
        data_format: `"channels_last"` (default) or `"channels_first"`.
        dilation_rate: int or `rank` ints.
        groups: positive int dividing `filters` and the input channels.
        activation: activation name or function (None means `"linear"`).
        use_bias: whether to add a `bias` vector.
        kernel_initializer, bias_initializer: initializers.
        kernel_regularizer, bias_regularizer: optional regularizers.
        kernel_constraint, bias_constraint: optional constraints.
        activity_regularizer, lora_rank, lora_alpha, dora_rank, dora_alpha:
            Keras arguments accepted only as None.
        **kwargs: base layer arguments (`name`, `dtype`, `trainable`).

    Raises:
        ValueError: Keras's errors for bad `filters`, `groups`, `kernel_size`,
            `strides`, `dilation_rate`, `padding` or `data_format`.
        NotImplementedError: a non-None activity regularizer, LoRA or DoRA rank.
    """

    def __init__(
        self,
        rank: int,
        filters: int,
        kernel_size: Any,
        strides: Any = 1,
        padding: str = "valid",
        data_format: str | None = None,
        dilation_rate: Any = 1,
        groups: int = 1,
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
        dora_rank: int | None = None,
        dora_alpha: float | None = None,
        **kwargs: Any,
    ) -> None:
        owner = type(self).__name__
        reject_unsupported(
            owner,
            activity_regularizer=activity_regularizer,
            lora_rank=lora_rank,
            lora_alpha=lora_alpha,
            dora_rank=dora_rank,
            dora_alpha=dora_alpha,
        )
        super().__init__(**kwargs)
        self.rank = rank
        for value, name in ((filters, "filters"), (groups, "groups")):
            if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
                raise TypeError(f"Expected `{name}` to be an int, received {name}={value!r}.")
        self.filters, self.groups = int(filters), int(groups)
        self.kernel_size = standardize_tuple(kernel_size, rank, "kernel_size")
        self.strides = standardize_tuple(strides, rank, "strides")
        self.dilation_rate = standardize_tuple(dilation_rate, rank, "dilation_rate")
        self.padding = standardize_padding(padding, allow_causal=rank == 1)
        self.data_format = standardize_data_format(data_format)
        self.activation = activations.get(activation)
        self.use_bias = check_bool(use_bias, "use_bias")
        self.kernel_initializer = initializers.get(kernel_initializer)
        self.bias_initializer = initializers.get(bias_initializer)
        self.kernel_regularizer = regularizers.get(kernel_regularizer)
        self.bias_regularizer = regularizers.get(bias_regularizer)
        self.kernel_constraint = constraints.get(kernel_constraint)
        self.bias_constraint = constraints.get(bias_constraint)
        if self.filters <= 0:
            raise ValueError(
                "Invalid value for argument `filters`. Expected a strictly positive value. "
                f"Received filters={self.filters}."
            )
        if self.groups <= 0:
            raise ValueError(
                f"The number of groups must be a positive integer. Received: groups={self.groups}."
            )
        if self.filters % self.groups != 0:
            raise ValueError(
                "The number of filters must be evenly divisible by the number of groups. "
                f"Received: groups={self.groups}, filters={self.filters}."
            )
        if max(self.strides) > 1 and max(self.dilation_rate) > 1:
            raise ValueError(
                "`strides > 1` not supported in conjunction with `dilation_rate > 1`. "
                f"Received: strides={self.strides} and dilation_rate={self.dilation_rate}"
            )
        self.kernel = self.bias = None

    @classmethod
    def from_config(cls, config: dict) -> BaseConv:
        from onnxbn.serialization import check_config_keys, require_dict

        require_dict(config, f"{cls.__name__} config")
        params = inspect.signature(BaseConv.__init__).parameters
        allowed = [p for p in params if p not in ("self", "rank", "kwargs")]
        check_config_keys(config, allowed + list(BASE_CONFIG_KEYS), cls.__name__)
        return cls(**config)

    @property
    def channel_axis(self) -> int:
        return -1 if self.data_format == "channels_last" else 1

    def _check_rank(self, shape: tuple) -> None:
        check_min_ndim(self, shape, self.rank + 2)
        if len(shape) != self.rank + 2:
            kernel_shape = self.kernel_size + (shape[self.channel_axis], self.filters)
            raise ValueError(
                "Kernel shape must have the same length as input, but received kernel of "
                f"shape {kernel_shape} and input of shape {tuple(shape)}."
            )

    def compute_output_shape(self, input_shape: tuple) -> tuple:
        """Keras's `compute_conv_output_shape` (None dims stay None)."""
        self._check_rank(input_shape)
        if self.data_format == "channels_last":
            spatial = input_shape[1:-1]
        else:
            spatial = input_shape[2:]
        out = tuple(
            conv_output_size(n, k, s, d, self.padding)
            for n, k, s, d in zip(spatial, self.kernel_size, self.strides, self.dilation_rate)
        )
        if any(n is not None and n < 0 for n in out):
            raise ValueError(
                f"Computed output size would be negative. Received `inputs shape="
                f"{tuple(input_shape)}`, `kernel shape={self.kernel_size}`, "
                f"`dilation_rate={self.dilation_rate}`."
            )
        if self.data_format == "channels_last":
            return (input_shape[0],) + out + (self.filters,)
        return (input_shape[0], self.filters) + out

    def build(self, input_shape: tuple[int | None, ...]) -> None:
        self._check_rank(input_shape)
        channels = input_shape[self.channel_axis]
        if channels is None:
            raise ValueError(
                f"Layer {self.name!r}: the channel axis of input shape {tuple(input_shape)} "
                "must be defined to create the convolution kernel."
            )
        if channels % self.groups != 0:
            raise ValueError(
                "The number of input channels must be evenly divisible by the number of groups. "
                f"Received groups={self.groups}, but the input has {channels} channels "
                f"(full input shape is {tuple(input_shape)})."
            )
        self.compute_output_shape(input_shape)
        add_kernel_and_bias(self, self.kernel_size + (channels // self.groups, self.filters))
        self.input_spec = InputSpec(axes={self.channel_axis: channels})
        self.built = True

    def compute_output_spec(self, inputs: SymbolicTensor) -> SymbolicTensor:
        return SymbolicTensor(self.compute_output_shape(inputs.shape), self.compute_dtype)

    def call(self, inputs: np.ndarray) -> np.ndarray:
        return self.vjp(inputs)[0]

    def vjp(self, inputs: np.ndarray) -> tuple[np.ndarray, Pullback]:
        self.compute_output_shape(inputs.shape)  # Keras's checks of the input shape
        channels_first = self.data_format == "channels_first"
        x = inputs.astype(np.float64)
        if channels_first:
            x = np.moveaxis(x, 1, -1)
        z, conv_pullback = convolve_vjp(
            x,
            self.kernel.value.astype(np.float64),
            strides=self.strides,
            dilation_rate=self.dilation_rate,
            padding=self.padding,
            groups=self.groups,
        )
        if self.bias is not None:
            z = z + self.bias.value.astype(np.float64)
        if channels_first:
            z = np.moveaxis(z, -1, 1)
        # Keras applies the activation in the layer's data format (softmax: last axis).
        y, activation_pullback = activations.apply_with_vjp(self.activation, z)
        trainable = trainable_paths(self)

        def pullback(dy: np.ndarray) -> Gradients:
            dz = activation_pullback(dy)
            if channels_first:
                dz = np.moveaxis(dz, 1, -1)
            dx, dkernel = conv_pullback(dz)
            if channels_first:
                dx = np.moveaxis(dx, -1, 1)
            weights = {}
            if self.kernel.path in trainable:
                weights[self.kernel.path] = dkernel
            if self.bias is not None and self.bias.path in trainable:
                weights[self.bias.path] = dz.reshape(-1, self.filters).sum(axis=0)
            return Gradients((dx,), weights)

        return y.astype(to_numpy_dtype(self.compute_dtype)), pullback

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(
            {
                "filters": self.filters,
                # Lists: the form these tuples take in a JSON config.
                "kernel_size": list(self.kernel_size),
                "strides": list(self.strides),
                "padding": self.padding,
                "data_format": self.data_format,
                "dilation_rate": list(self.dilation_rate),
                "groups": self.groups,
                "activation": activations.serialize(self.activation),
                "use_bias": self.use_bias,
                "kernel_initializer": initializers.serialize(self.kernel_initializer),
                "bias_initializer": initializers.serialize(self.bias_initializer),
                "kernel_regularizer": regularizers.serialize(self.kernel_regularizer),
                "bias_regularizer": regularizers.serialize(self.bias_regularizer),
                "activity_regularizer": None,
                "kernel_constraint": constraints.serialize(self.kernel_constraint),
                "bias_constraint": constraints.serialize(self.bias_constraint),
            }
        )
        return config


@register_layer("keras.layers")
class Conv1D(BaseConv):
    """1D convolution over `(batch, steps, channels)` (Keras's `Conv1D`).

    Args:
        filters, kernel_size, strides, padding, data_format, dilation_rate,
            groups, activation, use_bias, initializers, regularizers,
            constraints: see `BaseConv`; `padding="causal"` pads
            `dilation_rate * (kernel_size - 1)` steps on the left only.
        **kwargs: base layer arguments (`name`, `dtype`, `trainable`).

    Call arguments:
        inputs: `(batch, steps, channels)` (`(batch, channels, steps)` for
            `channels_first`).

    Returns:
        `activation(conv1d(inputs, kernel) + bias)`, shape `(batch, new_steps,
        filters)` (or channels first). The layer does not support masking: a
        mask on its input is dropped, as in Keras.
    """

    def __init__(self, filters: int, kernel_size: Any, **kwargs: Any) -> None:
        super().__init__(1, filters, kernel_size, **kwargs)


@register_layer("keras.layers")
class Conv2D(BaseConv):
    """2D convolution over images (Keras's `Conv2D`).

    Args:
        filters, kernel_size, strides, padding, data_format, dilation_rate,
            groups, activation, use_bias, initializers, regularizers,
            constraints: see `BaseConv`.
        **kwargs: base layer arguments (`name`, `dtype`, `trainable`).

    Call arguments:
        inputs: `(batch, height, width, channels)` (`(batch, channels, height,
            width)` for `channels_first`).

    Returns:
        `activation(conv2d(inputs, kernel) + bias)`, shape `(batch, new_height,
        new_width, filters)` (or channels first). Masks are dropped.
    """

    def __init__(self, filters: int, kernel_size: Any, **kwargs: Any) -> None:
        super().__init__(2, filters, kernel_size, **kwargs)
