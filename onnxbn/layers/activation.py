"""Activation functions with Keras names (`get` / `serialize`), and the `Activation` and `ReLU` layers.

The functions compute in float64 and return the input's float dtype (float32
for integer or bool inputs), so a layer can apply them to its float64
pre-activation and round once; `apply_with_vjp` gives that float64 result
with its pullback, which the layers' gradient rules share. How they become
ONNX lives in `onnxbn/lowering/activation.py`.
"""

from __future__ import annotations

from collections.abc import Callable
from numbers import Real
from typing import Any

import numpy as np

from onnxbn.dtypes import is_float, to_numpy_dtype
from onnxbn.gradients import Gradients, Pullback
from onnxbn.layers.layer import Layer
from onnxbn.operation_registry import register_layer
from onnxbn.tensor import SymbolicTensor

# Module strings Keras writes for a builtin activation serialized as a dict.
_FUNCTION_MODULES = ("keras.activations", "keras.src.activations.activations", "builtins")


def _float64(x: Any) -> tuple[np.ndarray, np.dtype]:
    """`x` in float64, and the dtype the result is returned in."""
    x = np.asarray(x)
    try:
        out = to_numpy_dtype(x.dtype) if is_float(x.dtype) else np.dtype(np.float32)
    except TypeError:
        raise TypeError(f"Activations need a numeric array, received dtype {x.dtype}.") from None
    return x.astype(np.float64), out


# `dy -> dx` of one activation call, both float64.
ActivationPullback = Callable[[np.ndarray], np.ndarray]


def _rounded(kernel: Callable[..., tuple], x: Any, **params: Any) -> np.ndarray:
    """`kernel`'s float64 result for `x`, returned in `x`'s float dtype."""
    x64, out = _float64(x)
    return kernel(x64, out, **params)[0].astype(out)


def _relu(
    x64: np.ndarray,
    dtype: np.dtype,
    negative_slope: float = 0.0,
    max_value: float | None = None,
    threshold: float = 0.0,
) -> tuple[np.ndarray, ActivationPullback]:
    # Keras casts the threshold to the data's dtype: float32 data equal to float32(0.1)
    # is not above a threshold of 0.1, though it is above float64(0.1).
    threshold = float(dtype.type(threshold))
    with np.errstate(invalid="ignore", over="ignore"):
        if threshold != 0:
            # Keras multiplies by the comparison, so NaN and -inf below it give NaN.
            y = x64 * (x64 > threshold)
        else:
            y = np.maximum(x64, 0.0)
        if max_value is not None:
            y = np.clip(y, 0.0, float(max_value))
        if negative_slope != 0:
            y = y - negative_slope * np.maximum(threshold - x64, 0.0)

    def pullback(dy: np.ndarray) -> np.ndarray:
        # At a kink, the slope of the piece the documented formula picks there:
        # saturated at x >= max_value, damped at x <= threshold.
        rising = x64 > threshold
        if max_value is not None:  # the clip to [0, max_value] passes only its inside
            rising &= (x64 > 0.0) & (x64 < float(max_value))
        # Multiplied by the 0/1 slope, as TensorFlow's ReluGrad: a NaN or inf
        # gradient stays NaN where the slope is 0.
        with np.errstate(invalid="ignore"):
            dx = dy * rising
            if negative_slope != 0:
                dx = dx + dy * (negative_slope * (x64 <= threshold))
        return dx

    return y, pullback


def relu(
    x: Any, negative_slope: float = 0.0, max_value: float | None = None, threshold: float = 0.0
) -> np.ndarray:
    """Keras's `relu`: `x` above `threshold` (else 0), clipped to `max_value`,
    minus `negative_slope * (threshold - x)` below the threshold.

    Args:
        x: input array.
        negative_slope: slope below the threshold.
        max_value: saturation value, or None.
        threshold: values at or below it are damped.

    Returns:
        An array of `x`'s shape and float dtype.
    """
    return _rounded(
        _relu, x, negative_slope=negative_slope, max_value=max_value, threshold=threshold
    )


