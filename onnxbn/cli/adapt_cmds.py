"""`onnxbn recalibrate` and `onnxbn to-training`: adapt an existing ONNX model's BatchNormalization."""

from __future__ import annotations

import argparse
import sys

import numpy as np

from onnxbn.cli.files import require_file


class Recalibrate:
    """Re-estimate every BatchNormalization node's mean and variance on new data."""

    NAME = "recalibrate"
    HELP = "re-estimate BatchNormalization statistics of an ONNX model on data (.npz)"

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("model", help="path of the .onnx file")
        parser.add_argument(
            "--data", required=True, metavar="DATA.npz",
            help="the model's inputs by name; batches are split along axis 0",
        )  # fmt: skip
        parser.add_argument("--batch-size", type=int, default=None,
                            help="rows per batch (default: all rows in one batch)")  # fmt: skip
        parser.add_argument("--engine", choices=("onnxruntime", "reference"),
                            default="onnxruntime")  # fmt: skip
        parser.add_argument("-o", "--output", required=True, help="the .onnx file to write")

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        from onnxbn.adapt import recalibrate

        require_file(args.model)
        require_file(args.data, "Data file")
        with np.load(args.data, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
        batches = split_batches(arrays, args.batch_size)
        model = recalibrate(args.model, batches, path=args.output, engine=args.engine)
        nodes = sum(n.op_type == "BatchNormalization" for n in model.graph.node)
        print(f"wrote {args.output}: {nodes} BatchNormalization nodes recalibrated on "
              f"{len(batches)} batch(es) of {args.data}")  # fmt: skip
        return 0


class ToTraining:
    """Turn every inference BatchNormalization node into onnxbn's portable training form."""

    NAME = "to-training"
    HELP = "give an ONNX model's BatchNormalization nodes a training form with state"

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("model", help="path of the .onnx file")
        parser.add_argument("--momentum", type=float, default=None,
                            help="momentum of every node (default: each node's own, else 0.9)")  # fmt: skip
        parser.add_argument("-o", "--output", required=True, help="the .onnx file to write")

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        from onnxbn.adapt import to_training
        from onnxbn.contract import initial_state
        from onnxbn.model_files import write_atomic

        require_file(args.model)
        model = to_training(args.model, momentum=args.momentum)
        write_atomic(model, args.output)
        state = list(initial_state(model))
        print(f"wrote {args.output}: {len(state)} state inputs {state}", file=sys.stdout)
        return 0


def split_batches(arrays: dict[str, np.ndarray], batch_size: int | None) -> list[dict]:
    """Feed dicts of `batch_size` rows (the last may be shorter) from whole-data arrays.

    Raises:
        ValueError: no arrays, arrays with different row counts, or a batch
            size below 1.
    """
    if not arrays:
        raise ValueError("The data archive holds no arrays; expected the model's inputs by name.")
    rows = {name: a.shape[0] if a.ndim else None for name, a in arrays.items()}
    if len(set(rows.values())) != 1 or None in rows.values():
        raise ValueError(f"Every input needs the same number of rows (axis 0); got {rows}.")
    total = next(iter(rows.values()))
    size = total if batch_size is None else batch_size
    if size < 1:
        raise ValueError(f"--batch-size must be >= 1, received {batch_size}.")
    return [
        {name: a[start : start + size] for name, a in arrays.items()}
        for start in range(0, max(total, 1), size)
    ]
