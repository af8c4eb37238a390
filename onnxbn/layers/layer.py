"""`Layer`: an `Operation` with weights, a dtype policy, `trainable`, masks and input specs."""

from __future__ import annotations

import inspect
from typing import Any

import numpy as np

from onnxbn import constraints, initializers, regularizers
from onnxbn.dtypes import DTypePolicy, is_float, standardize_dtype, to_numpy_dtype
from onnxbn.gradients import Pullback
from onnxbn.layers.input_spec import InputSpec, assert_input_compatibility
from onnxbn.operation import Operation, is_symbolic_call
from onnxbn.tensor import SymbolicTensor, to_array
from onnxbn.tree import flatten
from onnxbn.variable import Variable

BASE_CONFIG_KEYS = ("name", "trainable", "dtype")


def assign_weights(variables: list[Variable], weights: Any, owner: str) -> None:
    """Assigns `weights` to `variables` in order, after checking count, types and shapes.

    Nothing is assigned unless every array fits (Keras's messages).

    Raises:
        TypeError: `weights` is not a list, or holds a non-numeric array.
        ValueError: the wrong number of arrays or a wrong shape.
    """
    if not isinstance(weights, (list, tuple)):
        raise TypeError(f"set_weights expects a list of arrays, received {type(weights).__name__}.")
    kind = owner.split(" ", 1)[0]
    if len(weights) != len(variables):
        raise ValueError(
            f"You called `set_weights(weights)` on {owner} with a weight list of length "
            f"{len(weights)}, but the {kind} was expecting {len(variables)} weights."
        )
    arrays = [to_array(w, f"Weight {v.path!r}") for v, w in zip(variables, weights)]
    for variable, array in zip(variables, arrays):
        if array.shape != variable.shape:
            raise ValueError(
                f"Weight {variable.path!r} of {owner}: weight shape {variable.shape} is not "
                f"compatible with provided weight shape {array.shape}."
            )
    for variable, array in zip(variables, arrays):
        variable.assign(array)


