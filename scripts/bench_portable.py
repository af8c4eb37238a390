"""Cost of the portable training lowering on onnxruntime: the previous lowering against the current.

The previous lowering is the package at `--before` (default 1e8d330: native
BatchNormalization fed in-graph statistics, `Max` variance clamp, unclamped
Slice ends, data-dependent masked head, initializer-backed state inputs); the
current one is this working tree. Each is exported in its own subprocess (the
previous from a `git archive` of its `onnxbn/` in a temporary folder, removed
afterwards) with the same public-API code and the weights of
`onnxbn.cli.benchmark.layout_data`, then both are timed here, in one process:

- one round runs `np.copyto` of the input's bytes, then the previous and the
  current export of each mode (inference, training, masked training), the pair's
  order alternating between rounds so neither always runs on a warm cache;
- both get exactly the same feeds, the state fed explicitly, and fetch all their
  outputs (a training step returns the new state too);
- the cost is the median over rounds of the paired ratio current / previous
  (with its interquartile range); each export's time is also given as a ratio of
  medians to the memcpy; errors are max |y - float64 reference| on x = 1e4 + N(0,1).

Inference exports are the same graph in both, so their ratio shows the noise floor.

Usage:
    python scripts/bench_portable.py [--before COMMIT] [--threads N] [--quick] [--runs R]
                                     [--layouts NCHW NHWC 2D small]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence

import numpy as np
import onnx
import onnxruntime as ort

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
# Run from a checkout without installing the package.
sys.path.insert(0, ROOT)

from onnxbn.cli import benchmark  # noqa: E402

MODES = ("inference", "training", "masked")
FULL_RUNS, QUICK_RUNS = 60, 6
BEFORE = "1e8d330"

# Runs in a fresh interpreter whose PYTHONPATH selects the package version; only
# the public API, so the same code exports every commit since the layer existed.
EXPORT_CHILD = r"""
import json, os, sys
import numpy as np
import onnx
import onnxbn
from onnxbn import layers

source, out, spec_path = sys.argv[1:4]
here = os.path.realpath(onnxbn.__file__)
if not here.startswith(os.path.realpath(source) + os.sep):
    raise SystemExit(f"expected onnxbn from {source}, imported {here}")
spec = json.load(open(spec_path))
for name, layout in spec["layouts"].items():
    shape, axis = layout["shape"], layout["axis"]
    w = np.load(os.path.join(out, name + "_weights.npz"))
    for mode in spec["modes"]:
        onnxbn.reset_names()
        x = onnxbn.Input(shape[1:], name="x")
        inputs, kwargs = [x], {}
        if mode == "masked":
            mask = onnxbn.Input(shape[1:-1], dtype="bool", name="mask")
            inputs.append(mask)
            kwargs["mask"] = mask
        bn = layers.BatchNormalization(
            axis=axis, momentum=spec["momentum"], epsilon=spec["epsilon"], name="bn"
        )
        y = bn(x, training=mode != "inference", **kwargs)
        bn.set_weights([w["scale"], w["bias"], w["mean"], w["var"]])
        model = onnxbn.export_onnx(onnxbn.Model(inputs, y, name="bn_" + mode))
        onnx.save(model, os.path.join(out, f"{name}_{mode}.onnx"))
