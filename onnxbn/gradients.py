"""The gradient contract shared by the eager layers and the ONNX gradient lowerings.

Every layer that can be trained defines, beside its forward computation, how a
gradient flows back through one call:

- eager (`onnxbn/layers/<layer>.py`): `Layer.vjp(*args, **kwargs)` runs the call
  like `layer(*args, **kwargs)` (same outputs, same state updates) and returns
  `(outputs, pullback)`; `pullback(dy)` maps the float64 gradient of the loss
  with respect to the output to a `Gradients` of float64 arrays;
- ONNX (`onnxbn/lowering/<layer>.py`): a rule registered with
  `register_gradient(LayerClass)` maps the lowered gradient of the output to a
  `Gradients` of lowered values (see `onnxbn/lowering/registry.py`).

Both read what the forward computation already knows (saved intermediates),
never re-derive the layer by differentiating generic code.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class Gradients:
    """Gradients of the loss flowing out of one layer call.

    Attributes:
        inputs: one entry per positional argument of the call, in order: the
            gradient with respect to that argument (same shape), a list of them
            for a list argument (`Add`), or `None` where no gradient flows
            (integer ids, masks).
        weights: `{variable.path: gradient}` for the layer's trainable weights
            (`layer.trainable_weights`; empty for a frozen layer).
    """

    inputs: tuple[Any, ...]
    weights: dict[str, Any] = field(default_factory=dict)


Pullback = Callable[[np.ndarray], Gradients]


def sum_to_shape(grad: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Sums `grad` over the axes NumPy broadcasting added or stretched to reach it from `shape`."""
    grad = np.asarray(grad)
    extra = grad.ndim - len(shape)
    if extra:
        grad = grad.sum(axis=tuple(range(extra)))
    stretched = tuple(i for i, d in enumerate(shape) if d == 1 and grad.shape[i] != 1)
    if stretched:
        grad = grad.sum(axis=stretched, keepdims=True)
    return grad.reshape(shape)
