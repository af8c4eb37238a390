"""What a first-time user of the command line meets: flags, messages and quiet logs."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import onnxbn
from onnxbn import layers
from onnxbn.cli import main
from onnxbn.cli.check_cmd import compare

FIXTURES = Path(__file__).parents[1] / "fixtures" / "keras"


def _functional_config(tmp_path):
    config = json.loads((FIXTURES / "functional_model.json").read_text())["get_config"]
    path = tmp_path / "model.json"
    path.write_text(json.dumps(config))
    return config, path


def _graph_model(path, nodes, inputs, outputs, initializers=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return path


def test_weights_archive_names_missing_and_unexpected_keys(tmp_path, capsys):
    config, config_path = _functional_config(tmp_path)
    paths = [w.path for w in onnxbn.Model.from_config(config).weights]
    arrays = {p: w for p, w in zip(paths, onnxbn.Model.from_config(config).get_weights())}
    out = ["-o", str(tmp_path / "m.onnx")]
    partial = dict(arrays)
    del partial[paths[1]]
    partial["bn1/gama"] = arrays[paths[0]]
    np.savez(tmp_path / "partial.npz", **partial)
    assert main(["export", str(config_path), "--weights", str(tmp_path / "partial.npz"), *out]) == 2
    err = capsys.readouterr().err
    assert f"missing [{paths[1]!r}]" in err
    assert "not weights of the model ['bn1/gama']" in err
    assert "(keyed by weight paths)" in err
    # Positional archives: a short one says which positions are missing.
    np.savez(tmp_path / "short.npz", *list(arrays.values())[:-1])
    assert main(["export", str(config_path), "--weights", str(tmp_path / "short.npz"), *out]) == 2
    assert f"missing ['arr_{len(paths) - 1}']" in capsys.readouterr().err
    np.savez(tmp_path / "full.npz", *arrays.values())
    assert main(["export", str(config_path), "--weights", str(tmp_path / "full.npz"), *out]) == 0


def test_input_shape_with_a_model_config_is_an_error(tmp_path, capsys):
    _, config_path = _functional_config(tmp_path)
    argv = ["export", str(config_path), "-o", str(tmp_path / "m.onnx"), "--input-shape", "None,5,8"]
    assert main(argv) == 2
    assert "--input-shape 'None,5,8' applies to a single layer" in capsys.readouterr().err
    assert not (tmp_path / "m.onnx").exists()


def test_save_state_without_state_says_so(tmp_path, capsys):
    x = onnxbn.Input((3,), name="x")
    model = onnxbn.Model(x, layers.BatchNormalization(name="bn")(x))
    onnxbn.export_onnx(model, tmp_path / "m.onnx", training=False)
    np.save(tmp_path / "x.npy", np.ones((2, 3), np.float32))
    argv = ["run", str(tmp_path / "m.onnx"), "--input", f"x={tmp_path / 'x.npy'}"]
    assert main([*argv, "--save-state", str(tmp_path / "s.npz")]) == 2
    assert "has no state to save" in capsys.readouterr().err
    assert not (tmp_path / "s.npz").exists()


@pytest.mark.parametrize("command", ["run", "check", "inspect", "bench"])
def test_a_file_that_is_not_onnx_is_named(tmp_path, capsys, command):
    bad = tmp_path / "notes.onnx"
    bad.write_text("these are notes, not a model")
    argv = [command, str(bad)] if command != "bench" else ["bench", "--model", str(bad)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "valid ONNX model" in err


@pytest.mark.parametrize(
    "a,b,agree",
    [
        ([np.inf, -np.inf, np.nan, 1.0], [np.inf, -np.inf, np.nan, 1.0 + 1e-6], True),
        ([np.inf], [-np.inf], False),
        ([np.inf], [1e30], False),
        ([np.nan], [0.0], False),
        ([1.0], [1.1], False),
        ([[1.0, 2.0]], [1.0, 2.0], False),
    ],
)
def test_check_compares_special_values_position_by_position(a, b, agree):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ok, _ = compare(np.array(a, np.float32), np.array(b, np.float32), 1e-4, 1e-4)
    assert ok is agree


def _log_model(path):
    """y = Log(x): -inf at 0, NaN below it, the same on both engines."""
    return _graph_model(
        path,
        [helper.make_node("Log", ["x"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
    )


def test_check_agrees_on_equal_non_finite_outputs_without_warnings(tmp_path):
    model = _log_model(tmp_path / "log.onnx")
    np.save(tmp_path / "x.npy", np.array([[0.0, -1.0, 1.0, np.inf]], np.float32))
    done = subprocess.run(
        [sys.executable, "-W", "default", "-m", "onnxbn", "check", str(model),
         "--input", f"x={tmp_path / 'x.npy'}"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "engines agree" in done.stdout
    assert "Warning" not in done.stderr, done.stderr


def test_check_tolerances_and_given_inputs(tmp_path, capsys):
    x = onnxbn.Input((3,), name="x")
    model = onnxbn.Model(x, layers.BatchNormalization(name="bn")(x))
    onnxbn.export_onnx(model, tmp_path / "m.onnx", training=True)
    np.save(tmp_path / "x.npy", np.arange(6, dtype=np.float32).reshape(2, 3))
    given = ["--input", f"x={tmp_path / 'x.npy'}"]
    assert main(["check", str(tmp_path / "m.onnx"), *given, "--rtol", "0", "--atol", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "0e+00" in out and "5e-01" in out and "engines agree" in out
    assert main(["check", str(tmp_path / "m.onnx"), "--atol", "-1"]) == 2
    assert "--atol must be a number >= 0" in capsys.readouterr().err
    assert main(["check", str(tmp_path / "m.onnx"), "--input", f"z={tmp_path / 'x.npy'}"]) == 2
    assert "Unknown inputs ['z']" in capsys.readouterr().err
    help_text = subprocess.run(
        [sys.executable, "-m", "onnxbn", "check", "--help"], capture_output=True, text=True
    ).stdout
    for flag in ("--seed", "--atol", "--rtol", "--input NAME=FILE.npy"):
        assert flag in help_text
    assert "seed of the random inputs" in help_text


def test_bench_model_times_a_given_file(tmp_path, capsys):
    x = onnxbn.Input((None, 3), name="x")
    model = onnxbn.Model(x, layers.BatchNormalization(name="bn")(x))
    onnxbn.export_onnx(model, tmp_path / "m.onnx", training=True)
    argv = ["bench", "--model", str(tmp_path / "m.onnx"), "--repeats", "3", "--batch", "2"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "inputs x(2, 2, 3), 2 state inputs" in out
    assert "intra_op_num_threads=1: median" in out and "over 3 runs" in out
    assert main([*argv, "--layouts", "small"]) == 2


def test_bench_writes_no_carriage_returns_into_a_log(tmp_path):
    """Off a terminal the progress is one line per layout, not a redrawn bar."""
    done = subprocess.run(
        [sys.executable, "-m", "onnxbn", "bench", "--repeats", "2", "--layouts", "small"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "\r" not in done.stderr and "\r" not in done.stdout
    assert "bench:   small:" in done.stderr
