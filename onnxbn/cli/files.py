"""Reading the files the command line is given (models, arrays, configs) with clear errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx


def require_file(path: str, what: str = "Model file") -> Path:
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"{what} {path!r} does not exist or is not a file.")
    return file


def load_model(path: str, external_data: bool = False) -> onnx.ModelProto:
    """Loads an ONNX model (external data only when asked: engines resolve it safely)."""
    file = require_file(path)
    try:
        return onnx.load(str(file), load_external_data=external_data)
    except Exception as error:  # protobuf raises its own DecodeError types
        raise ValueError(f"Model file {path!r} is not a valid ONNX model: {error}") from None


def load_json(path: str) -> Any:
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"Config file {path!r} does not exist or is not a file.")
    try:
        return json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"Config file {path!r} is not valid JSON: {error}") from None


def load_array(path: str) -> np.ndarray:
    """A `.npy` file (pickles refused: a data file must not run code)."""
    try:
        return np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise ValueError(f"Array file {path!r} does not exist.") from None
    except ValueError as error:
        raise ValueError(f"Array file {path!r} is not a plain .npy array: {error}") from None


def load_npz(path: str) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as data:
            if not hasattr(data, "files"):
                raise ValueError(f"{path!r} is a single array; expected an .npz archive.")
            return {name: data[name] for name in data.files}
    except FileNotFoundError:
        raise ValueError(f"Archive {path!r} does not exist.") from None
    except OSError as error:
        raise ValueError(f"{path!r} is not a readable .npz archive: {error}") from None


def parse_feed(text: str) -> tuple[str, str]:
    """`name=file.npy` -> (name, file)."""
    name, sep, file = text.partition("=")
    if not sep or not name or not file:
        raise ValueError(f"--input expects NAME=FILE.npy, received {text!r}.")
    return name, file
