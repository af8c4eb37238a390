"""`onnxbn recalibrate` and `onnxbn to-training` end to end (statistics against the float64 oracle)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import onnxbn
from onnxbn.cli.adapt_cmds import split_batches
from onnxbn.cli.main import main
from tests.adapt.models import batches_for, conv_bn_relu_conv_bn, expected_statistics


def test_recalibrate_then_to_training(tmp_path, capsys):
    model = conv_bn_relu_conv_bn(18)
    onnx.save(model, str(tmp_path / "cnn.onnx"))
    (data,) = batches_for(model, 1, 10)
    np.savez(tmp_path / "data.npz", **data)
    out = tmp_path / "recalibrated.onnx"
    code = main(["recalibrate", str(tmp_path / "cnn.onnx"), "--data", str(tmp_path / "data.npz"),
                 "--batch-size", "4", "-o", str(out)])  # fmt: skip
    assert code == 0
    assert "2 BatchNormalization nodes recalibrated on 3 batch(es)" in capsys.readouterr().out
    arrays = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(out)).graph.initializer}
    for name, (mean, var) in expected_statistics(model, [data]).items():
        index = name[-1]
        np.testing.assert_allclose(arrays[f"m{index}"], mean, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(arrays[f"v{index}"], var, rtol=1e-4, atol=1e-5)
    trained = tmp_path / "trained.onnx"
    assert main(["to-training", str(out), "-o", str(trained), "--momentum", "0.5"]) == 0
    assert list(onnxbn.initial_state(trained)) == ["m1", "v1", "m2", "v2"]
    assert capsys.readouterr().err == ""


def test_errors_name_the_file_and_exit_2(tmp_path, capsys):
    model = conv_bn_relu_conv_bn(18)
    onnx.save(model, str(tmp_path / "cnn.onnx"))
    code = main(["recalibrate", str(tmp_path / "cnn.onnx"), "--data", str(tmp_path / "no.npz"),
                 "-o", str(tmp_path / "x.onnx")])  # fmt: skip
    assert code == 2 and "Data file" in capsys.readouterr().err
    np.savez(tmp_path / "wrong.npz", image=np.zeros((2, 3, 6, 6), np.float32))
    code = main(["recalibrate", str(tmp_path / "cnn.onnx"), "--data", str(tmp_path / "wrong.npz"),
                 "-o", str(tmp_path / "x.onnx")])  # fmt: skip
    assert code == 2 and "missing ['x'], unknown ['image']" in capsys.readouterr().err
    assert not (tmp_path / "x.onnx").exists()


def test_split_batches():
    arrays = {"x": np.arange(10).reshape(5, 2), "m": np.ones(5, bool)}
    batches = split_batches(arrays, 2)
    assert [b["x"].shape[0] for b in batches] == [2, 2, 1]
    assert len(split_batches(arrays, None)) == 1
    with pytest.raises(ValueError, match="same number of rows"):
        split_batches({"x": np.zeros((3, 1)), "m": np.zeros(4)}, 2)
    with pytest.raises(ValueError, match="--batch-size must be >= 1"):
        split_batches(arrays, 0)
    with pytest.raises(ValueError, match="holds no arrays"):
        split_batches({}, 2)
