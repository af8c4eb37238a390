"""Keras 3 losses in NumPy: the same names, config keys and math, with their gradients.

Each loss follows Keras 3.15 (`keras/src/losses/loss.py`, `losses.py` and the
NumPy backend's cross-entropies) step by step, in float64:

1. `y_true` and `y_pred` become float arrays; when their ranks differ by one and
   the longer one ends in a dimension of 1, that dimension is squeezed (or the
   rank-1 one expanded), Keras's `squeeze_or_expand_to_same_rank`;
2. the per-sample losses `values` (the last axis reduced): mean squared or
   absolute error; binary cross-entropy averaged over the last axis; categorical
   cross-entropy, with probabilities divided by their sum; probabilities are
   clipped to `[1e-7, 1 - 1e-7]` (`keras.backend.epsilon()`), logits go through
   `sigmoid` (binary, then clipped as the NumPy backend does) or `log_softmax`;
3. a mask on `y_pred` weighs valid entries by `total / valid` (0 when none is
   valid) and multiplies `sample_weight`; the weights multiply `values`
   (squeezed or expanded to the same rank, then broadcast);
4. `sum_over_batch_size`: the sum of the weighted values divided by their
   number, 0 when there is none (Keras's `divide_no_nan`). An empty batch
   (Keras returns the empty, unreduced tensor) gives 0.0 here.

`value_and_gradient` also returns d(loss)/d(y_pred), the gradient of this very
computation: zero where a probability was clipped, `sign(0) = 0` for the
absolute error.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from onnxbn.gradients import sum_to_shape
from onnxbn.registry import Registry
from onnxbn.serialization import (
    deserialize_object,
    get_object,
    require_number,
    serialize_object,
    short_repr,
)

EPSILON = 1e-7  # keras.backend.epsilon()
REDUCTION = "sum_over_batch_size"

LOSSES: Registry[str, type] = Registry("loss")
MODULE = "keras.losses"
MODULES = frozenset({MODULE, "keras.src.losses", "keras.src.losses.losses"})

Backward = Callable[[np.ndarray], np.ndarray]


def _as_float64(x: Any, name: str) -> np.ndarray:
    """`x` as a float64 array (bools and integers too, as Keras casts them)."""
    try:
        array = np.asarray(x)
        if array.dtype.kind not in "biuf" and array.dtype.name != "bfloat16":
            raise TypeError
        return array.astype(np.float64)
    except (TypeError, ValueError):
        raise TypeError(
            f"Expected `{name}` to be a numeric array. Received: "
            f"{short_repr(x)} of type {type(x).__name__}."
        ) from None


def squeeze_or_expand_to_same_rank(
    x1: np.ndarray, x2: np.ndarray, expand_rank_1: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Keras's rank alignment: squeeze (or expand) a last dimension of 1 when ranks differ by 1."""
    if x1.ndim == x2.ndim + 1 and x1.shape[-1] == 1:
        if x2.ndim == 1 and expand_rank_1:
            x2 = x2[..., None]
        else:
            x1 = np.squeeze(x1, axis=-1)
    if x2.ndim == x1.ndim + 1 and x2.shape[-1] == 1:
        if x1.ndim == 1 and expand_rank_1:
            x1 = x1[..., None]
        else:
            x2 = np.squeeze(x2, axis=-1)
    return x1, x2


def _broadcast(a: np.ndarray, b: np.ndarray, what: str) -> tuple[int, ...]:
    try:
        return np.broadcast_shapes(a.shape, b.shape)
    except ValueError:
        raise ValueError(
            f"Incompatible shapes for {what}: {a.shape} and {b.shape} do not broadcast."
        ) from None


def _require_same_shape(y_true: np.ndarray, y_pred: np.ndarray, loss: str) -> None:
    if y_true.shape != y_pred.shape:
        raise ValueError(
            f"{loss}: `y_true` and `y_pred` must have the same shape. "
            f"Received: y_true.shape={y_true.shape}, y_pred.shape={y_pred.shape}."
        )


