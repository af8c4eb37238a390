"""The NumPy interpreter: compiles an ONNX graph once into a plan, then runs it.

The plan is a list of steps `(kernel function, input names, attribute
kwargs, output names, names to drop)`, so running a node is one dict lookup
per input, one call and one store per output (a few microseconds). All
validation happens at compile time: unsupported ops raise
`NotImplementedError` naming op type and opset; a malformed graph (an input
nothing produces, a name produced twice, a missing or unknown attribute)
raises `ValueError` naming it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import onnx

from onnxbn.reference import kernels
from onnxbn.reference.kernels.table import OUTPUT_COUNT_KEYWORD
from onnxbn.reference.limits import (
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_DEPTH,
    check_max_bytes,
    reset_max_bytes,
    set_max_bytes,
)
from onnxbn.reference.loading import (
    TensorLoader,
    attribute_value,
    check_nesting,
    check_tensor_type,
    input_spec,
    load_model,
)
from onnxbn.reference.opset import DEFAULT_DOMAINS, default_opset
from onnxbn.reference.reuse import donating, plan_donations
from onnxbn.session import FeedSpec, convert_feed

_UNUSED = "\x00unused:"  # prefix of skipped outputs; no ONNX name starts with NUL


class Step(NamedTuple):
    fn: Any
    inputs: tuple[str, ...]
    kwargs: dict[str, Any]
    outputs: tuple[str, ...]
    drop: tuple[str, ...]
    node: str
    op_type: str


def _node_label(node: onnx.NodeProto, index: int) -> str:
    name = node.name or f"#{index}"
    return f"node {name!r} ({node.op_type})"


class Interpreter:
    """Runs an ONNX model with the reference kernels.

    Args:
        model: a `ModelProto`, a path to a `.onnx` file, or serialized bytes.
        base_dir: folder of the external data of an in-memory model.
        max_bytes: cap on any single tensor the model declares or a kernel
            allocates from data-dependent sizes (default 4 GiB).
        max_depth: cap on graph nesting through graph attributes.

    Raises:
        NotImplementedError: an op (or its opset) has no kernel, the opset is
            newer than the interpreter knows, or the model imports only
            another domain.
        ValueError: a malformed or unsafe model (see `onnxbn.reference.loading`).
    """

    def __init__(
        self,
        model: onnx.ModelProto | str | os.PathLike | bytes,
        *,
        base_dir: str | os.PathLike | None = None,
        max_bytes: int = DEFAULT_MAX_BYTES,
        max_depth: int = DEFAULT_MAX_DEPTH,
    ) -> None:
        self.max_bytes = check_max_bytes(max_bytes)
        if isinstance(max_depth, bool) or not isinstance(max_depth, int) or max_depth < 1:
            raise ValueError(f"max_depth must be a positive int, received {max_depth!r}.")
        proto, folder = load_model(model, base_dir)
        self.model = proto
        check_nesting(proto.graph, max_depth)
        self.opset = default_opset(proto)
        self._loader = TensorLoader(folder, self.max_bytes)
        token = set_max_bytes(self.max_bytes)
        try:
            self._compile(proto.graph)
        finally:
            reset_max_bytes(token)

    def _compile(self, graph: onnx.GraphProto) -> None:
        constants: dict[str, Any] = {"": None}
        for tensor in graph.initializer:
            self._claim(constants, tensor.name, "initializer")
            constants[tensor.name] = self._loader.to_array(tensor, "Initializer")
        for sparse in graph.sparse_initializer:
            name = sparse.values.name
            self._claim(constants, name, "sparse initializer")
            constants[name] = self._loader.sparse_to_array(sparse, f"Sparse initializer {name!r}")
        self.input_names: list[str] = []
        self._specs: dict[str, FeedSpec | None] = {}
        for value_info in graph.input:
            if value_info.name in self._specs or not value_info.name:
                raise ValueError(f"Graph input {value_info.name!r} is declared twice or unnamed.")
            self.input_names.append(value_info.name)
            self._specs[value_info.name] = input_spec(value_info)
        self.required_inputs = [n for n in self.input_names if n not in constants]
        available = set(constants) | set(self.input_names)
        steps: list[Step] = []
        for index, node in enumerate(graph.node):
            step = self._compile_node(node, index, available)
            if node.op_type == "Constant":
                constants[step.outputs[0]] = self._fold(step)
            else:
                steps.append(step)
        for value_info in graph.output:
            check_tensor_type(value_info, "Graph output")
        self.output_names = [o.name for o in graph.output]
        for name in self.output_names:
            if name not in available:
                raise ValueError(
                    f"Graph output {name!r} is not produced by any node, input or initializer."
                )
        self._constants = constants
        # run_all keeps every value, so it runs the plan without drops or reuse.
        self._all_steps = steps
        self._steps = self._optimized(steps)
        self._all_program = [(s.fn, s.inputs, s.kwargs, s.outputs, (), s.node) for s in steps]
        self._program = [(s.fn, s.inputs, s.kwargs, s.outputs, s.drop, s.node) for s in self._steps]

    @staticmethod
    def _claim(names: Mapping[str, Any] | set[str], name: str, what: str) -> None:
        if not name:
            raise ValueError(f"An {what} has an empty name.")
        if name in names:
            raise ValueError(f"The name {name!r} ({what}) is defined twice in the graph.")

    def _compile_node(self, node: onnx.NodeProto, index: int, available: set[str]) -> Step:
        label = _node_label(node, index)
        if node.domain not in DEFAULT_DOMAINS:
            raise NotImplementedError(
                f"{label}: domain {node.domain!r} is not supported by the reference "
                f"interpreter (opset {self.opset} of the default domain only)."
            )
        kernel = kernels.select(node.op_type, self.opset)
        inputs = list(node.input)
        while inputs and not inputs[-1]:
            inputs.pop()  # trailing optional inputs left out: the kernel's defaults apply
        if len(inputs) < kernel.min_inputs or (
            kernel.max_inputs is not None and len(inputs) > kernel.max_inputs
        ):
            expected = f"{kernel.min_inputs}..{kernel.max_inputs if kernel.max_inputs is not None else 'any'}"
            raise ValueError(
                f"{label} has {len(inputs)} inputs {inputs}; {node.op_type}-"
                f"{kernel.since_version} takes {expected}."
            )
        for position, name in enumerate(inputs):
            if not name and position < kernel.min_inputs:
                raise ValueError(f"{label}: required input {position} is empty.")
            if name and name not in available:
                raise ValueError(
                    f"{label} reads {name!r}, which no earlier node, graph input or "
                    "initializer produces."
                )
        kwargs = self._attributes(node, kernel, label)
        outputs = list(node.output)
        while outputs and not outputs[-1]:
            outputs.pop()
        if not outputs:
            raise ValueError(f"{label} has no outputs.")
        for position, name in enumerate(outputs):
            if name:
                self._claim(available, name, f"output of {label}")
                available.add(name)
            else:  # a skipped optional output: a private name nothing reads
                outputs[position] = f"{_UNUSED}{index}:{position}"
        if kernel.wants_output_count:
            kwargs[OUTPUT_COUNT_KEYWORD] = len(outputs)
        return Step(kernel.fn, tuple(inputs), kwargs, tuple(outputs), (), label, node.op_type)

    def _attributes(
        self, node: onnx.NodeProto, kernel: kernels.Kernel, label: str
    ) -> dict[str, Any]:
        kwargs: dict[str, Any] = {}
        for attr in node.attribute:
            if attr.name not in kernel.attributes:
                raise ValueError(
                    f"{label} has attribute {attr.name!r}, unknown to {node.op_type}-"
                    f"{kernel.since_version}; expected one of {sorted(kernel.attributes)}."
                )
            if attr.name in kwargs:
                raise ValueError(f"{label} sets attribute {attr.name!r} twice.")
            kwargs[attr.name] = attribute_value(attr, self._loader, label)
        missing = [a for a in kernel.required_attributes if a not in kwargs]
        if missing:
            raise ValueError(
                f"{label} is missing required attribute(s) {missing} of "
                f"{node.op_type}-{kernel.since_version}."
            )
        return kwargs

    @staticmethod
    def _fold(step: Step) -> np.ndarray:
        """Evaluates a Constant node once, at compile time."""
        try:
            (value,) = step.fn(**step.kwargs)
        except (TypeError, ValueError) as error:
            raise ValueError(f"{step.node}: {error}") from None
        value = np.asarray(value)
        value.flags.writeable = False
        return value

    def _optimized(self, steps: list[Step]) -> list[Step]:
        """Frees each value after its last reader and lets element-wise steps
        write into a dying input (see `onnxbn.reference.reuse`)."""
        keep = set(self.output_names)
        last: dict[str, int] = {}
        for i, step in enumerate(steps):
            for name in step.inputs:
                if name:
                    last[name] = i
        drops: list[list[str]] = [[] for _ in steps]
        for name, i in last.items():
            if name not in keep:
                drops[i].append(name)
        for i, step in enumerate(steps):  # outputs nobody reads go at once
            drops[i].extend(n for n in step.outputs if n not in last and n not in keep)
        donations = plan_donations(steps, keep)
        result = []
        for i, (step, drop) in enumerate(zip(steps, drops)):
            step = step._replace(drop=tuple(drop))
            if i in donations:
                ufunc, positions = donations[i]
                step = step._replace(fn=donating(ufunc, step.fn, positions))
            result.append(step)
        return result

    def constant(self, name: str) -> np.ndarray:
        """The (read-only) value of an initializer or folded Constant.

        Raises:
            KeyError: no constant of that name.
        """
        if not name or name not in self._constants:
            raise KeyError(f"No initializer or constant named {name!r}.")
        return self._constants[name]

    def check_feeds(self, feeds: Mapping[str, Any]) -> dict[str, Any]:
        """Validates feed names, dtypes and static dims; converts lists and scalars.

        Raises:
            ValueError: an unknown or missing feed, or a wrong shape.
            TypeError: a wrong dtype.
        """
        if not isinstance(feeds, Mapping):
            raise TypeError(
                f"feeds must be a dict of input name -> array, received {type(feeds).__name__}."
            )
        arrays = {}
        for name, value in feeds.items():
            if name not in self._specs:
                raise ValueError(
                    f"Unknown feed {name!r}; the model's inputs are {self.input_names}."
                )
            spec = self._specs[name]
            arrays[name] = np.asarray(value) if spec is None else convert_feed(name, value, spec)
        missing = [n for n in self.required_inputs if n not in arrays]
        if missing:
            raise ValueError(f"Missing feeds {missing}; the model's inputs are {self.input_names}.")
        return arrays

    def run(
        self, feeds: Mapping[str, Any], output_names: Sequence[str] | None = None
    ) -> list[np.ndarray]:
        """Runs the graph.

        Args:
            feeds: `{input name: array}`; inputs with an initializer are optional.
            output_names: which values to return (default: every graph output).

        Returns:
            The requested values, in order, as arrays the caller owns.

        Raises:
            ValueError, TypeError: bad feeds, or a node failing (named in the message).
        """
        names = self.output_names if output_names is None else list(output_names)
        values = self.execute(self.check_feeds(feeds), names)
        return [values[n] for n in names]

    def run_all(self, feeds: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Runs the graph and returns every value by name: initializers, feeds and
        each node output (read-only arrays may be views of one another)."""
        values = self._execute(self.check_feeds(feeds), keep_all=True)
        return {k: v for k, v in values.items() if not k.startswith(_UNUSED)}

    def execute(self, feeds: dict[str, Any], output_names: Sequence[str]) -> dict[str, np.ndarray]:
        """Runs already-checked feeds; returns `{name: array}` for `output_names`."""
        unknown = [n for n in output_names if n not in self.output_names]
        if unknown:
            raise ValueError(
                f"Unknown outputs {unknown}; the graph outputs are {self.output_names}."
            )
        env = self._execute(feeds, keep_all=False)
        fed = {id(v) for v in feeds.values()}
        result = {}
        for name in output_names:
            value = np.asarray(env[name])
            # The caller owns what it gets: no views of constants, feeds or other outputs.
            if not value.flags.writeable or value.base is not None or id(value) in fed:
                value = value.copy()
            fed.add(id(value))
            result[name] = value
        return result

    def _execute(self, feeds: dict[str, Any], keep_all: bool) -> dict[str, Any]:
        env = dict(self._constants)
        env.update(feeds)
        token = set_max_bytes(self.max_bytes)
        label = ""
        try:
            with np.errstate(all="ignore"):
                # Plain tuples, unpacked once per node: the loop is the per-node overhead.
                for fn, inputs, kwargs, outputs, drop, label in (  # noqa: B007 (read on error)
                    self._all_program if keep_all else self._program
                ):
                    results = fn(*[env[n] for n in inputs], **kwargs)
                    if len(results) < len(outputs):
                        raise ValueError(
                            f"produced {len(results)} outputs but the node names "
                            f"{len(outputs)} {list(outputs)}"
                        )
                    for name, value in zip(outputs, results):
                        env[name] = value
                    for name in drop:
                        del env[name]
        except NotImplementedError as error:
            raise NotImplementedError(f"{label}: {error}") from error
        except TypeError as error:
            raise TypeError(f"{label} failed: {error}") from error
        except (ValueError, ArithmeticError, IndexError, KeyError) as error:
            raise ValueError(f"{label} failed: {error}") from error
        finally:
            reset_max_bytes(token)
        env.pop("", None)
        return env


def run(
    model: onnx.ModelProto | str | os.PathLike | bytes,
    feeds: Mapping[str, Any],
    *,
    base_dir: str | os.PathLike | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_depth: int = DEFAULT_MAX_DEPTH,
) -> list[np.ndarray]:
    """Runs a plain ONNX model once and returns ALL its graph outputs, in order.

    Args:
        model: a `ModelProto`, a path to a `.onnx` file, or serialized bytes.
        feeds: `{input name: array}`.
        base_dir, max_bytes, max_depth: as for `Interpreter`.

    Returns:
        One array per graph output.

    Raises:
        NotImplementedError: an unsupported op (naming op type and opset).
        ValueError, TypeError: a malformed or unsafe model, or bad feeds.
    """
    interpreter = Interpreter(model, base_dir=base_dir, max_bytes=max_bytes, max_depth=max_depth)
    return interpreter.run(feeds)
