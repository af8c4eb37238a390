"""The exported train step holds no node whose result reaches no output."""

from __future__ import annotations

import pytest

from models import real_models
from onnxbn import optimizers
from onnxbn.export import export_onnx


@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
def test_every_node_and_initializer_is_used(data_format: str) -> None:
    model, _ = real_models.resnet_cnn(data_format=data_format)
    model.compile(optimizer=optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy")
    graph = export_onnx(model, train_step=True).graph
    read = {name for node in graph.node for name in node.input}
    outputs = {o.name for o in graph.output}
    dead = [n.name for n in graph.node if not any(o in read or o in outputs for o in n.output)]
    assert not dead
    assert all(t.name in read for t in graph.initializer)
    # The gradient with respect to the image (the first convolution's input) is not computed.
    names = {n.name for n in graph.node}
    assert "stem_conv/d_input" not in names
    assert {"stem_conv/d_kernel", "block1_a_conv/d_input"} <= names
