"""Benchmark: the cost of `synchronized=True` per BatchNormalization layer, over MPI.

For P processes (default 2 and 4) and several channel counts C, each process
holds a fixed per-replica batch (default 32x4x4xC, channels last, float32) and
times one training step of

- the eager layer, synchronized (one all-gather of `(count, mean, M2)`, 3·C
  float64 values per process, plus the dtype check's small all-gather) and
  unsynchronized;
- a training export on `onnxbn.runtime.Session(model, comm=comm)`,
  synchronized (two phases: the graph up to `bn/partial_moments`, the
  all-gather, then the whole graph fed `bn/global_moments`) and the same
  layer exported unsynchronized;
- the synchronized export run once on one process's own statistics (a
  one-process communicator): the graph's own cost, without the second phase
  and the exchanges;
- the all-gather alone (`comm.allgather` of a `(3, C)` float64 array, as
  `onnxbn.distributed.allreduce_moments` does) and the whole all-reduce
  (`allreduce_moments`: all-gather and Chan et al.'s combine).

Every timed call starts right after a barrier, so a step's time includes
waiting for the slowest replica, as in real data-parallel training. Variants
are interleaved step by step so machine noise hits all alike; each process
takes the median over `--steps` steps after `--warmup` untimed ones, and the
table shows the max over processes of those medians, with the ratio
synchronized / unsynchronized.

onnxruntime sessions get one intra-op thread and NumPy's BLAS one thread per
process: P replicas share the machine's cores, as in data-parallel training
with one process per core (`runtime.Session` has no session-options argument,
so the benchmark rebuilds its onnxruntime session; see `one_thread`).

Usage:
    python scripts/bench_distributed.py [--processes 2 4] [--channels 16 256 4096]
        [--batch 32 4 4] [--steps 30] [--warmup 5] [--mpich-yield]

The parent process launches itself once per P as
    mpiexec -n P python scripts/bench_distributed.py --worker RESULT.json ...
(same options), collects rank 0's results and prints the Markdown table and a
note on how the cost scales with C and P. Needs the distributed extra:
`pip install "onnxbn[distributed]"`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
# Run from a checkout without installing the package.
sys.path.insert(0, str(ROOT))

import onnxbn  # noqa: E402
from onnxbn import distributed, layers, runtime  # noqa: E402

VARIANTS = (
    "eager unsync",
    "eager sync",
    "ort unsync",
    "ort sync",
    "ort sync graph local",
    "all-gather",
    "all-reduce",
)
MOMENTUM, EPSILON = 0.99, 1e-3
CPU = ["CPUExecutionProvider"]
# Keep one thread per replica: P processes already share the cores.
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
# `--mpich-yield`, with more processes than cores: MPICH's busy-waiting ranks can take
# the core from the replica they wait for; these make them yield (the settings
# MPICH's own CI uses for oversubscribed mpi4py runs). Off by default: on this
# 2-core VM they made no difference beyond the noise at P=4.
YIELD_VARIABLES = {
    "MPIR_CVAR_POLLS_BEFORE_YIELD": "1",
    "MPIR_CVAR_CH4_PROGRESS_THROTTLE": "true",
    "MPIR_CVAR_CH4_PROGRESS_THROTTLE_NO_PROGRESS_COUNT": "1",
}


# -- worker (one MPI process) -------------------------------------------------------
def one_thread(session: runtime.Session) -> runtime.Session:
    """`session` running on a CPU onnxruntime session with one intra-op thread.

    `runtime.Session` takes onnxruntime's default thread pool (one spinning
    thread per core); P processes on the same cores would then fight over them
    and the timings would measure that contention, not the synchronization.
    """
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    session._session = onnxruntime.InferenceSession(  # noqa: SLF001 - see the docstring
        session._model_proto.SerializeToString(),  # noqa: SLF001
        options,
        providers=["CPUExecutionProvider"],
    )
    return session


def training_export(synchronized: bool, batch: tuple[int, ...], channels: int) -> Any:
    """A training export of one BatchNormalization layer named `bn` over `(N, *batch, C)`."""
    onnxbn.reset_names()
    x = onnxbn.Input((*batch, channels), name="x")
    bn = layers.BatchNormalization(
        momentum=MOMENTUM, epsilon=EPSILON, synchronized=synchronized, name="bn"
    )
    return onnxbn.export_onnx(onnxbn.Model([x], bn(x)), training=True)


def step_functions(comm: Any, channels: int, batch: tuple[int, ...]) -> dict[str, Callable]:
    """The timed calls of one channel count, by variant name."""
    rng = np.random.default_rng(comm.Get_rank())
    x = (1e4 + rng.standard_normal(batch + (channels,))).astype(np.float32)
    eager = {
        sync: layers.BatchNormalization(momentum=MOMENTUM, epsilon=EPSILON, synchronized=sync)
        for sync in (False, True)
    }
    for layer in eager.values():
        layer.build(x.shape)
    from mpi4py import MPI

    models = {sync: training_export(sync, batch[1:], channels) for sync in (False, True)}
    sessions = {
        sync: one_thread(runtime.Session(models[sync], providers=CPU, comm=comm))
        for sync in (False, True)
    }
    # The synchronized graph run once, on this process's statistics (a one-process
    # communicator): what the graph itself costs, without the second pass and exchanges.
    local = one_thread(runtime.Session(models[True], providers=CPU, comm=MPI.COMM_SELF))
    packed = np.zeros((3, channels))
    partial = (np.full(channels, float(x[..., 0].size)), x.mean(axis=(0, 1, 2)), np.ones(channels))

    def eager_step(layer: layers.BatchNormalization) -> Callable[[], object]:
        def step() -> object:
            with distributed.communicator(comm):
                return layer(x, training=True)

        return step

    return {
        "eager unsync": eager_step(eager[False]),
        "eager sync": eager_step(eager[True]),
        "ort unsync": lambda: sessions[False].run({"x": x}),
        "ort sync": lambda: sessions[True].run({"x": x}),
        "ort sync graph local": lambda: local.run({"x": x}),
        "all-gather": lambda: comm.allgather(packed),
        "all-reduce": lambda: distributed.allreduce_moments(comm, partial, what="bench"),
    }


def measure(comm: Any, fns: dict[str, Callable], steps: int, warmup: int) -> dict[str, float]:
    """Max over processes of each process's median seconds per call (barrier before each)."""
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for index in range(warmup + steps):
        for name, fn in fns.items():
            comm.Barrier()
            start = time.perf_counter()
            fn()
            elapsed = time.perf_counter() - start
            if index >= warmup:
                samples[name].append(elapsed)
    from mpi4py import MPI

    return {
        name: comm.allreduce(statistics.median(values), op=MPI.MAX)
        for name, values in samples.items()
    }


