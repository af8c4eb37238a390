"""Loading models and tensors from untrusted sources.

- A model file is parsed without its external data (`load_external_data=False`);
  external tensors are then read here, only from files inside the model's
  folder: absolute paths, `..` components and symlinks that leave the folder
  are refused.
- Every tensor's declared size is checked against the data behind it and
  against the allocation cap before anything is allocated.
- Protobuf and onnx errors become `ValueError`; OS errors and `MemoryError`
  pass through.
"""

from __future__ import annotations

import math
import os
import stat
from typing import Any

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import TensorProto, helper, numpy_helper

from onnxbn.session import FeedSpec

_DECODE_ERRORS = (DecodeError, ValueError, TypeError, UnicodeDecodeError, RuntimeError)

# Where each data type keeps its values when not in raw_data, and how many
# entries one element takes there.
_FIELDS = {
    TensorProto.FLOAT: ("float_data", 1),
    TensorProto.COMPLEX64: ("float_data", 2),
    TensorProto.DOUBLE: ("double_data", 1),
    TensorProto.COMPLEX128: ("double_data", 2),
    TensorProto.INT64: ("int64_data", 1),
    TensorProto.UINT32: ("uint64_data", 1),
    TensorProto.UINT64: ("uint64_data", 1),
    TensorProto.STRING: ("string_data", 1),
}
_SUB_BYTE = {TensorProto.INT4: 2, TensorProto.UINT4: 2}
for _name, _per_byte in (("FLOAT4E2M1", 2), ("INT2", 4), ("UINT2", 4)):
    if hasattr(TensorProto, _name):
        _SUB_BYTE[getattr(TensorProto, _name)] = _per_byte


def load_model(
    model: onnx.ModelProto | str | os.PathLike | bytes, base_dir: str | os.PathLike | None = None
) -> tuple[onnx.ModelProto, str | None]:
    """Parses `model` and returns it with the folder its external data may come from.

    Args:
        model: a `ModelProto`, a path to a `.onnx` file, or serialized bytes.
        base_dir: the folder of external data for an in-memory model; a file's
            own folder is always used for a path.

    Returns:
        `(model, folder)`; `folder` is `None` when no external data may be read.

    Raises:
        ValueError: undecodable bytes, or `base_dir` given with a path.
        TypeError: `model` of another type.
    """
    if isinstance(model, onnx.ModelProto):
        return model, None if base_dir is None else os.fspath(base_dir)
    if isinstance(model, (bytes, bytearray, memoryview)):
        proto = onnx.ModelProto()
        try:
            proto.ParseFromString(bytes(model))
        except _DECODE_ERRORS as error:
            raise ValueError(f"Could not decode the ONNX model bytes: {error}") from None
        return proto, None if base_dir is None else os.fspath(base_dir)
    if isinstance(model, (str, os.PathLike)):
        if base_dir is not None:
            raise ValueError(
                "base_dir= is only for in-memory models; a model file's external data is "
                f"always read from its own folder (received path {os.fspath(model)!r})."
            )
        path = os.fspath(model)
        try:
            proto = onnx.load(path, load_external_data=False)
        except (OSError, MemoryError):
            raise  # the machine's limits, not a malformed file
        except Exception as error:  # protobuf/JSON/text parse errors of any class
            raise ValueError(f"Could not decode the ONNX model {path!r}: {error}") from None
        return proto, os.path.dirname(os.path.abspath(path))
    raise TypeError(
        f"model must be an onnx.ModelProto, a path or bytes, received {type(model).__name__}."
    )


def numpy_dtype(data_type: int, what: str) -> np.dtype:
    """NumPy dtype of a `TensorProto` data type code.

    Raises:
        ValueError: an unknown or undefined code.
    """
    try:
        return np.dtype(helper.tensor_dtype_to_np_dtype(data_type))
    except (KeyError, ValueError, TypeError):
        raise ValueError(f"{what} has unknown data type {data_type}.") from None


