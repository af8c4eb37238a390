"""Benchmark: onnxbn's exports on onnxruntime CPU against a memcpy proxy and the native node.

The benchmark itself lives in `onnxbn/cli/benchmark.py` (so `onnxbn bench` works from
an installed package; the formulations tried: `docs/lowering.md`); this script keeps
its command line: per-layout lines as results come in, then one Markdown table
per thread setting.

Usage:
    python scripts/bench.py [--quick] [--threads N ...] [--runs R] [--layouts ...]
"""

from __future__ import annotations

import argparse
import os
import sys

# Run from a checkout without installing the package.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from onnxbn.cli import benchmark  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats (smoke run)")
    parser.add_argument(
        "--threads",
        type=int,
        nargs="+",
        default=[1, os.cpu_count() or 1],
        help="intra_op_num_threads settings to run (each gets its own table)",
    )
    parser.add_argument("--runs", type=int, default=None, help="timed runs per variant")
    parser.add_argument(
        "--layouts", nargs="+", default=list(benchmark.LAYOUTS), choices=list(benchmark.LAYOUTS)
    )
    args = parser.parse_args(argv)
    table = benchmark.run(
        quick=args.quick,
        repeats=args.runs,
        threads=args.threads,
        layouts=args.layouts,
        report=lambda line: print(line, flush=True),
    )
    print()
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
