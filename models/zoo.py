"""Example models built with the onnxbn graph API, with deterministic weights.

Each builder returns `(model, sample_inputs)`: an `onnxbn.Model` whose weights
come from a seeded generator, and a dict of small sample inputs for it.
`scripts/export_models.py` exports every builder in inference and training
variants in the ONNX backend-test layout.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

import onnxbn
from onnxbn import layers

SEED = 1234


def _init_weights(model: onnxbn.Model, rng: np.random.Generator) -> None:
    """gamma ~ U(0.5, 1.5), beta ~ N(0, 0.5), moving mean ~ N(0, 1), variance ~ U(0.5, 2)."""
    weights = []
    for variable in model.weights:
        shape = variable.shape
        kind = variable.name
        if kind == "gamma":
            weights.append(rng.uniform(0.5, 1.5, shape))
        elif kind == "beta":
            weights.append(rng.normal(0.0, 0.5, shape))
        elif kind == "moving_mean":
            weights.append(rng.normal(0.0, 1.0, shape))
        else:
            weights.append(rng.uniform(0.5, 2.0, shape))
    model.set_weights(weights)


def image_features() -> tuple[onnxbn.Model, dict[str, np.ndarray]]:
    """A channels-last image-feature stack: (None, 8, 8, 16) -> BN -> BN(scale=False)."""
    onnxbn.reset_names()
    rng = np.random.default_rng(SEED)
    x = onnxbn.Input((8, 8, 16), name="image")
    h = layers.BatchNormalization(axis=-1, name="bn_features")(x)
    y = layers.BatchNormalization(axis=-1, scale=False, momentum=0.9, name="bn_head")(h)
    model = onnxbn.Model(x, y, name="image_features")
    _init_weights(model, rng)
    sample = {"image": rng.normal(0.5, 2.0, (2, 8, 8, 16)).astype(np.float32)}
    return model, sample


def masked_sequence() -> tuple[onnxbn.Model, dict[str, np.ndarray]]:
    """Sequences with padding: x (None, 6, 4) + bool mask (None, 6) -> BN(mask) -> BN(axis=1)."""
    onnxbn.reset_names()
    rng = np.random.default_rng(SEED + 1)
    x = onnxbn.Input((6, 4), name="tokens")
    mask = onnxbn.Input((6,), dtype="bool", name="mask")
    h = layers.BatchNormalization(axis=-1, momentum=0.9, name="bn_features")(x, mask=mask)
    y = layers.BatchNormalization(axis=1, epsilon=1e-5, name="bn_steps")(h)
    model = onnxbn.Model([x, mask], y, name="masked_sequence")
    _init_weights(model, rng)
    lengths = np.array([6, 3])
    valid = np.arange(6)[None, :] < lengths[:, None]
    tokens = rng.normal(-1.0, 3.0, (2, 6, 4)).astype(np.float32)
    tokens[~valid] = 0.0  # padding
    return model, {"tokens": tokens, "mask": valid}


def tabular() -> tuple[onnxbn.Model, dict[str, np.ndarray]]:
    """2-D features: (None, 10) -> BN -> BN(center=False, epsilon=1e-5)."""
    onnxbn.reset_names()
    rng = np.random.default_rng(SEED + 2)
    x = onnxbn.Input((10,), name="features")
    h = layers.BatchNormalization(name="bn_input")(x)
    y = layers.BatchNormalization(center=False, epsilon=1e-5, name="bn_output")(h)
    model = onnxbn.Model(x, y, name="tabular")
    _init_weights(model, rng)
    sample = {"features": rng.normal(3.0, 5.0, (4, 10)).astype(np.float32)}
    return model, sample


MODELS: dict[str, Callable[[], tuple[onnxbn.Model, dict[str, np.ndarray]]]] = {
    "image_features": image_features,
    "masked_sequence": masked_sequence,
    "tabular": tabular,
}