def _require_rank(y_pred: np.ndarray, loss: str) -> None:
    if y_pred.ndim < 1:
        raise ValueError(f"{loss}: `y_pred` must be at least rank 1. Received a scalar.")


def _clip(p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`clip(p, eps, 1 - eps)` and where it passes the gradient (NaN stays NaN)."""
    inside = (p >= EPSILON) & (p <= 1.0 - EPSILON)
    return np.clip(p, EPSILON, 1.0 - EPSILON), inside


def _weights_and_reduce(
    values: np.ndarray, sample_weight: Any, mask: Any
) -> tuple[float, np.ndarray]:
    """Keras's `reduce_weighted_values` for `sum_over_batch_size`, with d(loss)/d(values)."""
    weight = None if sample_weight is None else _as_float64(sample_weight, "sample_weight")
    if mask is not None:
        valid = _as_float64(mask, "mask") != 0  # Keras casts the mask to bool
        count = np.count_nonzero(valid)
        float_mask = np.where(valid, valid.size / count if count else 0.0, 0.0)
        if weight is None:
            weight = float_mask
        else:
            float_mask, weight = squeeze_or_expand_to_same_rank(float_mask, weight)
            _broadcast(float_mask, weight, "the mask and `sample_weight`")
            weight = weight * float_mask
    aligned = values
    weighted = values
    if weight is not None:
        aligned, weight = squeeze_or_expand_to_same_rank(values, weight)
        shape = _broadcast(aligned, weight, "the losses and `sample_weight` (or mask)")
        weighted = aligned * weight
    else:
        shape = values.shape
    if weighted.ndim == 0:  # Keras returns a scalar unreduced
        loss, per_element = float(weighted), np.ones(shape)
    else:
        size = weighted.size  # 0 for an empty batch: divide_no_nan gives 0
        loss = float(np.sum(weighted) / size) if size else 0.0
        per_element = np.full(shape, 1.0 / size if size else 0.0)
    if weight is not None:
        per_element = per_element * weight
    grad = sum_to_shape(np.broadcast_to(per_element, shape), aligned.shape)
    return loss, grad.reshape(values.shape)


class Loss:
    """Loss base class: `loss(y_true, y_pred, sample_weight=None)` returns a float.

    Args:
        name: name of the loss.
        reduction: only `"sum_over_batch_size"` (Keras's default) is supported.
        dtype: only `None`: every loss is computed in float64.

    Call arguments:
        y_true: targets, an array (integer class ids for the sparse loss).
        y_pred: predictions, an array.
        sample_weight: optional weights of the per-sample losses (Keras's rank
            alignment, then NumPy broadcasting).
        mask: optional mask of `y_pred` (Keras's `_keras_mask`), the shape of
            the per-sample losses; non-zero means valid.

    Raises:
        ValueError: for another reduction or dtype, non-broadcastable shapes.
        TypeError: for non-numeric arrays.
    """

    def __init__(
        self, name: str | None = None, reduction: str | None = REDUCTION, dtype: Any = None
    ) -> None:
        if name is not None and not isinstance(name, str):
            raise TypeError(f"Expected `name` to be a str. Received: name={short_repr(name)}.")
        if reduction != REDUCTION:
            raise ValueError(
                f"Invalid value for argument `reduction`: {short_repr(reduction)}. "
                "Only 'sum_over_batch_size' (Keras's default) is supported."
            )
        if dtype is not None:
            raise ValueError(
                f"Invalid value for argument `dtype`: {short_repr(dtype)}. "
                "Expected None: losses are computed in float64."
            )
        self.name = name or type(self).__name__
        self.reduction = reduction

    def __call__(
        self, y_true: Any, y_pred: Any, sample_weight: Any = None, mask: Any = None
    ) -> float:
        loss, _ = self._evaluate(y_true, y_pred, sample_weight, mask, gradient=False)
        return loss

    def value_and_gradient(
        self, y_true: Any, y_pred: Any, sample_weight: Any = None, mask: Any = None
    ) -> tuple[float, np.ndarray]:
        """The loss and its float64 gradient with respect to `y_pred` (same shape).

        Args: as for calling the loss.

        Returns:
            `(loss, dloss_dy_pred)`.
        """
        return self._evaluate(y_true, y_pred, sample_weight, mask, gradient=True)

    def _evaluate(
        self, y_true: Any, y_pred: Any, sample_weight: Any, mask: Any, *, gradient: bool
    ) -> tuple[float, Any]:
        y_pred = _as_float64(y_pred, "y_pred")
        y_true_aligned, y_pred_aligned = squeeze_or_expand_to_same_rank(
            _as_float64(y_true, "y_true"), y_pred
        )
        with np.errstate(all="ignore"):  # NaN and infinities propagate as in Keras
            values, backward = self.call(y_true_aligned, y_pred_aligned)
            loss, dvalues = _weights_and_reduce(values, sample_weight, mask)
            if not gradient:
                return loss, None
            return loss, backward(dvalues).reshape(y_pred.shape)

    def call(self, y_true: np.ndarray, y_pred: np.ndarray) -> tuple[np.ndarray, Backward]:
        """The per-sample losses and their pullback `dvalues -> dy_pred`."""
        raise NotImplementedError(f"{type(self).__name__} does not implement call().")

    def get_config(self) -> dict:
        """The constructor arguments, as Keras writes them."""
        return {"name": self.name, "reduction": self.reduction}

    @classmethod
    def from_config(cls, config: dict) -> Loss:
        return cls(**config)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"


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
        _require_rank(y_pred, self.name)
        shape = _broadcast(y_true, y_pred, f"{self.name} (y_true and y_pred)")
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
        _require_rank(y_pred, self.name)
        shape = _broadcast(y_true, y_pred, f"{self.name} (y_true and y_pred)")
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
        self.from_logits = _require_bool(from_logits, "from_logits")
        self.label_smoothing = require_number(label_smoothing, "label_smoothing", minimum=0)
        if self.label_smoothing > 1:
            raise ValueError(
                f"Expected `label_smoothing` in [0, 1]. Received: label_smoothing={label_smoothing}."
            )
        self.axis = _require_last_axis(axis)

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
        _require_same_shape(y_true, y_pred, self.name)
        _require_rank(y_pred, self.name)
        s = self.label_smoothing
        t = y_true * (1.0 - s) + 0.5 * s if s else y_true
        p = 1.0 / (1.0 + np.exp(-y_pred)) if self.from_logits else y_pred
        c, inside = _clip(p)
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
        c, inside = _clip(y_pred / norm)
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
        _require_same_shape(y_true, y_pred, self.name)
        _require_rank(y_pred, self.name)
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
        self.from_logits = _require_bool(from_logits, "from_logits")
        if ignore_class is not None:
            raise ValueError(
                f"Invalid value for argument `ignore_class`: {short_repr(ignore_class)}. "
                "Only None is supported."
            )
        self.ignore_class = None
        self.axis = _require_last_axis(axis)

    def call(self, y_true: np.ndarray, y_pred: np.ndarray) -> tuple[np.ndarray, Backward]:
        _require_rank(y_pred, self.name)
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


def _require_bool(value: Any, name: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(
            f"Expected `{name}` to be a bool. Received: {name}={short_repr(value)} "
            f"of type {type(value).__name__}."
        )
    return bool(value)


def _require_last_axis(axis: Any) -> int:
    if isinstance(axis, (bool, np.bool_)) or not isinstance(axis, (int, np.integer)) or axis != -1:
        raise ValueError(
            f"Invalid value for argument `axis`: {short_repr(axis)}. Only -1 "
            "(the last axis) is supported."
        )
    return -1


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
