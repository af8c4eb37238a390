"""`LoweringContext`: what rules write into, and what it owns.

The context owns every name in the graph (`<layer>/<what>`, unique), the
initializers, the graph inputs, and the moving-statistic state slots of a
training export. Rules only say which ONNX nodes they need; the context fills
in every attribute the op's schema defines at the target opset, so the graph
never depends on a runtime's idea of a default.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxbn.contract import STATE_SUFFIX
from onnxbn.dtypes import standardize_dtype, to_numpy_dtype


def onnx_dtype(dtype: str) -> int:
    """TensorProto element type of an onnxbn dtype name."""
    return helper.np_dtype_to_tensor_dtype(to_numpy_dtype(dtype))


def state_doc(path: str, kind: str) -> str:
    """The doc_string of a state input or output: viewers such as Netron show only the
    last `/` part of a name (every state output reads `new`), and show this text."""
    layer, _, weight = path.rpartition("/")
    if kind == "input":
        return (
            f"{weight} of layer {layer!r}, current value: feed the starting value "
            f"(metadata onnxbn:initial_state), then each run's {path}{STATE_SUFFIX}."
        )
    return f"{weight} of layer {layer!r} after this run: feed it back as input {path!r}."


@dataclass(frozen=True)
class Value:
    """A tensor of the graph under construction.

    Attributes:
        name: graph name.
        dtype: onnxbn dtype name (`"float32"`, `"bool"`, ...).
        shape: static shape, `None` for a dimension known only at run time;
            `None` as a whole when even the rank is unknown.
    """

    name: str
    dtype: str
    shape: tuple[int | None, ...] | None = None

    @property
    def rank(self) -> int:
        if self.shape is None:
            raise ValueError(f"Value {self.name!r} has no known rank.")
        return len(self.shape)


@dataclass
class StateSlot:
    """One moving statistic carried through a training export."""

    path: str  # `<layer>/moving_mean`: the plain graph input's name
    dtype: str
    shape: tuple[int, ...]
    current: Value  # the latest value (the input until a call updates it)
    initial: np.ndarray  # the starting value, kept in the model's metadata


@dataclass
class CallRecord:
    """One lowered layer call, kept for its gradient rule in a train step.

    Attributes:
        op: the called operation.
        operands: the lowered positional arguments.
        params: the lowered keyword arguments (`training=` resolved).
        output: the lowered output.
        saved: intermediates the forward rule kept with `ctx.save(key, value)`.
    """

    op: Any
    operands: tuple
    params: dict
    output: Any = None
    saved: dict[str, Any] = field(default_factory=dict)


class LoweringContext:
    """Collects nodes, initializers, inputs and state while rules run.

    Args:
        opset: default-domain opset version of the graph.
        trainings: `{id(op): [resolved training flag of each call, in order]}`
            for every operation called in the exported graph.
    """

    def __init__(self, opset: int, trainings: dict[int, list[bool]] | None = None) -> None:
        self.opset = opset
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.state: dict[str, StateSlot] = {}
        # Synchronized BatchNormalization: inputs/outputs declared after the state ones.
        self.sync_inputs: list[onnx.ValueInfoProto] = []
        self.sync_outputs: list[onnx.ValueInfoProto] = []
        self._trainings = trainings or {}
        self._names: set[str] = set()
        self._scope = ""
        # Train step: the paths of the weights carried as state, and the call being lowered.
        self.trainable_paths: set[str] = set()
        self.weight_values: dict[str, Value] = {}
        self.current_call: CallRecord | None = None
        self.values: dict[int, Value] = {}  # `{id(symbolic tensor): lowered value}`

    # -- naming ---------------------------------------------------------------
    @contextlib.contextmanager
    def scope(self, name: str) -> Iterator[None]:
        """Names created inside start with `name/` (e.g. the layer name)."""
        previous = self._scope
        self._scope = name
        try:
            yield
        finally:
            self._scope = previous

    def reserve(self, name: str) -> str:
        """Claims `name` exactly; a name already in use is an error."""
        if name in self._names:
            raise ValueError(
                f"The graph name {name!r} is used twice; tensor and layer names must "
                "be unique in an exported graph."
            )
        self._names.add(name)
        return name

    def is_free(self, name: str) -> bool:
        return name not in self._names

    def fresh(self, label: str) -> str:
        """A new unique name `<scope>/<label>` (`_1`, `_2`, ... on reuse)."""
        base = f"{self._scope}/{label}" if self._scope else label
        name, k = base, 0
        while name in self._names:
            k += 1
            name = f"{base}_{k}"
        self._names.add(name)
        return name

    # -- graph pieces -----------------------------------------------------------
    def add_input(self, name: str, dtype: str, dims: Sequence[int | str]) -> Value:
        """Declares a graph input; `dims` holds ints and dim_param strings."""
        self.reserve(name)
        self.inputs.append(helper.make_tensor_value_info(name, onnx_dtype(dtype), list(dims)))
        shape = tuple(d if isinstance(d, int) else None for d in dims)
        return Value(name, dtype, shape)

    def constant(self, array: Any, label: str, dtype: str | None = None) -> Value:
        """An initializer holding `array` (cast to `dtype` when given)."""
        data = np.asarray(array)
        if dtype is not None:
            data = data.astype(to_numpy_dtype(dtype))
        name = self.fresh(label)
        self.initializers.append(numpy_helper.from_array(np.array(data, order="C"), name))
        return Value(name, standardize_dtype(data.dtype), tuple(data.shape))

    def op(
        self,
        op_type: str,
        inputs: Sequence[Value | str | None],
        *,
        label: str | None = None,
        dtype: str | None = None,
        shape: tuple[int | None, ...] | None = None,
        outputs: int = 1,
        **attributes: Any,
    ) -> Any:
        """Appends one node and returns its output (a tuple when `outputs > 1`).

        Every attribute the schema of `op_type` gives a default at this opset
        and that is not passed is written with that default.

        Args:
            op_type: default-domain ONNX op type.
            inputs: input values (`None` or `""` for an omitted optional input).
            label: output name label (default: the op type).
            dtype: output dtype (default: the first input's).
            shape: output static shape, if the rule knows it.
            outputs: number of node outputs, all of `dtype` and `shape`.
            **attributes: node attributes.
        """
        names = ["" if v is None else (v if isinstance(v, str) else v.name) for v in inputs]
        out_names = [self.fresh(label or op_type)]
        out_names += [self.fresh(f"{label or op_type}_out{i}") for i in range(1, outputs)]
        # A node is named after what it computes, its first output (`bn/batch_mean`):
        # node and tensor names are separate namespaces in ONNX, and output names are
        # unique, so node names are too. Renaming the output later keeps this name.
        node = helper.make_node(
            op_type,
            names,
            out_names,
            name=out_names[0],
            **self._with_defaults(op_type, attributes),
        )
        self.nodes.append(node)
        if dtype is None:
            first = next((v for v in inputs if isinstance(v, Value)), None)
            if first is None:
                raise ValueError(f"{op_type}: the output dtype must be given.")
            dtype = first.dtype
        values = tuple(Value(name, dtype, shape) for name in out_names)
        return values[0] if outputs == 1 else values

    def _with_defaults(self, op_type: str, attributes: dict[str, Any]) -> dict[str, Any]:
        schema = onnx.defs.get_schema(op_type, self.opset)
        unknown = sorted(set(attributes) - set(schema.attributes))
        if unknown:
            raise ValueError(
                f"{op_type}-{schema.since_version} has no attributes {unknown}; "
                f"known: {sorted(schema.attributes)}."
            )
        full = dict(attributes)
        for name, attr in schema.attributes.items():
            if name not in full and attr.default_value.type != onnx.AttributeProto.UNDEFINED:
                full[name] = helper.get_attribute_value(attr.default_value)
        return full

    # -- weights and saved intermediates (train step) ---------------------------
    def weight(self, variable: Any, label: str, dtype: str) -> Value:
        """A layer weight as a value of `dtype`.

        In a plain export, a constant of the variable's current value. In a
        train step, a trainable weight is the state input `variable.path` (the
        variable's dtype), cast to `dtype` when they differ; its gradient is
        the gradient with respect to the returned value.
        """
        if variable.path not in self.trainable_paths:
            return self.constant(np.asarray(variable.value, dtype=np.float64), label, dtype)
        value = self.read_state(variable.path, variable.value, variable.dtype)
        if value.dtype != dtype:
            value = self.op(
                "Cast", [value], label=label, dtype=dtype, shape=value.shape, to=onnx_dtype(dtype)
            )
        return value

    def save(self, key: str, value: Any) -> Any:
        """Keeps `value` for the gradient rule of the call being lowered; returns it."""
        if self.current_call is not None:
            self.current_call.saved[key] = value
        return value

    # -- state ----------------------------------------------------------------
    def trainings(self, op: Any) -> list[bool]:
        """Resolved `training` flags of every call of `op` in this export."""
        return list(self._trainings.get(id(op), []))

    def read_state(self, path: str, value: np.ndarray, dtype: str) -> Value:
        """Current value of the state `path`, declaring it on first use.

        The first read creates the plain graph input `path` (never backed by
        an initializer: several runtimes fold such inputs into constants);
        `value` becomes its starting value in the model's metadata.
        """
        slot = self.state.get(path)
        if slot is None:
            data = np.asarray(value).astype(to_numpy_dtype(dtype))
            self.reserve(path)
            self.reserve(path + STATE_SUFFIX)
            info = helper.make_tensor_value_info(path, onnx_dtype(dtype), list(data.shape))
            info.doc_string = state_doc(path, "input")
            self.inputs.append(info)
            slot = StateSlot(path, dtype, tuple(data.shape), Value(path, dtype, data.shape), data)
            self.state[path] = slot
        return slot.current

    def exchange(
        self, partial: Value, partial_suffix: str, global_suffix: str, flag_name: str
    ) -> tuple[Value, Value, Value]:
        """Publishes `partial` as output `<scope><partial_suffix>`; declares the global input.

        The input `<scope><global_suffix>` (same type, zeros by default) and the
        shared bool flag input `flag_name` (False by default) are declared once;
        see `onnxbn/lowering/synchronized.py` for the contract.

        Returns:
            The renamed partial, the global input and the flag.
        """
        dtype = onnx_dtype(partial.dtype)
        out_name = self.reserve(self._scope + partial_suffix)
        self.rename(partial.name, out_name)
        self.sync_outputs.append(
            helper.make_tensor_value_info(out_name, dtype, list(partial.shape))
        )
        if flag_name not in self._names:
            self.reserve(flag_name)
            self.sync_inputs.append(helper.make_tensor_value_info(flag_name, TensorProto.BOOL, []))
            self.initializers.append(numpy_helper.from_array(np.array(False), flag_name))
        in_name = self.reserve(self._scope + global_suffix)
        self.sync_inputs.append(helper.make_tensor_value_info(in_name, dtype, list(partial.shape)))
        zeros = np.zeros(partial.shape, to_numpy_dtype(partial.dtype))
        self.initializers.append(numpy_helper.from_array(zeros, in_name))
        return (
            Value(out_name, partial.dtype, partial.shape),
            Value(in_name, partial.dtype, partial.shape),
            Value(flag_name, "bool", ()),
        )

    def write_state(self, path: str, value: Value) -> None:
        """Makes `value` the current value of the state `path`."""
        slot = self.state[path]
        if value.dtype != slot.dtype:
            raise ValueError(f"State {path!r} is {slot.dtype}; a rule wrote a {value.dtype} value.")
        slot.current = value

    def initial_state(self) -> dict[str, np.ndarray]:
        """The starting value of every state input, in input order (`onnxbn:initial_state`)."""
        return {slot.path: slot.initial for slot in self.state.values()}

    def state_outputs(self) -> list[onnx.ValueInfoProto]:
        """Names the final value of every state `<path>/new` and declares the outputs."""
        outputs = []
        for slot in self.state.values():
            target = slot.path + STATE_SUFFIX
            if slot.current.name == slot.path:
                self.nodes.append(helper.make_node("Identity", [slot.path], [target], name=target))
            else:
                self.rename(slot.current.name, target)
                for node in self.nodes:  # `bn/moving_mean/new`, not the rule's `bn/new`
                    if target in node.output:
                        node.name = target
            info = helper.make_tensor_value_info(target, onnx_dtype(slot.dtype), list(slot.shape))
            info.doc_string = state_doc(slot.path, "output")
            outputs.append(info)
        return outputs

    # -- rewriting --------------------------------------------------------------
    def rename(self, old: str, new: str) -> None:
        """Renames a node output everywhere it appears (`new` must be reserved)."""
        for node in self.nodes:
            for i, name in enumerate(node.input):
                if name == old:
                    node.input[i] = new
            for i, name in enumerate(node.output):
                if name == old:
                    node.output[i] = new
        self._names.discard(old)
        self._names.add(new)

    def produced(self, name: str) -> bool:
        """True when a node of the graph outputs `name`."""
        return any(name in node.output for node in self.nodes)
