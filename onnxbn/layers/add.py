"""Add: elementwise sum of a list of inputs (Keras 3's merge-layer semantics).

How it becomes ONNX lives in `onnxbn/lowering/add.py`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from onnxbn import ops
from onnxbn.dtypes import to_numpy_dtype
from onnxbn.gradients import Gradients, Pullback, sum_to_shape
from onnxbn.layers.layer import Layer
from onnxbn.operation import is_symbolic_call
from onnxbn.operation_registry import register_layer
from onnxbn.tensor import SymbolicTensor


def _elementwise_shape(shape1: tuple | None, shape2: tuple | None) -> tuple | None:
    """Keras's `_compute_elemwise_op_output_shape` (right-aligned, None is unknown)."""
    if shape1 is None or shape2 is None:
        return None
    if len(shape1) < len(shape2):
        shape1, shape2 = shape2, shape1
    if not shape2:
        return tuple(shape1)
    out = list(shape1[: -len(shape2)])
    for i, j in zip(shape1[-len(shape2) :], shape2):
        if i is None or j is None:
            out.append(None)
        elif i == 1:
            out.append(j)
        elif j == 1 or i == j:
            out.append(i)
        else:
            raise ValueError(
                f"Inputs have incompatible shapes. Received shapes {tuple(shape1)} and "
                f"{tuple(shape2)}"
            )
    return tuple(out)


def merge_output_shape(shapes: list[tuple]) -> tuple:
    """Output shape of an elementwise merge of inputs of `shapes` (batch axis first).

    Raises:
        ValueError: incompatible shapes or different known batch sizes.
    """
    batch_sizes = {s[0] for s in shapes if s} - {None}
    if len(batch_sizes) > 1:
        raise ValueError(
            f"Cannot merge tensors with different batch sizes. Received tensors with shapes "
            f"{[tuple(s) for s in shapes]}"
        )
    out = tuple(shapes[0][1:])
    for shape in shapes[1:]:
        out = _elementwise_shape(out, tuple(shape[1:]))
    return (next(iter(batch_sizes), None),) + out


