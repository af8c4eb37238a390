"""GlobalAveragePooling1D / 2D: the mean over the spatial axes (Keras 3 semantics).

The 1D layer takes Keras's mask (masked steps are left out of the mean) and
consumes it: its output carries no mask. How these become ONNX lives in
`onnxbn/lowering/global_average_pooling.py`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from onnxbn.dtypes import to_numpy_dtype
from onnxbn.gradients import Gradients, Pullback
from onnxbn.layers.arguments import check_bool
from onnxbn.layers.conv import standardize_data_format
from onnxbn.layers.input_spec import InputSpec
from onnxbn.layers.layer import Layer, to_array
from onnxbn.operation_registry import register_layer
from onnxbn.tensor import SymbolicTensor


class BaseGlobalPooling(Layer):
    """Shared shape rule and config of the global pooling layers.

    Args:
        pool_dimensions: number of spatial axes.
        data_format: `"channels_last"` (default) or `"channels_first"`.
        keepdims: keep the spatial axes with size 1.
        **kwargs: base layer arguments (`name`, `dtype`, `trainable`).
    """

    def __init__(
        self,
        pool_dimensions: int,
        data_format: str | None = None,
        keepdims: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.data_format = standardize_data_format(data_format)
        self.keepdims = check_bool(keepdims, "keepdims")
        self.input_spec = InputSpec(ndim=pool_dimensions + 2)
        self.built = True  # no weights: Keras builds it at construction

    @property
    def spatial_axes(self) -> tuple[int, ...]:
        ndim = self.input_spec.ndim
        if self.data_format == "channels_last":
            return tuple(range(1, ndim - 1))
        return tuple(range(2, ndim))

    def compute_output_shape(self, input_shape: tuple) -> tuple:
        spatial = len(input_shape) - 2
        if self.data_format == "channels_last":
            if self.keepdims:
                return (input_shape[0],) + (1,) * spatial + (input_shape[-1],)
            return (input_shape[0], input_shape[-1])
        if self.keepdims:
            return (input_shape[0], input_shape[1]) + (1,) * spatial
        return (input_shape[0], input_shape[1])

    def get_config(self) -> dict:
        config = super().get_config()
        config.update({"data_format": self.data_format, "keepdims": self.keepdims})
        return config


@register_layer("keras.layers")
class GlobalAveragePooling1D(BaseGlobalPooling):
    """Global average pooling over the steps of temporal data (Keras's layer).

    Args:
        data_format: `"channels_last"` (`(batch, steps, features)`, default) or
            `"channels_first"` (`(batch, features, steps)`).
        keepdims: keep the steps axis with length 1.
        **kwargs: base layer arguments (`name`, `dtype`, `trainable`).

    Call arguments:
        inputs: a 3D array.
        mask: optional `(batch, steps)` array; non-zero steps are averaged,
            the others left out (`sum(where(mask, x, 0)) / count(mask)`; a row
            with no valid step gives NaN, as in Keras). Filled from the
            input's implicit mask in a graph.

    Returns:
        `(batch, features)` (or with the steps axis kept), compute dtype. The
        output carries no mask.

    Raises:
        ValueError: an input that is not 3D, a mask of the wrong shape.
    """

    def __init__(self, data_format: str | None = None, keepdims: bool = False, **kwargs: Any):
        super().__init__(1, data_format=data_format, keepdims=keepdims, **kwargs)
        self.supports_masking = True

    def _check_mask(self, mask_shape: tuple, input_shape: tuple) -> None:
        steps = input_shape[1] if self.data_format == "channels_last" else input_shape[2]
        expected = (input_shape[0], steps)
        if len(mask_shape) != 2 or any(
            m is not None and e is not None and m != e for m, e in zip(mask_shape, expected)
        ):
            raise ValueError(
                f"Layer {self.name!r}: the mask must have shape (batch, steps) = {expected}, "
                f"received a mask of shape {tuple(mask_shape)}."
            )

    def compute_output_spec(self, inputs: SymbolicTensor, mask: Any = None) -> SymbolicTensor:
        if mask is not None:
            if not isinstance(mask, SymbolicTensor):
                raise TypeError(
                    f"Layer {self.name!r}: in a symbolic call the mask must be a "
                    f"SymbolicTensor, received {type(mask).__name__}."
                )
            self._check_mask(mask.shape, inputs.shape)
        return SymbolicTensor(self.compute_output_shape(inputs.shape), self.compute_dtype)

    def call(self, inputs: np.ndarray, mask: Any = None) -> np.ndarray:
        return self.vjp(inputs, mask=mask)[0]

    def vjp(self, inputs: np.ndarray, mask: Any = None) -> tuple[np.ndarray, Pullback]:
        axis = self.spatial_axes[0]
        x = inputs.astype(np.float64)
        if mask is None:
            count = x.shape[axis]
            if count == 0:  # no steps: NaN as Keras's mean gives, without a warning
                y = np.full(self.compute_output_shape(x.shape), np.nan)
            else:
                y = x.mean(axis=axis, keepdims=self.keepdims)
            valid = True
        else:
            mask = to_array(mask, f"Mask of layer {self.name!r}")
            self._check_mask(mask.shape, x.shape)
            valid = np.expand_dims(mask.astype(bool), 2 if axis == 1 else 1)
            total = np.where(valid, x, 0.0).sum(axis=axis, keepdims=self.keepdims)
            count = np.broadcast_to(valid, x.shape).sum(axis=axis, keepdims=True)
            with np.errstate(invalid="ignore", divide="ignore"):
                y = total / (count if self.keepdims else count.squeeze(axis))

        def pullback(dy: np.ndarray) -> Gradients:
            # Each valid step receives its row's gradient over the row's count.
            dy = dy if self.keepdims else np.expand_dims(dy, axis)
            with np.errstate(invalid="ignore", divide="ignore"):
                dx = np.where(valid, np.broadcast_to(dy / count, x.shape), 0.0)
            return Gradients((dx,))

        return y.astype(to_numpy_dtype(self.compute_dtype)), pullback

    def compute_mask(self, inputs: Any, previous_mask: Any) -> None:
        return None


@register_layer("keras.layers")
class GlobalAveragePooling2D(BaseGlobalPooling):
    """Global average pooling over the two spatial axes (Keras's layer).

    Args:
        data_format: `"channels_last"` (`(batch, rows, cols, channels)`,
            default) or `"channels_first"` (`(batch, channels, rows, cols)`).
        keepdims: keep the spatial axes with size 1.
        **kwargs: base layer arguments (`name`, `dtype`, `trainable`).

    Call arguments:
        inputs: a 4D array.

    Returns:
        `(batch, channels)` (or with spatial axes kept), compute dtype. The
        layer does not support masking (a mask on its input is dropped).

    Raises:
        ValueError: an input that is not 4D.
    """

    def __init__(self, data_format: str | None = None, keepdims: bool = False, **kwargs: Any):
        super().__init__(2, data_format=data_format, keepdims=keepdims, **kwargs)

    def compute_output_spec(self, inputs: SymbolicTensor) -> SymbolicTensor:
        return SymbolicTensor(self.compute_output_shape(inputs.shape), self.compute_dtype)

    def call(self, inputs: np.ndarray) -> np.ndarray:
        return self.vjp(inputs)[0]

    def vjp(self, inputs: np.ndarray) -> tuple[np.ndarray, Pullback]:
        x = inputs.astype(np.float64)
        axes = self.spatial_axes
        count = int(np.prod([x.shape[a] for a in axes]))
        if count:
            y = x.mean(axis=axes, keepdims=self.keepdims)
        else:
            y = np.full(self.compute_output_shape(x.shape), np.nan)

        def pullback(dy: np.ndarray) -> Gradients:
            dy = dy if self.keepdims else np.expand_dims(dy, axes)
            return Gradients((np.broadcast_to(dy / max(count, 1), x.shape).copy(),))

        return y.astype(to_numpy_dtype(self.compute_dtype)), pullback
