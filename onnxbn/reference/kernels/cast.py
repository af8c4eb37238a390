"""Cast and CastLike.

Conversions are NumPy's (float to int truncates toward zero, float to float
rounds to nearest even; bfloat16 via `ml_dtypes`). String and sub-byte/float8
targets are outside this interpreter's scope and raise `NotImplementedError`.
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper

from onnxbn.reference.kernels.table import kernel

# ml_dtypes casts to these ignore ONNX's saturate/round_mode rules.
_UNSUPPORTED_TARGETS = {
    TensorProto.STRING,
    TensorProto.FLOAT8E4M3FN,
    TensorProto.FLOAT8E4M3FNUZ,
    TensorProto.FLOAT8E5M2,
    TensorProto.FLOAT8E5M2FNUZ,
    TensorProto.UINT4,
    TensorProto.INT4,
}
for _name in ("FLOAT4E2M1", "FLOAT8E8M0", "UINT2", "INT2"):
    if hasattr(TensorProto, _name):
        _UNSUPPORTED_TARGETS.add(getattr(TensorProto, _name))

_DTYPES: dict[np.dtype, int] = {}
for _code in TensorProto.DataType.values():
    if _code in _UNSUPPORTED_TARGETS or _code == TensorProto.UNDEFINED:
        continue
    try:
        _DTYPES[np.dtype(helper.tensor_dtype_to_np_dtype(_code))] = _code
    except (KeyError, ValueError, TypeError):
        continue  # a code this onnx version cannot map to NumPy


def _target_dtype(to: int) -> np.dtype:
    if to in _UNSUPPORTED_TARGETS:
        raise NotImplementedError(
            f"Cast to {TensorProto.DataType.Name(to)} is not supported by the reference "
            "interpreter (string, float8 and sub-byte types are out of scope)."
        )
    try:
        return np.dtype(helper.tensor_dtype_to_np_dtype(to))
    except (KeyError, ValueError, TypeError):
        raise ValueError(f"Cast 'to' must be a TensorProto data type, received {to!r}.") from None


def _cast(value: np.ndarray, dtype: np.dtype) -> np.ndarray:
    if value.dtype == dtype:
        return value
    if value.dtype not in _DTYPES:
        raise NotImplementedError(
            f"Cast from {value.dtype} is not supported by the reference interpreter."
        )
    return np.asarray(value.astype(dtype))


@kernel("Cast", 6)
def cast_6(input: np.ndarray, *, to: int) -> tuple[np.ndarray]:
    return (_cast(input, _target_dtype(to)),)


@kernel("Cast", 19)
def cast_19(input: np.ndarray, *, saturate: int = 1, to: int) -> tuple[np.ndarray]:
    # saturate only changes float8 targets, which are refused above.
    return (_cast(input, _target_dtype(to)),)


@kernel("Cast", 24)
def cast_24(
    input: np.ndarray,
    *,
    round_mode: str = "up",
    saturate: int = 1,
    to: int,
) -> tuple[np.ndarray]:
    # round_mode only changes float8e8m0 targets, which are refused above.
    return (_cast(input, _target_dtype(to)),)


@kernel("CastLike", 15)
def cast_like_15(input: np.ndarray, target_type: np.ndarray) -> tuple[np.ndarray]:
    return (_cast(input, _check_target(target_type.dtype)),)


@kernel("CastLike", 19)
def cast_like_19(
    input: np.ndarray,
    target_type: np.ndarray,
    *,
    saturate: int = 1,
) -> tuple[np.ndarray]:
    return (_cast(input, _check_target(target_type.dtype)),)


@kernel("CastLike", 24)
def cast_like_24(
    input: np.ndarray,
    target_type: np.ndarray,
    *,
    round_mode: str = "up",
    saturate: int = 1,
) -> tuple[np.ndarray]:
    return (_cast(input, _check_target(target_type.dtype)),)


def _check_target(dtype: np.dtype) -> np.dtype:
    if dtype not in _DTYPES:
        raise NotImplementedError(
            f"CastLike to {dtype} is not supported by the reference interpreter."
        )
    return dtype
