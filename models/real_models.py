"""Real-model examples: BatchNormalization where users put it, after Conv and Dense layers.

Each builder returns `(model, sample_inputs)`: an `onnxbn.Model` whose weights
come from a seeded generator, and a dict of small sample inputs. Builders reset
onnxbn's automatic names, so every call gives the same graph.

- `resnet_cnn`: a ResNet-style CNN on `(None, 16, 16, 3)` images: stem
  Conv2D-BN-ReLU, an identity residual block, a downsampling residual block
  with a strided 1x1 projection (Conv-BN) on the skip path, global average
  pooling and a softmax Dense head. `batchnorm=False` builds the same network
  without any BatchNormalization (its convolutions get biases instead), the
  baseline `scripts/bench_models.py` compares the folded export against.
- `mlp_bn`: Dense-BN-ReLU twice, then a softmax Dense head.
- `sequence_classifier`: token ids of any length -> `Embedding(mask_zero=True)`
  -> Dense -> BN -> ReLU -> GlobalAveragePooling1D -> softmax Dense; the
  padding mask reaches BN (masked batch statistics) and the pooling (masked
  mean) through Keras's implicit mask, with no explicit `mask=` argument.

None of them contains Dropout: a training call of the eager layer drops at
random, which an export (identity, see `onnxbn/lowering/dropout.py`) does not
reproduce, so the training variants could not be checked against it.
`scripts/export_real_models.py` exports each in inference and training variants.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

import onnxbn
from onnxbn import layers

SEED = 20240917


def init_weights(model: onnxbn.Model, rng: np.random.Generator) -> None:
    """Seeded weights by kind: He-normal kernels, small biases, non-trivial BN statistics."""
    weights = []
    for variable in model.weights:
        shape, kind = variable.shape, variable.name
        if kind in ("kernel", "embeddings"):
            fan_in = int(np.prod(shape[:-1])) if kind == "kernel" else 1
            weights.append(rng.normal(0.0, np.sqrt(2.0 / fan_in), shape))
        elif kind == "bias":
            weights.append(rng.normal(0.0, 0.1, shape))
        elif kind == "gamma":
            weights.append(rng.uniform(0.5, 1.5, shape))
        elif kind in ("beta", "moving_mean"):
            weights.append(rng.normal(0.0, 0.2, shape))
        elif kind == "moving_variance":
            weights.append(rng.uniform(0.5, 1.5, shape))
        else:
            raise ValueError(f"No initialization rule for weight {variable.path!r}.")
    model.set_weights(weights)


def _conv_bn(h, filters, kernel_size, name, batchnorm, data_format, strides=1):
    """Conv2D (no bias when BN follows, as ResNets do) then BN."""
    h = layers.Conv2D(
        filters,
        kernel_size,
        strides=strides,
        padding="same",
        data_format=data_format,
        use_bias=not batchnorm,
        name=f"{name}_conv",
    )(h)
    if batchnorm:
        axis = -1 if data_format == "channels_last" else 1
        h = layers.BatchNormalization(axis, momentum=0.9, epsilon=1e-5, name=f"{name}_bn")(h)
    return h


def _residual_block(h, filters, name, batchnorm, data_format, strides=1):
    """Conv-BN-ReLU-Conv-BN + skip (a strided 1x1 Conv-BN when the shape changes), ReLU."""
    skip = h
    y = _conv_bn(h, filters, 3, f"{name}_a", batchnorm, data_format, strides)
    y = layers.ReLU(name=f"{name}_a_relu")(y)
    y = _conv_bn(y, filters, 3, f"{name}_b", batchnorm, data_format)
    channels = h.shape[-1] if data_format == "channels_last" else h.shape[1]
    if strides != 1 or channels != filters:
        skip = _conv_bn(h, filters, 1, f"{name}_proj", batchnorm, data_format, strides)
    y = layers.Add(name=f"{name}_add")([y, skip])
    return layers.ReLU(name=f"{name}_out")(y)


def resnet_cnn(
    batchnorm: bool = True, batch: int = 4, data_format: str = "channels_last"
) -> tuple[onnxbn.Model, dict[str, np.ndarray]]:
    """The ResNet-style CNN (see the module docstring) and `batch` sample images.

    Args:
        batchnorm: False builds the same network without BN (biased convolutions).
        batch: number of sample images.
        data_format: `"channels_last"` (`(None, 16, 16, 3)` input) or
            `"channels_first"` (`(None, 3, 16, 16)`); the weights are the same.
    """
    onnxbn.reset_names()
    rng = np.random.default_rng(SEED)
    last = data_format == "channels_last"
    x = onnxbn.Input((16, 16, 3) if last else (3, 16, 16), name="image")
    h = _conv_bn(x, 16, 3, "stem", batchnorm, data_format)
    h = layers.ReLU(name="stem_relu")(h)
    h = _residual_block(h, 16, "block1", batchnorm, data_format)
    h = _residual_block(h, 32, "block2", batchnorm, data_format, strides=2)
    h = layers.GlobalAveragePooling2D(data_format=data_format, name="pool")(h)
    y = layers.Dense(10, activation="softmax", name="head")(h)
    model = onnxbn.Model(x, y, name="resnet_cnn" if batchnorm else "resnet_cnn_no_bn")
    init_weights(model, rng)
    images = rng.normal(0.5, 1.0, (batch, 16, 16, 3)).astype(np.float32)
    return model, {"image": images if last else np.ascontiguousarray(images.transpose(0, 3, 1, 2))}


def mlp_bn() -> tuple[onnxbn.Model, dict[str, np.ndarray]]:
    """Tabular MLP: (None, 20) -> [Dense(64)-BN-ReLU] -> [Dense(32)-BN-ReLU] -> Dense(3, softmax)."""
    onnxbn.reset_names()
    rng = np.random.default_rng(SEED + 1)
    x = onnxbn.Input((20,), name="features")
    h = x
    for i, units in enumerate((64, 32)):
        h = layers.Dense(units, name=f"dense{i}")(h)
        h = layers.BatchNormalization(name=f"bn{i}")(h)
        h = layers.ReLU(name=f"relu{i}")(h)
    y = layers.Dense(3, activation="softmax", name="head")(h)
    model = onnxbn.Model(x, y, name="mlp_bn")
    init_weights(model, rng)
    sample = {"features": rng.normal(1.0, 2.0, (8, 20)).astype(np.float32)}
    return model, sample


def sequence_classifier() -> tuple[onnxbn.Model, dict[str, np.ndarray]]:
    """Padded token ids (None, None) int32 -> Embedding(mask_zero) -> Dense -> BN -> pool -> Dense."""
    onnxbn.reset_names()
    rng = np.random.default_rng(SEED + 2)
    tokens = onnxbn.Input((None,), dtype="int32", name="tokens")
    h = layers.Embedding(50, 16, mask_zero=True, name="embedding")(tokens)
    h = layers.Dense(24, name="proj")(h)
    h = layers.BatchNormalization(momentum=0.9, name="bn")(h)  # takes the padding mask
    h = layers.ReLU(name="relu")(h)
    h = layers.GlobalAveragePooling1D(name="pool")(h)  # masked mean
    y = layers.Dense(2, activation="softmax", name="head")(h)
    model = onnxbn.Model(tokens, y, name="sequence_classifier")
    init_weights(model, rng)
    lengths = np.array([10, 7, 3, 10, 1])
    ids = rng.integers(1, 50, (len(lengths), 10)).astype(np.int32)
    ids[np.arange(10)[None, :] >= lengths[:, None]] = 0  # padding
    return model, {"tokens": ids}


MODELS: dict[str, Callable[[], tuple[onnxbn.Model, dict[str, np.ndarray]]]] = {
    "resnet_cnn": resnet_cnn,
    "mlp_bn": mlp_bn,
    "sequence_classifier": sequence_classifier,
}
