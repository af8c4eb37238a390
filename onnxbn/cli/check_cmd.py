"""Feed the same inputs through onnxruntime and the reference interpreter and compare."""

from __future__ import annotations

import argparse

import numpy as np
import onnx

from onnxbn.cli.files import load_array, parse_feed
from onnxbn.session import value_info_spec

NAME = "check"
HELP = "compare onnxruntime and the reference interpreter on random or given inputs"

# (rtol, atol) per output dtype: two float32 engines differ by accumulation order.
TOLERANCES = {
    "float64": (1e-9, 1e-9),
    "float32": (1e-4, 1e-4),
    "float16": (1e-2, 1e-2),
    "bfloat16": (5e-2, 5e-2),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="path of the .onnx file")
    parser.add_argument(
        "--input",
        action="append",
        default=[],
        metavar="NAME=FILE.npy",
        help="feed this input from a .npy file (repeat for each); inputs not given are random",
    )
    parser.add_argument(
        "--batch",
        type=int,
        default=4,
        help="size of every dynamic dim of a random input (default 4)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the random inputs (NumPy default_rng; same seed, same inputs; default 0)",
    )
    parser.add_argument("--steps", type=int, default=2, help="runs per engine (state carried)")
    parser.add_argument(
        "--rtol",
        type=float,
        help="relative tolerance of every output (default: per dtype, float32 1e-4)",
    )
    parser.add_argument(
        "--atol",
        type=float,
        help="absolute tolerance of every output (default: per dtype, float32 1e-4)",
    )


def random_feeds(
    graph: onnx.GraphProto, names: list[str], batch: int, seed: int
) -> dict[str, np.ndarray]:
    """Random arrays for the graph inputs `names`, every dynamic dim of size `batch`."""
    rng = np.random.default_rng(seed)
    feeds = {}
    specs = {vi.name: value_info_spec(vi) for vi in graph.input}
    for name in names:
        spec = specs[name]
        shape = tuple(batch if d is None else d for d in (spec.shape or ()))
        if spec.dtype == np.bool_:
            feeds[name] = rng.random(shape) > 0.3
        elif spec.dtype.kind in "iu":
            feeds[name] = rng.integers(0, 8, size=shape).astype(spec.dtype)
        else:
            feeds[name] = (rng.normal(size=shape) * 2 + 0.5).astype(spec.dtype)
    return feeds


def compare(a, b, rtol: float, atol: float) -> tuple[bool, float]:
    """`(agree, max abs diff over finite entries)`.

    The engines agree where both are finite and within tolerance, or both hold
    the same non-finite value (NaN and NaN, +inf and +inf, -inf and -inf).
    """
    a64 = np.asarray(a).astype(np.float64)
    b64 = np.asarray(b).astype(np.float64)
    if a64.shape != b64.shape:
        return False, float("inf")
    finite = np.isfinite(a64) & np.isfinite(b64)
    same_special = (np.isnan(a64) & np.isnan(b64)) | (~finite & (a64 == b64))
    with np.errstate(invalid="ignore", over="ignore"):
        diff = np.where(finite, np.abs(a64 - b64), 0.0)
    close = finite & (diff <= atol + rtol * np.abs(np.where(finite, b64, 0.0)))
    worst = float(diff.max()) if diff.size else 0.0
    return bool(np.all(close | same_special)), worst


def given_feeds(items: list[str]) -> dict[str, np.ndarray]:
    feeds = {}
    for item in items:
        name, file = parse_feed(item)
        if name in feeds:
            raise ValueError(f"Input {name!r} is given twice.")
        feeds[name] = load_array(file)
    return feeds


def run(args: argparse.Namespace) -> int:
    from onnxbn.cli.run_cmd import make_session

    for flag in ("rtol", "atol"):
        value = getattr(args, flag)
        if value is not None and not value >= 0:
            raise ValueError(f"--{flag} must be a number >= 0, received {value}.")
    if args.steps < 1:
        raise ValueError(f"--steps must be >= 1, received {args.steps}.")
    ort_session = make_session("ort", args.model)
    ref_session = make_session("reference", args.model)
    feeds = given_feeds(args.input)
    unknown = sorted(set(feeds) - set(ort_session.input_names))
    if unknown:
        raise ValueError(
            f"Unknown inputs {unknown}; the model's inputs are {ort_session.input_names}."
        )
    missing = [n for n in ort_session._required if n not in feeds]
    feeds.update(random_feeds(ort_session._model_proto.graph, missing, args.batch, args.seed))
    # Overflow or 0/0 in a model is what the comparison reports, not a NumPy warning.
    with np.errstate(all="ignore"):
        for _ in range(args.steps):
            ort_out = ort_session.run(feeds)
            ref_out = ref_session.run(feeds)
    rows = [(n, a, b) for n, a, b in zip(ort_session.output_names, ort_out, ref_out)]
    ort_state, ref_state = ort_session.state, ref_session.state
    rows += [(n, ort_state[n], ref_state[n]) for n in ort_state]
    print(f"{'output':<40} {'dtype':<9} {'max abs diff':>13} {'rtol':>8} {'atol':>8}  result")
    ok = True
    for name, a, b in rows:
        dtype = str(np.asarray(a).dtype)
        default_rtol, default_atol = TOLERANCES.get(dtype, (0.0, 0.0))
        rtol = default_rtol if args.rtol is None else args.rtol
        atol = default_atol if args.atol is None else args.atol
        close, worst = compare(a, b, rtol, atol)
        ok &= close
        print(
            f"{name:<40} {dtype:<9} {worst:>13.3e} {rtol:>8.0e} {atol:>8.0e}  "
            f"{'agree' if close else 'DIFFER'}"
        )
    print("engines agree" if ok else "engines DISAGREE")
    return 0 if ok else 1
