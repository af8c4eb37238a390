"""The optimizer update of a train step as ONNX nodes: Keras's `SGD` and `Adam`.

The state follows `onnxbn/optimizers.py`: `optimizer/iterations` (int64, the
steps taken) is declared first, then each variable's slots in Keras's order
(`optimizer/<slot>/<variable path>`), all before any update node, so their
names are taken before a generated one could be. The update is the eager
formula computed in the variable's dtype (float32 for a 16-bit variable, whose
slots are still stored in its dtype and rounded before the weight update reads
them, as Keras assigns them); Adam's bias correction raises the betas to
`iterations + 1` cast to that dtype. Then the variable's constraint projects
the new weight, and the counter becomes `iterations + 1`. The variables stored
in one dtype are updated together, on their concatenation (`_update_group`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from onnxbn import optimizers as eager
from onnxbn.dtypes import to_numpy_dtype
from onnxbn.lowering import emit
from onnxbn.lowering.constraints import lower_constraint, working_dtype
from onnxbn.lowering.context import LoweringContext, Value


class _Constants:
    """Scalars shared by every variable of one (stored, working) dtype pair.

    A hyperparameter is rounded to the variable's dtype first, as Keras casts
    it (`ops.cast(self.momentum, variable.dtype)`), then held in the working
    dtype.
    """

    def __init__(self, ctx: LoweringContext, iterations: Value) -> None:
        self.ctx = ctx
        self.iterations = iterations
        self._cache: dict[tuple[str, str, str], Value] = {}

    def get(self, name: str, value: float, stored: str, dtype: str) -> Value:
        key = (name, stored, dtype)
        if key not in self._cache:
            rounded = np.asarray(value, np.float64).astype(to_numpy_dtype(stored))
            with self.ctx.scope(eager.PREFIX):
                self._cache[key] = emit.scalar(self.ctx, rounded, dtype, name)
        return self._cache[key]

    def adam_alpha(self, opt: eager.Adam, stored: str, dtype: str) -> Value:
        """`learning_rate * sqrt(1 - beta_2**t) / (1 - beta_1**t)`, `t = iterations + 1`."""
        key = ("alpha", stored, dtype)
        if key in self._cache:
            return self._cache[key]
        ctx = self.ctx
        one = self.get("one", 1.0, stored, dtype)
        lr = self.get("learning_rate", opt.learning_rate, stored, dtype)
        beta_1 = self.get("beta_1", opt.beta_1, stored, dtype)
        beta_2 = self.get("beta_2", opt.beta_2, stored, dtype)
        with ctx.scope(eager.PREFIX):
            one_step = emit.scalar(ctx, 1, "int64", "one_step")
            step = ctx.op("Add", [self.iterations, one_step], label="step", shape=())
            # Keras: `ops.cast(self.iterations + 1, variable.dtype)`.
            t = emit.cast(ctx, emit.cast(ctx, step, stored, label="local_step"), dtype)
            power_1 = ctx.op("Pow", [beta_1, t], label="beta_1_power", shape=())
            power_2 = ctx.op("Pow", [beta_2, t], label="beta_2_power", shape=())
            correction_1 = ctx.op("Sub", [one, power_1], label="one_minus_beta_1_power", shape=())
            correction_2 = ctx.op("Sub", [one, power_2], label="one_minus_beta_2_power", shape=())
            root = ctx.op("Sqrt", [correction_2], label="sqrt_correction", shape=())
            scaled = ctx.op("Mul", [lr, root], label="corrected_rate", shape=())
            self._cache[key] = ctx.op("Div", [scaled, correction_1], label="alpha", shape=())
        return self._cache[key]


class _Update:
    """What a rule needs for one variable: its dtypes, constants and slot rounding."""

    def __init__(self, ctx: LoweringContext, constants: _Constants, stored: str) -> None:
        self.ctx = ctx
        self.constants = constants
        self.stored = stored
        self.dtype = working_dtype(stored)
        self.kept: dict[str, Value] = {}  # name of a rounded slot -> its stored value

    def const(self, name: str, value: float) -> Value:
        return self.constants.get(name, value, self.stored, self.dtype)

    def assign(self, value: Value) -> Value:
        """A new slot value stored in the variable's dtype and read back in the
        working dtype: Keras assigns a slot before the weight update reads it."""
        kept = emit.cast(self.ctx, value, self.stored, label="stored")
        back = emit.cast(self.ctx, kept, self.dtype, label="rounded")
        self.kept[back.name] = kept
        return back


def _sgd(
    ctx: LoweringContext, opt: eager.SGD, u: _Update, w: Value, g: Value, slots: dict
) -> tuple[Value, dict]:
    step = ctx.op("Mul", [g, u.const("learning_rate", opt.learning_rate)], label="scaled_gradient")
    if not opt.slot_names:
        return ctx.op("Sub", [w, step], label="new", shape=w.shape), {}
    momentum = u.const("momentum", opt.momentum)
    decayed = ctx.op("Mul", [slots["momentum"], momentum], label="decayed", shape=w.shape)
    m = u.assign(ctx.op("Sub", [decayed, step], label="momentum", shape=w.shape))
    if opt.nesterov:
        ahead = ctx.op("Mul", [m, momentum], label="ahead", shape=w.shape)
        delta = ctx.op("Sub", [ahead, step], label="delta", shape=w.shape)
        return ctx.op("Add", [w, delta], label="new", shape=w.shape), {"momentum": m}
    return ctx.op("Add", [w, m], label="new", shape=w.shape), {"momentum": m}


def _adam(
    ctx: LoweringContext, opt: eager.Adam, u: _Update, w: Value, g: Value, slots: dict
) -> tuple[Value, dict]:
    def moment(old: Value, target: Value, beta: float, label: str) -> Value:
        # Keras's `old += (target - old) * (1 - beta)`.
        diff = ctx.op("Sub", [target, old], label=f"{label}_diff", shape=w.shape)
        keep = u.const(f"one_minus_{label}_beta", 1.0 - beta)
        change = ctx.op("Mul", [diff, keep], label=f"{label}_change", shape=w.shape)
        return u.assign(ctx.op("Add", [old, change], label=label, shape=w.shape))

    m = moment(slots["momentum"], g, opt.beta_1, "momentum")
    square = ctx.op("Mul", [g, g], label="squared_gradient", shape=w.shape)
    v = moment(slots["velocity"], square, opt.beta_2, "velocity")
    alpha = u.constants.adam_alpha(opt, u.stored, u.dtype)
    scaled = ctx.op("Mul", [m, alpha], label="scaled_momentum", shape=w.shape)
    root = ctx.op("Sqrt", [v], label="sqrt_velocity", shape=w.shape)
    denominator = ctx.op("Add", [root, u.const("epsilon", opt.epsilon)], label="denominator")
    delta = ctx.op("Div", [scaled, denominator], label="delta", shape=w.shape)
    return ctx.op("Sub", [w, delta], label="new", shape=w.shape), {"momentum": m, "velocity": v}


_RULES = {eager.SGD: _sgd, eager.Adam: _adam}


def _initial_slots(optimizer: eager.Optimizer, variable: Any) -> dict[str, np.ndarray]:
    """The optimizer's current slots of `variable` (a built optimizer), else zeros."""
    if optimizer.built:
        try:
            return optimizer.slots(variable)
        except ValueError:  # a variable it was not built with
            pass
    zeros = np.zeros(variable.shape, to_numpy_dtype(variable.dtype))
    return {name: zeros for name in optimizer.slot_names}


