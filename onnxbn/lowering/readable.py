"""What makes an exported graph readable in a viewer (Netron) and in `onnx.printer`.

`annotate(model)` adds, without touching a name or a computation:

- the shapes and dtypes of every intermediate tensor (`value_info`, from onnx's
  shape inference);
- a `doc_string` on the graph (what it is, where its state is) and on the first
  node of every layer (the layer's class and its main settings, from the
  `onnxbn:layer:<name>` metadata the export writes).

Node names (`bn/batch_mean`) and the doc_strings of state inputs and outputs
come from `onnxbn/lowering/context.py`, which names everything.
"""

from __future__ import annotations

import json

import onnx

from onnxbn.contract import state_pairs

LAYER_PREFIX = "onnxbn:layer:"
# Settings worth a line in a viewer, per key of a layer's Keras config.
SHOWN = ("axis", "momentum", "epsilon", "center", "scale", "renorm", "synchronized",
         "filters", "kernel_size", "strides", "padding", "data_format", "units",
         "activation", "rate")  # fmt: skip


def layer_doc(name: str, envelope: dict) -> str:
    """One line saying what layer `name` is, e.g. `BatchNormalization 'bn' (axis=-1, ...)`."""
    config = envelope.get("config", {}) if isinstance(envelope, dict) else {}
    settings = ", ".join(f"{k}={config[k]!r}" for k in SHOWN if k in config)
    kind = envelope.get("class_name", "layer") if isinstance(envelope, dict) else "layer"
    return f"{kind} {name!r}" + (f" ({settings})" if settings else "")


def annotate(model: onnx.ModelProto) -> None:
    """Adds value_info shapes and doc_strings to an exported model, in place."""
    graph = model.graph
    layers = {}
    training = None
    for prop in model.metadata_props:
        if prop.key.startswith(LAYER_PREFIX):
            try:
                layers[prop.key[len(LAYER_PREFIX) :]] = json.loads(prop.value)
            except ValueError:
                continue
        elif prop.key == "onnxbn:training":
            training = prop.value
    seen = set()
    for node in graph.node:
        layer = node.name.split("/")[0]
        if layer in layers and layer not in seen:
            seen.add(layer)
            node.doc_string = f"First node of {layer_doc(layer, layers[layer])}."
    pairs = state_pairs(graph)
    mode = {"true": "training", "false": "inference"}.get(str(training), "as recorded")
    text = f"Exported by onnxbn; layer calls in {mode} mode."
    if pairs:
        text += (
            f" {len(pairs)} state inputs (moving statistics) with their starting values in "
            "the onnxbn:initial_state metadata; feed each `<name>/new` output back as "
            "input `<name>` to carry the state."
        )
    graph.doc_string = text
    known = {v.name for v in list(graph.input) + list(graph.output)}
    try:
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError):
        return  # the export's validation reports it
    del graph.value_info[:]
    graph.value_info.extend(v for v in inferred.graph.value_info if v.name not in known)
