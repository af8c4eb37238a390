"""Prints the ONNX backend conformance tally after a run that computed it."""

from __future__ import annotations

from tests.reference import onnx_node_cases


def pytest_terminal_summary(terminalreporter) -> None:
    if onnx_node_cases.outcomes.cache_info().currsize == 0:
        return  # the conformance tests did not run
    counts = onnx_node_cases.tally()
    total = sum(counts.values())
    terminalreporter.write_sep("-", "onnxbn.reference: ONNX backend node tests")
    terminalreporter.write_line(
        f"{counts['passed']} passed, {counts['failed']} failed, "
        f"{counts['not implemented']} not implemented, {counts['excluded']} excluded "
        f"(of {total} cases that use a supported op type)"
    )
