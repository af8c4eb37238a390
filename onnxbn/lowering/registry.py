"""The lowering table: one rule per Operation class, registered by decorator."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from onnxbn.registry import Registry, RegistryLookupError

# A rule is `rule(ctx, op, *operands, **params)`: `ctx` is the LoweringContext,
# `op` the called Operation, operands the lowered positional call arguments
# and params the keyword ones (e.g. `training=`, `mask=`). It returns the
# lowered output value(s) in the structure of the call's outputs.
LoweringRule = Callable[..., Any]

LOWERING_RULES: Registry[type, LoweringRule] = Registry("lowering rule")


def register_lowering(op_class: type) -> Callable[[LoweringRule], LoweringRule]:
    """Decorator registering the lowering rule of `op_class`.

    Args:
        op_class: the Operation subclass the rule lowers.

    Returns:
        A decorator that registers the rule and returns it unchanged.

    Raises:
        ValueError: `op_class` already has a rule.
    """
    return LOWERING_RULES.register(op_class)


def lookup_lowering(op: Any) -> LoweringRule:
    """The rule for `op`'s class (or its nearest registered base class).

    Raises:
        ValueError: no rule for the class; the message lists the known classes.
    """
    for cls in type(op).__mro__:
        rule = LOWERING_RULES.get(cls)
        if rule is not None:
            return rule
    known = [cls.__name__ for cls in LOWERING_RULES]
    raise RegistryLookupError(
        f"No ONNX lowering for {type(op).__name__} {getattr(op, 'name', op)!r}; "
        f"operations with a lowering: {sorted(known)}."
    )


# A gradient rule is `rule(ctx, op, call, dy)`: `call` is the forward call's
# `CallRecord` (operands, params, output and what the forward rule saved with
# `ctx.save`), `dy` the lowered gradient of the loss with respect to the call's
# output (the output's dtype and shape). It returns an `onnxbn.gradients.Gradients`
# of lowered values: one entry per positional operand, `{path: value}` for the
# trainable weights the call read through `ctx.weight` (in the working dtype).
GradientRule = Callable[..., Any]

GRADIENT_RULES: Registry[type, GradientRule] = Registry("gradient rule")


def register_gradient(op_class: type) -> Callable[[GradientRule], GradientRule]:
    """Decorator registering the gradient rule of `op_class` (beside its lowering rule).

    Raises:
        ValueError: `op_class` already has a gradient rule.
    """
    return GRADIENT_RULES.register(op_class)


def lookup_gradient(op: Any) -> GradientRule:
    """The gradient rule for `op`'s class (or its nearest registered base class).

    Raises:
        ValueError: no rule; the message names the layer and lists the known classes.
    """
    for cls in type(op).__mro__:
        rule = GRADIENT_RULES.get(cls)
        if rule is not None:
            return rule
    known = [cls.__name__ for cls in GRADIENT_RULES]
    raise RegistryLookupError(
        f"No gradient rule for {type(op).__name__} {getattr(op, 'name', op)!r}, so a train "
        f"step cannot be exported; operations with one: {sorted(known)}."
    )
