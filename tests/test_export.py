"""export_onnx: graph interface, opsets, metadata, validation, atomic writes, errors."""

from __future__ import annotations

import json
import os

import numpy as np
import onnx
import pytest

import onnxbn
from onnxbn import export as export_module
from onnxbn import layers
from onnxbn.export import DEFAULT_OPSET, MIN_OPSET, export_onnx, newest_opset


def strict_check(model: onnx.ModelProto) -> None:
    onnx.checker.check_model(model, full_check=True)
    onnx.shape_inference.infer_shapes(model, strict_mode=True, check_type=True)


def two_layer_model(training_first=True):
    onnxbn.reset_names()
    x = onnxbn.Input((5, 3), name="x")
    mask = onnxbn.Input((5,), dtype="bool", name="mask")
    bn1 = layers.BatchNormalization(name="bn1")
    bn2 = layers.BatchNormalization(axis=1, name="bn2")
    y = bn2(bn1(x, mask=mask, training=training_first))
    return onnxbn.Model([x, mask], y, name="two"), bn1, bn2


def test_interface_inference():
    model, _, _ = two_layer_model()
    proto = export_onnx(model, training=False)
    strict_check(proto)
    assert [i.name for i in proto.graph.input] == ["x", "mask"]
    assert [o.name for o in proto.graph.output] == ["bn2"]
    assert proto.opset_import[0].version == DEFAULT_OPSET
    assert proto.ir_version == 8  # what onnxruntime releases since 1.10 accept
    assert proto.producer_name == "onnxbn"
    assert proto.producer_version == onnxbn.__version__
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param == "batch" and [d.dim_value for d in dims[1:]] == [5, 3]


def test_interface_training_state_order():
    model, _, _ = two_layer_model()
    proto = export_onnx(model, training=True)
    strict_check(proto)
    assert [i.name for i in proto.graph.input] == [
        "x", "mask", "bn1/moving_mean", "bn1/moving_variance",
        "bn2/moving_mean", "bn2/moving_variance",
    ]  # fmt: skip
    assert [o.name for o in proto.graph.output] == [
        "bn2", "bn1/moving_mean/new", "bn1/moving_variance/new",
        "bn2/moving_mean/new", "bn2/moving_variance/new",
    ]  # fmt: skip
    # Plain inputs: runtimes that fold initializer-backed inputs still carry the state.
    initializers = {t.name for t in proto.graph.initializer}
    assert not initializers & {i.name for i in proto.graph.input}
    assert list(onnxbn.initial_state(proto)) == [i.name for i in proto.graph.input[2:]]


def test_training_none_keeps_recorded_flags():
    model, _, _ = two_layer_model(training_first=True)
    proto = export_onnx(model)  # bn1 recorded training=True, bn2 nothing
    names = [i.name for i in proto.graph.input]
    assert names == ["x", "mask", "bn1/moving_mean", "bn1/moving_variance"]


def test_frozen_layer_has_no_state():
    model, bn1, _ = two_layer_model()
    bn1.trainable = False
    proto = export_onnx(model, training=True)
    assert [i.name for i in proto.graph.input][2:] == ["bn2/moving_mean", "bn2/moving_variance"]


def test_metadata_holds_layer_configs():
    model, bn1, _ = two_layer_model()
    proto = export_onnx(model, training=True)
    props = {p.key: p.value for p in proto.metadata_props}
    config = json.loads(props["onnxbn:layer:bn1"])
    assert config["class_name"] == "BatchNormalization"
    assert config["config"] == json.loads(json.dumps(bn1.get_config()))
    assert json.loads(props["onnxbn:state"])[0] == ["bn1/moving_mean", "bn1/moving_mean/new"]


@pytest.mark.parametrize("opset", sorted({MIN_OPSET, DEFAULT_OPSET, newest_opset()}))
def test_every_supported_opset_validates(opset):
    model, _, _ = two_layer_model()
    for training in (False, True):
        proto = export_onnx(model, training=training, opset=opset)
        strict_check(proto)
        assert proto.opset_import[0].version == opset
        assert proto.ir_version == onnx.helper.find_min_ir_version_for(list(proto.opset_import))


@pytest.mark.parametrize("opset", [MIN_OPSET - 1, 1, 10_000])
def test_unsupported_opset(opset):
    model, _, _ = two_layer_model()
    with pytest.raises(ValueError, match=rf"opset {opset}.*{MIN_OPSET} to {newest_opset()}"):
        export_onnx(model, opset=opset)


@pytest.mark.parametrize("bad", ["18", 18.0, True])
def test_opset_type(bad):
    model, _, _ = two_layer_model()
    with pytest.raises(TypeError, match="opset"):
        export_onnx(model, opset=bad)


def test_never_called_layer():
    with pytest.raises(ValueError, match="never called"):
        export_onnx(layers.BatchNormalization(name="lonely"))


def test_not_a_model():
    with pytest.raises(TypeError, match="received dict"):
        export_onnx({})


