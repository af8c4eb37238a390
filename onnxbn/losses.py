"""The concrete Keras 3 losses in NumPy (same names, config keys and math) and `get`/`serialize`.

Each loss follows Keras 3.15 (`keras/src/losses/losses.py` and the NumPy
backend's cross-entropies) in float64; `onnxbn/loss.py` holds the base class
(rank alignment, weights, mask and reduction). The per-sample losses `values`
(the last axis reduced): mean squared or absolute error; binary cross-entropy
averaged over the last axis; categorical cross-entropy, with probabilities
divided by their sum; probabilities are clipped to `[1e-7, 1 - 1e-7]`
(`keras.backend.epsilon()`), logits go through `sigmoid` (binary, then clipped
as the NumPy backend does) or `log_softmax`.

`value_and_gradient` also returns d(loss)/d(y_pred), the gradient of this very
computation: zero where a probability was clipped, `sign(0) = 0` for the
absolute error.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from onnxbn.gradients import sum_to_shape

# `name as name`: re-exported, importable from this module as before.
from onnxbn.loss import EPSILON as EPSILON
from onnxbn.loss import (
    REDUCTION,
    Backward,
    Loss,
    broadcast_shape,
    clip,
    require_bool,
    require_last_axis,
    require_rank,
    require_same_shape,
)
from onnxbn.loss import squeeze_or_expand_to_same_rank as squeeze_or_expand_to_same_rank
from onnxbn.registry import Registry
from onnxbn.serialization import (
    deserialize_object,
    get_object,
    require_number,
    serialize_object,
    short_repr,
)

LOSSES: Registry[str, type] = Registry("loss")
MODULE = "keras.losses"
MODULES = frozenset({MODULE, "keras.src.losses", "keras.src.losses.losses"})


@LOSSES.register("MeanSquaredError")
class MeanSquaredError(Loss):
    """`mean(square(y_true - y_pred), axis=-1)`, averaged over the batch.

    Args: see `Loss` (`name` defaults to `"mean_squared_error"`).
    """

    def __init__(
        self, reduction: str | None = REDUCTION, name: str = "mean_squared_error", dtype: Any = None
    ) -> None:
        super().__init__(name=name, reduction=reduction, dtype=dtype)

    def call(self, y_true: np.ndarray, y_pred: np.ndarray) -> tuple[np.ndarray, Backward]:
        require_rank(y_pred, self.name)
        shape = broadcast_shape(y_true, y_pred, f"{self.name} (y_true and y_pred)")
        diff = np.broadcast_to(y_pred - y_true, shape)

        def backward(dvalues: np.ndarray) -> np.ndarray:
            return sum_to_shape(dvalues[..., None] * 2.0 * diff / shape[-1], y_pred.shape)

        return np.mean(np.square(diff), axis=-1), backward


@LOSSES.register("MeanAbsoluteError")
class MeanAbsoluteError(Loss):
    """`mean(abs(y_true - y_pred), axis=-1)`, averaged over the batch.

    Args: see `Loss` (`name` defaults to `"mean_absolute_error"`).
    """

    def __init__(
        self,
        reduction: str | None = REDUCTION,
        name: str = "mean_absolute_error",
        dtype: Any = None,
    ) -> None:
        super().__init__(name=name, reduction=reduction, dtype=dtype)

    def call(self, y_true: np.ndarray, y_pred: np.ndarray) -> tuple[np.ndarray, Backward]:
        require_rank(y_pred, self.name)
        shape = broadcast_shape(y_true, y_pred, f"{self.name} (y_true and y_pred)")
        diff = np.broadcast_to(y_pred - y_true, shape)

        def backward(dvalues: np.ndarray) -> np.ndarray:
            return sum_to_shape(dvalues[..., None] * np.sign(diff) / shape[-1], y_pred.shape)

        return np.mean(np.abs(diff), axis=-1), backward


class _Crossentropy(Loss):
    """Shared arguments of the binary and categorical cross-entropies."""

    def __init__(
        self,
        from_logits: bool,
        label_smoothing: float,
        axis: int,
        reduction: str | None,
        name: str,
        dtype: Any,
    ) -> None:
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self.from_logits = require_bool(from_logits, "from_logits")
        self.label_smoothing = require_number(label_smoothing, "label_smoothing", minimum=0)
        if self.label_smoothing > 1:
            raise ValueError(
                f"Expected `label_smoothing` in [0, 1]. Received: label_smoothing={label_smoothing}."
            )
        self.axis = require_last_axis(axis)

    def get_config(self) -> dict:
        return {
            **super().get_config(),
            "from_logits": self.from_logits,
            "label_smoothing": self.label_smoothing,
            "axis": self.axis,
        }


@LOSSES.register("BinaryCrossentropy")
class BinaryCrossentropy(_Crossentropy):
    """`-(t * log(p) + (1 - t) * log(1 - p))` averaged over the last axis, then the batch.

    `p = clip(y_pred, 1e-7, 1 - 1e-7)`; with `from_logits=True`, `p` is the
    clipped `sigmoid(y_pred)` (Keras's NumPy backend), so logits beyond about
    ±16.1 saturate with a zero gradient.

    Args:
        from_logits: whether `y_pred` holds logits rather than probabilities.
        label_smoothing: in `[0, 1]`; targets become `t * (1 - s) + 0.5 * s`.
        axis: only `-1`.
        reduction, name, dtype: see `Loss` (`name` defaults to `"binary_crossentropy"`).
    """

    def __init__(
        self,
        from_logits: bool = False,
        label_smoothing: float = 0.0,
        axis: int = -1,
        reduction: str | None = REDUCTION,
        name: str = "binary_crossentropy",
        dtype: Any = None,
    ) -> None:
        super().__init__(from_logits, label_smoothing, axis, reduction, name, dtype)

    def call(self, y_true: np.ndarray, y_pred: np.ndarray) -> tuple[np.ndarray, Backward]:
        require_same_shape(y_true, y_pred, self.name)
        require_rank(y_pred, self.name)
        s = self.label_smoothing
        t = y_true * (1.0 - s) + 0.5 * s if s else y_true
        p = 1.0 / (1.0 + np.exp(-y_pred)) if self.from_logits else y_pred
        c, inside = clip(p)
        elementwise = -(t * np.log(c) + (1.0 - t) * np.log(1.0 - c))

        def backward(dvalues: np.ndarray) -> np.ndarray:
            de = dvalues[..., None] / y_pred.shape[-1]
            if self.from_logits:  # d/dx through the sigmoid: (p - t) where not clipped
                return de * (p - t) * inside
            return de * (-t / c + (1.0 - t) / (1.0 - c)) * inside

        return np.mean(elementwise, axis=-1), backward


def _categorical(
    t: np.ndarray, y_pred: np.ndarray, from_logits: bool
) -> tuple[np.ndarray, Backward]:
    """`-sum(t * log_prob, -1)` of the NumPy backend, and its pullback."""
    if from_logits:
        shifted = y_pred - np.max(y_pred, axis=-1, keepdims=True)
        log_prob = shifted - np.log(np.sum(np.exp(shifted), axis=-1, keepdims=True))

        def backward(dvalues: np.ndarray) -> np.ndarray:
            total = np.sum(t, axis=-1, keepdims=True)
            return dvalues[..., None] * (np.exp(log_prob) * total - t)

    else:
        norm = np.sum(y_pred, axis=-1, keepdims=True)
        c, inside = clip(y_pred / norm)
        log_prob = np.log(c)

        def backward(dvalues: np.ndarray) -> np.ndarray:
            dq = -dvalues[..., None] * t / c * inside
            return (dq - np.sum(dq * (y_pred / norm), axis=-1, keepdims=True)) / norm

    return -np.sum(t * log_prob, axis=-1), backward


@LOSSES.register("CategoricalCrossentropy")
class CategoricalCrossentropy(_Crossentropy):
    """`-sum(y_true * log(p), axis=-1)` over one-hot targets, averaged over the batch.

    `p = clip(y_pred / sum(y_pred, -1), 1e-7, 1 - 1e-7)`, or
    `log(p) = log_softmax(y_pred)` with `from_logits=True`.

    Args:
        from_logits: whether `y_pred` holds logits rather than probabilities.
        label_smoothing: in `[0, 1]`; targets become `t * (1 - s) + s / classes`.
        axis: only `-1`.
        reduction, name, dtype: see `Loss` (`name` defaults to
            `"categorical_crossentropy"`).
    """

    def __init__(
        self,
        from_logits: bool = False,
        label_smoothing: float = 0.0,
        axis: int = -1,
        reduction: str | None = REDUCTION,
        name: str = "categorical_crossentropy",
        dtype: Any = None,
    ) -> None:
        super().__init__(from_logits, label_smoothing, axis, reduction, name, dtype)

    def call(self, y_true: np.ndarray, y_pred: np.ndarray) -> tuple[np.ndarray, Backward]:
        require_same_shape(y_true, y_pred, self.name)
        require_rank(y_pred, self.name)
        s = self.label_smoothing
        t = y_true * (1.0 - s) + s / y_true.shape[-1] if s else y_true
        return _categorical(t, y_pred, self.from_logits)


@LOSSES.register("SparseCategoricalCrossentropy")
class SparseCategoricalCrossentropy(Loss):
    """Categorical cross-entropy with integer class ids as targets.

    `y_true` has the shape of `y_pred` without its last axis (or with a last
    axis of 1); float ids are truncated to integers as Keras casts them; a
    negative id is a row of zeros (loss 0), as Keras's NumPy `one_hot`.

    Args:
        from_logits: whether `y_pred` holds logits rather than probabilities.
        ignore_class: only `None`.
        reduction, name, dtype, axis: see `Loss` (`axis` only `-1`; `name`
            defaults to `"sparse_categorical_crossentropy"`).

    Raises:
        ValueError: for ids that are not finite or not below the class count.
    """

    def __init__(
        self,
        from_logits: bool = False,
        ignore_class: int | None = None,
        reduction: str | None = REDUCTION,
        axis: int = -1,
        name: str = "sparse_categorical_crossentropy",
        dtype: Any = None,
    ) -> None:
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self.from_logits = require_bool(from_logits, "from_logits")
        if ignore_class is not None:
            raise ValueError(
                f"Invalid value for argument `ignore_class`: {short_repr(ignore_class)}. "
                "Only None is supported."
            )
        self.ignore_class = None
        self.axis = require_last_axis(axis)

    def call(self, y_true: np.ndarray, y_pred: np.ndarray) -> tuple[np.ndarray, Backward]:
        require_rank(y_pred, self.name)
        if y_true.ndim == y_pred.ndim and y_true.shape[-1] == 1:
            y_true = np.squeeze(y_true, axis=-1)
        if y_true.shape != y_pred.shape[:-1]:
            raise ValueError(
                f"{self.name}: `y_true` must have the shape of `y_pred` without its last "
                f"axis. Received: y_true.shape={y_true.shape}, y_pred.shape={y_pred.shape}."
            )
        classes = y_pred.shape[-1]
        if not np.all(np.isfinite(y_true)) or np.any(np.trunc(y_true) >= classes):
            raise ValueError(
                f"{self.name}: class ids must be finite and below the number of classes "
                f"({classes}). Received: y_true={short_repr(y_true)}."
            )
        ids = np.trunc(y_true)[..., None]
        t = (ids == np.arange(classes)).astype(np.float64)  # negative ids: all zero
        return _categorical(t, y_pred, self.from_logits)

    def get_config(self) -> dict:
        return {
            **super().get_config(),
            "from_logits": self.from_logits,
            "ignore_class": self.ignore_class,
        }


# Keras's names: the class names, their functions' snake_case names and the aliases.
ALIASES: dict[str, str] = {
    "mean_squared_error": "MeanSquaredError",
    "mse": "MeanSquaredError",
    "MSE": "MeanSquaredError",
    "mean_absolute_error": "MeanAbsoluteError",
    "mae": "MeanAbsoluteError",
    "MAE": "MeanAbsoluteError",
    "binary_crossentropy": "BinaryCrossentropy",
    "bce": "BinaryCrossentropy",
    "BCE": "BinaryCrossentropy",
    "categorical_crossentropy": "CategoricalCrossentropy",
    "sparse_categorical_crossentropy": "SparseCategoricalCrossentropy",
}


def serialize(loss: Loss | None) -> dict | None:
    """Returns the Keras envelope (module `"keras.losses"`), or `None`."""
    if loss is None:
        return None
    return serialize_object(loss, MODULE)


def deserialize(
    config: dict | str | None, custom_objects: Mapping[str, Any] | None = None
) -> Loss | Callable | None:
    """Builds a loss from an envelope, a `class_name` dict or a name.

    Raises:
        TypeError: for an identifier that is neither dict, str nor None.
        ValueError: for an unknown module, class name or config key (the
            message lists the known names), or a bad argument.
    """
    return deserialize_object(
        config,
        LOSSES,
        kind="loss function",
        modules=MODULES,
        aliases=ALIASES,
        custom_objects=custom_objects,
    )


def get(identifier: Any) -> Loss | Callable | None:
    """Returns a loss for `identifier`.

    Args:
        identifier: `None`; a name (`"mse"`, `"mean_squared_error"`,
            `"MeanSquaredError"`, `"mae"`, `"binary_crossentropy"`,
            `"categorical_crossentropy"`, `"sparse_categorical_crossentropy"`,
            ...; built with default arguments); an envelope or `class_name`
            dict; a `Loss` instance or class; or a callable, returned as is.

    Raises:
        TypeError: for an identifier of another type.
        ValueError: for an unknown name, listing the known ones.
    """
    return get_object(identifier, Loss, deserialize, "loss function")
