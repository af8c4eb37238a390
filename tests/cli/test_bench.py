"""`onnxbn bench`: the benchmark's table through the command line."""

from __future__ import annotations

import math
import re
import time

import pytest

from onnxbn.cli import benchmark, main

RATIO = re.compile(r"^(\S+)x \((\S+) ms(?:, err (\S+))?\)$")


def table_rows(text: str) -> tuple[list[str], list[list[str]]]:
    """The header cells and the body rows of the Markdown table in `text`."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    split = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]
    return split[0], split[2:]


def test_quick_bench_on_the_small_layout_prints_the_ratio_table(capsys):
    start = time.perf_counter()
    assert main(["bench", "--quick", "--layouts", "small"]) == 0
    elapsed = time.perf_counter() - start
    captured = capsys.readouterr()
    header, rows = table_rows(captured.out)
    assert header == ["layout", "memcpy", *benchmark.COLUMNS]
    assert len(rows) == 1 and rows[0][0] == "small 8x16"
    assert rows[0][1].endswith(" ms") and float(rows[0][1][:-3]) > 0
    cells = dict(zip(header, rows[0]))
    assert cells["tf2onnx T-BN-T"] == "-"  # channel-first layout: no transposes to time
    for column in ("native BN (NCHW)", "onnxbn inference", "onnxbn training", "onnxbn masked"):
        match = RATIO.match(cells[column])
        assert match, cells[column]
        ratio, millis, error = (float(g) for g in match.groups())
        assert math.isfinite(ratio) and ratio > 0 and millis > 0
        assert math.isfinite(error)
    # a quick run says it is one; the progress bar goes to stderr, not into the table
    assert "QUICK" in captured.out
    assert "small" in captured.err
    assert elapsed < 15


def test_bench_runs_one_table_per_thread_setting(capsys):
    assert main(["bench", "--repeats", "2", "--layouts", "small", "--threads", "1", "2"]) == 0
    out = capsys.readouterr().out
    assert "intra_op_num_threads=1;" in out and "intra_op_num_threads=2;" in out
    assert out.count("| small 8x16 |") == 2


def test_bench_rejects_an_unknown_layout(capsys):
    with pytest.raises(SystemExit) as caught:
        main(["bench", "--layouts", "NCDHW"])
    assert caught.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_bench_rejects_non_positive_repeats(capsys):
    assert main(["bench", "--repeats", "0", "--layouts", "small"]) == 2
    err = capsys.readouterr().err
    assert "onnxbn bench: error: repeats must be a positive integer" in err
    assert "Traceback" not in err


def test_cli_layout_names_are_the_benchmarks():
    from onnxbn.cli import bench_cmd

    assert bench_cmd.LAYOUTS == tuple(benchmark.LAYOUTS)
