"""Export a Keras layer or functional-model config (JSON) to an ONNX file."""

from __future__ import annotations

import argparse
from typing import Any

import onnxbn
from onnxbn import layers
from onnxbn.cli.files import load_json, load_npz
from onnxbn.tensor import standardize_shape

NAME = "export"
HELP = "export a Keras layer or functional-model config to ONNX"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "config",
        help="JSON: a layer envelope, a BatchNormalization config, "
        "or a functional model config (bare or in its envelope)",
    )
    parser.add_argument("-o", "--output", required=True, help="path of the .onnx file to write")
    parser.add_argument(
        "--weights",
        help=".npz of weights: keyed by weight path "
        "(e.g. bn/gamma) or arr_0, arr_1, ... in Keras order",
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--training",
        action="store_true",
        help="export every layer call in "
        "training mode (moving statistics become state inputs/outputs)",
    )
    mode.add_argument(
        "--inference", action="store_true", help="export every call in inference mode"
    )
    parser.add_argument("--opset", type=int, help="ONNX opset (default 18)")
    parser.add_argument(
        "--input-shape",
        help="full input shape of a single layer, batch "
        "included, e.g. 'None,16' (default: the config's build_config)",
    )
    parser.add_argument(
        "--no-fold",
        action="store_true",
        help="keep inference BatchNormalization separate from a preceding Conv/Dense",
    )


def parse_shape(text: str) -> tuple[int | None, ...]:
    dims: list[Any] = []
    for part in text.split(","):
        part = part.strip()
        if part.lower() in ("none", "?", ""):
            dims.append(None)
        elif part.isdigit():
            dims.append(int(part))
        else:
            raise ValueError(
                f"--input-shape expects comma-separated ints or None, received {text!r}."
            )
    return tuple(dims)


def build_model(config: Any, input_shape: str | None) -> onnxbn.Model:
    """A Model from any of the accepted config forms."""
    if not isinstance(config, dict):
        raise TypeError(f"The config must be a JSON object, received {type(config).__name__}.")
    if config.get("class_name") in ("Functional", "Model") or "layers" in config:
        if input_shape is not None:
            raise ValueError(
                f"--input-shape {input_shape!r} applies to a single layer; a model config "
                "declares its own input shapes (its InputLayers' batch_shape). Drop "
                "--input-shape, or edit the InputLayer shapes in the config."
            )
        return onnxbn.Model.from_config(config)
    if "class_name" in config:
        layer = layers.deserialize(config)
        build = (config.get("build_config") or {}).get("input_shape")
    else:
        layer = layers.BatchNormalization.from_config(config)
        build = None
    if input_shape is not None:
        shape = parse_shape(input_shape)
    elif build is not None:
        shape = standardize_shape(build, "build_config input_shape")
    else:
        raise ValueError(
            "A single layer needs an input shape: pass --input-shape (e.g. 'None,16') or give "
            "a config with build_config."
        )
    if len(shape) < 1:
        raise ValueError(f"--input-shape must include the batch axis, received {shape}.")
    x = onnxbn.Input(shape=shape[1:], batch_size=shape[0], name="x")
    return onnxbn.Model(x, layer(x), name=layer.name)


def load_weights(model: onnxbn.Model, path: str) -> None:
    """Weights keyed by weight path (`bn/gamma`) or `arr_0, arr_1, ...` in Keras order.

    Raises:
        ValueError: naming the missing and the unexpected keys.
    """
    arrays = load_npz(path)
    paths = [v.path for v in model.weights]
    positional = [f"arr_{i}" for i in range(len(paths))]
    by_position = all(k.startswith("arr_") and k[4:].isdigit() for k in arrays) and bool(arrays)
    expected = positional if by_position else paths
    missing = [k for k in expected if k not in arrays]
    unexpected = sorted(set(arrays) - set(expected))
    if missing or unexpected:
        form = "arr_0..arr_N in Keras order" if by_position else "weight paths"
        details = []
        if missing:
            details.append(f"missing {missing}")
        if unexpected:
            details.append(f"not weights of the model {unexpected}")
        raise ValueError(
            f"Weights archive {path!r} (keyed by {form}): {'; '.join(details)}. The model's "
            f"weights are {paths} (or arr_0..arr_{len(paths) - 1} in that order)."
        )
    model.set_weights([arrays[k] for k in expected])


def run(args: argparse.Namespace) -> int:
    model = build_model(load_json(args.config), args.input_shape)
    if args.weights:
        load_weights(model, args.weights)
    training = True if args.training else False if args.inference else None
    proto = onnxbn.export_onnx(
        model, args.output, training=training, opset=args.opset, fold_batchnorm=not args.no_fold
    )
    print(
        f"wrote {args.output}: {len(proto.graph.node)} nodes, opset "
        f"{proto.opset_import[0].version}, inputs {[i.name for i in proto.graph.input]}, "
        f"outputs {[o.name for o in proto.graph.output]}"
    )
    return 0
