"""Feed random inputs through onnxruntime and the reference interpreter and compare."""

from __future__ import annotations

import argparse

import numpy as np

from onnxbn.cli.files import require_file
from onnxbn.session import value_info_spec

NAME = "check"
HELP = "compare onnxruntime and the reference interpreter on random inputs"

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
        "--batch", type=int, default=4, help="size of every dynamic dim (default 4)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=2, help="runs per engine (state carried)")


def random_feeds(session, batch: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {}
    graph = session._model_proto.graph
    specs = {vi.name: value_info_spec(vi) for vi in graph.input}
    for name in session._required:
        spec = specs[name]
        shape = tuple(batch if d is None else d for d in (spec.shape or ()))
        if spec.dtype == np.bool_:
            feeds[name] = rng.random(shape) > 0.3
        elif spec.dtype.kind in "iu":
            feeds[name] = rng.integers(0, 8, size=shape).astype(spec.dtype)
        else:
            feeds[name] = (rng.normal(size=shape) * 2 + 0.5).astype(spec.dtype)
    return feeds


def run(args: argparse.Namespace) -> int:
    from onnxbn import reference, runtime

    require_file(args.model)
    ort_session = runtime.Session(args.model)
    ref_session = reference.Session(args.model)
    feeds = random_feeds(ort_session, args.batch, args.seed)
    for _ in range(args.steps):
        ort_out = ort_session.run(feeds)
        ref_out = ref_session.run(feeds)
    rows = [(n, a, b) for n, a, b in zip(ort_session.output_names, ort_out, ref_out)]
    rows += [(n, ort_session.state[n], ref_session.state[n]) for n in ort_session.state]
    print(f"{'output':<40} {'dtype':<9} {'max abs diff':>13} {'tolerance':>10}  result")
    ok = True
    for name, a, b in rows:
        a64 = np.asarray(a).astype(np.float64)
        b64 = np.asarray(b).astype(np.float64)
        dtype = str(np.asarray(a).dtype)
        rtol, atol = TOLERANCES.get(dtype, (0.0, 0.0))
        diff = np.abs(a64 - b64)
        same_nan = np.isnan(a64) == np.isnan(b64)
        close = a64.shape == b64.shape and bool(
            np.all(same_nan & ((diff <= atol + rtol * np.abs(b64)) | np.isnan(b64)))
        )
        ok &= close
        worst = float(np.nanmax(diff)) if diff.size else 0.0
        print(
            f"{name:<40} {dtype:<9} {worst:>13.3e} {atol:>10.0e}  {'agree' if close else 'DIFFER'}"
        )
    print("engines agree" if ok else "engines DISAGREE")
    return 0 if ok else 1
