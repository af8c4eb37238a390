"""The kernel table agrees with the ONNX schemas: versions, attribute names and defaults."""

from __future__ import annotations

import inspect

import numpy as np
import onnx
import onnx.defs
import pytest
from onnx import helper

from onnxbn.reference import kernels, supported_ops
from onnxbn.reference.kernels.table import KERNELS, NEWEST_OPSET, kernel, select

NEWEST = onnx.defs.onnx_opset_version()


def _served(op_type: str, since: int) -> range:
    """Opsets this kernel serves: from its since-version to the next registered one."""
    versions = supported_ops()[op_type]
    later = [v for v in versions if v > since]
    return range(since, (later[0] if later else NEWEST_OPSET + 1))


def _schema(op_type: str, opset: int) -> onnx.defs.OpSchema:
    return onnx.defs.get_schema(op_type, opset, "")


KERNEL_KEYS = sorted(KERNELS)


def test_newest_opset_is_the_newest_onnx_defines():
    # NEWEST_OPSET says every kernel was checked against ONNX's schemas up to it (the
    # tests below). A newer onnx may change an op's meaning at its new opsets: review
    # those schemas, add kernels where the meaning changed, then raise NEWEST_OPSET.
    assert NEWEST_OPSET == NEWEST, (
        f"onnx {onnx.__version__} defines opsets up to {NEWEST}; the reference "
        f"interpreter was checked up to {NEWEST_OPSET}"
    )


@pytest.mark.parametrize("op_type, since", KERNEL_KEYS)
def test_since_version_is_a_real_onnx_since_version(op_type: str, since: int) -> None:
    assert _schema(op_type, since).since_version == since


@pytest.mark.parametrize("op_type, since", KERNEL_KEYS)
def test_kernel_signature_matches_schema(op_type: str, since: int) -> None:
    entry = KERNELS.lookup((op_type, since))
    seen_attributes: set[str] = set()
    for opset in _served(op_type, since):
        schema = _schema(op_type, opset)
        seen_attributes |= set(schema.attributes)
        missing = set(schema.attributes) - set(entry.attributes)
        assert not missing, f"{op_type}-{since} lacks attributes {missing} of opset {opset}"
        required = {n for n, a in schema.attributes.items() if a.required}
        assert required <= set(entry.required_attributes) | set(entry.attributes)
        n_inputs = len(schema.inputs)
        variadic = schema.inputs and schema.inputs[-1].option.name == "Variadic"
        if variadic:
            assert entry.max_inputs is None
        else:
            assert entry.max_inputs == n_inputs, (opset, entry.max_inputs, n_inputs)
    invented = set(entry.attributes) - seen_attributes
    assert not invented, f"{op_type}-{since} takes attributes ONNX does not define: {invented}"


@pytest.mark.parametrize("op_type, since", KERNEL_KEYS)
def test_attribute_defaults_match_schema(op_type: str, since: int) -> None:
    entry = KERNELS.lookup((op_type, since))
    schema = _schema(op_type, max(_served(op_type, since)))
    for name, attribute in schema.attributes.items():
        if attribute.required:
            assert entry.attributes[name] is inspect.Parameter.empty, name
            continue
        if not attribute.default_value.name:
            assert entry.attributes[name] is None, f"{name} has no ONNX default"
            continue
        expected = helper.get_attribute_value(attribute.default_value)
        if isinstance(expected, bytes):
            expected = expected.decode()
        if isinstance(expected, float):
            np.testing.assert_allclose(entry.attributes[name], expected, rtol=1e-7)
        else:
            assert entry.attributes[name] == expected, name


@pytest.mark.parametrize(
    "op_type, opset, expected",
    [
        ("ReduceMean", 13, 1),
        ("ReduceMean", 17, 1),
        ("ReduceMean", 18, 18),
        ("ReduceMean", 21, 18),
        ("ReduceSum", 12, 1),
        ("ReduceSum", 13, 13),
        ("BatchNormalization", 9, 9),
        ("BatchNormalization", 13, 9),
        ("BatchNormalization", 14, 14),
        ("BatchNormalization", 15, 14),
        ("BatchNormalization", 22, 14),
        ("Squeeze", 11, 1),
        ("Squeeze", 13, 13),
        ("Split", 17, 13),
        ("Split", 18, 18),
    ],
)
def test_select_picks_newest_kernel_not_above_opset(op_type: str, opset: int, expected: int):
    assert select(op_type, opset).since_version == expected


@pytest.mark.parametrize(
    "op_type, opset, fragments",
    [
        ("BatchNormalization", 7, ["BatchNormalization", "opset 7", "[9, 14]"]),
        ("Mod", 13, ["'Mod'", "opset 13"]),
    ],
)
def test_select_unsupported_names_op_and_opset(op_type, opset, fragments) -> None:
    with pytest.raises(NotImplementedError) as info:
        select(op_type, opset)
    for fragment in fragments:
        assert fragment in str(info.value)


def test_duplicate_registration_is_an_error() -> None:
    with pytest.raises(ValueError, match="Duplicate reference kernel"):
        kernel("Add", 7)(lambda A, B: (A + B,))


def test_supported_ops_covers_the_required_list() -> None:
    required = (
        "BatchNormalization Add Sub Mul Div Pow Sqrt Reciprocal Neg Abs Exp Log Relu Sigmoid "
        "Tanh Softmax Erf Max Min Cast CastLike Where Not And Or Xor Equal Less LessOrEqual "
        "Greater GreaterOrEqual Identity Constant ConstantOfShape Shape Size Reshape Flatten "
        "Unsqueeze Squeeze Expand Transpose Concat Gather Slice Split ReduceMean ReduceSum "
        "ReduceSumSquare ReduceProd ReduceMax ReduceMin ReduceL2 MatMul Gemm Conv "
        "GlobalAveragePool AveragePool MaxPool Dropout Range Tile"
    ).split()
    ops = supported_ops()
    assert set(required) <= set(ops), set(required) - set(ops)
    assert ops["BatchNormalization"] == [9, 14]
    assert kernels.supported_ops is supported_ops