def _sigmoid(x64: np.ndarray, dtype: np.dtype) -> tuple[np.ndarray, ActivationPullback]:
    e = np.exp(-np.abs(x64))
    y = np.where(x64 >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
    return y, lambda dy: dy * y * (1.0 - y)


def sigmoid(x: Any) -> np.ndarray:
    """`1 / (1 + exp(-x))`, evaluated without overflow."""
    return _rounded(_sigmoid, x)


def _tanh(x64: np.ndarray, dtype: np.dtype) -> tuple[np.ndarray, ActivationPullback]:
    y = np.tanh(x64)
    return y, lambda dy: dy * (1.0 - y * y)


def tanh(x: Any) -> np.ndarray:
    """Hyperbolic tangent."""
    return _rounded(_tanh, x)


def _linear(x64: np.ndarray, dtype: np.dtype) -> tuple[np.ndarray, ActivationPullback]:
    return x64, lambda dy: dy


def linear(x: Any) -> np.ndarray:
    """Identity (Keras's `linear`; what `activation=None` means)."""
    return _rounded(_linear, x)


def _softmax(
    x64: np.ndarray, dtype: np.dtype, axis: int = -1
) -> tuple[np.ndarray, ActivationPullback]:
    if x64.ndim == 0:
        raise ValueError("softmax needs an input of rank >= 1, received a scalar.")
    with np.errstate(invalid="ignore", over="ignore"):
        e = np.exp(x64 - np.max(x64, axis=axis, keepdims=True))
        y = e / np.sum(e, axis=axis, keepdims=True)
    return y, lambda dy: y * (dy - np.sum(dy * y, axis=axis, keepdims=True))


def softmax(x: Any, axis: int = -1) -> np.ndarray:
    """`exp(x) / sum(exp(x))` along `axis`, shifted by the maximum for stability."""
    return _rounded(_softmax, x, axis=axis)


ACTIVATIONS: dict[str, Callable[..., np.ndarray]] = {
    "linear": linear,
    "relu": relu,
    "sigmoid": sigmoid,
    "softmax": softmax,
    "tanh": tanh,
}

# Each function's float64 computation with its pullback; the functions above round it.
_KERNELS: dict[str, Callable[..., tuple[np.ndarray, ActivationPullback]]] = {
    "linear": _linear,
    "relu": _relu,
    "sigmoid": _sigmoid,
    "softmax": _softmax,
    "tanh": _tanh,
}


def apply_with_vjp(
    fn: Callable[..., np.ndarray], x: Any, **params: Any
) -> tuple[np.ndarray, ActivationPullback]:
    """`fn(x, **params)` before its final rounding, and the pullback of that computation.

    Args:
        fn: one of this module's activation functions.
        x: its input; as for `fn`, the dtype decides how constants are compared
            (the ReLU threshold).
        **params: `fn`'s keyword arguments (`relu`'s, `softmax`'s `axis`).

    Returns:
        `(y, pullback)`: `y` in float64 (`fn(x)` is `y` rounded to `x`'s float
        dtype) and `pullback(dy) -> dx`, float64 arrays of `x`'s shape.

    Raises:
        ValueError: `fn` is not one of this module's functions.
    """
    x64, out = _float64(x)
    return _KERNELS[serialize(fn)](x64, out, **params)


def _unknown(identifier: Any) -> ValueError:
    return ValueError(
        f"Could not interpret activation function identifier: {identifier!r}. "
        f"Known activations: {sorted(ACTIVATIONS)}."
    )


def get(identifier: Any) -> Callable[..., np.ndarray]:
    """The activation function for `identifier` (Keras's `activations.get`).

    Args:
        identifier: None (`linear`), a name (`"relu"`), Keras's dict form of a
            builtin function (`{"class_name": "function", "config": "relu", ...}`)
            or one of this module's functions.

    Returns:
        The function.

    Raises:
        ValueError: an unknown name, dict or callable (the message lists the
            known activations).
    """
    if identifier is None:
        return linear
    if isinstance(identifier, str):
        if identifier in ACTIVATIONS:
            return ACTIVATIONS[identifier]
        raise _unknown(identifier)
    if isinstance(identifier, dict):
        name = identifier.get("config")
        if (
            identifier.get("class_name") == "function"
            and identifier.get("module", "keras.activations") in _FUNCTION_MODULES
            and isinstance(name, str)
            and name in ACTIVATIONS
        ):
            return ACTIVATIONS[name]
        raise _unknown(identifier)
    if callable(identifier) and any(identifier is fn for fn in ACTIVATIONS.values()):
        return identifier
    raise _unknown(identifier)


def serialize(activation: Callable[..., np.ndarray]) -> str:
    """The Keras config form of a builtin activation: its name.

    Raises:
        ValueError: not one of this module's functions.
    """
    for name, fn in ACTIVATIONS.items():
        if fn is activation:
            return name
    raise _unknown(activation)


def _compute(
    layer: Layer, x: np.ndarray, fn: Callable[..., np.ndarray], **params: Any
) -> tuple[np.ndarray, Pullback]:
    """The layer's output and pullback for `fn(x, **params)`."""
    # The function sees the data in the compute dtype, where Keras compares it with constants.
    dtype = to_numpy_dtype(layer.compute_dtype)
    y, pullback = apply_with_vjp(fn, np.asarray(x, dtype=dtype), **params)
    return y.astype(dtype), lambda dy: Gradients((pullback(dy),))


@register_layer("keras.layers")
class Activation(Layer):
    """Applies an activation function to its input (Keras's `Activation`).

    Args:
        activation: a name (`"relu"`, `"sigmoid"`, `"tanh"`, `"linear"`,
            `"softmax"`) or one of `onnxbn.layers.activation`'s functions.
        **kwargs: base layer arguments (`name`, `dtype`, `trainable`).

    Call arguments:
        inputs: array of any rank.

    Returns:
        `activation(inputs)`, same shape, in the compute dtype (integer inputs
        are computed in float). A mask on the input passes through.

    Raises:
        ValueError: an unknown activation (the message lists the known ones).
    """

    def __init__(self, activation: Any, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.activation = get(activation)
        self.supports_masking = True
        self.built = True  # no weights: Keras builds it at construction

    def call(self, inputs: np.ndarray) -> np.ndarray:
        return self.vjp(inputs)[0]

    def vjp(self, inputs: np.ndarray) -> tuple[np.ndarray, Pullback]:
        return _compute(self, inputs, self.activation)

    def compute_output_spec(self, inputs: SymbolicTensor) -> SymbolicTensor:
        return SymbolicTensor(inputs.shape, self.compute_dtype)

    def get_config(self) -> dict:
        config = super().get_config()
        config["activation"] = serialize(self.activation)
        return config


def _check_real(value: Any, what: str, allow_none: bool = False) -> Any:
    if value is None and allow_none:
        return None
    if value is None or isinstance(value, (bool, np.bool_)) or not isinstance(value, Real):
        raise TypeError(f"{what} of a ReLU layer must be a number, received {value!r}.")
    value = value.item() if isinstance(value, np.generic) else value
    if value != value:
        raise ValueError(f"{what} of a ReLU layer must not be NaN, received {value!r}.")
    if value < 0:
        raise ValueError(
            f"{what} of a ReLU layer cannot be a negative value. Received: {what}={value}"
        )
    return value


@register_layer("keras.layers")
class ReLU(Layer):
    """Rectified linear unit layer (Keras's `ReLU`).

    `f(x) = max_value` for `x >= max_value`, `x` for `threshold < x <
    max_value`, and `negative_slope * (x - threshold)` otherwise.

    Args:
        max_value: float >= 0 or None (unbounded).
        negative_slope: float >= 0, slope below the threshold.
        threshold: float >= 0.
        **kwargs: base layer arguments (`name`, `dtype`, `trainable`).

    Call arguments:
        inputs: array of any rank.

    Returns:
        Same shape as `inputs`, in the compute dtype. A mask passes through.

    Raises:
        TypeError: a non-numeric argument.
        ValueError: a negative or NaN argument.
    """

    def __init__(
        self,
        max_value: float | None = None,
        negative_slope: float = 0.0,
        threshold: float = 0.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.max_value = _check_real(max_value, "max_value", allow_none=True)
        self.negative_slope = _check_real(negative_slope, "negative_slope")
        self.threshold = _check_real(threshold, "threshold")
        self.supports_masking = True
        self.built = True

    def call(self, inputs: np.ndarray) -> np.ndarray:
        return self.vjp(inputs)[0]

    def vjp(self, inputs: np.ndarray) -> tuple[np.ndarray, Pullback]:
        return _compute(
            self,
            inputs,
            relu,
            negative_slope=self.negative_slope,
            max_value=self.max_value,
            threshold=self.threshold,
        )

    def compute_output_spec(self, inputs: SymbolicTensor) -> SymbolicTensor:
        return SymbolicTensor(inputs.shape, self.compute_dtype)

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(
            {
                "max_value": self.max_value,
                "negative_slope": self.negative_slope,
                "threshold": self.threshold,
            }
        )
        return config