def lower_update(
    ctx: LoweringContext,
    optimizer: eager.Optimizer,
    params: Sequence[tuple[Any, Value, Value]],
) -> None:
    """One optimizer step on `params`, written to the state of `ctx`.

    Args:
        ctx: The lowering context.
        optimizer: An `onnxbn.optimizers.SGD` or `Adam`; its current
            iterations and slots (zeros when not built) become the state's
            starting values.
        params: `(variable, weight, gradient)` per trainable variable: the
            weight is its state value (the variable's dtype), the gradient
            of the same shape (cast to the variable's dtype, as Keras does).
            Each new weight is written to the state `variable.path`.

    Raises:
        TypeError: an optimizer without a lowering, a constraint without one.
        ValueError: a weight or gradient shape other than the variable's.
    """
    rule = _RULES.get(type(optimizer))
    if rule is None:
        raise TypeError(
            f"Cannot export the optimizer {optimizer!r} of type {type(optimizer).__name__}: "
            "only onnxbn.optimizers.SGD and Adam have an ONNX lowering."
        )
    iterations = ctx.read_state(eager.ITERATIONS, np.int64(optimizer.iterations), "int64")
    states = []  # [(variable, weight, gradient, {slot: value})]
    for variable, w, g in params:
        for value, what in ((w, "weight"), (g, "gradient")):
            if value.shape is not None and tuple(value.shape) != tuple(variable.shape):
                raise ValueError(
                    f"The {what} {value.name!r} of variable {variable.path!r} has shape "
                    f"{value.shape}; expected {variable.shape}."
                )
        initial = _initial_slots(optimizer, variable)
        slots = {
            name: ctx.read_state(
                eager.slot_path(name, variable.path), initial[name], variable.dtype
            )
            for name in optimizer.slot_names
        }
        states.append((variable, w, g, slots))
    if not states:
        return  # Keras counts no step without gradients
    groups: dict[str, list] = {}
    for state in states:
        groups.setdefault(state[0].dtype, []).append(state)
    constants = _Constants(ctx, iterations)
    for stored, group in groups.items():
        with ctx.scope(f"{eager.PREFIX}/{stored}"):
            _update_group(ctx, optimizer, rule, constants, stored, group)
    with ctx.scope(eager.PREFIX):
        one = emit.scalar(ctx, 1, "int64", "one")
        ctx.write_state(
            eager.ITERATIONS, ctx.op("Add", [iterations, one], label="next_iterations", shape=())
        )


