"""Exports every model of `models/real_models.py` in inference and training variants.

Layout (ONNX backend test data):

    models/<name>_<variant>/model.onnx
    models/<name>_<variant>/test_data_set_0/input_<i>.pb   # every graph input, in order
    models/<name>_<variant>/test_data_set_0/output_<i>.pb  # every graph output, in order

Expected outputs come from the eager model (`model(inputs, training=...)`); a
training variant's outputs also hold the eager layers' updated moving
statistics (`<layer>/moving_*/new`), and its inputs the starting state
(`onnxbn.initial_state`) after the model's inputs. The inference variant is exported with
`fold_batchnorm=True` (the default).

Usage:
    python scripts/export_real_models.py [--out models] [--check]
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

from models.real_models import MODELS  # noqa: E402
from onnxbn import export_onnx, initial_state  # noqa: E402

VARIANTS = {"inference": False, "training": True}
STATE_SUFFIX = "/new"


def expected_outputs(model, sample: dict, training: bool, proto: onnx.ModelProto) -> list:
    """`[(graph output name, eager array)]`: the model's outputs, then the new moving statistics.

    The model's weights are restored afterwards, so the export and the
    expectation start from the same state.
    """
    variables = {v.path: v for v in model.weights}
    saved = model.get_weights()
    try:
        y = model(sample, training=training)
        arrays = [y] if isinstance(y, np.ndarray) else list(y)
        names = [o.name for o in proto.graph.output]
        for name in names[len(arrays) :]:
            arrays.append(variables[name[: -len(STATE_SUFFIX)]].numpy())
    finally:
        model.set_weights(saved)
    return list(zip(names, arrays))


def export_variant(name: str, builder, variant: str, out: str) -> tuple:
    """Writes one `<name>_<variant>` folder; returns `(folder, proto, sample, expected)`."""
    model, sample = builder()
    training = VARIANTS[variant]
    folder = os.path.join(out, f"{name}_{variant}")
    shutil.rmtree(folder, ignore_errors=True)
    data = os.path.join(folder, "test_data_set_0")
    os.makedirs(data)
    proto = export_onnx(model, os.path.join(folder, "model.onnx"), training=training)
    # Every graph input, in order: the model's, then the starting state.
    feeds = {t.name: np.asarray(sample[t.name]) for t in model.inputs}
    feeds.update(initial_state(proto))
    for i, (input_name, array) in enumerate(feeds.items()):
        _write(numpy_helper.from_array(array, input_name), data, i, "input")
    expected = expected_outputs(model, sample, training, proto)
    for i, (output_name, array) in enumerate(expected):
        _write(numpy_helper.from_array(np.asarray(array), output_name), data, i, "output")
    return folder, proto, sample, expected


def _write(tensor: onnx.TensorProto, folder: str, index: int, kind: str) -> None:
    with open(os.path.join(folder, f"{kind}_{index}.pb"), "wb") as handle:
        handle.write(tensor.SerializeToString())


def check(proto: onnx.ModelProto, sample: dict, expected: list) -> float:
    """onnxruntime (plain session, starting state fed) reproduces the stored outputs; max error."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(
        proto.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    results = session.run(None, {**sample, **initial_state(proto)})
    worst = 0.0
    for (name, want), got in zip(expected, results):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=name)
        worst = max(worst, float(np.max(np.abs(got - want), initial=0.0)))
    return worst


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(ROOT, "models"))
    parser.add_argument("--check", action="store_true", help="verify with onnxruntime")
    args = parser.parse_args(argv)
    for name, builder in MODELS.items():
        for variant in VARIANTS:
            folder, proto, sample, expected = export_variant(name, builder, variant, args.out)
            ops = sorted({n.op_type for n in proto.graph.node})
            line = f"{folder}: {len(proto.graph.node)} nodes, {len(expected)} outputs, ops {ops}"
            if args.check:
                line += f", max |onnxruntime - eager| = {check(proto, sample, expected):.2e}"
            print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