def worker(args: argparse.Namespace) -> None:
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    batch = tuple(args.batch)
    records = []
    for channels in args.channels:
        fns = step_functions(comm, channels, batch)
        times = measure(comm, fns, args.steps, args.warmup)
        records.append({"P": comm.Get_size(), "C": channels, **times})
    if comm.Get_rank() == 0:
        Path(args.worker).write_text(json.dumps(records))


# -- parent: launch, tabulate, summarize --------------------------------------------
def mpiexec() -> str:
    found = shutil.which("mpiexec", path=os.path.dirname(sys.executable)) or shutil.which("mpiexec")
    if found is None:
        raise SystemExit(
            'no mpiexec found: pip install "onnxbn[distributed]" (mpi4py and MPICH from PyPI)'
        )
    return found


def launch(processes: int, args: argparse.Namespace, timeout: float) -> list[dict]:
    """Runs the worker under `mpiexec -n processes`; returns rank 0's records."""
    with tempfile.TemporaryDirectory() as folder:
        result = Path(folder) / "result.json"
        command = [
            mpiexec(), "-n", str(processes), sys.executable, str(Path(__file__).resolve()),
            "--worker", str(result),
            "--channels", *map(str, args.channels),
            "--batch", *map(str, args.batch),
            "--steps", str(args.steps),
            "--warmup", str(args.warmup),
        ]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        env.update({name: "1" for name in THREAD_VARIABLES})
        gentle = args.mpich_yield and processes > (os.cpu_count() or 1)
        if gentle:
            for name, value in YIELD_VARIABLES.items():
                env.setdefault(name, value)
        load = os.getloadavg()[0]  # other jobs on the machine: context for the noise
        done = subprocess.run(command, env=env, timeout=timeout, capture_output=True, text=True)
        if done.returncode != 0 or not result.exists():
            raise SystemExit(
                f"mpiexec -n {processes} failed ({done.returncode}):\n{done.stderr[-4000:]}"
            )
        records = json.loads(result.read_text())
        return [{**r, "yield": gentle, "load": load} for r in records]


