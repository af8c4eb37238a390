"""`onnxbn inspect` and the command line's error handling."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxbn.cli import main


def training_style_model(path):
    """A hand-built graph with one state pair, as a training export has."""
    graph = helper.make_graph(
        [
            helper.make_node("Add", ["x", "bn/moving_mean"], ["y"], name="bn/Add"),
            helper.make_node("Identity", ["bn/moving_mean"], ["bn/moving_mean/new"]),
        ],
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3]),
            helper.make_tensor_value_info("bn/moving_mean", TensorProto.FLOAT, [3]),
        ],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3]),
            helper.make_tensor_value_info("bn/moving_mean/new", TensorProto.FLOAT, [3]),
        ],
        [numpy_helper.from_array(np.zeros(3, np.float32), "bn/moving_mean")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)
    helper.set_model_props(model, {"onnxbn.layer.bn": "{}"})
    onnx.save(model, path)
    return path


def test_inspect_lists_inputs_outputs_state_and_ops(tmp_path, capsys):
    path = training_style_model(tmp_path / "m.onnx")
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "  x: float32 (?, 3)" in out
    assert "  y: float32 (?, 3)" in out
    assert "state pairs: 1" in out and "bn/moving_mean -> bn/moving_mean/new" in out
    assert "Add: 1" in out and "Identity: 1" in out
    assert "ai.onnx 18" in out and "onnxbn.layer.bn" in out


@pytest.mark.parametrize(
    "argv,code,message",
    [
        (["inspect", "missing.onnx"], 2, "does not exist"),
        (["run", "missing.onnx"], 2, "does not exist"),
        (["export", "missing.json", "-o", "x.onnx"], 2, "does not exist"),
    ],
)
def test_errors_are_one_line_on_stderr(argv, code, message, capsys):
    assert main(argv) == code
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_corrupt_model_file(tmp_path, capsys):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07garbage\xff\xff")
    assert main(["inspect", str(bad)]) == 2
    assert "not a valid ONNX model" in capsys.readouterr().err


def test_console_entry_point_help():
    result = subprocess.run(
        [sys.executable, "-m", "onnxbn", "--help"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0
    for command in ("export", "run", "check", "inspect", "bench"):
        assert command in result.stdout
    for command in ("export", "run", "check", "inspect", "bench"):
        sub = subprocess.run(
            [sys.executable, "-m", "onnxbn", command, "--help"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert sub.returncode == 0 and "usage: onnxbn" in sub.stdout


def test_usage_error_exit_code(capsys):
    with pytest.raises(SystemExit) as excinfo:
        main(["frobnicate"])
    assert excinfo.value.code == 2
