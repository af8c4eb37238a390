"""The optimizer update of a train step applied once per dtype, on concatenated weights.

The per-variable update (`lowering/optimizers.py`) is a dozen element-wise
nodes per variable: about 230 of the ResNet-style train step's 880 nodes, 8%
of its onnxruntime kernel time, mostly per-node overhead on small tensors.
Here the variables stored in one dtype are flattened and concatenated (weight,
gradient, each slot), the same rule runs once on the concatenation, and Split
+ Reshape hand each variable its new weight and slots. Every element goes
through the same operations with the same constants as in the per-variable
form, so the results are bit-identical; the state inputs and outputs stay one
per variable, declared in the same order.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from onnxbn import optimizers as eager
from onnxbn.lowering import emit
from onnxbn.lowering.constraints import lower_constraint
from onnxbn.lowering.context import LoweringContext, Value
from onnxbn.lowering.optimizers import _RULES, _Constants, _initial_slots, _Update, lower_update


def lower_fused_update(
    ctx: LoweringContext,
    optimizer: eager.Optimizer,
    params: Sequence[tuple[Any, Value, Value]],
) -> None:
    """One optimizer step on `params`, written to the state of `ctx`.

    The same contract and results as `lowering.optimizers.lower_update`, with
    one update per stored dtype instead of one per variable.

    Args:
        ctx: The lowering context.
        optimizer: An `onnxbn.optimizers.SGD` or `Adam`.
        params: `(variable, weight, gradient)` per trainable variable, the
            weight and gradient of the variable's shape and dtype.

    Raises:
        TypeError: an optimizer without a lowering, a constraint without one.
        ValueError: a weight or gradient shape other than the variable's.
    """
    rule = _RULES.get(type(optimizer))
    if rule is None or len(params) < 2:
        lower_update(ctx, optimizer, params)  # nothing to fuse, or its error
        return
    iterations = ctx.read_state(eager.ITERATIONS, np.int64(optimizer.iterations), "int64")
    groups: dict[str, list] = {}  # stored dtype -> [(variable, w, g, slots)]
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
        groups.setdefault(variable.dtype, []).append((variable, w, g, slots))
    constants = _Constants(ctx, iterations)
    for stored, states in groups.items():
        with ctx.scope(f"{eager.PREFIX}/{stored}"):
            _update_group(ctx, optimizer, rule, constants, stored, states)
    with ctx.scope(eager.PREFIX):
        one = emit.scalar(ctx, 1, "int64", "one")
        ctx.write_state(
            eager.ITERATIONS, ctx.op("Add", [iterations, one], label="next_iterations", shape=())
        )


def _update_group(ctx, optimizer, rule, constants, stored: str, states: list) -> None:
    """The rule applied once to the concatenated variables of one stored dtype."""
    sizes = [int(np.prod(variable.shape, dtype=np.int64)) for variable, *_ in states]
    total = (sum(sizes),)

    def flat(value: Value, variable: Any, label: str) -> Value:
        if len(variable.shape) == 1:  # already flat, whatever static shape the rule knew
            return value
        return emit.reshape(ctx, value, [int(np.prod(variable.shape))], label)

    def joined(values: list[Value], label: str) -> Value:
        parts = [flat(v, variable, f"{label}_flat") for v, (variable, *_) in zip(values, states)]
        return ctx.op("Concat", parts, label=label, axis=0, shape=total)

    def split(value: Value, label: str) -> list[Value]:
        parts = ctx.op("Split", [value, emit.ints(ctx, sizes, "sizes")], label=label,
                       outputs=len(sizes), axis=0, shape=None)  # fmt: skip
        parts = [parts] if len(sizes) == 1 else parts
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
