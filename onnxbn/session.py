"""What every onnxbn session shares: feed checking and moving-statistic state carrying.

An exported training graph has, for each BatchNormalization layer in training
mode, plain state inputs such as `<layer>/moving_mean` and state outputs
`<layer>/moving_mean/new` (the contract: `onnxbn/contract.py`). A session starts
from `initial_state(model)`, feeds the current state and keeps the `/new`
outputs for the next call. Engines (onnxruntime, the NumPy reference
interpreter) only implement `_execute`.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx
from onnx import helper

from onnxbn.contract import SYNC_FLAG, TRAIN_STEP_KEY, initial_state, state_pairs, sync_pairs


class FeedSpec:
    """Name, NumPy dtype and static shape (None for dynamic dims) of a graph input."""

    def __init__(
        self,
        name: str,
        dtype: np.dtype,
        shape: tuple[int | None, ...] | None,
        dim_params: tuple[str | None, ...] | None = None,
    ):
        self.name = name
        self.dtype = dtype
        self.shape = shape
        # The dim_param of each dynamic dim (`batch`, ...): equal names must get equal sizes.
        self.dim_params = dim_params

    def __repr__(self) -> str:
        return f"FeedSpec({self.name!r}, {self.dtype}, {self.shape})"


def value_info_spec(value_info: onnx.ValueInfoProto) -> FeedSpec:
    """Reads name, dtype and (partial) shape of a graph input or output."""
    tensor_type = value_info.type.tensor_type
    dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor_type.elem_type))
    shape = params = None
    if tensor_type.HasField("shape"):
        dims = tensor_type.shape.dim
        shape = tuple(d.dim_value if d.HasField("dim_value") else None for d in dims)
        params = tuple(d.dim_param if d.HasField("dim_param") else None for d in dims)
    return FeedSpec(value_info.name, dtype, shape, params)


def check_shared_dims(arrays: Mapping[str, np.ndarray], specs: Mapping[str, FeedSpec]) -> None:
    """Feeds whose dims share a dim_param (e.g. `batch` of `x` and `mask`) must agree.

    Raises:
        ValueError: naming the dim_param, both feeds and both shapes.
    """
    seen: dict[str, tuple[int, str, tuple[int, ...]]] = {}
    for name, array in arrays.items():
        params = specs[name].dim_params if name in specs else None
        for axis, param in enumerate(params or ()):
            if not param or axis >= array.ndim:
                continue
            size = array.shape[axis]
            first = seen.setdefault(param, (size, name, array.shape))
            if first[0] != size:
                raise ValueError(
                    f"Feeds {first[1]!r} (shape {first[2]}) and {name!r} (shape {array.shape}) "
                    f"disagree on dim {param!r}: {first[0]} vs {size}. The model declares both "
                    f"dims as {param!r}, so they must have the same size."
                )


def convert_feed(name: str, value: Any, spec: FeedSpec) -> np.ndarray:
    """Checks one feed against its declared dtype and shape.

    Python scalars and lists are converted to the declared dtype; a NumPy array
    must already have it (silently casting would hide a caller's bug).

    Raises:
        TypeError: wrong dtype, or a value that is not numeric.
        ValueError: wrong rank or a static dimension that does not match.
    """
    if isinstance(value, np.ndarray) or np.isscalar(value) and isinstance(value, np.generic):
        array = np.asarray(value)
        if array.dtype != spec.dtype:
            raise TypeError(
                f"Feed {name!r} has dtype {array.dtype}, but the model declares "
                f"{spec.dtype}. Cast it first (e.g. x.astype('{spec.dtype}'))."
            )
    elif isinstance(value, (list, tuple, int, float, bool)) and not isinstance(value, str):
        try:
            array = np.asarray(value, dtype=spec.dtype)
        except (TypeError, ValueError) as error:
            raise TypeError(
                f"Feed {name!r} could not be converted to {spec.dtype}: {error}"
            ) from None
    else:
        raise TypeError(
            f"Feed {name!r} must be a NumPy array, a list or a scalar of dtype "
            f"{spec.dtype}; received {type(value).__name__}."
        )
    if spec.shape is not None:
        if array.ndim != len(spec.shape):
            raise ValueError(
                f"Feed {name!r} has rank {array.ndim} (shape {array.shape}), but the "
                f"model expects rank {len(spec.shape)} (shape {_show(spec.shape)})."
            )
        for got, want in zip(array.shape, spec.shape):
            if want is not None and got != want:
                raise ValueError(
                    f"Feed {name!r} has shape {array.shape}, but the model expects "
                    f"{_show(spec.shape)}."
                )
    return array


def _collectively(comm: Any, fn: Any) -> Any:
    """Runs `fn` on every process; if it fails anywhere, every process raises."""
    try:
        value, error = fn(), None
    except (TypeError, ValueError, NotImplementedError) as caught:
        value, error = None, caught
    reports = comm.allgather(None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    failed = [(rank, r) for rank, r in enumerate(reports) if r is not None]
    if failed:
        rank, report = failed[0]
        raise ValueError(f"Process {rank} of the synchronized run failed: {report}")
    return value


class StateDict(dict):
    """A read-only snapshot of a session's state (`session.state`).

    Item assignment would change a copy and be lost, so it raises and points at
    the setter: `session.state = {"bn/moving_mean": value}` (a partial dict
    sets only the names it holds). The arrays are read-only too; `dict(state)`
    or `{**state}` gives a plain dict to edit.
    """

    def __init__(self, values: Mapping[str, np.ndarray]) -> None:
        super().__init__()
        for name, value in values.items():
            array = np.array(value, copy=True)
            array.flags.writeable = False
            dict.__setitem__(self, name, array)

    def _read_only(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError(
            "session.state is a read-only snapshot; assigning into it would change nothing. "
            "Set state with `session.state = {name: value, ...}` (names you leave out keep "
            "their values), e.g. session.state = {**session.state, 'bn/moving_mean': new}."
        )

    __setitem__ = __delitem__ = __ior__ = _read_only
    update = pop = popitem = clear = setdefault = _read_only

    def __reduce__(self) -> Any:
        return (dict, (dict(self),))


def _show(shape: Sequence[int | None]) -> str:
    return "(" + ", ".join("?" if d is None else str(d) for d in shape) + ")"


class StatefulSession:
    """Base of `onnxbn.runtime.Session` and `onnxbn.reference.Session`.

    `run(feeds)` returns the model's outputs only; in a training export it feeds
    the current moving statistics and keeps the updated ones in `.state`. A
    lock makes concurrent training calls apply every update exactly once; an
    export without state runs without the lock.

    Args:
        model: the loaded `onnx.ModelProto`.
    """

    def __init__(self, model: onnx.ModelProto, comm: Any = None) -> None:
        graph = model.graph
        self._model_proto = model
        self._pairs = state_pairs(graph)
        self._sync = sync_pairs(graph)
        self._comm = comm
        state_inputs = {p[0] for p in self._pairs} | {g for _, g in self._sync}
        state_outputs = {p[1] for p in self._pairs} | {p for p, _ in self._sync}
        if self._sync:
            state_inputs.add(SYNC_FLAG)
        initializers = {t.name: t for t in graph.initializer}
        self._input_specs = {
            vi.name: value_info_spec(vi) for vi in graph.input if vi.name not in state_inputs
        }
        # Graph inputs with an initializer are optional feeds (ONNX IR >= 4).
        self._required = [n for n in self._input_specs if n not in initializers]
        self._output_names = [o.name for o in graph.output if o.name not in state_outputs]
        self._all_output_names = [o.name for o in graph.output]
        self._state = initial_state(model)
        self._lock = threading.Lock()

    @property
    def state(self) -> StateDict:
        """Current state, `{"<layer>/moving_mean": array, ...}`: a read-only snapshot.

        Assign the property to change it (`session.state = {name: value}`; names
        left out keep their values); item assignment raises `TypeError`.
        """
        return StateDict(self._state)

    @state.setter
    def state(self, values: Mapping[str, Any]) -> None:
        if not isinstance(values, Mapping):
            raise TypeError(f"state must be a dict, received {type(values).__name__}.")
        unknown = sorted(set(values) - set(self._state))
        if unknown:
            raise ValueError(f"Unknown state names {unknown}; known: {sorted(self._state)}.")
        new = dict(self._state)
        for name, value in values.items():
            current = self._state[name]
            array = np.asarray(value)
            if array.shape != current.shape:
                raise ValueError(
                    f"State {name!r} must have shape {current.shape}, received {array.shape}."
                )
            new[name] = array.astype(current.dtype)
        with self._lock:
            self._state = new

    @property
    def input_names(self) -> list[str]:
        """The model inputs a caller feeds (state inputs excluded)."""
        return list(self._input_specs)

    @property
    def output_names(self) -> list[str]:
        """The model outputs `run` returns (state outputs excluded)."""
        return list(self._output_names)

    def check_feeds(self, feeds: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Validates and converts `feeds` (see `convert_feed`)."""
        if not isinstance(feeds, Mapping):
            raise TypeError(
                f"feeds must be a dict of input name -> array, received {type(feeds).__name__}."
            )
        for name in feeds:
            if name in self._state:
                raise ValueError(
                    f"Feed {name!r} is moving-statistic state carried by the session; "
                    "set it with `session.state = {...}` instead of feeding it."
                )
            if name not in self._input_specs:
                raise ValueError(
                    f"Unknown feed {name!r}; the model's inputs are {self.input_names}."
                )
        missing = [n for n in self._required if n not in feeds]
        if missing:
            raise ValueError(f"Missing feeds {missing}; the model's inputs are {self.input_names}.")
        arrays = {n: convert_feed(n, v, self._input_specs[n]) for n, v in feeds.items()}
        check_shared_dims(arrays, self._input_specs)
        return arrays

    def run(self, feeds: Mapping[str, Any]) -> list[np.ndarray]:
        """Runs the model once.

        Args:
            feeds: `{input name: array}` for every model input without a default.

        Returns:
            The model's outputs, in graph order (state outputs are kept in `.state`).

        Raises:
            TypeError, ValueError: bad feeds (`.state` is left unchanged).
        """
        comm = self._communicator()
        if comm is not None:
            return self._run_synchronized(comm, feeds)
        arrays = self.check_feeds(feeds)
        if not self._pairs:
            results = self._execute(arrays, self._output_names)
            return [results[n] for n in self._output_names]
        with self._lock:
            results = self._execute({**arrays, **self._state}, self._all_output_names)
            self._state = {inp: np.asarray(results[out]) for inp, out in self._pairs}
        return [results[n] for n in self._output_names]

    def _execute(self, feeds: dict[str, np.ndarray], output_names: list[str]) -> dict[str, Any]:
        """Runs the graph on complete feeds; returns `{output name: array}`."""
        raise NotImplementedError

    # -- synchronized BatchNormalization (onnxbn/lowering/synchronized.py) ----------
    def _communicator(self) -> Any:
        """The communicator of a multi-process run of a synchronized export, else None."""
        if not self._sync:
            return None
        comm = self._comm
        if comm is None:
            from onnxbn import distributed

            comm = distributed.active_communicator()
        if comm is None or comm.Get_size() == 1:
            return None
        if any(p.key == TRAIN_STEP_KEY for p in self._model_proto.metadata_props):
            raise NotImplementedError(
                f"This train step has synchronized BatchNormalization layers and runs in "
                f"{comm.Get_size()} processes: its gradient uses each process's local sums, "
                "which is exact in one process only. Run it in one process (or without "
                "synchronized=True)."
            )
        return comm

    def _run_synchronized(self, comm: Any, feeds: Mapping[str, Any]) -> list[np.ndarray]:
        """One training step across the processes of `comm` (every process calls it).

        For each synchronized call in graph order: run up to its partial
        moments, all-gather them, combine (Chan et al.) and feed the global
        moments; then a last run gives the outputs and the new state. An error
        on any process is raised on every process, so none is left waiting.
        """
        from onnxbn.distributed import allreduce_moments

        arrays = _collectively(comm, lambda: self.check_feeds(feeds))
        with self._lock:
            complete = {**arrays, **self._state, SYNC_FLAG: np.array(True)}
            for partial_name, global_name in self._sync:
                partial = _collectively(
                    comm, lambda name=partial_name: self._execute(complete, [name])[name]
                )
                combined = allreduce_moments(comm, tuple(partial), what=partial_name)
                complete[global_name] = np.stack(combined).astype(np.float64)
            results = _collectively(comm, lambda: self._execute(complete, self._all_output_names))
            self._state = {inp: np.asarray(results[out]) for inp, out in self._pairs}
        return [results[n] for n in self._output_names]
