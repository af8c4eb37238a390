"""`onnxbn.runtime.Session`: an onnxruntime session that checks feeds and carries state.

Two execution paths, kept apart:

- host (CPU provider, or anything but CUDA): NumPy in, NumPy out; the moving
  statistics live in `.state` as NumPy arrays and are fed on every call;
- CUDA: I/O binding; the moving statistics stay on the device as OrtValues
  between calls (only the model's outputs come back to the host), and `.state`
  copies them out on demand.

onnxruntime's Python API has no NumPy type for bfloat16: bfloat16 feeds go in as
OrtValues built from the raw 16-bit words, and bfloat16 results are copied out
word for word into `ml_dtypes.bfloat16` arrays.

onnxruntime is an optional dependency (export and `onnxbn.reference` do not
need it): `pip install "onnxbn[cpu]"` installs the `onnxruntime` wheel,
`pip install "onnxbn[gpu]"` the `onnxruntime-gpu` wheel. The two install the
same `onnxruntime` package over each other, so exactly one of them may be
installed; `Session` raises a clear `ImportError` when none is and warns when
several are.
"""

from __future__ import annotations

import ctypes
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import ml_dtypes
import numpy as np
from onnx import TensorProto

from onnxbn.contract import load_model
from onnxbn.session import StateDict, StatefulSession

try:
    import onnxruntime
except ImportError as error:  # export and the reference interpreter run without it
    onnxruntime = None
    _IMPORT_ERROR: ImportError | None = error
else:
    _IMPORT_ERROR = None

CPU = "CPUExecutionProvider"
# Distributions that each install the `onnxruntime` Python package.
RUNTIME_DISTRIBUTIONS = (
    "onnxruntime",
    "onnxruntime-gpu",
    "onnxruntime-directml",
    "onnxruntime-openvino",
    "onnxruntime-qnn",
)
INSTALL_HINT = (
    'install exactly one onnxruntime wheel: pip install "onnxbn[cpu]" (onnxruntime, CPU) or '
    'pip install "onnxbn[gpu]" (onnxruntime-gpu, CUDA and CPU)'
)
CUDA = "CUDAExecutionProvider"
_BFLOAT16 = np.dtype(ml_dtypes.bfloat16)


def _ort_errors() -> tuple[type[BaseException], ...]:
    """onnxruntime's own exception types (its pybind module defines them)."""
    if onnxruntime is None:
        return (RuntimeError,)
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    names = (
        "Fail", "InvalidArgument", "NoSuchFile", "NoModel", "EngineError",
        "RuntimeException", "InvalidProtobuf", "ModelLoaded", "NotImplemented",
        "InvalidGraph", "EPFail",
    )  # fmt: skip
    found = tuple(getattr(state, n) for n in names if isinstance(getattr(state, n, None), type))
    return found + (RuntimeError,)


ORT_ERRORS = _ort_errors()


def installed_runtimes() -> list[str]:
    """The installed distributions that provide the `onnxruntime` package, e.g. `["onnxruntime"]`."""
    from importlib import metadata

    found = set()
    for dist in metadata.distributions():
        name = (dist.metadata["Name"] or "").lower().replace("_", "-")
        if name in RUNTIME_DISTRIBUTIONS:
            found.add(name)
    return sorted(found)


def require_onnxruntime() -> None:
    """Raises `ImportError` saying how to install onnxruntime when it is missing.

    Warns (`RuntimeWarning`) when several onnxruntime distributions are
    installed: they overwrite each other's files, so CUDA may silently be
    missing or the package may be broken.
    """
    if onnxruntime is None:
        raise ImportError(
            f"onnxbn.runtime.Session runs models on onnxruntime, which is not installed "
            f"({_IMPORT_ERROR}); {INSTALL_HINT}. Export and onnxbn.reference.Session need "
            "no onnxruntime."
        ) from _IMPORT_ERROR
    runtimes = installed_runtimes()
    if len(runtimes) > 1:
        keep = "onnxruntime-gpu" if "onnxruntime-gpu" in runtimes else runtimes[-1]
        warnings.warn(
            f"Several onnxruntime distributions are installed ({', '.join(runtimes)}); they "
            f"share one `onnxruntime` package and overwrite each other's files, so the "
            f"providers you get are an accident of install order "
            f"(now {onnxruntime.get_available_providers()}). Keep one: "
            f"pip uninstall -y {' '.join(runtimes)} && pip install {keep}",
            RuntimeWarning,
            stacklevel=3,
        )