class TensorLoader:
    """Turns `TensorProto`s into read-only arrays, safely.

    Args:
        folder: the folder external data may be read from (`None`: none may).
        max_bytes: the largest tensor accepted, in bytes.
    """

    def __init__(self, folder: str | None, max_bytes: int) -> None:
        self.folder = folder
        self.max_bytes = max_bytes

    def to_array(self, tensor: TensorProto, what: str) -> np.ndarray:
        """The tensor's value as a read-only array.

        Raises:
            ValueError: bad dims, a declared size larger than its data, a size
                over the cap, or external data from outside the folder.
        """
        what = f"{what} {tensor.name!r}" if tensor.name else what
        dtype = numpy_dtype(tensor.data_type, what)
        dims = [int(d) for d in tensor.dims]
        if any(d < 0 for d in dims):
            raise ValueError(f"{what} has negative dims {dims}.")
        count = math.prod(dims)
        nbytes = self._nbytes(tensor.data_type, count, dtype)
        if nbytes > self.max_bytes:
            raise ValueError(
                f"{what} declares {dims} of {dtype} ({nbytes} bytes), over the allocation "
                f"cap of {self.max_bytes} bytes (raise it with max_bytes=)."
            )
        if tensor.data_location == TensorProto.EXTERNAL:
            inline = TensorProto()
            inline.CopyFrom(tensor)
            del inline.external_data[:]
            inline.data_location = TensorProto.DEFAULT
            inline.raw_data = self._read_external(tensor, nbytes, what)
            tensor = inline
        else:
            self._check_inline(tensor, count, nbytes, what)
        try:
            array = numpy_helper.to_array(tensor)
        except _DECODE_ERRORS as error:
            raise ValueError(f"{what} could not be decoded: {error}") from None
        array = np.asarray(array)
        array.flags.writeable = False
        return array

    def sparse_to_array(self, sparse: onnx.SparseTensorProto, what: str) -> np.ndarray:
        """A dense read-only array from a `SparseTensorProto` (COO indices).

        Raises:
            ValueError: as `to_array`, or indices that do not fit the dims.
        """
        dims = [int(d) for d in sparse.dims]
        values = self.to_array(sparse.values, f"{what} values")
        indices = self.to_array(sparse.indices, f"{what} indices").astype(np.int64)
        if any(d < 0 for d in dims):
            raise ValueError(f"{what} has negative dims {dims}.")
        nbytes = math.prod(dims) * values.dtype.itemsize
        if nbytes > self.max_bytes:
            raise ValueError(
                f"{what} densifies to {nbytes} bytes, over the cap of {self.max_bytes}."
            )
        dense = np.zeros(dims, dtype=values.dtype)
        try:
            if indices.ndim == 1:
                dense.reshape(-1)[indices] = values.reshape(-1)
            else:
                dense[tuple(indices.T)] = values.reshape(-1)
        except (IndexError, ValueError) as error:
            raise ValueError(f"{what} indices do not fit dims {dims}: {error}") from None
        dense.flags.writeable = False
        return dense

    @staticmethod
    def _nbytes(data_type: int, count: int, dtype: np.dtype) -> int:
        if data_type in _SUB_BYTE:
            return -(-count // _SUB_BYTE[data_type])
        if data_type == TensorProto.STRING:
            return count * 8  # pointers; the strings themselves are already in memory
        return count * dtype.itemsize

    @staticmethod
    def _check_inline(tensor: TensorProto, count: int, nbytes: int, what: str) -> None:
        if tensor.HasField("raw_data"):
            have, need, unit = len(tensor.raw_data), nbytes, "bytes"
        else:
            field, per_element = _FIELDS.get(tensor.data_type, ("int32_data", 1))
            have = len(getattr(tensor, field))
            if tensor.data_type in _SUB_BYTE:
                need = -(-count // _SUB_BYTE[tensor.data_type])
            else:
                need = count * per_element
            unit = f"entries of {field}"
        if have < need:
            raise ValueError(
                f"{what} declares dims {list(tensor.dims)} ({need} {unit}) but holds only {have}."
            )
        if have > need:
            raise ValueError(
                f"{what} declares dims {list(tensor.dims)} ({need} {unit}) but holds {have}."
            )

    def _read_external(self, tensor: TensorProto, nbytes: int, what: str) -> bytes:
        info = {entry.key: entry.value for entry in tensor.external_data}
        location = info.get("location", "")
        path = self._resolve(location, what)
        try:
            offset = int(info.get("offset", "0"))
            length = int(info["length"]) if "length" in info else None
        except ValueError:
            raise ValueError(
                f"{what}: external data offset/length must be ints, received "
                f"{info.get('offset')!r}, {info.get('length')!r}."
            ) from None
        if offset < 0 or (length is not None and length < 0):
            raise ValueError(f"{what}: negative external data offset {offset} or length {length}.")
        if length is not None and length != nbytes:
            raise ValueError(
                f"{what} declares {nbytes} bytes but its external data length is {length}."
            )
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            if offset + nbytes > size:
                raise ValueError(
                    f"{what} declares {nbytes} bytes at offset {offset} of {location!r}, but "
                    f"the file holds only {size} bytes."
                )
            handle.seek(offset)
            data = handle.read(nbytes)
        if len(data) != nbytes:
            raise ValueError(f"{what}: read {len(data)} of {nbytes} bytes from {location!r}.")
        return data

    def _resolve(self, location: str, what: str) -> str:
        """The real path of an external data file, if it lies inside the folder."""
        if self.folder is None:
            raise ValueError(
                f"{what} has external data ({location!r}) but the model was given in memory; "
                "pass base_dir= (the folder holding the data) or load the model from its file."
            )
        parts = location.replace("\\", "/").split("/")
        if (
            not location
            or "\x00" in location
            or os.path.isabs(location)
            or location.startswith(("/", "\\"))
            or os.path.splitdrive(location)[0]
            or ".." in parts
        ):
            raise ValueError(
                f"{what}: external data location {location!r} must be a relative path inside "
                f"the model's folder, without '..'."
            )
        root = os.path.realpath(self.folder)
        path = os.path.realpath(os.path.join(root, location))
        if os.path.commonpath([root, path]) != root:
            raise ValueError(
                f"{what}: external data {location!r} resolves to {path!r}, outside the "
                f"model's folder {root!r} (a symlink that escapes is refused)."
            )
        try:
            mode = os.stat(path).st_mode
        except FileNotFoundError:
            raise ValueError(
                f"{what}: external data file {location!r} does not exist in {root!r}."
            ) from None
        if not stat.S_ISREG(mode):
            raise ValueError(f"{what}: external data {location!r} is not a regular file.")
        return path


def check_nesting(graph: onnx.GraphProto, max_depth: int) -> None:
    """Refuses graphs nested (through graph-valued attributes) deeper than `max_depth`.

    The main graph has depth 1. The walk is iterative, so a hostile file cannot
    exhaust Python's stack.

    Raises:
        ValueError: naming the depth reached and the cap.
    """
    stack = [(graph, 1)]
    while stack:
        current, depth = stack.pop()
        if depth > max_depth:
            raise ValueError(
                f"Graph {current.name!r} is nested {depth} levels deep, over the cap of "
                f"{max_depth} (raise it with max_depth=)."
            )
        for node in current.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    stack.append((attr.g, depth + 1))
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    stack.extend((g, depth + 1) for g in attr.graphs)


def check_tensor_type(value_info: onnx.ValueInfoProto, what: str) -> None:
    """Refuses graph inputs/outputs that are not tensors.

    Raises:
        NotImplementedError: sequences, maps, optionals and sparse tensors.
    """
    kind = value_info.type.WhichOneof("value")
    if kind not in (None, "tensor_type"):
        raise NotImplementedError(
            f"{what} {value_info.name!r} has type {kind}; the reference interpreter "
            "handles tensors only (no sequences, maps, optionals or sparse tensors)."
        )


def input_spec(value_info: onnx.ValueInfoProto) -> FeedSpec | None:
    """Declared dtype and static dims of a graph input (`None` if undeclared)."""
    check_tensor_type(value_info, "Graph input")
    tensor_type = value_info.type.tensor_type
    if not value_info.type.HasField("tensor_type") or not tensor_type.elem_type:
        return None
    dtype = numpy_dtype(tensor_type.elem_type, f"Graph input {value_info.name!r}")
    shape = None
    if tensor_type.HasField("shape"):
        shape = tuple(
            d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim
        )
    return FeedSpec(value_info.name, dtype, shape)


def attribute_value(attr: onnx.AttributeProto, loader: TensorLoader, where: str) -> Any:
    """A node attribute as a Python value (tensors as arrays, strings decoded).

    Raises:
        ValueError: a reference attribute, an undecodable string, or a bad tensor.
        NotImplementedError: graph- or type-valued attributes.
    """
    what = f"{where} attribute {attr.name!r}"
    if attr.ref_attr_name:
        raise ValueError(f"{what} refers to a function attribute outside a function.")
    kind = attr.type
    A = onnx.AttributeProto
    try:
        if kind == A.FLOAT:
            return float(attr.f)
        if kind == A.INT:
            return int(attr.i)
        if kind == A.STRING:
            return attr.s.decode("utf-8")
        if kind == A.FLOATS:
            return [float(v) for v in attr.floats]
        if kind == A.INTS:
            return [int(v) for v in attr.ints]
        if kind == A.STRINGS:
            return [s.decode("utf-8") for s in attr.strings]
    except UnicodeDecodeError:
        raise ValueError(f"{what} is not valid UTF-8.") from None
    if kind == A.TENSOR:
        return loader.to_array(attr.t, what)
    if kind == A.TENSORS:
        return [loader.to_array(t, what) for t in attr.tensors]
    if kind == A.SPARSE_TENSOR:
        return loader.sparse_to_array(attr.sparse_tensor, what)
    if kind in (A.GRAPH, A.GRAPHS, A.TYPE_PROTO, A.TYPE_PROTOS, A.SPARSE_TENSORS):
        raise NotImplementedError(
            f"{what} has type {A.AttributeType.Name(kind)}, which the reference "
            "interpreter does not support."
        )
    raise ValueError(f"{what} has no value (attribute type {kind}).")
