"""Run the BatchNormalization benchmark and print its ratio table, or time a given model."""

from __future__ import annotations

import argparse
import statistics
import sys
import time

NAME = "bench"
HELP = "benchmark the exports against a memcpy of the same bytes, or time a model (--model)"
# The benchmark's layout names (onnxbn.cli.benchmark.LAYOUTS), listed here so that
# building the parser does not import onnxruntime.
LAYOUTS = ("NCHW", "NHWC", "2D", "small")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        metavar="FILE",
        help="time this .onnx file on onnxruntime CPU with random inputs instead "
        "(a training export is fed its starting state)",
    )
    parser.add_argument(
        "--batch",
        type=int,
        default=8,
        help="with --model: size of every dynamic dim of the random inputs (default 8)",
    )
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


def _report(line: str) -> None:
    print(f"bench: {line}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    if args.model is not None:
        if args.layouts:
            raise ValueError("--layouts selects the built-in benchmark; drop it with --model.")
        return time_model(args)
    from onnxbn.cli import benchmark

    # A bar redraws itself with carriage returns: only on a terminal. Logs get one line
    # per layout instead.
    interactive = sys.stderr.isatty()
    table = benchmark.run(
        quick=args.quick,
        repeats=args.repeats,
        threads=args.threads,
        layouts=args.layouts,
        progress=interactive,
        report=None if interactive else _report,
    )
    print(table)
    return 0


def time_model(args: argparse.Namespace) -> int:
    """Median time of one run of a user's model on onnxruntime CPU, per thread setting."""
    import onnxruntime

    from onnxbn.cli.check_cmd import random_feeds
    from onnxbn.cli.files import load_model
    from onnxbn.contract import initial_state

    runs = args.repeats or (5 if args.quick else 30)
    if runs < 1 or args.batch < 0 or any(t < 1 for t in args.threads):
        raise ValueError(
            f"--repeats and --threads must be >= 1 and --batch >= 0, received "
            f"{runs}, {args.threads}, {args.batch}."
        )
    model = load_model(args.model, external_data=True)
    state = initial_state(model)
    initializers = {t.name for t in model.graph.initializer}
    names = [i.name for i in model.graph.input if i.name not in set(state) | initializers]
    feeds = {**random_feeds(model.graph, names, args.batch, seed=0), **state}
    data = model.SerializeToString()
    print(
        f"model {args.model}: {len(model.graph.node)} nodes, inputs "
        + ", ".join(f"{k}{tuple(v.shape)}" for k, v in feeds.items() if k in names)
        + (f", {len(state)} state inputs" if state else "")
    )
    for threads in args.threads:
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        try:
            session = onnxruntime.InferenceSession(
                data, options, providers=["CPUExecutionProvider"]
            )
            session.run(None, feeds)  # warm-up
            times = []
            for _ in range(runs):
                start = time.perf_counter()
                session.run(None, feeds)
                times.append(time.perf_counter() - start)
        except Exception as error:  # onnxruntime's own types: report, do not trace back
            raise ValueError(f"onnxruntime could not run {args.model!r}: {error}") from None
        print(
            f"onnxruntime CPU, intra_op_num_threads={threads}: median "
            f"{statistics.median(times) * 1e3:.3f} ms, min {min(times) * 1e3:.3f} ms "
            f"over {runs} runs{' (QUICK)' if args.quick and not args.repeats else ''}"
        )
    return 0

