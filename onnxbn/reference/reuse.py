"""Buffer reuse: an element-wise node may write its result into an input that dies there.

On large tensors a fresh NumPy array costs page faults on top of the
arithmetic; writing `Add(t, b)` into `t` when nothing reads `t` afterwards
saves them (and the memory). The decision is static and conservative:

- `t` is produced by an op whose outputs are always fresh arrays (never an
  input, a constant or a view of either), and is not a graph output;
- every reader of `t` is an op that never returns a view or alias of its
  inputs, so no other value shares `t`'s memory;
- the donating node is the last reader and an element-wise ufunc op (at run
  time it only writes into `t` if the result has `t`'s shape and dtype), or an
  inference BatchNormalization reading `t` as X (it normalizes `t` in place).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from onnxbn.reference.kernels.normalization import inference_into

# Element-wise ops that can compute into an input: op type -> ufunc (float inputs).
DONATING_UFUNCS: dict[str, np.ufunc] = {
    "Add": np.add,
    "Sub": np.subtract,
    "Mul": np.multiply,
    "Div": np.true_divide,
    "Sqrt": np.sqrt,
    "Neg": np.negative,
    "Abs": np.absolute,
    "Exp": np.exp,
    "Log": np.log,
    "Tanh": np.tanh,
    "Reciprocal": np.reciprocal,
}

# Ops whose every output is a newly allocated array that nothing else references.
FRESH_OUTPUT_OPS = frozenset(
    {*DONATING_UFUNCS, "Pow", "Relu", "Sigmoid", "Erf", "Softmax", "MatMul", "Gemm", "Conv"}
    | {"BatchNormalization"}
)

# Ops that never return a view or alias of an input (readers that keep `t` unshared).
_NON_ALIASING_OPS = FRESH_OUTPUT_OPS | {
    "Shape",
    "Size",
    "Equal",
    "Less",
    "LessOrEqual",
    "Greater",
    "GreaterOrEqual",
    "Where",
    "Concat",
    "Gather",
    "Expand",
}
_REDUCTIONS = frozenset(
    {
        "ReduceMean",
        "ReduceSum",
        "ReduceSumSquare",
        "ReduceProd",
        "ReduceMax",
        "ReduceMin",
        "ReduceL2",
    }
)

# Other ops that can compute into an input: op type -> (function, the one input position).
# The function takes the node's arguments and returns its results, or None to decline.
IN_PLACE_KERNELS: dict[str, tuple[Callable[..., tuple | None], int]] = {
    "BatchNormalization": (inference_into, 0),
}

# Below this many elements a fresh allocation is cheaper than the checks.
MIN_DONATION_SIZE = 1 << 16


def _never_aliases(op_type: str, kwargs: dict[str, Any]) -> bool:
    if op_type in _NON_ALIASING_OPS:
        return True
    # A reduction returns its input unchanged only with noop_with_empty_axes=1.
    return op_type in _REDUCTIONS and not kwargs.get("noop_with_empty_axes", 0)


def donating(
    how: np.ufunc | Callable[..., tuple | None],
    fallback: Callable[..., tuple],
    positions: Sequence[int],
) -> Callable[..., tuple]:
    """`fallback` (the kernel), except that it computes into `args[i]` for the first
    `i` in `positions` whose shape and dtype the result would have.

    `how` is the op's ufunc, or an `IN_PLACE_KERNELS` function (which decides itself
    whether it can write into its input and returns None when not)."""
    if not isinstance(how, np.ufunc):
        (position,) = positions

        def in_place(*args: np.ndarray, **kwargs: Any) -> tuple:
            buffer = args[position]
            if buffer.size >= MIN_DONATION_SIZE:
                result = how(*args, **kwargs)
                if result is not None:
                    return result
            return fallback(*args, **kwargs)

        in_place.__name__ = f"{fallback.__name__}_in_place"
        return in_place

    ufunc = how

    def fn(*args: np.ndarray) -> tuple:
        for i in positions:
            buffer = args[i]
            if (
                buffer.size >= MIN_DONATION_SIZE
                and buffer.dtype.kind == "f"
                and buffer.flags.writeable
                and all(a.dtype == buffer.dtype for a in args)
                and np.broadcast_shapes(*(a.shape for a in args)) == buffer.shape
            ):
                return (ufunc(*args, out=buffer),)
        return fallback(*args)

    fn.__name__ = f"{fallback.__name__}_reusing_input"
    return fn


def plan_donations(steps: Sequence[Any], keep: set[str]) -> dict[int, tuple[Any, tuple[int, ...]]]:
    """Which steps may write into which of their input positions.

    Args:
        steps: plan steps with `op_type`, `inputs`, `outputs`, `kwargs`.
        keep: names that must survive the run (graph outputs).

    Returns:
        `{step index: (ufunc or IN_PLACE_KERNELS function, input positions)}`.
    """
    producer: dict[str, int] = {}
    readers: dict[str, list[int]] = {}
    for i, step in enumerate(steps):
        for name in step.inputs:
            if name:
                readers.setdefault(name, []).append(i)
        for name in step.outputs:
            if name:
                producer[name] = i
    plan: dict[int, list[int]] = {}
    for name, reading in readers.items():
        source = producer.get(name)
        if source is None or name in keep or steps[source].op_type not in FRESH_OUTPUT_OPS:
            continue
        last = reading[-1]
        consumer = steps[last]
        if consumer.inputs.count(name) != 1:
            continue
        position = consumer.inputs.index(name)
        if consumer.op_type in IN_PLACE_KERNELS:
            if IN_PLACE_KERNELS[consumer.op_type][1] != position:
                continue
        elif consumer.op_type not in DONATING_UFUNCS:
            continue
        if all(_never_aliases(steps[r].op_type, steps[r].kwargs) for r in reading):
            plan.setdefault(last, []).append(position)
    result: dict[int, tuple[Any, tuple[int, ...]]] = {}
    for i, positions in plan.items():
        op_type = steps[i].op_type
        if op_type in IN_PLACE_KERNELS:
            result[i] = (IN_PLACE_KERNELS[op_type][0], tuple(positions))
        else:
            result[i] = (DONATING_UFUNCS[op_type], tuple(sorted(positions)))
    return result
