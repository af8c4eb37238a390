"""Train anywhere: compile a model, train it eagerly, export its train step, train it on plain onnxruntime.

The second half uses only onnxruntime, numpy and the standard library, as a
program without onnxbn (in any language) would: it reads the starting state
from the model's metadata and feeds each `/new` output back.

Usage:
    python scripts/train_anywhere.py [--path train_step.onnx] [--steps 5]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def build_and_export(path: str) -> tuple[np.ndarray, np.ndarray]:
    import onnxbn
    from onnxbn import initializers, layers

    x = onnxbn.Input((20,), name="features")
    seeded = {"kernel_initializer": initializers.GlorotUniform(seed=1)}  # the same output each run
    h = layers.Dense(32, name="dense", **seeded)(x)
    h = layers.BatchNormalization(name="bn")(h)
    h = layers.ReLU(name="relu")(h)
    y = layers.Dense(3, activation="softmax", name="head", **seeded)(h)
    model = onnxbn.Model(x, y, name="classifier")
    model.compile(optimizer=onnxbn.optimizers.Adam(learning_rate=1e-2),
                  loss="sparse_categorical_crossentropy")  # fmt: skip
    rng = np.random.default_rng(0)
    features = rng.normal(size=(256, 20)).astype(np.float32)
    labels = (features[:, :3].argmax(axis=1)).astype(np.int64)
    history = model.fit(features, labels, batch_size=32, epochs=3, verbose=0, seed=0)
    print("eager fit, loss per epoch:", [round(v, 4) for v in history.history["loss"]])
    onnxbn.export_onnx(model, path, train_step=True)
    return features, labels


def train_with_plain_onnxruntime(path: str, features, labels, steps: int) -> None:
    import onnxruntime as ort

    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map["onnxbn:initial_state"]
    state = {
        e["name"]: np.frombuffer(
            base64.b64decode(e["data"]), np.dtype(e["dtype"]).newbyteorder("<")
        ).reshape(e["shape"])
        for e in json.loads(meta)
    }
    outputs = [o.name for o in session.get_outputs()]  # "loss", then "<state>/new"
    for step in range(steps):
        batch = slice(32 * step, 32 * step + 32)
        results = dict(zip(outputs, session.run(None, {
            "features": features[batch], "y_true": labels[batch], **state})))  # fmt: skip
        state = {name: results[name + "/new"] for name in state}
        print(f"onnxruntime step {int(state['optimizer/iterations'])}: loss {results['loss']:.4f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--path", default="train_step.onnx")
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args(argv)
    features, labels = build_and_export(args.path)
    train_with_plain_onnxruntime(args.path, features, labels, args.steps)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
