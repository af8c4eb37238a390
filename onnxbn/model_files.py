"""Checking and writing ONNX model files: full validation and atomic writes.

Needs only onnx: the exporter, the adapters and the command line share it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets

import onnx
from google.protobuf.message import DecodeError, EncodeError

# What onnx or protobuf raise on an invalid model; re-raised as ValueError.
_ONNX_ERRORS = (
    onnx.checker.ValidationError,
    onnx.shape_inference.InferenceError,
    DecodeError,
    EncodeError,
)


def validate(model: onnx.ModelProto) -> None:
    """Full checker plus strict, type-checking shape inference.

    Raises:
        ValueError: what onnx reported.
    """
    try:
        onnx.checker.check_model(model, full_check=True)
        onnx.shape_inference.infer_shapes(model, strict_mode=True, check_type=True)
    except _ONNX_ERRORS as error:
        raise ValueError(f"The exported model is not valid ONNX: {error}") from error


def write_atomic(model: onnx.ModelProto, path: str | os.PathLike) -> None:
    """Writes `model` to `path` so that readers see the old file or the whole new one.

    A temp file in the same folder is written, flushed and fsynced, then renamed
    over `path`; on any failure the temp file is removed and the previous file
    is untouched. The new file gets the mode a plain `open(path, "w")` gives
    (the kernel applies the umask), or the replaced file's mode.

    Raises:
        OSError: the OS error, of the same type, naming `path` (never the temp file).
    """
    try:
        data = model.SerializeToString()
    except _ONNX_ERRORS as error:
        raise ValueError(f"The model could not be serialized: {error}") from error
    path = os.fspath(path)
    if os.path.isdir(path):
        raise IsADirectoryError(errno.EISDIR, "Cannot write the model over a folder", path)
    try:
        fd, temp = _create_temp(path)
    except OSError as error:
        raise _naming(error, path) from None
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        with contextlib.suppress(FileNotFoundError):
            os.chmod(temp, os.stat(path).st_mode & 0o777)  # keep the replaced file's mode
        os.replace(temp, path)
    except BaseException as error:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        if isinstance(error, OSError) and error.filename is not None:
            raise _naming(error, path) from None
        raise


def _create_temp(path: str) -> tuple[int, str]:
    """`(fd, name)` of a new, empty file beside `path`, created with mode 0o666 less the umask."""
    folder = os.path.dirname(os.path.abspath(path))
    prefix = f".{os.path.basename(path)}."
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        temp = os.path.join(folder, f"{prefix}{secrets.token_hex(4)}.tmp")
        try:
            return os.open(temp, flags, 0o666), temp
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "No free temporary file name beside the model", path)


def _naming(error: OSError, path: str) -> OSError:
    """The same kind of OS error, naming the path the caller gave."""
    if error.errno is None:
        return error
    return type(error)(error.errno, error.strerror, path)
