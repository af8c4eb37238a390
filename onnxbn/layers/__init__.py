"""Layers with Keras 3 semantics, and Keras-envelope `serialize` / `deserialize`."""

from onnxbn.layers.batch_normalization import BatchNormalization
from onnxbn.layers.input_layer import InputLayer
from onnxbn.layers.layer import Layer
from onnxbn.layers.registry import deserialize, serialize

__all__ = ["BatchNormalization", "InputLayer", "Layer", "deserialize", "serialize"]
