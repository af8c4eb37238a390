"""The public names of ../shared/API.md are reachable from `import onnxbn`."""

from __future__ import annotations

import inspect

import onnx.backend.base

import onnxbn


def test_top_level_names():
    for name in ("Input", "SymbolicTensor", "Operation", "Model", "export_onnx", "layers",
                 "runtime", "reference", "distributed"):  # fmt: skip
        assert hasattr(onnxbn, name), name
    assert hasattr(onnxbn.layers, "BatchNormalization")
    assert callable(onnxbn.layers.serialize) and callable(onnxbn.layers.deserialize)
    assert callable(onnxbn.reference.run) and callable(onnxbn.reference.supported_ops)


def test_signatures():
    params = inspect.signature(onnxbn.export_onnx).parameters
    assert list(params) == [
        "model_or_layer",
        "path",
        "training",
        "opset",
        "fold_batchnorm",
        "train_step",
    ]
    assert params["training"].kind is inspect.Parameter.KEYWORD_ONLY
    assert list(inspect.signature(onnxbn.Input).parameters) == [
        "shape",
        "batch_size",
        "dtype",
        "name",
    ]
    bn = inspect.signature(onnxbn.layers.BatchNormalization).parameters
    assert list(bn)[:14] == [
        "axis", "momentum", "epsilon", "center", "scale", "beta_initializer",
        "gamma_initializer", "moving_mean_initializer", "moving_variance_initializer",
        "beta_regularizer", "gamma_regularizer", "beta_constraint", "gamma_constraint",
        "synchronized",
    ]  # fmt: skip
    assert bn["momentum"].default == 0.99 and bn["epsilon"].default == 1e-3
    assert "providers" in inspect.signature(onnxbn.runtime.Session).parameters


def test_reference_backend_is_an_onnx_backend():
    backend = onnxbn.reference.backend
    assert issubclass(backend.ReferenceBackend, onnx.backend.base.Backend)
    assert backend.supports_device("CPU")
