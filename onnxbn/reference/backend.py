"""`onnx.backend.base.Backend` on the reference interpreter.

Usable as the backend of `onnx.backend.test.BackendTest` (the module exposes
`prepare`, `run_model`, `run_node`, `supports_device` and `is_compatible`):

    import onnx.backend.test
    from onnxbn.reference import backend
    globals().update(onnx.backend.test.BackendTest(backend, __name__).test_cases)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx
from onnx import helper
from onnx.backend.base import Backend, BackendRep

from onnxbn.reference.interpreter import Interpreter
from onnxbn.reference.kernels.table import NEWEST_OPSET


class ReferenceBackendRep(BackendRep):
    """A prepared model: `run(inputs)` returns the graph outputs as a tuple.

    Args:
        interpreter: the compiled model.
    """

    def __init__(self, interpreter: Interpreter) -> None:
        self.interpreter = interpreter

    def run(self, inputs: Any, **kwargs: Any) -> tuple[np.ndarray, ...]:
        """Runs the model.

        Args:
            inputs: a dict by input name, a list in graph-input order, or one array.

        Returns:
            The graph outputs, in order.
        """
        names = self.interpreter.input_names
        if isinstance(inputs, Mapping):
            feeds = dict(inputs)
        elif isinstance(inputs, (list, tuple)):
            if len(inputs) > len(names):
                raise ValueError(
                    f"Received {len(inputs)} inputs; the model has {len(names)}: {names}."
                )
            feeds = dict(zip(names, inputs))
        else:
            feeds = {names[0]: inputs} if names else {}
        return tuple(self.interpreter.run(feeds))


class ReferenceBackend(Backend):
    """The onnxbn NumPy reference interpreter as an ONNX backend (CPU only)."""

    @classmethod
    def is_compatible(cls, model: onnx.ModelProto, device: str = "CPU", **kwargs: Any) -> bool:
        """Whether `prepare` would succeed (every op has a kernel at the model's opset)."""
        try:
            cls.prepare(model, device, **kwargs)
        except NotImplementedError:
            return False
        return True

    @classmethod
    def prepare(
        cls, model: onnx.ModelProto, device: str = "CPU", **kwargs: Any
    ) -> ReferenceBackendRep:
        """Compiles `model`.

        Args:
            model: the `ModelProto` (or a path).
            device: must be `"CPU"`.
            **kwargs: `base_dir`, `max_bytes`, `max_depth` for `Interpreter`;
                others (e.g. the test runner's `rtol`) are ignored.

        Raises:
            NotImplementedError: a node the interpreter cannot run (op type and opset
                named), an opset newer than it knows, or only another domain imported.
            ValueError: another device, or a malformed model.
        """
        if not cls.supports_device(device):
            raise ValueError(f"The reference backend runs on 'CPU', received device {device!r}.")
        options = {k: kwargs[k] for k in ("base_dir", "max_bytes", "max_depth") if k in kwargs}
        return ReferenceBackendRep(Interpreter(model, **options))

    @classmethod
    def run_model(
        cls, model: onnx.ModelProto, inputs: Any, device: str = "CPU", **kwargs: Any
    ) -> tuple[np.ndarray, ...]:
        return cls.prepare(model, device, **kwargs).run(inputs)

    @classmethod
    def run_node(
        cls,
        node: onnx.NodeProto,
        inputs: Any,
        device: str = "CPU",
        outputs_info: Sequence[tuple[np.dtype, tuple[int, ...]]] | None = None,
        **kwargs: Any,
    ) -> tuple[np.ndarray, ...]:
        """Runs a single node on `inputs` (a list in node-input order, or a dict).

        `kwargs["opset_version"]` picks the opset (default: the newest that both
        onnx and the interpreter know).
        """
        if isinstance(inputs, Mapping):
            values = [inputs[name] for name in node.input if name]
        else:
            values = list(inputs)
        names = [name for name in node.input if name]
        graph_inputs = [
            helper.make_tensor_value_info(
                name, helper.np_dtype_to_tensor_dtype(np.asarray(v).dtype), np.asarray(v).shape
            )
            for name, v in zip(names, values)
        ]
        graph_outputs = [helper.make_empty_tensor_value_info(n) for n in node.output if n]
        graph = helper.make_graph([node], "run_node", graph_inputs, graph_outputs)
        opset = kwargs.get("opset_version", min(onnx.defs.onnx_opset_version(), NEWEST_OPSET))
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
        rep = cls.prepare(model, device)
        return rep.run(dict(zip(names, values)))

    @classmethod
    def supports_device(cls, device: str) -> bool:
        return str(device).upper() == "CPU"


prepare = ReferenceBackend.prepare
run_model = ReferenceBackend.run_model
run_node = ReferenceBackend.run_node
supports_device = ReferenceBackend.supports_device
is_compatible = ReferenceBackend.is_compatible
