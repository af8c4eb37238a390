"""The ONNX state contract: every name and format a caller of an onnxbn export relies on.

A training export (or any graph onnxbn makes stateful) carries its state as
plain graph inputs and outputs, so that any runtime, in any language, can run
it:

- a state input `<name>` (e.g. `bn/moving_mean`) is a plain graph input, never
  backed by an initializer (runtimes such as OpenVINO, tract and onnx2torch fold
  initializer-backed inputs into constants); its updated value is the output
  `<name>/new`; a caller feeds each `/new` output back as the next input;
- the starting values live in the model's `metadata_props` under the key
  `onnxbn:initial_state`: a JSON list, in state-input order, of
  `{"name": ..., "dtype": ..., "shape": [...], "data": ...}` where `data` is the
  base64 of the tensor's little-endian, C-order bytes and `dtype` a NumPy name
  (`float32`, `float64`, `float16`, `bfloat16`, `int64`);
- a synchronized BatchNormalization call publishes `<layer>/partial_moments`
  and reads `<layer>/global_moments`, selected by the bool input `synchronize`
  (see `onnxbn/lowering/synchronized.py`).

This module imports neither onnxruntime nor the layers: lowering, sessions and
the command line all read the contract from here.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import numpy_helper

STATE_SUFFIX = "/new"
INITIAL_STATE_KEY = "onnxbn:initial_state"
# Metadata key marking a train step (`export_onnx(model, train_step=True)`), value "true".
TRAIN_STEP_KEY = "onnxbn:train_step"
SYNC_FLAG = "synchronize"
PARTIAL_SUFFIX = "/partial_moments"
GLOBAL_SUFFIX = "/global_moments"


def _numpy_dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def encode_initial_state(values: Mapping[str, np.ndarray]) -> str:
    """The `onnxbn:initial_state` metadata value for `{state input: starting value}`."""
    entries = []
    for name, value in values.items():
        array = np.array(value, order="C")  # not ascontiguousarray: it makes scalars 1-D
        little = array.astype(array.dtype.newbyteorder("<"), copy=False)
        entries.append(
            {
                "name": name,
                "dtype": str(array.dtype),
                "shape": list(array.shape),
                "data": base64.b64encode(little.tobytes()).decode("ascii"),
            }
        )
    return json.dumps(entries)


def decode_initial_state(text: str) -> dict[str, np.ndarray]:
    """Reads an `onnxbn:initial_state` metadata value.

    Raises:
        ValueError: the value is not the documented JSON form, or a tensor's
            data does not match its dtype and shape.
    """
    try:
        entries = json.loads(text)
        result = {}
        for entry in entries:
            dtype = _numpy_dtype(entry["dtype"]).newbyteorder("<")
            shape = tuple(int(d) for d in entry["shape"])
            data = base64.b64decode(entry["data"], validate=True)
            array = np.frombuffer(data, dtype=dtype).reshape(shape)
            result[str(entry["name"])] = array.astype(dtype.newbyteorder("="))
        return result
    except (TypeError, KeyError, ValueError, json.JSONDecodeError) as error:
        raise ValueError(
            f"The model's {INITIAL_STATE_KEY!r} metadata is not a JSON list of "
            f"{{name, dtype, shape, data}} entries with base64 little-endian data: {error}"
        ) from None


def state_pairs(graph: onnx.GraphProto) -> list[tuple[str, str]]:
    """`(state input, state output)` pairs of a stateful graph, in output order."""
    input_names = {i.name for i in graph.input}
    pairs = []
    for output in graph.output:
        if output.name.endswith(STATE_SUFFIX):
            source = output.name[: -len(STATE_SUFFIX)]
            if source in input_names:
                pairs.append((source, output.name))
    return pairs


def sync_pairs(graph: onnx.GraphProto) -> list[tuple[str, str]]:
    """`(partial output, global input)` of each synchronized call, in graph order."""
    input_names = {i.name for i in graph.input}
    pairs = []
    for output in graph.output:
        if output.name.endswith(PARTIAL_SUFFIX):
            target = output.name[: -len(PARTIAL_SUFFIX)] + GLOBAL_SUFFIX
            if target in input_names:
                pairs.append((output.name, target))
    return pairs


def initial_state(model_or_path: Any) -> dict[str, np.ndarray]:
    """The starting value of every state input of a stateful export.

    Args:
        model_or_path: an `onnx.ModelProto`, the path of an ONNX file, or its bytes.

    Returns:
        `{state input name: array}` in state-input order, each with the input's
        declared dtype and shape; `{}` when the graph has no state. A file
        written before the metadata existed (state inputs backed by
        initializers) is read from those initializers.

    Raises:
        TypeError: `model_or_path` is not a model, a path or bytes.
        ValueError: the file is not ONNX, the metadata is malformed, or a state
            input has no starting value or one of another dtype or shape.
    """
    model = load_model(model_or_path)
    pairs = state_pairs(model.graph)
    if not pairs:
        return {}
    props = {p.key: p.value for p in model.metadata_props}
    stored = decode_initial_state(props[INITIAL_STATE_KEY]) if INITIAL_STATE_KEY in props else {}
    initializers = {t.name: t for t in model.graph.initializer}
    declared = {i.name: i for i in model.graph.input}
    result = {}
    for name, _ in pairs:
        if name in stored:
            value = stored[name]
        elif name in initializers:
            value = numpy_helper.to_array(initializers[name])
        else:
            raise ValueError(
                f"State input {name!r} has no starting value: neither the model's "
                f"{INITIAL_STATE_KEY!r} metadata nor an initializer holds it."
            )
        _check_declared(name, value, declared[name])
        result[name] = value
    return result


def _check_declared(name: str, value: np.ndarray, info: onnx.ValueInfoProto) -> None:
    tensor_type = info.type.tensor_type
    want = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type))
    if value.dtype != want:
        raise ValueError(
            f"The starting value of state input {name!r} is {value.dtype}; the graph "
            f"declares {want}."
        )
    dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim]
    if tensor_type.HasField("shape") and (
        len(dims) != value.ndim or any(d is not None and d != s for d, s in zip(dims, value.shape))
    ):
        raise ValueError(
            f"The starting value of state input {name!r} has shape {value.shape}; the "
            f"graph declares {tuple(dims)}."
        )


def load_model(model_or_path: Any) -> onnx.ModelProto:
    """A ModelProto from itself, a path, or serialized bytes.

    Raises:
        TypeError: anything else.
        ValueError: bytes or a file that is not an ONNX model.
        OSError: the file cannot be read (unchanged).
    """
    if isinstance(model_or_path, onnx.ModelProto):
        return model_or_path
    try:
        if isinstance(model_or_path, (bytes, bytearray)):
            return onnx.load_from_string(bytes(model_or_path))
        if isinstance(model_or_path, (str, os.PathLike)):
            return onnx.load(os.fspath(model_or_path))
    except (DecodeError, onnx.checker.ValidationError) as error:
        raise ValueError(f"Not a valid ONNX model: {error}") from error
    raise TypeError(
        f"Expected an onnx.ModelProto, a path or bytes, received {type(model_or_path).__name__}."
    )
