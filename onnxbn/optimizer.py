"""The `Optimizer` base class: step counter, slots, `apply`, configs and the state names.

As Keras 3 (`keras/src/optimizers/base_optimizer.py`): an optimizer owns an
int64 step counter (`iterations`) and, once built on a list of trainable
variables, its slots: one zero-initialized array per slot name and variable,
of the variable's shape and dtype. `apply(grads, variables)` runs one Keras
step: the update of every variable, then each variable's constraint, then
`iterations += 1`. The update is Keras's formula with Keras's operands (the
gradient, the hyperparameters and the step count cast to the variable's
dtype), computed in float64, each assigned value rounded once to the
variable's dtype.

The state is named as in a train-step export: `optimizer/iterations`, then
`optimizer/<slot>/<variable path>` by variable, each variable's slots
together (Keras's order). The learning rate is a hyperparameter, not state.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from onnxbn.dtypes import is_float, to_numpy_dtype
from onnxbn.serialization import require_number, short_repr, to_snake_case

PREFIX = "optimizer"
ITERATIONS = f"{PREFIX}/iterations"

# Keras's base-optimizer arguments and the only value each may take here.
_UNSUPPORTED_DEFAULTS = {
    "weight_decay": None,
    "clipnorm": None,
    "clipvalue": None,
    "global_clipnorm": None,
    "use_ema": False,
    "ema_overwrite_frequency": None,
    "loss_scale_factor": None,
    "gradient_accumulation_steps": None,
}


def slot_path(slot: str, variable_path: str) -> str:
    """The state name of one slot: `optimizer/<slot>/<variable path>`."""
    return f"{PREFIX}/{slot}/{variable_path}"


def require_unit(value: Any, name: str, *, upper_open: bool) -> float:
    """`value` as a float in `[0, 1]` (`[0, 1)` with `upper_open`), or an error naming it."""
    number = float(require_number(value, name, minimum=0))
    if number > 1 or (upper_open and number == 1):
        bound = "[0, 1)" if upper_open else "[0, 1]"
        raise ValueError(f"Expected `{name}` in {bound}. Received: {name}={number}.")
    return number


class Optimizer:
    """Base class: step counter, slots, `apply` and configs.

    Subclasses set `slot_names` and implement `_update`.

    Args:
        learning_rate: A positive finite float. Stored as Keras does, in a
            float32 variable: the rate the update uses (and the config
            reports) is the float32 value nearest to it.
        name: The optimizer's name (default: the snake_case class name).
        **base: Keras's other base-optimizer arguments (`weight_decay`,
            `clipnorm`, `use_ema`, ...), accepted at their defaults only so
            that Keras configs load; `ema_momentum` is kept as given.

    Raises:
        TypeError: a non-numeric hyperparameter.
        ValueError: a hyperparameter out of range, or an unsupported Keras
            feature switched on.
    """

    slot_names: tuple[str, ...] = ()

    def __init__(self, learning_rate: float, name: str | None = None, **base: Any) -> None:
        self.learning_rate = learning_rate
        if name is not None and not isinstance(name, str):
            raise TypeError(f"Expected `name` to be a str. Received: name={short_repr(name)}.")
        self.name = name or to_snake_case(type(self).__name__)
        self.ema_momentum = float(require_number(base.pop("ema_momentum", 0.99), "ema_momentum"))
        for key, value in base.items():
            if key not in _UNSUPPORTED_DEFAULTS:
                raise ValueError(f"Argument(s) not recognized: {{{key!r}: {short_repr(value)}}}")
            if value is not _UNSUPPORTED_DEFAULTS[key] and value != _UNSUPPORTED_DEFAULTS[key]:
                raise ValueError(
                    f"{type(self).__name__}: `{key}` is not supported. Received: "
                    f"{key}={short_repr(value)}; expected {_UNSUPPORTED_DEFAULTS[key]!r}."
                )
        self._iterations = np.int64(0)
        self._variables: list[Any] = []
        self._index: dict[int, int] = {}
        self._slots: list[dict[str, np.ndarray]] = []
        self.built = False

    # -- hyperparameters and state ---------------------------------------------
    @property
    def learning_rate(self) -> float:
        """The learning rate (the float32 value Keras's variable holds)."""
        return self._learning_rate

    @learning_rate.setter
    def learning_rate(self, value: float) -> None:
        number = float(require_number(value, "learning_rate", minimum=0, strict=True))
        rounded = float(np.float32(number))
        if not math.isfinite(rounded) or rounded == 0:
            raise ValueError(
                "Expected `learning_rate` to be a positive float32 number. "
                f"Received: learning_rate={number}."
            )
        self._learning_rate = rounded

    @property
    def iterations(self) -> np.int64:
        """The number of steps taken (int64)."""
        return self._iterations

    def build(self, variables: Sequence[Any]) -> None:
        """Creates the zero slots of each variable (once; later calls do nothing).

        Args:
            variables: The trainable `Variable`s (each with `path`, `shape`,
                `dtype`), in the order the state is named.

        Raises:
            TypeError: a variable whose dtype is not floating.
            ValueError: the same variable twice.
        """
        if self.built:
            return
        variables = list(variables)
        index: dict[int, int] = {}
        for i, variable in enumerate(variables):
            if not is_float(variable.dtype):
                raise TypeError(
                    f"Cannot optimize variable {variable.path!r} of dtype {variable.dtype}: "
                    "expected a floating dtype."
                )
            if id(variable) in index:
                raise ValueError(f"Variable {variable.path!r} is passed twice to build().")
            index[id(variable)] = i
        self._variables = variables
        self._index = index
        self._slots = [
            {s: np.zeros(v.shape, to_numpy_dtype(v.dtype)) for s in self.slot_names}
            for v in variables
        ]
        self.built = True

    @property
    def variables(self) -> list[tuple[str, np.ndarray]]:
        """`[(state name, array copy)]`: `optimizer/iterations`, then the slots."""
        state = [(ITERATIONS, np.array(self._iterations, dtype=np.int64))]
        for variable, slots in zip(self._variables, self._slots):
            state += [(slot_path(s, variable.path), slots[s].copy()) for s in self.slot_names]
        return state

    def slots(self, variable: Any) -> dict[str, np.ndarray]:
        """`{slot name: array copy}` of one variable the optimizer was built with."""
        return {k: v.copy() for k, v in self._slots[self._position(variable)].items()}

    def assign_variables(self, values: Mapping[str, Any]) -> None:
        """Sets state by name (e.g. a session's state after exported steps).

        Raises:
            ValueError: an unknown name, or an array of another shape.
        """
        targets = {
            slot_path(s, v.path): (slots, s)
            for v, slots in zip(self._variables, self._slots)
            for s in self.slot_names
        }
        for name, value in values.items():
            array = np.asarray(value)
            if name == ITERATIONS:
                if array.shape != () or array.dtype.kind not in "iu":
                    raise ValueError(f"{ITERATIONS} must be an integer scalar; got {array!r}.")
                self._iterations = np.int64(array)
            elif name in targets:
                slots, s = targets[name]
                if array.shape != slots[s].shape:
                    raise ValueError(
                        f"State {name!r} has shape {slots[s].shape}; received {array.shape}."
                    )
                slots[s] = array.astype(slots[s].dtype)
            else:
                raise ValueError(
                    f"Unknown optimizer state {name!r}. Known: {[ITERATIONS, *targets]}."
                )

    def _position(self, variable: Any) -> int:
        try:
            return self._index[id(variable)]
        except KeyError:
            raise ValueError(
                f"Unknown variable: {variable!r}. This optimizer can only be called for the "
                "variables it was originally built with. When working with a new set of "
                "variables, you should recreate a new optimizer instance."
            ) from None

    # -- the step ----------------------------------------------------------------
    def apply(self, grads: Sequence[Any], variables: Sequence[Any] | None = None) -> None:
        """One optimizer step, as Keras's `Optimizer.apply`.

        Args:
            grads: One gradient per variable (cast to the variable's dtype
                first, as Keras does); `None` skips that variable (with a
                warning). An empty list is a no-op (no step is counted).
            variables: The variables to update; builds the optimizer on
                first use. Default: the variables it was built with.

        Raises:
            ValueError: unknown variables, mismatched lengths or shapes, or
                no gradient at all.
        """
        grads = list(grads)
        if not grads:
            return
        if variables is None:
            if not self.built:
                raise ValueError(
                    "When passing `grads` without `variables`, the optimizer must already be "
                    "built on a list of variables. Call `optimizer.build(trainable_variables)` "
                    "first."
                )
            variables = self._variables
        else:
            variables = list(variables)
            self.build(variables)
        if len(grads) != len(variables):
            raise ValueError(
                f"Received {len(grads)} gradients for {len(variables)} variables; expected "
                "one gradient per variable."
            )
        positions = [self._position(v) for v in variables]
        pairs = [(g, v, p) for g, v, p in zip(grads, variables, positions) if g is not None]
        if not pairs:
            raise ValueError("No gradients provided for any variable.")
        if len(pairs) < len(grads):
            missing = [v.path for g, v in zip(grads, variables) if g is None]
            warnings.warn(
                f"Gradients do not exist for variables {missing} when minimizing the loss.",
                stacklevel=2,
            )
        updates = []
        for grad, variable, position in pairs:
            dtype = to_numpy_dtype(variable.dtype)
            g = np.asarray(grad)
            if g.shape != variable.shape:
                raise ValueError(
                    f"Gradient of shape {g.shape} for variable {variable.path!r} of shape "
                    f"{variable.shape}."
                )
            if g.dtype.kind not in "biuf" and g.dtype != to_numpy_dtype("bfloat16"):
                raise TypeError(
                    f"Gradient for variable {variable.path!r} has dtype {g.dtype}; "
                    "expected a numeric array."
                )

            def rnd(x: Any, dtype: np.dtype = dtype) -> np.ndarray:
                return np.asarray(x, np.float64).astype(dtype).astype(np.float64)

            slots = {k: v.astype(np.float64) for k, v in self._slots[position].items()}
            with np.errstate(all="ignore"):
                new_w, new_slots = self._update(
                    np.asarray(variable.value, np.float64), rnd(g), slots, rnd
                )
            updates.append((variable, position, new_w.astype(dtype), new_slots, dtype))
        for variable, position, new_w, new_slots, dtype in updates:
            variable.assign(new_w)
            self._slots[position] = {k: v.astype(dtype) for k, v in new_slots.items()}
        # Keras projects after every update of the step, then counts the step.
        for variable, *_ in updates:
            if variable.constraint is not None:
                variable.assign(variable.constraint(variable.value))
        self._iterations = np.int64(self._iterations + 1)

    def apply_gradients(self, grads_and_vars: Sequence[tuple[Any, Any]]) -> np.int64:
        """`apply` on `(gradient, variable)` pairs; returns `iterations`."""
        grads, variables = zip(*grads_and_vars) if grads_and_vars else ((), ())
        self.apply(list(grads), list(variables))
        return self._iterations

    def _update(
        self,
        w: np.ndarray,
        g: np.ndarray,
        slots: dict[str, np.ndarray],
        rnd: Callable[[np.ndarray], np.ndarray],
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """One variable's update in float64: `(new weight, new slots)`.

        `rnd` rounds to the variable's dtype: each assigned value (a slot is
        assigned before the weight update reads it) and each hyperparameter
        (Keras casts them to the variable's dtype: `ops.cast(self.momentum,
        variable.dtype)`; a float literal such as `1 - beta_1` takes the
        tensor's dtype).
        """
        raise NotImplementedError

    # -- configs ---------------------------------------------------------------
    def get_config(self) -> dict:
        """Keras's config: base keys, then the optimizer's own."""
        return {
            "name": self.name,
            "learning_rate": self._learning_rate,
            "weight_decay": None,
            "clipnorm": None,
            "global_clipnorm": None,
            "clipvalue": None,
            "use_ema": False,
            "ema_momentum": self.ema_momentum,
            "ema_overwrite_frequency": None,
            "loss_scale_factor": None,
            "gradient_accumulation_steps": None,
        }

    @classmethod
    def from_config(cls, config: dict) -> Optimizer:
        """Instantiates the optimizer from the output of `get_config()`."""
        return cls(**config)

    def __repr__(self) -> str:
        own = {k: v for k, v in self.get_config().items() if k not in _UNSUPPORTED_DEFAULTS}
        args = ", ".join(f"{k}={v!r}" for k, v in own.items() if k not in ("ema_momentum",))
        return f"{type(self).__name__}({args})"