def _check_providers(providers: Any) -> list[Any]:
    """Validates an explicit provider list against what onnxruntime offers."""
    available = onnxruntime.get_available_providers()
    if isinstance(providers, (str, bytes)) or not isinstance(providers, Sequence):
        raise TypeError(
            f"providers must be a list of provider names, received {providers!r}; "
            f"available: {available}."
        )
    if not providers:
        raise ValueError(f"providers must not be empty; available: {available}.")
    for entry in providers:
        name = entry[0] if isinstance(entry, tuple) and len(entry) == 2 else entry
        if not isinstance(name, str):
            raise TypeError(
                f"A provider must be a name or a (name, options) pair, received {entry!r}."
            )
        if name not in available:
            raise ValueError(
                f"Unknown execution provider {name!r}; this onnxruntime offers {available}."
            )
    return list(providers)


def _provider_name(entry: Any) -> str:
    return entry[0] if isinstance(entry, tuple) else entry


class Session(StatefulSession):
    """Runs an exported model on onnxruntime.

    Args:
        model_or_path: an `onnx.ModelProto`, a path to a `.onnx` file, or bytes.
        providers: None picks CUDA when onnxruntime offers it and a session can
            be created on it, else CPU; an explicit list (names or
            `(name, options)` pairs) is validated and used as given.
        comm: an mpi4py communicator for a training export with synchronized
            BatchNormalization layers (default: `COMM_WORLD` under `mpiexec`);
            see `onnxbn/lowering/synchronized.py`.

    Attributes:
        providers: the execution providers in use, in priority order.
        state: `{"<layer>/moving_mean": array, ...}` (empty without state).

    Raises:
        ImportError: onnxruntime is not installed (`pip install "onnxbn[cpu]"`
            or `"onnxbn[gpu]"`).
        TypeError: a bad `model_or_path` or `providers` type.
        ValueError: an invalid model, an unknown provider, a requested
            provider onnxruntime could not use, or an onnxruntime error.
    """

    def __init__(
        self, model_or_path: Any, providers: Sequence[Any] | None = None, comm: Any = None
    ) -> None:
        require_onnxruntime()
        model = load_model(model_or_path)
        super().__init__(model, comm=comm)
        data = model.SerializeToString()
        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3
        if providers is None:
            choices = [[CPU]]
            if CUDA in onnxruntime.get_available_providers():
                choices.insert(0, [CUDA, CPU])
        else:
            choices = [_check_providers(providers)]
        session, last_error = None, None
        for choice in choices:
            try:
                candidate = onnxruntime.InferenceSession(data, options, providers=choice)
            except ORT_ERRORS as error:
                last_error = error
                continue
            missing = [
                _provider_name(p)
                for p in choice
                if _provider_name(p) not in candidate.get_providers()
            ]
            if missing and providers is None:
                continue  # e.g. CUDA offered but its libraries are missing: try CPU
            if missing:
                raise ValueError(
                    f"onnxruntime could not use the requested providers {missing}; "
                    f"it runs with {candidate.get_providers()}."
                )
            session = candidate
            break
        if session is None:
            raise ValueError(f"onnxruntime could not load the model: {last_error}")
        self._session = session
        self.providers: list[str] = list(session.get_providers())
        graph = model.graph
        self._bfloat16_io = any(
            v.type.tensor_type.elem_type == TensorProto.BFLOAT16
            for v in list(graph.input) + list(graph.output)
        )
        self._on_device = self.providers[0] == CUDA
        if self._on_device:
            self._device_state = {k: self._to_device(v) for k, v in self._state.items()}

    # -- host path ------------------------------------------------------------------
    def _execute(self, feeds: dict[str, np.ndarray], output_names: list[str]) -> dict[str, Any]:
        try:
            if not self._bfloat16_io:
                arrays = {k: np.asarray(v, order="C") for k, v in feeds.items()}
                return dict(zip(output_names, self._session.run(output_names, arrays)))
            values = {k: _to_ortvalue(v) for k, v in feeds.items()}
            results = self._session.run_with_ort_values(output_names, values)
        except ORT_ERRORS as error:
            raise ValueError(f"onnxruntime failed: {error}") from error
        return {name: _to_numpy(value) for name, value in zip(output_names, results)}

    # -- CUDA path ------------------------------------------------------------------
    def run(self, feeds: Mapping[str, Any]) -> list[np.ndarray]:
        """Runs the model once; see `onnxbn.session.StatefulSession.run`."""
        if not self._on_device or not self._pairs or self._communicator() is not None:
            return super().run(feeds)
        arrays = self.check_feeds(feeds)
        with self._lock:
            binding = self._session.io_binding()
            for name, array in arrays.items():
                binding.bind_ortvalue_input(name, _to_ortvalue(array))
            for name in self._output_names:
                binding.bind_output(name, "cpu")
            for state_in, state_out in self._pairs:
                binding.bind_ortvalue_input(state_in, self._device_state[state_in])
                if self._state[state_in].dtype == _BFLOAT16:
                    binding.bind_output(state_out, "cpu")  # no bfloat16 device copies
                else:
                    binding.bind_output(state_out, "cuda", self._device_id())
            try:
                self._session.run_with_iobinding(binding)
            except ORT_ERRORS as error:
                raise ValueError(f"onnxruntime failed: {error}") from error
            values = binding.get_outputs()
            count = len(self._output_names)
            self._device_state = {
                state_in: value for (state_in, _), value in zip(self._pairs, values[count:])
            }
        return [_to_numpy(v) for v in values[:count]]

    @property
    def state(self) -> StateDict:
        """Current state, read-only (copied from the device on the CUDA path); see
        `StatefulSession.state`."""
        if self._on_device:
            with self._lock:
                return StateDict({k: _to_numpy(v) for k, v in self._device_state.items()})
        return StatefulSession.state.fget(self)

    @state.setter
    def state(self, values: Mapping[str, Any]) -> None:
        StatefulSession.state.fset(self, values)
        if self._on_device:
            with self._lock:
                self._device_state = {k: self._to_device(v) for k, v in self._state.items()}

    def _device_id(self) -> int:
        options = self._session.get_provider_options().get(CUDA, {})
        return int(options.get("device_id", 0))

    def _to_device(self, array: np.ndarray) -> Any:
        if array.dtype == _BFLOAT16:  # stays on the host; onnxruntime copies it in
            return _to_ortvalue(array)
        return onnxruntime.OrtValue.ortvalue_from_numpy(
            np.asarray(array, order="C"), "cuda", self._device_id()
        )


def _to_ortvalue(array: np.ndarray) -> Any:
    array = np.asarray(array, order="C")  # keeps 0-d arrays 0-d
    if array.dtype == _BFLOAT16:
        return onnxruntime.OrtValue.ortvalue_from_numpy_with_onnx_type(
            array.view(np.uint16), onnx_element_type=TensorProto.BFLOAT16
        )
    return onnxruntime.OrtValue.ortvalue_from_numpy(array)


def _to_numpy(value: Any) -> np.ndarray:
    """A host NumPy copy of an OrtValue (bfloat16 copied word for word)."""
    if value.data_type() != "tensor(bfloat16)":
        return value.numpy()
    if value.device_name().lower() != "cpu":
        raise ValueError("bfloat16 device outputs must be bound to the host.")
    out = np.empty(value.shape(), dtype=np.uint16)
    if out.size:
        ctypes.memmove(out.ctypes.data, value.data_ptr(), out.nbytes)
    return out.view(_BFLOAT16)
