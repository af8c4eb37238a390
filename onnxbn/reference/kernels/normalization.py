"""BatchNormalization at since-versions 9 and 14 (the 14 kernel serves opset 15 on).

Channel axis 1 (X is N x C x D1 ... Dn). Inference normalizes with the given
`input_mean` / `input_var`; training uses the batch statistics (mean and
biased variance over every axis but 1) and returns the running statistics

    running_mean = input_mean * momentum + current_mean * (1 - momentum)
    running_var = input_var * momentum + current_var * (1 - momentum)

- opset 9-13: the node's output count selects the form: one output is
  inference; five outputs (Y, running mean, running var, saved mean, saved
  var) is training. Saved mean/var are the batch mean and biased variance.
  (`onnx.reference` uses batch statistics for both forms, onnx issue 5799.)
- opset 14+: the `training_mode` attribute selects the form; training returns
  Y, running mean and running var.
- opset 15 only widens the types (scale/B and mean/var may differ from X's), so
  it has no kernel of its own (`kernels/table.py`): the 14 kernel takes any mix.

Batch statistics accumulate in float64; normalization of float16/bfloat16 is
computed in float32. Y is cast to X's type, running statistics to the type of
`input_mean`.
"""

from __future__ import annotations

import numpy as np

from onnxbn.reference.kernels.precision import as_array, compute_dtype
from onnxbn.reference.kernels.reduction import sum_of_squares
from onnxbn.reference.kernels.summation import float_sum
from onnxbn.reference.kernels.table import kernel


def _check(x: np.ndarray, **params: np.ndarray) -> int:
    if x.ndim < 2:
        raise ValueError(
            f"BatchNormalization takes X of rank >= 2 (N, C, ...), received {x.shape}."
        )
    channels = x.shape[1]
    for name, value in params.items():
        if value.shape != (channels,):
            raise ValueError(
                f"BatchNormalization {name} must have shape ({channels},) for X of shape "
                f"{x.shape}, received {value.shape}."
            )
    return channels


def _work_dtype(x: np.ndarray) -> np.dtype:
    return compute_dtype(x.dtype) if x.dtype.kind == "f" else np.dtype(np.float32)


def _channel_shape(x: np.ndarray) -> tuple[int, ...]:
    return (-1,) + (1,) * (x.ndim - 2)


# Samples per block hold about this many elements, so that the three passes of
# subtract / scale / shift over a block stay in a 1 MiB L2 cache.
_BLOCK_ELEMENTS = 1 << 18