@register_layer("keras.layers")
class Add(Layer):
    """Elementwise sum of a list of inputs (Keras's `Add`).

    Inputs of different ranks are expanded at axis 1 to the largest rank, then
    broadcast, as Keras does. The sum is taken in float64 and returned in the
    compute dtype.

    Masks follow Keras 3's `Merge.compute_mask`: when every input carries a
    mask, the output mask is their logical OR (recorded as `LogicalOr` op
    nodes, as Keras records them); when any input has none, the output has none.

    Args:
        **kwargs: base layer arguments (`name`, `dtype`, `trainable`).

    Call arguments:
        inputs: a list (or tuple) of at least one array.

    Returns:
        The sum, of the broadcast shape.

    Raises:
        ValueError: inputs not a list, incompatible shapes, different batch sizes.
        TypeError: call arguments other than the inputs.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.supports_masking = True

    def build(self, input_shape: Any) -> None:
        if not isinstance(input_shape, (list, tuple)) or not all(
            isinstance(s, (list, tuple)) for s in input_shape
        ):
            raise ValueError(
                "A merge layer should be called on a list of inputs. "
                f"Received: input_shape={input_shape} (not a list of shapes)"
            )
        if len(input_shape) < 1:
            raise ValueError(
                "A merge layer should be called on a list of at least 1 input. "
                f"Received {len(input_shape)} inputs. Full input_shape received: {input_shape}"
            )
        merge_output_shape([tuple(s) for s in input_shape])
        self.built = True

    @property
    def build_config(self) -> dict | None:
        """Keras's `{"input_shape": [shape, ...]}`: one shape per input."""
        if self._build_shape is None:
            return None
        return {"input_shape": [list(s) for s in self._build_shape]}

    def build_from_config(self, config: dict) -> None:
        """Builds from `build_config` (a list of input shapes, as Keras writes it).

        Raises:
            ValueError: a config other than `{"input_shape": [shape, ...]}`.
        """
        from onnxbn.tensor import standardize_shape

        shapes = config.get("input_shape") if isinstance(config, dict) else None
        if set(config or {}) != {"input_shape"} or not isinstance(shapes, list):
            raise ValueError(
                f"Add build_config must be {{'input_shape': [shape, ...]}}, received {config!r}."
            )
        shapes = [standardize_shape(s, "Add build_config input_shape") for s in shapes]
        self.build(shapes)
        self._build_shape = tuple(shapes)

    def _prepare(self, inputs: Any, kwargs: dict) -> tuple[list, bool]:
        """Checks and converts the inputs and builds the layer; also tells if symbolic."""
        owner = f"Add {self.name!r}"
        if kwargs:
            raise TypeError(f"{owner} takes only its list of inputs, received {sorted(kwargs)}.")
        if not isinstance(inputs, (list, tuple)):
            raise ValueError(
                "A merge layer should be called on a list of inputs. "
                f"Received: inputs={inputs!r:.200} (not a list of tensors)"
            )
        inputs = list(inputs)
        symbolic = is_symbolic_call((inputs,), {}, owner)
        if symbolic:
            for x in inputs:
                if not isinstance(x, SymbolicTensor):
                    raise TypeError(f"{owner}: every input must be a SymbolicTensor, got {x!r}.")
        else:
            inputs = [self._convert_input(x) for x in inputs]
        shapes = [tuple(x.shape) for x in inputs]
        if not self.built:
            self.build(shapes)
            self._build_shape = tuple(shapes)
        return inputs, symbolic

    def __call__(self, inputs: Any, **kwargs: Any) -> Any:
        inputs, symbolic = self._prepare(inputs, kwargs)
        if not symbolic:
            return self.call(inputs)
        output = self.symbolic_call(inputs)
        output._attach_mask(self.compute_mask(inputs, [x.mask for x in inputs]))
        return output

    def call_with_vjp(self, inputs: Any, **kwargs: Any) -> tuple[np.ndarray, Pullback]:
        """An eager call and its pullback (see `Layer.call_with_vjp`).

        Raises:
            TypeError: symbolic inputs (gradients are eager).
        """
        inputs, symbolic = self._prepare(inputs, kwargs)
        if symbolic:
            raise TypeError(
                f"Add {self.name!r}: call_with_vjp runs on arrays, not symbolic tensors."
            )
        return self.vjp(inputs)

    def compute_output_spec(self, inputs: list[SymbolicTensor]) -> SymbolicTensor:
        return SymbolicTensor(merge_output_shape([x.shape for x in inputs]), self.compute_dtype)

    def call(self, inputs: list[np.ndarray]) -> np.ndarray:
        return self.vjp(inputs)[0]

    def vjp(self, inputs: list[np.ndarray]) -> tuple[np.ndarray, Pullback]:
        merge_output_shape([x.shape for x in inputs])  # Keras's shape checks
        rank = max(x.ndim for x in inputs)
        # Lower-rank inputs gain axes right after the batch axis, then broadcast.
        expanded = [x.shape[:1] + (1,) * (rank - x.ndim) + x.shape[1:] for x in inputs]
        total = None
        for x, shape in zip(inputs, expanded):
            x = x.astype(np.float64).reshape(shape)
            total = x if total is None else total + x

        def pullback(dy: np.ndarray) -> Gradients:
            grads = [sum_to_shape(dy, shape).reshape(x.shape) for x, shape in zip(inputs, expanded)]
            return Gradients((grads,))

        return total.astype(to_numpy_dtype(self.compute_dtype)), pullback

    def compute_mask(self, inputs: Any, previous_mask: Any) -> Any:
        """Logical OR of the input masks; None when any input has none (Keras 3)."""
        if previous_mask is None:
            return None
        if not isinstance(previous_mask, (list, tuple)) or len(previous_mask) != len(inputs):
            raise ValueError(
                "The lists `inputs` and `mask` should have the same length. Received: "
                f"{len(inputs)} inputs and mask={previous_mask!r:.200}"
            )
        if any(m is None for m in previous_mask):
            return None
        output_mask = previous_mask[0]
        for m in previous_mask[1:]:
            output_mask = ops.logical_or(output_mask, m)
        return output_mask
