"""Benchmark: `onnxbn.recalibrate` against plain inference over the same batches (onnxruntime CPU).

The torch.onnx CNN fixture (two BatchNormalization depths, so two passes) over
64 batches of 32: the wall time of a recalibration against 64 plain inference
runs of the same model in one onnxruntime session. The floor is one inference
pass per BatchNormalization depth; the ratio shows what the statistics, the
probe sessions and the Chan merges add. Medians over repeats, in one process.

Usage:
    python scripts/bench_recalibrate.py [--batches 64] [--batch-size 32] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np
import onnx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import onnxruntime as ort  # noqa: E402

from onnxbn.adapt.nodes import batch_norm_nodes  # noqa: E402
from onnxbn.adapt.recalibrate import depths, recalibrate  # noqa: E402

FIXTURE = os.path.join(ROOT, "tests", "fixtures", "torch", "cnn_torchscript_opset18.onnx")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--model", default=FIXTURE)
    args = parser.parse_args(argv)
    model = onnx.load(args.model)
    (x,) = [i for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    dims = [d.dim_value or args.batch_size for d in x.type.tensor_type.shape.dim]
    dims[0] = args.batch_size
    rng = np.random.default_rng(0)
    batches = [{x.name: rng.normal(size=dims).astype(np.float32)} for _ in range(args.batches)]
    passes = max(depths(model, batch_norm_nodes(model)).values()) + 1
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])  # fmt: skip

    def inference():
        for feeds in batches:
            session.run(None, feeds)

    def recalibration():
        recalibrate(model, batches)

    inference()
    recalibration()
    times = {"inference": [], "recalibrate": []}
    for _ in range(args.repeats):
        for name, fn in (("inference", inference), ("recalibrate", recalibration)):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    inf, rec = (statistics.median(times[k]) for k in ("inference", "recalibrate"))
    print(f"model {os.path.basename(args.model)}: {args.batches} batches of {args.batch_size}, "
          f"{passes} passes (BatchNormalization depths)")  # fmt: skip
    print(f"{args.batches} inference runs: {inf * 1e3:.1f} ms; recalibrate: {rec * 1e3:.1f} ms")
    print(f"ratio {rec / inf:.2f}x (floor {passes}x: one inference pass per depth)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
