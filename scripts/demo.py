"""Builds a masked BatchNormalization model, runs it eagerly, exports it and runs it on onnxruntime.

Usage: python scripts/demo.py [--out models/demo.onnx]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

import onnxbn
from onnxbn import layers


def build() -> onnxbn.Model:
    x = onnxbn.Input(shape=(None, 16), name="x")
    m = onnxbn.Input(shape=(None,), dtype="bool", name="mask")
    bn = layers.BatchNormalization(axis=-1, momentum=0.9, epsilon=1e-3, name="bn")
    return onnxbn.Model(inputs=[x, m], outputs=bn(x, mask=m), name="demo")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("models/demo.onnx"))
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    x = (rng.normal(size=(8, 12, 16)) * 3 + 10).astype(np.float32)
    mask = rng.random((8, 12)) > 0.25

    model = build()
    eager = build()
    eager.set_weights(model.get_weights())
    y_eager = eager([x, mask], training=True)
    print(
        f"eager training call: y{y_eager.shape} mean={y_eager.mean():+.4f} std={y_eager.std():.4f}"
    )

    if not hasattr(onnxbn, "export_onnx"):
        return
    from onnxbn import runtime

    proto = onnxbn.export_onnx(model, args.out, training=True)
    print(
        f"exported {args.out} (opset {proto.opset_import[0].version}, "
        f"{len(proto.graph.node)} nodes)"
    )
    session = runtime.Session(args.out)
    (y_ort,) = session.run({"x": x, "mask": mask})
    print(
        f"onnxruntime {session.providers}: max |y_ort - y_eager| = "
        f"{np.max(np.abs(y_ort - y_eager)):.2e}"
    )
    diff = max(
        float(np.max(np.abs(session.state[w.path] - w.numpy())))
        for w in eager.non_trainable_weights
    )
    print(f"moving statistics carried by the session vs eager layer: max diff = {diff:.2e}")


if __name__ == "__main__":
    main()
