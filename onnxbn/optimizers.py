"""Keras 3 optimizers in NumPy: `SGD` and `Adam` (same update rules, state and configs) and `get`.

The base class, its step and the state names live in `onnxbn/optimizer.py`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

# `name as name`: re-exported, importable from this module as before.
from onnxbn.optimizer import ITERATIONS as ITERATIONS
from onnxbn.optimizer import PREFIX as PREFIX
from onnxbn.optimizer import (
    Optimizer,
    require_unit,
)
from onnxbn.optimizer import slot_path as slot_path
from onnxbn.registry import Registry
from onnxbn.serialization import (
    deserialize_object,
    get_object,
    require_number,
    serialize_object,
    short_repr,
    to_snake_case,
)

OPTIMIZERS: Registry[str, type] = Registry("optimizer")
MODULE = "keras.optimizers"
MODULES = frozenset(
    {
        MODULE,
        "keras.src.optimizers",
        "keras.src.optimizers.sgd",
        "keras.src.optimizers.adam",
    }
)


@OPTIMIZERS.register("SGD")
class SGD(Optimizer):
    """Gradient descent, with optional (Nesterov) momentum, as Keras's `SGD`.

    With `momentum == 0`: `w = w - learning_rate * g` (no slots). Otherwise
    the slot `momentum` holds `m = momentum * m - learning_rate * g`, then
    `w = w + m`, or with `nesterov=True`
    `w = w + momentum * m - learning_rate * g`.

    Args:
        learning_rate: Positive float (default 0.01).
        momentum: Float in `[0, 1]` (default 0).
        nesterov: Whether to use Nesterov momentum.
        **kwargs: See `Optimizer` (`name` and Keras's base arguments).
    """

    def __init__(
        self,
        learning_rate: float = 0.01,
        momentum: float = 0.0,
        nesterov: bool = False,
        name: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(learning_rate, name=name, **kwargs)
        self.momentum = require_unit(momentum, "momentum", upper_open=False)
        if not isinstance(nesterov, (bool, np.bool_)):
            raise TypeError(
                f"Expected `nesterov` to be a bool. Received: nesterov={short_repr(nesterov)}."
            )
        self.nesterov = bool(nesterov)
        self.slot_names = ("momentum",) if self.momentum != 0 else ()

    def _update(self, w, g, slots, rnd):
        lr = rnd(self._learning_rate)
        if not self.slot_names:
            return w - g * lr, {}
        momentum = rnd(self.momentum)
        m = rnd(slots["momentum"] * momentum - g * lr)
        if self.nesterov:
            return w + (m * momentum - g * lr), {"momentum": m}
        return w + m, {"momentum": m}

    def get_config(self) -> dict:
        return {**super().get_config(), "momentum": self.momentum, "nesterov": self.nesterov}


@OPTIMIZERS.register("Adam")
class Adam(Optimizer):
    """Adam, as Keras's `Adam` (`amsgrad=False`).

    With `t = iterations + 1` (the step being taken):
    `m += (g - m) * (1 - beta_1)`, `v += (g**2 - v) * (1 - beta_2)`,
    `alpha = learning_rate * sqrt(1 - beta_2**t) / (1 - beta_1**t)`,
    `w -= m * alpha / (sqrt(v) + epsilon)` (epsilon outside the square root,
    added before the bias correction of `v`: Keras's "epsilon hat").
    Slots: `momentum` (m) and `velocity` (v).

    Args:
        learning_rate: Positive float (default 0.001).
        beta_1: Decay of the first moment, in `[0, 1)` (default 0.9).
        beta_2: Decay of the second moment, in `[0, 1)` (default 0.999).
        epsilon: Non-negative fuzz factor (default 1e-7).
        amsgrad: Only `False` is supported.
        **kwargs: See `Optimizer` (`name` and Keras's base arguments).
    """

    slot_names = ("momentum", "velocity")

    def __init__(
        self,
        learning_rate: float = 0.001,
        beta_1: float = 0.9,
        beta_2: float = 0.999,
        epsilon: float = 1e-7,
        amsgrad: bool = False,
        name: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(learning_rate, name=name, **kwargs)
        self.beta_1 = require_unit(beta_1, "beta_1", upper_open=True)
        self.beta_2 = require_unit(beta_2, "beta_2", upper_open=True)
        self.epsilon = float(require_number(epsilon, "epsilon", minimum=0))
        if amsgrad is not False:
            raise ValueError(f"Adam: `amsgrad` is not supported. Received: amsgrad={amsgrad!r}.")

    def _update(self, w, g, slots, rnd):
        step = rnd(self._iterations + 1)
        beta_1_power, beta_2_power = rnd(self.beta_1) ** step, rnd(self.beta_2) ** step
        alpha = rnd(self._learning_rate) * np.sqrt(1.0 - beta_2_power) / (1.0 - beta_1_power)
        m = rnd(slots["momentum"] + (g - slots["momentum"]) * rnd(1.0 - self.beta_1))
        v = rnd(slots["velocity"] + (np.square(g) - slots["velocity"]) * rnd(1.0 - self.beta_2))
        delta = (m * alpha) / (np.sqrt(v) + rnd(self.epsilon))
        return w - delta, {"momentum": m, "velocity": v}

    def get_config(self) -> dict:
        return {
            **super().get_config(),
            "beta_1": self.beta_1,
            "beta_2": self.beta_2,
            "epsilon": self.epsilon,
            "amsgrad": False,
        }


# Keras's names: the class names and their lowercase forms ("sgd", "adam").
ALIASES: dict[str, str] = {to_snake_case(name): name for name in OPTIMIZERS}


def serialize(optimizer: Optimizer) -> dict:
    """Returns the Keras envelope (module `"keras.optimizers"`)."""
    return serialize_object(optimizer, MODULE)


def deserialize(config: dict | str, custom_objects: Mapping[str, Any] | None = None) -> Optimizer:
    """Builds an optimizer from an envelope, a `class_name` dict or a name.

    Raises:
        TypeError: for an identifier that is neither dict nor str.
        ValueError: for an unknown module, class name or config key, or a
            bad hyperparameter.
    """
    return deserialize_object(
        config,
        OPTIMIZERS,
        kind="optimizer",
        modules=MODULES,
        aliases=ALIASES,
        custom_objects=custom_objects,
    )


def get(identifier: Any) -> Optimizer:
    """Returns an optimizer for `identifier`.

    Args:
        identifier: A name (`"sgd"`, `"adam"`, `"SGD"`, `"Adam"`: default
            hyperparameters); a Keras envelope or `class_name` dict; an
            `Optimizer` instance (returned as is) or class.

    Raises:
        TypeError: for `None` or an identifier of another type.
        ValueError: see `deserialize`.
    """
    if identifier is None or not isinstance(identifier, (str, dict, type, Optimizer)):
        raise TypeError(
            f"Could not interpret optimizer identifier {short_repr(identifier)} of type "
            f"{type(identifier).__name__}: expected a str, a dict or an Optimizer."
        )
    return get_object(identifier, Optimizer, deserialize, "optimizer")
