"""Run the BatchNormalization benchmark and print its ratio table."""

from __future__ import annotations

import argparse

NAME = "bench"
HELP = "benchmark the exports against a memcpy of the same bytes"
# The benchmark's layout names (onnxbn.cli.benchmark.LAYOUTS), listed here so that
# building the parser does not import onnxruntime.
LAYOUTS = ("NCHW", "NHWC", "2D", "small")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--quick", action="store_true", help="fewer repeats (a smoke run, labelled in the table)"
    )
    parser.add_argument("--repeats", type=int, help="timed runs per measurement (median)")
    parser.add_argument(
        "--threads",
        type=int,
        nargs="+",
        default=[1],
        metavar="N",
        help="onnxruntime intra_op_num_threads settings, one table each (default: 1)",
    )
    parser.add_argument(
        "--layouts",
        nargs="+",
        choices=LAYOUTS,
        metavar="LAYOUT",
        help=f"layouts to run, from {', '.join(LAYOUTS)} (default: all)",
    )


def run(args: argparse.Namespace) -> int:
    from onnxbn.cli import benchmark

    table = benchmark.run(
        quick=args.quick,
        repeats=args.repeats,
        threads=args.threads,
        layouts=args.layouts,
        progress=True,
    )
    print(table)
    return 0
