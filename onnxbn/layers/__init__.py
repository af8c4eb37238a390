"""Layers with Keras 3 semantics, and Keras-envelope `serialize` / `deserialize`."""

from onnxbn.layers.activation import Activation, ReLU
from onnxbn.layers.add import Add
from onnxbn.layers.batch_normalization import BatchNormalization
from onnxbn.layers.conv import Conv1D, Conv2D
from onnxbn.layers.dense import Dense
from onnxbn.layers.dropout import Dropout
from onnxbn.layers.embedding import Embedding
from onnxbn.layers.flatten import Flatten
from onnxbn.layers.global_average_pooling import GlobalAveragePooling1D, GlobalAveragePooling2D
from onnxbn.layers.input_layer import Input, InputLayer
from onnxbn.layers.layer import Layer
from onnxbn.layers.masking import Masking
from onnxbn.operation_registry import deserialize, serialize

__all__ = ["BatchNormalization", "Input", "InputLayer", "Layer", "deserialize", "serialize"]
__all__ += [
    "Activation",
    "Add",
    "Conv1D",
    "Conv2D",
    "Dense",
    "Dropout",
    "Embedding",
    "Flatten",
    "GlobalAveragePooling1D",
    "GlobalAveragePooling2D",
    "Masking",
    "ReLU",
]
