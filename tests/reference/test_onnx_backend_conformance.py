"""ONNX's backend node tests for every op type the interpreter registers.

The op list comes from `supported_ops()`, so a new kernel is tested by
ONNX's own cases automatically. The tally (passed / failed / not implemented /
excluded) is printed in the terminal summary (see conftest.py).
"""

from __future__ import annotations

import re

import pytest

from onnxbn.reference import supported_ops
from tests.reference.onnx_node_cases import EXCLUSIONS, outcomes


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
