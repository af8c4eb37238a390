"""Adapting ONNX models users already have: BatchNormalization recalibration and training form."""

from onnxbn.adapt.recalibrate import recalibrate
from onnxbn.adapt.to_training import to_training

__all__ = ["recalibrate", "to_training"]
