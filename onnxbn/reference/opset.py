"""Which opset of the default ONNX domain a model runs at, and whether the interpreter knows it."""

from __future__ import annotations

import onnx

from onnxbn.reference.kernels.table import NEWEST_OPSET

# The names of the default ONNX domain; the interpreter runs no other.
DEFAULT_DOMAINS = ("", "ai.onnx")


def default_opset(model: onnx.ModelProto) -> int:
    """The opset of the default domain the model imports.

    Raises:
        ValueError: no opset import at all, or a version below 1 (malformed).
        NotImplementedError: only other domains, or an opset newer than
            `NEWEST_OPSET` (well-formed models this interpreter cannot run).
    """
    if not model.opset_import:
        raise ValueError(
            "The model imports no opset of the default ONNX domain; expected an "
            "opset_import entry with domain ''."
        )
    versions = [o.version for o in model.opset_import if o.domain in DEFAULT_DOMAINS]
    if not versions:
        domains = sorted({o.domain for o in model.opset_import})
        raise NotImplementedError(
            f"The model imports only the domain(s) {domains}; the reference interpreter "
            "runs the default ONNX domain ('' or 'ai.onnx') only."
        )
    if min(versions) < 1:
        raise ValueError(
            f"The model imports opset {min(versions)} of the default ONNX domain; "
            "expected a version >= 1."
        )
    opset = int(max(versions))
    if opset > NEWEST_OPSET:
        raise NotImplementedError(
            f"The model imports opset {opset} of the default ONNX domain; the reference "
            f"interpreter knows opsets up to {NEWEST_OPSET}, and an op's meaning may have "
            "changed since."
        )
    return opset
