"""Argument parsing and error handling shared by every `onnxbn` command.

Errors are printed on stderr as one line, without a traceback. Exit codes:
0 success, 1 a check found disagreement, 2 bad usage or bad input
(`ValueError`, `TypeError`, a missing file, a missing optional package), 3 an operation the model needs
is not implemented.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from onnxbn.cli import bench_cmd, check_cmd, export_cmd, inspect_cmd, run_cmd
from onnxbn.cli.adapt_cmds import Recalibrate, ToTraining

EXIT_OK = 0
EXIT_DISAGREE = 1
EXIT_BAD_INPUT = 2
EXIT_NOT_IMPLEMENTED = 3

COMMANDS = (export_cmd, run_cmd, check_cmd, inspect_cmd, bench_cmd, Recalibrate, ToTraining)


def version() -> str:
    """The installed distribution's version (the package's own where it is not installed)."""
    from importlib import metadata

    try:
        return metadata.version("onnxbn")
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        import onnxbn

        return onnxbn.__version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="onnxbn",
        description="Export Keras-exact BatchNormalization models to ONNX and run them.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS:
        sub = subparsers.add_parser(
            command.NAME, help=command.HELP, description=command.__doc__.strip().splitlines()[0]
        )
        command.add_arguments(sub)
        sub.set_defaults(handler=command.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs one command; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or EXIT_OK)
    except NotImplementedError as error:
        print(f"onnxbn {args.command}: not implemented: {error}", file=sys.stderr)
        return EXIT_NOT_IMPLEMENTED
    except ImportError as error:  # e.g. `run` without onnxruntime installed
        print(f"onnxbn {args.command}: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except (ValueError, TypeError, KeyError, OSError) as error:
        message = str(error) if not isinstance(error, KeyError) else str(error.args[0])
        print(f"onnxbn {args.command}: error: {message}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"onnxbn {args.command}: interrupted", file=sys.stderr)
        return 130
