"""The `Loss` base class and what every loss shares: rank alignment, checks, clipping, reduction.

As Keras 3.15 (`keras/src/losses/loss.py`), in float64:

1. `y_true` and `y_pred` become float arrays; when their ranks differ by one and
   the longer one ends in a dimension of 1, that dimension is squeezed (or the
   rank-1 one expanded), Keras's `squeeze_or_expand_to_same_rank`;
2. the subclass's `call` gives the per-sample losses `values` and their pullback;
3. a mask on `y_pred` weighs valid entries by `total / valid` (0 when none is
   valid) and multiplies `sample_weight`; the weights multiply `values`
   (squeezed or expanded to the same rank, then broadcast);
4. `sum_over_batch_size`: the sum of the weighted values divided by their
   number, 0 when there is none (Keras's `divide_no_nan`). An empty batch
   (Keras returns the empty, unreduced tensor) gives 0.0 here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from onnxbn.gradients import sum_to_shape
from onnxbn.serialization import short_repr
from onnxbn.tensor import as_float64

EPSILON = 1e-7  # keras.backend.epsilon()
REDUCTION = "sum_over_batch_size"

Backward = Callable[[np.ndarray], np.ndarray]


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


def broadcast_shape(a: np.ndarray, b: np.ndarray, what: str) -> tuple[int, ...]:
    """The broadcast shape of `a` and `b`, or a `ValueError` naming `what`."""
    try:
        return np.broadcast_shapes(a.shape, b.shape)
    except ValueError:
        raise ValueError(
            f"Incompatible shapes for {what}: {a.shape} and {b.shape} do not broadcast."
        ) from None


def require_same_shape(y_true: np.ndarray, y_pred: np.ndarray, loss: str) -> None:
    """Raises a `ValueError` naming `loss` unless both shapes are equal."""
    if y_true.shape != y_pred.shape:
        raise ValueError(
            f"{loss}: `y_true` and `y_pred` must have the same shape. "
            f"Received: y_true.shape={y_true.shape}, y_pred.shape={y_pred.shape}."
        )


def require_rank(y_pred: np.ndarray, loss: str) -> None:
    """Raises a `ValueError` naming `loss` for a scalar `y_pred`."""
    if y_pred.ndim < 1:
        raise ValueError(f"{loss}: `y_pred` must be at least rank 1. Received a scalar.")


def clip(p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`clip(p, eps, 1 - eps)` and where it passes the gradient (NaN stays NaN)."""
    inside = (p >= EPSILON) & (p <= 1.0 - EPSILON)
    return np.clip(p, EPSILON, 1.0 - EPSILON), inside


def weights_and_reduce(
    values: np.ndarray, sample_weight: Any, mask: Any
) -> tuple[float, np.ndarray]:
    """Keras's `reduce_weighted_values` for `sum_over_batch_size`, with d(loss)/d(values)."""
    weight = None if sample_weight is None else as_float64(sample_weight, "`sample_weight`")
    if mask is not None:
        valid = as_float64(mask, "`mask`") != 0  # Keras casts the mask to bool
        count = np.count_nonzero(valid)
        float_mask = np.where(valid, valid.size / count if count else 0.0, 0.0)
        if weight is None:
            weight = float_mask
        else:
            float_mask, weight = squeeze_or_expand_to_same_rank(float_mask, weight)
            broadcast_shape(float_mask, weight, "the mask and `sample_weight`")
            weight = weight * float_mask
    aligned = values
    weighted = values
    if weight is not None:
        aligned, weight = squeeze_or_expand_to_same_rank(values, weight)
        shape = broadcast_shape(aligned, weight, "the losses and `sample_weight` (or mask)")
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


def require_bool(value: Any, name: str) -> bool:
    """`value` as a bool, or a `TypeError` naming the argument."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(
            f"Expected `{name}` to be a bool. Received: {name}={short_repr(value)} "
            f"of type {type(value).__name__}."
        )
    return bool(value)


def require_last_axis(axis: Any) -> int:
    """`-1`, the only axis supported, or a `ValueError`."""
    if isinstance(axis, (bool, np.bool_)) or not isinstance(axis, (int, np.integer)) or axis != -1:
        raise ValueError(
            f"Invalid value for argument `axis`: {short_repr(axis)}. Only -1 "
            "(the last axis) is supported."
        )
    return -1


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
        y_pred = as_float64(y_pred, "`y_pred`")
        y_true_aligned, y_pred_aligned = squeeze_or_expand_to_same_rank(
            as_float64(y_true, "`y_true`"), y_pred
        )
        with np.errstate(all="ignore"):  # NaN and infinities propagate as in Keras
            values, backward = self.call(y_true_aligned, y_pred_aligned)
            loss, dvalues = weights_and_reduce(values, sample_weight, mask)
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
