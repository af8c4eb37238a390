"""Run an ONNX model on onnxruntime or the reference interpreter, carrying training state."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from onnxbn.cli.files import load_array, load_npz, parse_feed, require_file

NAME = "run"
HELP = "run a model on input .npy files (training exports carry state across --steps)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="path of the .onnx file")
    parser.add_argument(
        "--input",
        action="append",
        default=[],
        metavar="NAME=FILE.npy",
        help="one model input (repeat for each)",
    )
    parser.add_argument(
        "--engine",
        choices=("ort", "reference"),
        default="ort",
        help="onnxruntime (default) or the NumPy reference interpreter",
    )
    parser.add_argument("--steps", type=int, default=1, help="number of runs (state carried)")
    parser.add_argument("--state", help=".npz of initial moving statistics (keyed by state name)")
    parser.add_argument("--save-state", help="write the final moving statistics to this .npz")
    parser.add_argument("--output-dir", help="write each output to OUTPUT_DIR/<name>.npy")


def make_session(engine: str, model: str):
    """A session on `engine`; an error about the file names the file."""
    require_file(model)
    if engine == "reference":
        from onnxbn.reference import Session
    else:
        from onnxbn.runtime import Session
    try:
        return Session(model)
    except ValueError as error:
        if model in str(error):
            raise
        raise ValueError(f"Model file {model!r}: {error}") from error


def safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def run(args: argparse.Namespace) -> int:
    if args.steps < 1:
        raise ValueError(f"--steps must be >= 1, received {args.steps}.")
    feeds = {}
    for item in args.input:
        name, file = parse_feed(item)
        if name in feeds:
            raise ValueError(f"Input {name!r} is given twice.")
        feeds[name] = load_array(file)
    session = make_session(args.engine, args.model)
    if args.save_state and not session.state:
        raise ValueError(
            f"--save-state: model {args.model!r} has no state to save (it is not a training "
            "export: no moving statistics are carried). Drop --save-state, or export with "
            "--training."
        )
    if args.state:
        session.state = load_npz(args.state)
    outputs = []
    for _ in range(args.steps):
        outputs = session.run(feeds)
    for name, value in zip(session.output_names, outputs):
        value = np.asarray(value)
        finite = (
            value.astype(np.float64)
            if value.dtype.kind in "fc" or value.dtype.itemsize == 2
            else value
        )
        print(
            f"{name}: {value.dtype} {value.shape} mean={np.mean(finite):+.6g} std={np.std(finite):.6g}"
        )
        if args.output_dir:
            Path(args.output_dir).mkdir(parents=True, exist_ok=True)
            np.save(Path(args.output_dir) / f"{safe_name(name)}.npy", value)
    for name, value in session.state.items():
        print(f"state {name}: {value.dtype} {value.shape} after {args.steps} step(s)")
    if args.save_state:
        np.savez(args.save_state, **session.state)
        print(f"saved state to {args.save_state}")
    return 0
