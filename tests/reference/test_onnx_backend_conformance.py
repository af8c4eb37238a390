"""ONNX's backend node tests for every op type the interpreter registers.

The op list comes from `supported_ops()`, so a new kernel is tested by
ONNX's own cases automatically. The tally (passed / failed / not implemented /
excluded) is printed in the terminal summary (see conftest.py).
"""

from __future__ import annotations

import re

import pytest

from onnxbn.reference import backend, supported_ops
from tests.reference.onnx_node_cases import EXCLUSIONS, node_cases, outcomes


def _describe(failures) -> str:
    return "\n".join(f"{o.name}: {o.detail[:300]}" for o in failures)


@pytest.mark.parametrize("op_type", sorted(supported_ops()))
def test_node_cases_pass(op_type: str) -> None:
    supported = set(supported_ops())
    mine = [o for o in outcomes() if op_type in o.op_types]
    runnable = [o for o in mine if o.op_types <= supported]
    assert runnable, f"ONNX has no node test case for {op_type} using only supported ops."
    failures = [o for o in mine if o.status == "failed"]
    assert not failures, f"{len(failures)} ONNX node cases with {op_type} fail:\n" + _describe(
        failures
    )
    # Only graphs that also use an op without a kernel may be 'not implemented'.
    missing = [o for o in runnable if o.status == "not implemented"]
    assert not missing, "Supported-only graphs raised NotImplementedError:\n" + _describe(missing)
    assert any(o.status == "passed" for o in mine)


@pytest.mark.parametrize("pattern, reason", EXCLUSIONS)
def test_exclusions_are_current(pattern: str, reason: str) -> None:
    matched = [o for o in outcomes() if re.search(pattern, o.name)]
    assert matched, f"Exclusion {pattern!r} ({reason}) matches no case; remove it."
    passing = [o.name for o in matched if o.raw_status == "passed"]
    assert not passing, f"Excluded cases pass now; narrow {pattern!r}: {passing}"


def test_not_implemented_cases_use_an_op_without_kernel() -> None:
    supported = set(supported_ops())
    wrong = [
        o.name for o in outcomes() if o.status == "not implemented" and o.op_types <= supported
    ]
    assert not wrong


def test_cases_of_other_domains_are_unsupported_not_failed() -> None:
    # ai.onnx.ml and ai.onnx.preview.training models are well formed: the backend test
    # runner must be able to skip them (is_compatible False, NotImplementedError).
    others = [
        c for c in node_cases() if not {o.domain for o in c.model.opset_import} & {"", "ai.onnx"}
    ]
    assert len(others) >= 15
    for case in others:
        assert not backend.is_compatible(case.model), case.name
        with pytest.raises(NotImplementedError) as info:
            backend.prepare(case.model)
        for domain in {o.domain for o in case.model.opset_import}:
            assert repr(domain) in str(info.value), case.name
