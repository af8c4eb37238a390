"""`onnxbn export`, `run` and `check` end to end on real Keras configs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

import onnxbn
from onnxbn.cli import main

FIXTURES = Path(__file__).parents[1] / "fixtures" / "keras"


def write_functional_config(tmp_path):
    config = json.loads((FIXTURES / "functional_model.json").read_text())["get_config"]
    path = tmp_path / "model.json"
    path.write_text(json.dumps(config))
    return config, path


def test_export_run_training_steps_match_eager(tmp_path, capsys):
    config, config_path = write_functional_config(tmp_path)
    rng = np.random.default_rng(0)
    eager = onnxbn.Model.from_config(config)
    weights = [rng.uniform(0.5, 1.5, w.shape).astype(np.float32) for w in eager.weights]
    eager.set_weights(weights)
    np.savez(tmp_path / "w.npz", **{w.path: v for w, v in zip(eager.weights, weights)})
    out = tmp_path / "m.onnx"
    assert (
        main(
            [
                "export",
                str(config_path),
                "--weights",
                str(tmp_path / "w.npz"),
                "-o",
                str(out),
                "--training",
            ]
        )
        == 0
    )
    assert "wrote" in capsys.readouterr().out
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)

    x = (rng.normal(size=(4, 5, 8)) * 2 + 3).astype(np.float32)
    mask = rng.random((4, 5)) > 0.3
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "mask.npy", mask)
    for engine in ("ort", "reference"):
        state = tmp_path / f"state_{engine}.npz"
        assert (
            main(
                [
                    "run",
                    str(out),
                    "--input",
                    f"x={tmp_path / 'x.npy'}",
                    "--input",
                    f"mask={tmp_path / 'mask.npy'}",
                    "--engine",
                    engine,
                    "--steps",
                    "3",
                    "--save-state",
                    str(state),
                    "--output-dir",
                    str(tmp_path / engine),
                ]
            )
            == 0
        )
        text = capsys.readouterr().out
        assert "state bn1/moving_mean" in text
        saved = dict(np.load(state))
        reference = onnxbn.Model.from_config(config)
        reference.set_weights(weights)
        for _ in range(3):
            y = reference(x, mask, training=True)
        for w in reference.non_trainable_weights:
            np.testing.assert_allclose(saved[w.path], w.numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.load(tmp_path / engine / "bn2.npy"), y, rtol=1e-4, atol=1e-4)

    assert main(["check", str(out)]) == 0
    text = capsys.readouterr().out
    assert "engines agree" in text and "bn2/moving_variance/new" not in text


def test_export_single_layer_envelope_and_bare_config(tmp_path, capsys):
    envelope = json.loads((FIXTURES / "axis_neg3.json").read_text())["serialize"]
    (tmp_path / "env.json").write_text(json.dumps(envelope))
    assert main(["export", str(tmp_path / "env.json"), "-o", str(tmp_path / "a.onnx")]) == 0
    model = onnx.load(str(tmp_path / "a.onnx"))
    assert [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim] == [2, 3, 4, 5]
    bare = json.loads((FIXTURES / "default.json").read_text())["get_config"]
    (tmp_path / "bare.json").write_text(json.dumps(bare))
    assert main(["export", str(tmp_path / "bare.json"), "-o", str(tmp_path / "b.onnx")]) == 2
    assert "--input-shape" in capsys.readouterr().err
    assert (
        main(
            [
                "export",
                str(tmp_path / "bare.json"),
                "-o",
                str(tmp_path / "b.onnx"),
                "--input-shape",
                "None,7,5",
                "--opset",
                "15",
            ]
        )
        == 0
    )
    assert onnx.load(str(tmp_path / "b.onnx")).opset_import[0].version == 15


@pytest.mark.parametrize(
    "files,argv,message",
    [
        ({"c.json": "{not json"}, ["export", "c.json", "-o", "o.onnx"], "not valid JSON"),
        ({"c.json": "[1, 2]"}, ["export", "c.json", "-o", "o.onnx"], "JSON object"),
        (
            {"c.json": '{"class_name": "Lambda", "config": {}}'},
            ["export", "c.json", "-o", "o.onnx"],
            "Unknown layer class 'Lambda'",
        ),
        (
            {"c.json": '{"axis": 1}'},
            ["export", "c.json", "-o", "o.onnx", "--input-shape", "a,b"],
            "--input-shape expects",
        ),
        (
            {"c.json": '{"axis": 1}'},
            ["export", "c.json", "-o", "o.onnx", "--input-shape", "None,3", "--opset", "3"],
            "opset",
        ),
    ],
)
def test_export_errors(tmp_path, monkeypatch, capsys, files, argv, message):
    monkeypatch.chdir(tmp_path)
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "o.onnx").exists()


def test_run_errors(tmp_path, capsys):
    x = onnxbn.Input(shape=(3,), name="x")
    onnxbn.export_onnx(onnxbn.Model(x, onnxbn.layers.BatchNormalization()(x)), tmp_path / "m.onnx")
    np.save(tmp_path / "x64.npy", np.zeros((2, 3)))
    np.save(tmp_path / "obj.npy", np.array([None, 1], dtype=object), allow_pickle=True)
    cases = [
        (["--input", "x"], "NAME=FILE"),
        (["--input", f"x={tmp_path / 'x64.npy'}"], "float64"),
        (["--input", f"x={tmp_path / 'obj.npy'}"], "not a plain .npy"),
        ([], "Missing feeds ['x']"),
        (["--input", f"y={tmp_path / 'x64.npy'}"], "Unknown feed 'y'"),
        (["--steps", "0"], "--steps must be >= 1"),
    ]
    for extra, message in cases:
        assert main(["run", str(tmp_path / "m.onnx"), *extra]) == 2, extra
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (extra, err)
