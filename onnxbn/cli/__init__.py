"""The `onnxbn` command line: export, run, check, inspect, bench."""

from onnxbn.cli.main import main

__all__ = ["main"]