def _update_group(ctx, optimizer, rule, constants, stored: str, states: list) -> None:
    """The rule applied once to the variables stored in one dtype, concatenated.

    A dozen element-wise nodes per variable were about 230 of the ResNet-style
    train step's 880 nodes (8% of its onnxruntime kernel time, mostly per-node
    overhead on small tensors): the weights, gradients and slots are flattened
    and concatenated, the rule runs once, and Split + Reshape give each variable
    its new weight and slots. Every element goes through the same operations
    with the same constants as it would alone, so the results do not change.
    """
    sizes = [int(np.prod(variable.shape, dtype=np.int64)) for variable, *_ in states]
    single = len(states) == 1

    def flat(value: Value, variable: Any, label: str) -> Value:
        if len(variable.shape) == 1:
            return value
        return emit.reshape(ctx, value, [int(np.prod(variable.shape))], label)

    def joined(values: list[Value], label: str) -> Value:
        if single:
            return values[0]
        parts = [flat(v, variable, f"{label}_flat") for v, (variable, *_) in zip(values, states)]
        return ctx.op("Concat", parts, label=label, axis=0, shape=(sum(sizes),))

    def split(value: Value, label: str) -> list[Value]:
        if single:
            return [value]
        parts = ctx.op("Split", [value, emit.ints(ctx, sizes, "sizes")], label=label,
                       outputs=len(sizes), axis=0, shape=None)  # fmt: skip
        return [
            Value(part.name, part.dtype, tuple(variable.shape))
            if len(variable.shape) == 1
            else emit.reshape(ctx, part, list(variable.shape), label)
            for part, (variable, *_) in zip(parts, states)
        ]

    u = _Update(ctx, constants, stored)
    w = emit.cast(ctx, joined([w for _, w, _, _ in states], "weights"), u.dtype)
    # Keras casts the gradient to the variable's dtype.
    g = joined([emit.cast(ctx, g, stored, label="gradient") for _, _, g, _ in states], "gradients")
    slots = {
        name: emit.cast(ctx, joined([s[name] for *_, s in states], name), u.dtype)
        for name in optimizer.slot_names
    }
    new_w, new_slots = rule(ctx, optimizer, u, w, emit.cast(ctx, g, u.dtype), slots)
    new_w = emit.cast(ctx, new_w, stored, label="rounded_new")
    for (variable, *_), value in zip(states, split(new_w, "new")):
        with ctx.scope(variable.path):
            ctx.write_state(variable.path, lower_constraint(ctx, variable.constraint, value))
    for name, value in new_slots.items():
        for (variable, *_), part in zip(states, split(u.kept[value.name], name)):
            ctx.write_state(eager.slot_path(name, variable.path), part)
