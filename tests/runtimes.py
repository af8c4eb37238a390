"""The portability matrix: one way to run an ONNX model on each runtime, as a user would.

Each runner takes a `ModelProto` and returns a callable `feeds -> [outputs in
graph order]`; the model is loaded once and called for every step. The state
of a training export is fed by the caller (`carry_state`), exactly as the
README tells a user of a runtime without onnxbn to do.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable

import ml_dtypes
import numpy as np
import onnx

import onnxbn
from onnxbn.contract import state_pairs

Runner = Callable[[dict[str, np.ndarray]], list[np.ndarray]]

RUNTIMES = ["onnxruntime", "onnxbn.reference", "onnx.reference", "openvino", "tract"]

# What a runtime cannot represent at all: listed as skipped with the reason.
UNSUPPORTED_DTYPES = {
    "tract": {"bfloat16": "tract has no bfloat16 tensor type"},
}


def _onnxruntime(model: onnx.ModelProto) -> Runner:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    if any(_is_bfloat16(v) for v in list(model.graph.input) + list(model.graph.output)):
        return lambda feeds: _ort_values(session, feeds)
    return lambda feeds: session.run(None, feeds)


def _ort_values(session, feeds):
    """bfloat16 goes through OrtValues (onnxruntime's NumPy path has no bfloat16)."""
    from onnxbn.runtime import _to_numpy, _to_ortvalue

    values = {name: _to_ortvalue(array) for name, array in feeds.items()}
    names = [o.name for o in session.get_outputs()]
    return [_to_numpy(v) for v in session.run_with_ort_values(names, values)]


def _is_bfloat16(value_info: onnx.ValueInfoProto) -> bool:
    return value_info.type.tensor_type.elem_type == onnx.TensorProto.BFLOAT16


def _onnxbn_reference(model: onnx.ModelProto) -> Runner:
    from onnxbn.reference.interpreter import Interpreter

    interpreter = Interpreter(model)
    names = [o.name for o in model.graph.output]

    def run(feeds):
        results = interpreter.execute(feeds, names)
        return [results[n] for n in names]

    return run


def _onnx_reference(model: onnx.ModelProto) -> Runner:
    from onnx.reference import ReferenceEvaluator

    evaluator = ReferenceEvaluator(model)
    return lambda feeds: evaluator.run(None, feeds)


def _openvino(model: onnx.ModelProto) -> Runner:
    import openvino as ov

    core = ov.Core()
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "model.onnx")
        onnx.save(model, path)
        compiled = core.compile_model(
            core.read_model(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"}
        )
    names = [o.name for o in model.graph.output]
    ports = {}
    for port in compiled.outputs:
        for name in port.get_names():
            ports[name] = port

    def run(feeds):
        request = compiled.create_infer_request()
        request.infer({k: _ov_tensor(ov, v) for k, v in feeds.items()})
        return [_from_ov(request.get_tensor(ports[n])) for n in names]

    return run


def _ov_tensor(ov, array: np.ndarray):
    """An OpenVINO tensor; bfloat16 bits copied into a bf16 tensor (NumPy has no bfloat16)."""
    array = np.asarray(array, order="C")  # keeps 0-d arrays 0-d
    if array.dtype != ml_dtypes.bfloat16:
        return ov.Tensor(array)
    tensor = ov.Tensor(ov.Type.bf16, list(array.shape))
    tensor.data.view(np.uint16)[...] = array.view(np.uint16)
    return tensor


def _from_ov(tensor) -> np.ndarray:
    data = np.array(tensor.data)
    if tensor.element_type.get_type_name() == "bf16":
        return data.view(np.uint16).view(ml_dtypes.bfloat16)
    return data


def _tract(model: onnx.ModelProto) -> Runner:
    import tract

    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "model.onnx")
        onnx.save(model, path)
        runnable = tract.onnx().load(path).into_model().into_runnable()
    order = [i.name for i in model.graph.input if i.name not in _initializer_names(model)]

    def run(feeds):
        results = runnable.run([np.asarray(feeds[n], order="C") for n in order])
        return [r.to_numpy() for r in results]

    return run


def _initializer_names(model: onnx.ModelProto) -> set[str]:
    return {t.name for t in model.graph.initializer}


RUNNERS: dict[str, Callable[[onnx.ModelProto], Runner]] = {
    "onnxruntime": _onnxruntime,
    "onnxbn.reference": _onnxbn_reference,
    "onnx.reference": _onnx_reference,
    "openvino": _openvino,
    "tract": _tract,
}


def load(runtime: str, model: onnx.ModelProto) -> Runner:
    """A runner of `model` on `runtime` (a name of `RUNTIMES`)."""
    return RUNNERS[runtime](model)


def skip_reason(runtime: str, dtypes: set[str]) -> str | None:
    """Why `runtime` cannot run a model with tensors of `dtypes`, or None."""
    for dtype in sorted(dtypes):
        reason = UNSUPPORTED_DTYPES.get(runtime, {}).get(dtype)
        if reason is not None:
            return reason
    return None


def carry_state(
    runtime: str, model: onnx.ModelProto, feeds_per_step: list[dict[str, np.ndarray]]
) -> list[tuple[list[np.ndarray], dict[str, np.ndarray]]]:
    """Runs `model` once per step, feeding the state as a user of the runtime would.

    The first step feeds `onnxbn.initial_state(model)`, every later one the
    `/new` outputs of the step before.

    Returns:
        For each step, the model's outputs (state outputs excluded) and the
        state after the step (`{state input: array}`).
    """
    pairs = state_pairs(model.graph)
    outputs = [o.name for o in model.graph.output]
    state_outputs = {out for _, out in pairs}
    model_outputs = [i for i, name in enumerate(outputs) if name not in state_outputs]
    state = onnxbn.initial_state(model)
    runner = load(runtime, model)
    steps = []
    for feeds in feeds_per_step:
        results = runner({**feeds, **state})
        by_name = dict(zip(outputs, results))
        state = {inp: np.asarray(by_name[out]) for inp, out in pairs}
        steps.append(([np.asarray(results[i]) for i in model_outputs], state))
    return steps
