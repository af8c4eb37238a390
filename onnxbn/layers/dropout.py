"""Dropout: identity at inference, seeded random dropping in eager training (Keras 3).

How it becomes ONNX lives in `onnxbn/lowering/dropout.py`.
"""

from __future__ import annotations

from numbers import Real
from typing import Any

import numpy as np

from onnxbn.dtypes import to_numpy_dtype
from onnxbn.gradients import Gradients, Pullback
from onnxbn.layers.layer import Layer
from onnxbn.operation_registry import register_layer
from onnxbn.tensor import SymbolicTensor


def _check_noise_shape(noise_shape: Any) -> tuple | None:
    """Keras's `_validate_noise_shape`: ints > 0 or None per axis."""
    if noise_shape is None:
        return None
    if isinstance(noise_shape, str):
        raise ValueError(
            "Invalid value received for argument `noise_shape`. Expected a tuple or list of "
            f"integers. Received: noise_shape={noise_shape}"
        )
    try:
        noise_shape = tuple(noise_shape)
    except TypeError:
        raise ValueError(
            "Invalid value received for argument `noise_shape`. Expected an iterable of "
            f"integers (e.g., a tuple or list). Received: noise_shape={noise_shape}"
        ) from None
    for i, dim in enumerate(noise_shape):
        if dim is None:
            continue
        if isinstance(dim, (bool, np.bool_)) or not isinstance(dim, (int, np.integer)):
            raise ValueError(
                "Invalid value received for argument `noise_shape`. Expected all elements to "
                f"be integers or None. Received element at index {i}: {dim} "
                f"(type: {type(dim).__name__})"
            )
        if dim <= 0:
            raise ValueError(
                "Invalid value received for argument `noise_shape`. Expected all dimensions "
                f"to be positive integers or None. Received negative or zero value at index "
                f"{i}: {dim}"
            )
    return tuple(None if d is None else int(d) for d in noise_shape)


@register_layer("keras.layers")
class Dropout(Layer):
    """Randomly zeroes inputs in training, scaling the rest by `1 / (1 - rate)` (Keras's `Dropout`).

    At inference (`training` False or None, the default) the layer is the
    identity. With `training=True` in eager calls, each call draws a new
    Bernoulli keep-mask of probability `1 - rate` over `noise_shape` (None
    entries take the input's size), broadcast to the input. The draws come from
    a NumPy generator seeded with `seed`, so two layers with the same seed drop
    the same positions call after call; the random stream is NumPy's, not that
    of a Keras backend, so the positions differ from Keras's.

    Exports: an inference export is the identity. A training export also keeps
    Dropout as the identity unless the exporter is explicitly asked to emit
    random dropping, so an exported training graph is never silently random.

    Args:
        rate: float in [0, 1], the fraction of inputs to drop.
        noise_shape: optional shape of the keep-mask (ints > 0 or None).
        seed: optional int seeding the generator.
        **kwargs: base layer arguments (`name`, `dtype`, `trainable`).

    Call arguments:
        inputs: array of any rank.
        training: Python bool; drops only when True (`trainable` has no effect).

    Returns:
        Same shape as `inputs`, in the compute dtype. A mask passes through.

    Raises:
        ValueError: `rate` outside [0, 1], a bad `noise_shape`, or one that
            does not broadcast to the input.
        TypeError: a non-numeric `rate`, a non-int `seed`.
    """

    def __init__(
        self, rate: float, noise_shape: Any = None, seed: int | None = None, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        if isinstance(rate, (bool, np.bool_)) or not isinstance(rate, Real):
            raise TypeError(f"Expected `rate` to be a float, received rate={rate!r}.")
        if not 0 <= rate <= 1:
            raise ValueError(
                "Invalid value received for argument `rate`. Expected a float value between "
                f"0 and 1. Received: rate={rate}"
            )
        if seed is not None and (
            isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer))
        ):
            raise TypeError(f"Expected `seed` to be an int or None, received seed={seed!r}.")
        self.rate = rate.item() if isinstance(rate, np.generic) else rate
        self.seed = None if seed is None else int(seed)
        self.noise_shape = _check_noise_shape(noise_shape)
        self._generator = np.random.default_rng(self.seed)
        self.supports_masking = True
        self.built = True

    def compute_output_spec(self, inputs: SymbolicTensor, training: Any = None) -> SymbolicTensor:
        if training is not None and not isinstance(training, (bool, np.bool_)):
            raise TypeError(f"training must be a bool or None, received {training!r}.")
        return SymbolicTensor(inputs.shape, self.compute_dtype)

    def call(self, inputs: np.ndarray, training: Any = False) -> np.ndarray:
        return self.vjp(inputs, training=training)[0]

    def vjp(self, inputs: np.ndarray, training: Any = False) -> tuple[np.ndarray, Pullback]:
        if training is not None and not isinstance(training, (bool, np.bool_)):
            raise TypeError(f"training must be a bool or None, received {training!r}.")
        dtype = to_numpy_dtype(self.compute_dtype)
        if not training or self.rate == 0:
            return inputs.astype(dtype), lambda dy: Gradients((dy,))
        shape = inputs.shape
        if self.noise_shape is not None:
            if len(self.noise_shape) != inputs.ndim:
                raise ValueError(
                    f"Layer {self.name!r}: noise_shape {self.noise_shape} does not match the "
                    f"rank of the input shape {shape}."
                )
            shape = tuple(n if d is None else d for d, n in zip(self.noise_shape, inputs.shape))
        keep_prob = 1.0 - self.rate
        keep = self._generator.random(shape) < keep_prob
        try:
            keep = np.broadcast_to(keep, inputs.shape)
        except ValueError:
            raise ValueError(
                f"Layer {self.name!r}: noise_shape {self.noise_shape} does not broadcast to "
                f"the input shape {inputs.shape}."
            ) from None
        if keep_prob == 0:
            return np.zeros(inputs.shape, dtype), lambda dy: Gradients((np.zeros(inputs.shape),))
        y = np.where(keep, inputs.astype(np.float64) / keep_prob, 0.0)
        # The gradient goes through the positions this draw kept, scaled alike.
        return y.astype(dtype), lambda dy: Gradients((np.where(keep, dy / keep_prob, 0.0),))

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(
            {
                "rate": self.rate,
                "seed": self.seed,
                "noise_shape": None if self.noise_shape is None else list(self.noise_shape),
            }
        )
        return config