def markdown(records: list[dict], batch: tuple[int, ...], steps: int) -> str:
    """The table: absolute times, ratios synchronized / unsynchronized, collective times."""
    lines = [
        f"synchronized / unsynchronized training step of one BatchNormalization layer, "
        f"per-replica batch {'x'.join(map(str, batch))}xC float32 (channels last); "
        f"max over processes of each process's median over {steps} steps; "
        "onnxruntime CPU, 1 intra-op thread per process",
        "",
        "| P | C | eager unsync | eager sync | eager ratio | ort unsync | ort sync | ort ratio "
        "| ort sync graph, 1 pass, no exchange | all-gather 3·C f64 "
        "| all-reduce (gather + combine) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    loads = {r["P"]: r["load"] for r in records if "load" in r}
    if loads:
        lines[0] += "; 1-min load average as each P started: " + ", ".join(
            f"P={p}: {load:.1f}" for p, load in loads.items()
        )
    if any(r.get("yield") for r in records):
        lines[0] += (
            f"; * more processes than the {os.cpu_count()} cores: run with MPICH told to "
            "yield while it waits (MPIR_CVAR_POLLS_BEFORE_YIELD=1, "
            "MPIR_CVAR_CH4_PROGRESS_THROTTLE=true)"
        )
    for r in records:
        cells = [
            f"{r['P']}{' *' if r.get('yield') else ''}",
            str(r["C"]),
            f"{r['eager unsync'] * 1e3:.3f} ms",
            f"{r['eager sync'] * 1e3:.3f} ms",
            f"{r['eager sync'] / r['eager unsync']:.2f}x",
            f"{r['ort unsync'] * 1e3:.3f} ms",
            f"{r['ort sync'] * 1e3:.3f} ms",
            f"{r['ort sync'] / r['ort unsync']:.2f}x",
            f"{r['ort sync graph local'] * 1e3:.3f} ms "
            f"({r['ort sync graph local'] / r['ort unsync']:.2f}x)",
            f"{r['all-gather'] * 1e6:.1f} µs",
            f"{r['all-reduce'] * 1e6:.1f} µs",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def note(records: list[dict]) -> str:
    """How the cost scales with C and P, read off the measured numbers."""
    by = {(r["P"], r["C"]): r for r in records}
    ps = sorted({r["P"] for r in records})
    cs = sorted({r["C"] for r in records})
    lo, hi = cs[0], cs[-1]

    def ratio(p: int, c: int, path: str) -> float:
        return by[p, c][f"{path} sync"] / by[p, c][f"{path} unsync"]

    def added(p: int, c: int, path: str) -> float:
        return by[p, c][f"{path} sync"] - by[p, c][f"{path} unsync"]

    parts = []
    for path, label in (("eager", "eager"), ("ort", "onnxruntime")):
        trend = _trend([ratio(p, hi, path) / ratio(p, lo, path) for p in ps])
        per_p = "; ".join(
            f"P={p}: {ratio(p, lo, path):.2f}x at C={lo} -> {ratio(p, hi, path):.2f}x at C={hi}, "
            f"+{added(p, lo, path) * 1e3:.2f} -> +{added(p, hi, path) * 1e3:.2f} ms per step"
            for p in ps
        )
        parts.append(f"- {label}: the ratio {trend} with C ({per_p}).")
    graph = [by[p, c]["ort sync graph local"] / by[p, c]["ort unsync"] for p in ps for c in cs]
    rest = [(added(p, c, "ort") - by[p, c]["ort sync graph local"]) * 1e3 for p in ps for c in cs]
    verdict = (
        "so the graph is not the cost"
        if max(graph) < 1.2
        else "so part of the cost is the graph itself"
    )
    parts.append(
        f"- onnxruntime, where the time goes: the synchronized graph run once costs "
        f"{min(graph):.2f}-{max(graph):.2f}x the unsynchronized one, {verdict}; the two-phase "
        "driver runs it twice (up to the partial moments, then all of it), and the rest of "
        f"the added time, {min(rest):.2f} to {max(rest):.2f} ms beyond one extra pass, is the "
        "driver's four all-gathers (feed check, partial-moments run, the moments, "
        "results) and waiting for the slowest replica at each."
    )
    growth_c = [by[p, hi]["all-gather"] / by[p, lo]["all-gather"] for p in ps]
    gather = "; ".join(
        f"P={p}: {by[p, lo]['all-gather'] * 1e6:.0f} µs at C={lo} -> "
        f"{by[p, hi]['all-gather'] * 1e6:.0f} µs at C={hi} (x{g:.1f} for x{hi // lo} the bytes)"
        for p, g in zip(ps, growth_c)
    )
    shape = (
        "mostly a fixed latency at these sizes"
        if max(growth_c) < (hi / lo) ** 0.5
        else "growing with the bytes"
    )
    share = [by[p, c]["all-gather"] / by[p, c]["ort unsync"] for p in ps for c in (lo, hi)]
    parts.append(
        f"- all-gather of 3·C float64: {gather}: {shape}; it is "
        f"{min(share):.2f}-{max(share):.2f}x an unsynchronized onnxruntime step."
    )
    if len(ps) > 1:
        first, last = ps[0], ps[-1]
        growth = ", ".join(
            f"x{by[last, c]['all-gather'] / by[first, c]['all-gather']:.1f} at C={c}" for c in cs
        )
        cores = os.cpu_count() or 1
        crowd = (
            f"; P={last} processes share {cores} cores (oversubscribed), so part of that is "
            "waiting for a descheduled replica"
            if last > cores
            else ""
        )
        parts.append(f"- from P={first} to P={last} the all-gather takes {growth}{crowd}.")
    return "How the cost scales (from the numbers above):\n" + "\n".join(parts)


def _trend(changes: list[float]) -> str:
    """How a ratio moved from the smallest C to the largest, given new / old per P."""
    if all(c < 0.9 for c in changes):
        return "falls"
    if all(c > 1.1 for c in changes):
        return "rises"
    return "changes little" if all(0.9 <= c <= 1.1 for c in changes) else "varies"


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, nargs="+", default=[2, 4], metavar="P")
    parser.add_argument("--channels", type=int, nargs="+", default=[16, 256, 4096], metavar="C")
    parser.add_argument(
        "--batch",
        type=int,
        nargs="+",
        default=[32, 4, 4],
        help="per-replica batch shape before the channel axis (default 32 4 4)",
    )
    parser.add_argument("--steps", type=int, default=30, help="timed steps (median; >= 20)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument(
        "--mpich-yield",
        action="store_true",
        help="when P exceeds the cores, make MPICH yield while it waits (rows marked *)",
    )
    parser.add_argument("--timeout", type=float, default=900, help="seconds per mpiexec run")
    parser.add_argument("--worker", metavar="RESULT.json", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or min(args.channels) < 1 or min(args.processes) < 2:
        parser.error("need steps >= 1, warmup >= 0, channels >= 1 and processes >= 2")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.worker:
        worker(args)
        return 0
    records = []
    for processes in dict.fromkeys(args.processes):
        print(f"mpiexec -n {processes} ...", file=sys.stderr, flush=True)
        records.extend(launch(processes, args, args.timeout))
    print(markdown(records, tuple(args.batch), args.steps))
    print()
    print(note(records))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