def _normalize_into(
    y: np.ndarray,
    x: np.ndarray | None,
    mean: np.ndarray | None,
    scale: np.ndarray,
    bias: np.ndarray,
    var: np.ndarray,
    epsilon: float,
) -> np.ndarray:
    """y = (x - mean) * scale / sqrt(var + epsilon) + bias, per channel.

    With `x=None`, `y` already holds x - mean and is scaled and shifted in place;
    with `mean=None` the mean is zero.
    """
    work = y.dtype
    channel = _channel_shape(y)
    factor = scale.astype(work, copy=False) / np.sqrt(
        var.astype(work, copy=False) + work.type(epsilon)
    )
    factor = factor.reshape(channel)
    shift = bias.astype(work, copy=False).reshape(channel)
    per_sample = max(y[0].size, 1) if len(y) else 1
    step = max(1, _BLOCK_ELEMENTS // per_sample)
    for start in range(0, len(y), step):
        block = y[start : start + step]
        if x is None:
            block *= factor
        elif mean is None:
            np.multiply(x[start : start + step], factor, out=block)
        else:
            np.subtract(x[start : start + step], mean, out=block)
            block *= factor
        block += shift
    return y


def _inference(X, scale, B, input_mean, input_var, epsilon) -> np.ndarray:
    _check(X, scale=scale, B=B, input_mean=input_mean, input_var=input_var)
    x = X.astype(_work_dtype(X), copy=False)
    mean = input_mean.astype(x.dtype, copy=False).reshape(_channel_shape(x))
    if not mean.any():
        # x - 0 is x (signed zeros and NaN included): one pass fewer per block.
        mean = None
    y = _normalize_into(np.empty_like(x), x, mean, scale, B, input_var, epsilon)
    return as_array(y, X.dtype)


def inference_into(
    X: np.ndarray,
    scale: np.ndarray,
    B: np.ndarray,
    input_mean: np.ndarray,
    input_var: np.ndarray,
    *,
    epsilon: float = 1e-5,
    momentum: float = 0.9,
    training_mode: int = 0,
    _num_node_outputs: int = 1,
) -> tuple[np.ndarray] | None:
    """Inference BatchNormalization written into X (which the caller gives up), or
    `None` when the node trains or X's type needs a separate output."""
    if training_mode or _num_node_outputs != 1 or X.dtype.kind != "f":
        return None
    if compute_dtype(X.dtype) != X.dtype or not X.flags.writeable or not X.flags.c_contiguous:
        return None
    _check(X, scale=scale, B=B, input_mean=input_mean, input_var=input_var)
    mean = input_mean.astype(X.dtype, copy=False).reshape(_channel_shape(X))
    if not mean.any():
        mean = None
    return (_normalize_into(X, X, mean, scale, B, input_var, epsilon),)


def _training(X, scale, B, input_mean, input_var, epsilon, momentum) -> tuple:
    _check(X, scale=scale, B=B, input_mean=input_mean, input_var=input_var)
    x = X.astype(_work_dtype(X), copy=False)
    axes = (0, *range(2, x.ndim))
    count = np.float64(x.size // x.shape[1] if x.shape[1] else 0)
    # Statistics accumulate in float64. Two passes (mean, then squared
    # deviations): no cancellation. The deviations become Y in place, so the
    # whole op allocates one X-sized array.
    batch_mean = float_sum(x, axes) / count
    centered = x - batch_mean.astype(x.dtype).reshape(_channel_shape(x))
    batch_var = sum_of_squares(centered, axes) / count
    y = as_array(_normalize_into(centered, None, None, scale, B, batch_var, epsilon), X.dtype)
    stats = compute_dtype(input_mean.dtype) if input_mean.dtype.kind == "f" else x.dtype
    m = stats.type(momentum)
    running_mean = input_mean.astype(stats) * m + batch_mean.astype(stats) * (1 - m)
    running_var = input_var.astype(stats) * m + batch_var.astype(stats) * (1 - m)
    return (
        y,
        running_mean.astype(input_mean.dtype),
        running_var.astype(input_var.dtype),
        batch_mean,
        batch_var,
    )


@kernel("BatchNormalization", 9, wants_output_count=True)
def batch_normalization_9(
    X: np.ndarray,
    scale: np.ndarray,
    B: np.ndarray,
    mean: np.ndarray,
    var: np.ndarray,
    *,
    epsilon: float = 1e-5,
    momentum: float = 0.9,
    _num_node_outputs: int,
) -> tuple[np.ndarray, ...]:
    if _num_node_outputs == 1:
        return (_inference(X, scale, B, mean, var, epsilon),)
    y, running_mean, running_var, saved_mean, saved_var = _training(
        X, scale, B, mean, var, epsilon, momentum
    )
    return y, running_mean, running_var, saved_mean.astype(X.dtype), saved_var.astype(X.dtype)


@kernel("BatchNormalization", 14)
def batch_normalization_14(
    X: np.ndarray,
    scale: np.ndarray,
    B: np.ndarray,
    input_mean: np.ndarray,
    input_var: np.ndarray,
    *,
    epsilon: float = 1e-5,
    momentum: float = 0.9,
    training_mode: int = 0,
) -> tuple[np.ndarray, ...]:
    if not training_mode:
        return (_inference(X, scale, B, input_mean, input_var, epsilon),)
    return _training(X, scale, B, input_mean, input_var, epsilon, momentum)[:3]
