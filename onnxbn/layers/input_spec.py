"""Keras's `InputSpec`: rank and per-axis size checks applied from the second call on."""

from __future__ import annotations

from collections.abc import Sequence


class InputSpec:
    """Expected rank and fixed axis sizes of a layer's first input.

    Args:
        ndim: expected rank, or None.
        axes: `{axis: size}` (negative axes allowed).
    """

    def __init__(self, ndim: int | None = None, axes: dict[int, int | None] | None = None):
        self.ndim = ndim
        self.axes = dict(axes or {})


def assert_input_compatibility(
    spec: InputSpec | None, shape: Sequence[int | None], layer_name: str, index: int = 0
) -> None:
    """Raises Keras's `ValueError` when `shape` violates `spec`."""
    if spec is None:
        return
    shape = tuple(shape)
    if spec.ndim is not None and len(shape) != spec.ndim:
        raise ValueError(
            f'Input {index} of layer "{layer_name}" is incompatible with the layer: '
            f"expected ndim={spec.ndim}, found ndim={len(shape)}. "
            f"Full shape received: {shape}"
        )
    for axis, value in spec.axes.items():
        if value is None:
            continue
        if not -len(shape) <= axis < len(shape):
            raise ValueError(
                f'Input {index} of layer "{layer_name}" is incompatible with the layer: '
                f"expected axis {axis} of input shape to have value {value}, but received "
                f"input with shape {shape}"
            )
        if shape[axis] not in (value, None):
            raise ValueError(
                f'Input {index} of layer "{layer_name}" is incompatible with the layer: '
                f"expected axis {axis} of input shape to have value {value}, but received "
                f"input with shape {shape}"
            )