"""


def export_with(source: str, out: str, layouts: Sequence[str]) -> None:
    """Exports every mode of `layouts` with the onnxbn package found under `source`.

    Args:
        source: a folder holding an `onnxbn/` package (put first on PYTHONPATH).
        out: where `<layout>_<mode>.onnx` files are written.
        layouts: names from `benchmark.LAYOUTS`.

    Raises:
        RuntimeError: the export subprocess failed (its stderr is included).
    """
    spec = {
        "layouts": {n: {"shape": benchmark.LAYOUTS[n][0], "axis": benchmark.LAYOUTS[n][1]}
                    for n in layouts},
        "modes": list(MODES),
        "momentum": benchmark.MOMENTUM,
        "epsilon": benchmark.EPSILON,
    }  # fmt: skip
    for name in layouts:
        weights = benchmark.layout_data(name)[1]
        np.savez(os.path.join(out, f"{name}_weights.npz"), **weights)
    spec_path = os.path.join(out, "spec.json")
    with open(spec_path, "w") as f:
        json.dump(spec, f)
    env = {**os.environ, "PYTHONPATH": os.path.abspath(source)}
    done = subprocess.run(
        [sys.executable, "-c", EXPORT_CHILD, os.path.abspath(source), out, spec_path],
        cwd=out,  # not the checkout, whose onnxbn/ would shadow `source`
        env=env,
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise RuntimeError(f"Exporting with the onnxbn of {source} failed:\n{done.stderr}")


def archive(commit: str, dest: str) -> str:
    """Extracts `onnxbn/` at `commit` into `dest`; returns the full commit hash."""
    full = subprocess.run(
        ["git", "-C", ROOT, "rev-parse", "--verify", f"{commit}^{{commit}}"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    tar = subprocess.run(
        ["git", "-C", ROOT, "archive", full, "onnxbn"], capture_output=True, check=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", dest], input=tar, check=True)
    return full


def working_tree() -> str:
    """HEAD's short hash, marked when `onnxbn/` has uncommitted changes."""
    head = subprocess.run(
        ["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "-C", ROOT, "status", "--porcelain", "--", "onnxbn"],
        capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    return f"{head} + uncommitted onnxbn/ changes" if dirty else head


def paired_rounds(
    memcpy: Callable[[], object],
    pairs: dict[str, tuple[Callable[[], object], Callable[[], object]]],
    rounds: int,
) -> dict[str, dict[str, list[float]]]:
    """Seconds per call, one call of each per round, the pair's order alternating.

    Args:
        memcpy: the baseline, run first in every round.
        pairs: `{mode: (previous, current)}`.
        rounds: timed rounds (after two untimed warm-up calls of each).

    Returns:
        `{mode: {"memcpy", "previous", "current": [seconds per round]}}`.
    """
    for fn in (memcpy, *(f for pair in pairs.values() for f in pair)):
        fn()
        fn()
    samples = {m: {"memcpy": [], "previous": [], "current": []} for m in pairs}
    for r in range(rounds):
        for mode, (previous, current) in pairs.items():
            order = [("previous", previous), ("current", current)]
            for key, fn in [("memcpy", memcpy), *(order if r % 2 == 0 else order[::-1])]:
                start = time.perf_counter()
                fn()
                samples[mode][key].append(time.perf_counter() - start)
    return samples


def summarize(samples: dict[str, list[float]]) -> dict[str, float]:
    """The cost figures of one (layout, mode) from its per-round samples.

    Returns:
        `ratio` (median of paired current/previous ratios), `q1`, `q3` (their
        quartiles), `of_medians` (median current / median previous), `memcpy`
        (median seconds), `previous_x` and `current_x` (median time / median memcpy).
    """
    ratios = [c / p for c, p in zip(samples["current"], samples["previous"], strict=True)]
    q1, _, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
    base = statistics.median(samples["memcpy"])
    previous, current = (
        statistics.median(samples["previous"]),
        statistics.median(samples["current"]),
    )
    return {
        "ratio": statistics.median(ratios),
        "q1": q1,
        "q3": q3,
        "of_medians": current / previous,
        "memcpy": base,
        "previous_x": previous / base,
        "current_x": current / base,
    }


def bench_layout(name: str, folders: dict[str, str], rounds: int, threads: int) -> dict[str, dict]:
    """Times and checks the previous and current exports of one layout, every mode.

    Returns:
        `{mode: summarize(...) plus "previous_err" and "current_err"}`.
    """
    shape, axis = benchmark.LAYOUTS[name]
    x, weights, feeds = benchmark.layout_data(name)
    out = np.empty_like(x)
    sessions = {
        (which, mode): benchmark.session(
            onnx.load(os.path.join(folder, f"{name}_{mode}.onnx")), threads
        )
        for which, folder in folders.items()
        for mode in MODES
    }
    pairs = {
        mode: tuple(
            (lambda s=sessions[which, mode], f=feeds[mode]: s.run(None, f))
            for which in ("previous", "current")
        )
        for mode in MODES
    }
    samples = paired_rounds(lambda: np.copyto(out, x), pairs, rounds)
    results = {}
    for mode in MODES:
        row = summarize(samples[mode])
        ref = benchmark.reference(
            x, axis, weights, "inference" if mode == "inference" else "training",
            feeds["masked"]["mask"] if mode == "masked" else None,
        )  # fmt: skip
        for which in ("previous", "current"):
            y = sessions[which, mode].run(["bn"], feeds[mode])[0]
            row[f"{which}_err"] = float(np.abs(y - ref).max())
        results[mode] = row
    return results


def markdown(results: dict[str, dict[str, dict]], caption: str) -> str:
    """One row per (layout, mode): the paired ratio, the memcpy time and both exports' ratios to
    it, both errors."""
    lines = [
        caption,
        "",
        "| layout | mode | current / previous (median paired, IQR) | ratio of medians "
        "| memcpy | previous / memcpy | current / memcpy | previous err | current err |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, modes in results.items():
        label = f"{name} {'x'.join(map(str, benchmark.LAYOUTS[name][0]))}"
        for mode, r in modes.items():
            lines.append(
                f"| {label} | {mode} | {r['ratio']:.2f} ({r['q1']:.2f}-{r['q3']:.2f}) "
                f"| {r['of_medians']:.2f} | {r['memcpy'] * 1e3:.4f} ms | {r['previous_x']:.2f}x | {r['current_x']:.2f}x "
                f"| {r['previous_err']:.1e} | {r['current_err']:.1e} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", default=BEFORE, help="commit of the previous lowering")
    parser.add_argument("--threads", type=int, default=1, help="intra_op_num_threads")
    parser.add_argument("--quick", action="store_true", help="fewer rounds (smoke run)")
    parser.add_argument("--runs", type=int, default=None, help="timed rounds per layout")
    parser.add_argument(
        "--layouts", nargs="+", default=list(benchmark.LAYOUTS), choices=list(benchmark.LAYOUTS)
    )
    args = parser.parse_args(argv)
    rounds = args.runs if args.runs is not None else (QUICK_RUNS if args.quick else FULL_RUNS)
    if rounds < 1 or args.threads < 1:
        parser.error(f"--runs and --threads must be positive, received {rounds}, {args.threads}")
    with tempfile.TemporaryDirectory(prefix="onnxbn_portable_") as tmp:
        folders = {
            "previous": os.path.join(tmp, "previous"),
            "current": os.path.join(tmp, "current"),
        }
        source = os.path.join(tmp, "before_src")
        for folder in (*folders.values(), source):
            os.makedirs(folder)
        before = archive(args.before, source)
        export_with(source, folders["previous"], args.layouts)
        export_with(ROOT, folders["current"], args.layouts)
        results = {}
        for name in args.layouts:
            results[name] = bench_layout(name, folders, rounds, args.threads)
            detail = ", ".join(f"{m} {r['ratio']:.2f}" for m, r in results[name].items())
            print(f"{name}: current/previous {detail}", flush=True)
    caption = (
        f"onnxruntime {ort.__version__} CPU, intra_op_num_threads={args.threads}; previous = "
        f"{before[:7]}, current = {working_tree()}; {rounds} interleaved rounds"
        f"{' (QUICK smoke run)' if args.quick and args.runs is None else ''}; all outputs "
        "fetched; errors max |y - float64| on x = 1e4 + N(0,1)"
    )
    print()
    print(markdown(results, caption))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