class Layer(Operation):
    """Base layer: weights, dtype policy, `trainable`, masking and input specs.

    Args:
        name: layer name (unique automatic name when omitted).
        dtype: dtype policy: a name (`"float32"`, `"mixed_float16"`, ...), a
            `DTypePolicy` or its Keras config dict.
        trainable: whether the layer's weights are trainable.

    Raises:
        ValueError: unrecognized keyword arguments.
    """

    def __init__(
        self,
        *,
        name: str | None = None,
        dtype: Any = None,
        trainable: bool = True,
        **kwargs: Any,
    ) -> None:
        if kwargs:
            raise ValueError(
                f"Unrecognized keyword arguments passed to {type(self).__name__}: {kwargs}. "
                f"Expected layer arguments and {list(BASE_CONFIG_KEYS)}."
            )
        if not isinstance(trainable, (bool, np.bool_)):
            raise TypeError(f"trainable must be a bool, received {trainable!r}.")
        self.dtype_policy = DTypePolicy.get(dtype)
        self._trainable = bool(trainable)
        self.built = False
        self.input_spec: InputSpec | None = None
        self.supports_masking = False
        self._build_shape: tuple | None = None
        self._trainable_variables: list[Variable] = []
        self._non_trainable_variables: list[Variable] = []
        super().__init__(name=name)

    # -- dtypes ---------------------------------------------------------------
    @property
    def dtype(self) -> str:
        """The variable dtype (as Keras's `layer.dtype`)."""
        return self.dtype_policy.variable_dtype

    @property
    def compute_dtype(self) -> str:
        return self.dtype_policy.compute_dtype

    @property
    def variable_dtype(self) -> str:
        return self.dtype_policy.variable_dtype

    # -- weights --------------------------------------------------------------
    def add_weight(
        self,
        shape: tuple[int, ...],
        initializer: Any,
        *,
        name: str,
        dtype: Any = None,
        trainable: bool = True,
        regularizer: Any = None,
        constraint: Any = None,
    ) -> Variable:
        """Creates a `Variable` owned by this layer (Keras order: creation order)."""
        dtype = standardize_dtype(dtype or self.variable_dtype)
        init = initializers.get(initializer)
        value = init(tuple(shape), dtype=dtype)
        variable = Variable(
            value,
            name=name,
            path=f"{self.name}/{name}",
            trainable=trainable,
            dtype=dtype,
            regularizer=regularizers.get(regularizer),
            constraint=constraints.get(constraint),
        )
        if trainable:
            self._trainable_variables.append(variable)
        else:
            self._non_trainable_variables.append(variable)
        return variable

    @property
    def trainable(self) -> bool:
        return self._trainable

    @trainable.setter
    def trainable(self, value: bool) -> None:
        if not isinstance(value, (bool, np.bool_)):
            raise TypeError(f"trainable must be a bool, received {value!r}.")
        self._trainable = bool(value)
        for variable in self._trainable_variables:
            variable.trainable = self._trainable

    @property
    def weights(self) -> list[Variable]:
        return self._trainable_variables + self._non_trainable_variables

    @property
    def trainable_weights(self) -> list[Variable]:
        if not self._trainable:
            return []
        return [v for v in self.weights if v.trainable]

    @property
    def non_trainable_weights(self) -> list[Variable]:
        if not self._trainable:
            return self.weights
        return [v for v in self.weights if not v.trainable]

    def get_weights(self) -> list[np.ndarray]:
        return [v.numpy() for v in self.weights]

    def set_weights(self, weights: list[Any]) -> None:
        """Assigns every weight, in `weights` order, after checking count and shapes.

        Raises:
            ValueError: wrong number of arrays or a wrong shape (nothing is assigned).
            TypeError: not a list, or a non-numeric array.
        """
        assign_weights(self.weights, weights, f"layer '{self.name}'")

    @property
    def losses(self) -> list[float]:
        """Regularization losses of the trainable weights (float64 scalars)."""
        return [v.regularizer(v.value) for v in self.trainable_weights if v.regularizer is not None]

    # -- calling --------------------------------------------------------------
    def build(self, input_shape: tuple[int | None, ...]) -> None:
        """Creates the weights for inputs of `input_shape` (batch axis included)."""
        self.built = True

    def _convert_input(self, value: Any) -> np.ndarray:
        array = to_array(value, f"Input of layer {self.name!r}")
        # Keras autocasts floating inputs to the compute dtype; ints stay ints.
        if is_float(array.dtype) and standardize_dtype(array.dtype) != self.compute_dtype:
            array = array.astype(to_numpy_dtype(self.compute_dtype))
        return array

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._dispatch(args, kwargs, vjp=False)

    def call_with_vjp(self, *args: Any, **kwargs: Any) -> tuple[Any, Pullback]:
        """An eager call that also returns its pullback (see `onnxbn/gradients.py`).

        Call arguments:
            *args, **kwargs: as for `layer(...)` on arrays.

        Returns:
            `(outputs, pullback)`: the call's outputs (state updated exactly as
            `layer(...)` does) and `pullback(dy) -> Gradients`, `dy` being the
            float64 gradient of the loss with respect to the output.

        Raises:
            TypeError: a symbolic argument (gradients are eager).
            NotImplementedError: the layer has no gradient rule.
        """
        return self._dispatch(args, kwargs, vjp=True)

    def vjp(self, *args: Any, **kwargs: Any) -> tuple[Any, Pullback]:
        """The layer's gradient rule: `call` plus its pullback (override in each layer)."""
        raise NotImplementedError(
            f"{type(self).__name__} {self.name!r} has no gradient rule, so it cannot be trained."
        )

    def _dispatch(self, args: tuple, kwargs: dict, vjp: bool) -> Any:
        owner = f"{type(self).__name__} {self.name!r}"
        symbolic = is_symbolic_call(args, kwargs, owner)
        if symbolic and vjp:
            raise TypeError(f"{owner}: call_with_vjp runs on arrays, not symbolic tensors.")
        if not args:
            raise TypeError(f"{owner} expects its input as the first positional argument.")
        first = args[0]
        if symbolic and not isinstance(first, SymbolicTensor):
            raise TypeError(
                f"{owner}: the first argument must be a SymbolicTensor, received {first!r}."
            )
        if not symbolic:
            first = self._convert_input(first)
            args = (first,) + args[1:]
        assert_input_compatibility(self.input_spec, first.shape, self.name)
        if (
            symbolic
            and self._call_has_mask_arg
            and kwargs.get("mask") is None
            and first.mask is not None
        ):
            kwargs["mask"] = first.mask
        if not self.built:
            self.build(tuple(first.shape))
            self.built = True
            self._build_shape = tuple(first.shape)
        if not symbolic:
            return self.vjp(*args, **kwargs) if vjp else self.call(*args, **kwargs)
        outputs = self.symbolic_call(*args, **kwargs)
        output_mask = self.compute_mask(first, first.mask)
        for tensor in flatten(outputs):
            tensor._attach_mask(output_mask)
        return outputs

    def compute_mask(self, inputs: Any, previous_mask: Any) -> Any:
        """Mask carried by the outputs: the input's mask if `supports_masking`."""
        return previous_mask if self.supports_masking else None

    # -- config ---------------------------------------------------------------
    def get_config(self) -> dict:
        return {
            "name": self.name,
            "trainable": self.trainable,
            "dtype": self.dtype_policy.serialize(),
        }

    @classmethod
    def from_config(cls, config: dict) -> Layer:
        from onnxbn.serialization import check_config_keys, require_dict

        require_dict(config, f"{cls.__name__} config")
        params = inspect.signature(cls.__init__).parameters
        allowed = [p for p in params if p not in ("self", "kwargs")] + list(BASE_CONFIG_KEYS)
        check_config_keys(config, allowed, cls.__name__)
        return cls(**config)

    @property
    def build_config(self) -> dict | None:
        if self._build_shape is None:
            return None
        return {"input_shape": list(self._build_shape)}
