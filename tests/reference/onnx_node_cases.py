"""ONNX's own backend node test cases, run against `onnxbn.reference.backend`.

The cases are generated in memory by the installed onnx package
(`onnx.backend.test.loader.load_model_tests(kind="node")`) and compared with
`onnx.backend.test.runner.Runner.assert_similar_outputs`, exactly as
`onnx.backend.test.BackendTest` does. Every case whose graph uses an op type
of `supported_ops()` is run once; `outcomes()` caches the result per case.
"""

from __future__ import annotations

import functools
import re
import warnings
from dataclasses import dataclass

from onnx.backend.test.loader import load_model_tests
from onnx.backend.test.runner import Runner

from onnxbn.reference import backend, supported_ops

try:
    from onnx.backend.test.runner import _normalize_tensor
except ImportError:  # older onnx: inputs are always arrays

    def _normalize_tensor(item):
        return item


# Cases that are not expected to pass, each with the reason. A pattern that
# matches nothing, or a listed case that passes, fails the suite (see tests).
EXCLUSIONS: list[tuple[str, str]] = [
    (
        r"(^|_)(FLOAT8E4M3FNUZ|FLOAT8E4M3FN|FLOAT8E5M2FNUZ|FLOAT8E5M2|FLOAT4E2M1|"
        r"U?INT4|U?INT2)(_|$)|_e8m0_",
        "float8, float4, int4 and int2 types are out of scope: their ONNX casts "
        "(saturation, rounding modes, packing) are not implemented",
    ),
    (
        r"^test_identity_(opt|sequence)$",
        "optional and sequence types are out of scope (tensors only)",
    ),
]


@dataclass(frozen=True)
class Outcome:
    name: str
    op_types: frozenset[str]
    status: str  # "passed", "failed", "not implemented" or "excluded"
    detail: str = ""
    excluded_because: str = ""
    raw_status: str = ""  # what running it gave, before exclusions


def exclusion_reason(name: str) -> str:
    for pattern, reason in EXCLUSIONS:
        if re.search(pattern, name):
            return reason
    return ""


def _graph_op_types(graph) -> set[str]:
    types = set()
    for node in graph.node:
        types.add(node.op_type)
        for attr in node.attribute:
            if attr.HasField("g"):
                types |= _graph_op_types(attr.g)
            for sub in attr.graphs:
                types |= _graph_op_types(sub)
    return types


def _run(case) -> tuple[str, str]:
    try:
        prepared = backend.prepare(case.model, "CPU")
        for inputs, expected in case.data_sets:
            got = prepared.run([_normalize_tensor(x) for x in inputs])
            Runner.assert_similar_outputs(
                [_normalize_tensor(y) for y in expected], got, case.rtol, case.atol
            )
    except NotImplementedError as error:
        return "not implemented", str(error)
    except Exception as error:  # any other failure is a failed case
        return "failed", f"{type(error).__name__}: {error}"
    return "passed", ""


@functools.lru_cache(maxsize=1)
def node_cases() -> tuple:
    """ONNX's backend node test cases (loaded once per process)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the generators' own overflow warnings
        return tuple(load_model_tests(kind="node"))


@functools.lru_cache(maxsize=1)
def outcomes() -> tuple[Outcome, ...]:
    """Runs every case that touches a supported op type (once per process)."""
    supported = set(supported_ops())
    results = []
    for case in node_cases():
        types = frozenset(_graph_op_types(case.model.graph))
        if not types & supported:
            continue
        raw, detail = _run(case)
        reason = exclusion_reason(case.name)
        status = "excluded" if reason else raw
        results.append(Outcome(case.name, types, status, detail, reason, raw))
    return tuple(results)


def tally() -> dict[str, int]:
    counts = {"passed": 0, "failed": 0, "not implemented": 0, "excluded": 0}
    for outcome in outcomes():
        counts[outcome.status] += 1
    return counts
