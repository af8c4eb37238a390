"""Keras ops that Keras records in functional graphs (for implicit masks)."""

from onnxbn.ops.numpy import Any, LogicalOr, NotEqual, any, logical_or, not_equal

__all__ = ["Any", "LogicalOr", "NotEqual", "any", "logical_or", "not_equal"]
