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


def test_missing_folder_names_the_users_path(tmp_path):
    model, _, _ = two_layer_model()
    path = tmp_path / "missing" / "model.onnx"
    with pytest.raises(FileNotFoundError) as info:
        export_onnx(model, path)
    assert info.value.filename == str(path)
    assert ".tmp" not in str(info.value) and str(path) in str(info.value)


def test_folder_as_path_names_the_users_path(tmp_path):
    model, _, _ = two_layer_model()
    with pytest.raises(IsADirectoryError) as info:
        export_onnx(model, tmp_path)
    assert info.value.filename == str(tmp_path)
    assert ".tmp" not in str(info.value)
    assert os.listdir(tmp_path) == []


def test_replace_error_names_the_users_path(tmp_path, monkeypatch):
    """An error from the final rename (e.g. the path became a folder meanwhile)."""
    model, _, _ = two_layer_model()
    path = tmp_path / "model.onnx"

    def replace(src, dst):
        raise IsADirectoryError(21, "Is a directory", src, dst)

    monkeypatch.setattr(export_module.os, "replace", replace)
    with pytest.raises(IsADirectoryError) as info:
        export_onnx(model, path)
    assert info.value.filename == str(path) and info.value.filename2 is None
    assert os.listdir(tmp_path) == []


def test_new_file_mode_follows_the_umask(tmp_path):
    model, _, _ = two_layer_model()
    previous = os.umask(0o027)
    try:
        export_onnx(model, tmp_path / "model.onnx")
    finally:
        os.umask(previous)
    assert os.stat(tmp_path / "model.onnx").st_mode & 0o777 == 0o640


def test_replaced_file_keeps_its_mode(tmp_path):
    model, _, _ = two_layer_model()
    path = tmp_path / "model.onnx"
    path.write_bytes(b"old")
    os.chmod(path, 0o604)
    export_onnx(model, path)
    assert os.stat(path).st_mode & 0o777 == 0o604
    assert onnx.load(str(path)).graph.name == "two"


# -- independence from any runtime ---------------------------------------------------
_WITHOUT_ONNXRUNTIME = """
import sys

class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name == "onnxruntime" or name.startswith("onnxruntime."):
            raise ImportError(f"{name} is blocked by the test")

sys.meta_path.insert(0, Blocker())
import numpy as np
import onnx
import onnxbn
from onnxbn import layers

x = onnxbn.Input((4, 3), name="x")
y = layers.BatchNormalization(name="bn")(x, training=True)
model = onnxbn.Model(x, y)
path = sys.argv[1]
for opset in (15, 18, onnxbn.export.newest_opset()):
    proto = onnxbn.export_onnx(model, path, opset=opset)
    onnx.checker.check_model(onnx.load(path), full_check=True)
assert list(onnxbn.initial_state(path)) == ["bn/moving_mean", "bn/moving_variance"]
session = onnxbn.reference.Session(path)
session.run({"x": np.ones((2, 4, 3), np.float32)})
assert "onnxruntime" not in sys.modules, "onnxruntime was imported"
print("exported without onnxruntime")
"""


def test_export_works_without_onnxruntime(tmp_path):
    """Export, initial_state and the reference Session need no runtime at all."""
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-c", _WITHOUT_ONNXRUNTIME, str(tmp_path / "m.onnx")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "exported without onnxruntime" in result.stdout


def _probe_model() -> onnxbn.Model:
    """A small model whose export uses every op type of every lowering variant."""
    onnxbn.reset_names()
    x = onnxbn.Input((3, 4, 5), dtype="float16", name="probe_x")
    mask = onnxbn.Input((3, 4), dtype="float32", name="probe_mask")
    xb = onnxbn.Input((4,), batch_size=2, dtype="bfloat16", name="probe_xb")
    xd = onnxbn.Input((None, 6), dtype="int32", name="probe_xd")
    bn = layers.BatchNormalization
    outputs = [
        bn(axis=-1, name="probe_last")(x, mask=mask, training=True),
        bn(axis=1, name="probe_inner")(x, mask=mask, training=True),
        bn(axis=2, scale=False, center=False, name="probe_mid")(x, training=True),
        bn(axis=2, dtype="float64", name="probe_f64")(x, training=True),
        bn(axis=0, name="probe_first")(xb),
        bn(axis=-1, name="probe_folded")(x),
        bn(axis=-1, name="probe_rows")(xd, training=True),
        bn(axis=-1, renorm=True, name="probe_renorm")(x, mask=mask, training=True),
        bn(axis=-1, synchronized=True, name="probe_sync")(x, training=True),
    ]
    for axis in (1, -1):  # shared layers: state read by a later call of each mode
        shared = bn(axis=axis, name=f"probe_shared{axis}")
        outputs.append(shared(shared(x, training=True), training=False))
    return onnxbn.Model([x, mask, xb, xd], outputs, name="probe")


@pytest.mark.parametrize("opset", range(MIN_OPSET, newest_opset() + 1))
def test_onnxruntime_loads_every_lowering_at_every_exported_opset(opset):
    """Runtime capability is the tests' business: every opset export_onnx accepts loads."""
    import onnxruntime as ort

    proto = export_onnx(_probe_model(), opset=opset)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])


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
