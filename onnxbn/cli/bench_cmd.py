"""Run the BatchNormalization benchmark and print its ratio table."""

from __future__ import annotations

import argparse

NAME = "bench"
HELP = "benchmark the exports against a memcpy of the same bytes"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="fewer repeats and shapes")
    parser.add_argument("--repeats", type=int, help="timed runs per measurement (median)")


def run(args: argparse.Namespace) -> int:
    from onnxbn import benchmark

    table = benchmark.run(quick=args.quick, repeats=args.repeats, progress=True)
    print(table)
    return 0
