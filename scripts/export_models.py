"""Exports every model of `models/zoo.py` in inference and training variants.

Layout (ONNX backend test data):

    models/<name>_<variant>/model.onnx
    models/<name>_<variant>/test_data_set_0/input_<i>.pb   # every graph input, in order
    models/<name>_<variant>/test_data_set_0/output_<i>.pb  # every graph output, in order

Expected outputs come from the eager model; a training variant's outputs also
hold the updated moving statistics (`<layer>/moving_*/new`), and its inputs
the starting state (`onnxbn.initial_state`) after the model's inputs.

Usage:
    python scripts/export_models.py [--out models] [--check]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys

import numpy as np
import onnx
from onnx import numpy_helper

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from models.zoo import MODELS  # noqa: E402
from onnxbn import export_onnx, initial_state  # noqa: E402
from onnxbn.runtime import Session  # noqa: E402

VARIANTS = {"inference": False, "training": True}


def expected_outputs(model, sample: dict, training: bool, proto: onnx.ModelProto) -> list:
    """Eager outputs, then the eager layers' updated moving statistics (training)."""
    layers_by_path = {v.path: v for v in model.weights}
    saved = model.get_weights()
    y = model(sample, training=training)
    outputs = [y] if isinstance(y, np.ndarray) else list(y)
    names = [o.name for o in proto.graph.output]
    for name in names[len(outputs) :]:
        outputs.append(layers_by_path[name[: -len("/new")]].numpy())
    model.set_weights(saved)
    return list(zip(names, outputs))


def export_all(out: str, check: bool) -> list[str]:
    written = []
    for name, builder in MODELS.items():
        for variant, training in VARIANTS.items():
            model, sample = builder()
            folder = os.path.join(out, f"{name}_{variant}")
            shutil.rmtree(folder, ignore_errors=True)
            data = os.path.join(folder, "test_data_set_0")
            os.makedirs(data)
            proto = export_onnx(model, os.path.join(folder, "model.onnx"), training=training)
            # Every graph input, in order: the model's, then the starting state.
            feeds = {t.name: np.asarray(sample[t.name]) for t in model.inputs}
            feeds.update(initial_state(proto))
            for i, (input_name, array) in enumerate(feeds.items()):
                _write(numpy_helper.from_array(array, input_name), data, f"input_{i}.pb")
            expected = expected_outputs(model, sample, training, proto)
            for i, (output_name, array) in enumerate(expected):
                _write(numpy_helper.from_array(np.asarray(array), output_name), data,
                       f"output_{i}.pb")  # fmt: skip
            if check:
                _check(proto, sample, expected)
            written.append(folder)
            print(f"{folder}: {len(proto.graph.node)} nodes, {len(expected)} outputs")
    return written


def _write(tensor: onnx.TensorProto, folder: str, filename: str) -> None:
    with open(os.path.join(folder, filename), "wb") as handle:
        handle.write(tensor.SerializeToString())


def _check(proto, sample, expected) -> None:
    """onnxruntime reproduces the stored outputs (plain session, starting state fed)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(proto.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])  # fmt: skip
    results = session.run(None, {**sample, **initial_state(proto)})
    for (name, want), got in zip(expected, results):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=name)
    Session(proto).run(sample)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(ROOT, "models"))
    parser.add_argument("--check", action="store_true", help="verify with onnxruntime")
    args = parser.parse_args(argv)
    export_all(args.out, args.check)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