def test_called_layer_exports_its_first_call():
    onnxbn.reset_names()
    x = onnxbn.Input((4,), name="x")
    bn = layers.BatchNormalization(name="bn")
    bn(bn(x), training=True)
    proto = export_onnx(bn)
    assert [i.name for i in proto.graph.input] == ["x"]
    assert [o.name for o in proto.graph.output] == ["bn"]


def test_dynamic_channel_rejected():
    onnxbn.reset_names()
    x = onnxbn.Input((3,), name="x")
    with pytest.raises(ValueError, match="channel axis"):
        layers.BatchNormalization(axis=0)(x)


def test_fixed_batch_and_dynamic_dims():
    onnxbn.reset_names()
    x = onnxbn.Input((None, 4), batch_size=2, name="x")
    y = layers.BatchNormalization(axis=0, name="bn")(x, training=True)
    proto = export_onnx(onnxbn.Model(x, y))
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_value == 2 and dims[1].dim_param == "x_dim1" and dims[2].dim_value == 4
    out = proto.graph.output[0].type.tensor_type.shape.dim
    assert out[0].dim_value == 2 and out[1].dim_param and out[2].dim_value == 4


def test_fold_batchnorm_flag_is_accepted():
    model, _, _ = two_layer_model()
    a = export_onnx(model, fold_batchnorm=True)
    b = export_onnx(model, fold_batchnorm=False)
    assert [n.op_type for n in a.graph.node] == [n.op_type for n in b.graph.node]
    with pytest.raises(TypeError, match="fold_batchnorm"):
        export_onnx(model, fold_batchnorm="yes")


def test_invalid_model_error_is_value_error(monkeypatch):
    def broken(model, full_check=False):
        raise onnx.checker.ValidationError("broken on purpose")

    monkeypatch.setattr(onnx.checker, "check_model", broken)
    model, _, _ = two_layer_model()
    with pytest.raises(ValueError, match="broken on purpose"):
        export_onnx(model)


def test_write_and_return(tmp_path):
    model, _, _ = two_layer_model()
    path = tmp_path / "model.onnx"
    proto = export_onnx(model, path)
    assert onnx.load(str(path)) == proto
    assert os.listdir(tmp_path) == ["model.onnx"]


def test_atomic_write_failure_keeps_previous_file(tmp_path, monkeypatch):
    model, _, _ = two_layer_model()
    path = tmp_path / "model.onnx"
    path.write_bytes(b"previous contents")

    def failing_fsync(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export_module.os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="No space left") as info:
        export_onnx(model, path)
    assert type(info.value) is OSError
    assert path.read_bytes() == b"previous contents"
    assert os.listdir(tmp_path) == ["model.onnx"]


def test_atomic_write_interrupted_mid_write(tmp_path, monkeypatch):
    model, _, _ = two_layer_model()
    path = tmp_path / "model.onnx"
    path.write_bytes(b"old")
    real_replace = os.replace

    def interrupted(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(export_module.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export_onnx(model, path)
    monkeypatch.setattr(export_module.os, "replace", real_replace)
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["model.onnx"]


def test_os_error_passes_through(tmp_path):
    model, _, _ = two_layer_model()
    with pytest.raises(FileNotFoundError):
        export_onnx(model, tmp_path / "missing" / "model.onnx")


MODELS_DIR = os.path.join(os.path.dirname(os.path.dirname(__file__)), "models")
ZOO = ("image_features", "masked_sequence", "tabular")  # models/zoo.py
EXAMPLES = [f"{name}_{variant}" for name in ZOO for variant in ("inference", "training")]


def test_example_models_exist_for_every_variant():
    import sys

    sys.path.insert(0, os.path.dirname(MODELS_DIR))
    from models.zoo import MODELS

    assert set(MODELS) == set(ZOO)
    for example in EXAMPLES:
        assert os.path.isfile(os.path.join(MODELS_DIR, example, "test_data_set_0", "input_0.pb"))


@pytest.mark.parametrize("example", EXAMPLES)
def test_example_models_reproduce_on_onnxruntime(example):
    """The committed backend-test data: inputs in graph order, every output expected."""
    import glob

    import onnxruntime as ort
    from onnx import numpy_helper

    folder = os.path.join(MODELS_DIR, example)
    proto = onnx.load(os.path.join(folder, "model.onnx"))
    strict_check(proto)

    def load(pattern):
        tensors = []
        for path in sorted(glob.glob(os.path.join(folder, "test_data_set_0", pattern))):
            tensor = onnx.TensorProto()
            with open(path, "rb") as handle:
                tensor.ParseFromString(handle.read())
            tensors.append((tensor.name, numpy_helper.to_array(tensor)))
        return tensors

    inputs, outputs = load("input_*.pb"), load("output_*.pb")
    assert [n for n, _ in outputs] == [o.name for o in proto.graph.output]
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(
        proto.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    results = session.run(None, dict(inputs))
    for (name, want), got in zip(outputs, results):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=name)
