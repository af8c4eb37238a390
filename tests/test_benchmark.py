"""The benchmark's helpers: the float64 reference, the ONNX baselines, timing and the table."""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest

from onnxbn.cli import benchmark


def weights_for(channels: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {
        "scale": rng.uniform(0.5, 1.5, channels),
        "bias": rng.standard_normal(channels),
        "mean": rng.standard_normal(channels),
        "var": rng.uniform(0.5, 2.0, channels),
    }


def per_channel(x: np.ndarray, axis: int, weights: dict, mode: str, mask=None) -> np.ndarray:
    """An independent formulation: one channel at a time, exact sums (math.fsum)."""
    moved = np.moveaxis(x.astype(np.float64), axis, -1)
    valid = None
    if mask is not None:
        valid = np.broadcast_to(np.expand_dims(mask, -1), x.shape)
        valid = np.moveaxis(valid, axis, -1)
    out = np.empty_like(moved)
    eps = benchmark.EPSILON
    for c in range(moved.shape[-1]):
        values = moved[..., c]
        if mode == "inference":
            mean, var = weights["mean"][c], weights["var"][c]
        else:
            chosen = values.ravel() if valid is None else values[valid[..., c]]
            # Keras divides masked sums by count + 1e-7, plain ones by the count.
            count = len(chosen) + (1e-7 if valid is not None else 0.0)
            mean = math.fsum(chosen) / count
            var = math.fsum((v - mean) ** 2 for v in chosen) / count
        out[..., c] = (values - mean) / math.sqrt(var + eps) * weights["scale"][c] + weights[
            "bias"
        ][c]
    return np.moveaxis(out, -1, axis)


@pytest.mark.parametrize("mode", ["inference", "training", "masked"])
@pytest.mark.parametrize("shape,axis", [((6, 5), 1), ((3, 4, 2, 5), 3), ((2, 5, 3, 4), 1)])
def test_reference_agrees_with_a_per_channel_formula(mode, shape, axis):
    rng = np.random.default_rng(1)
    x = (1e4 + rng.standard_normal(shape)).astype(np.float32)
    weights = weights_for(shape[axis], rng)
    mask = rng.random(shape[:-1]) < 0.7 if mode == "masked" else None
    got = benchmark.reference(
        x, axis, weights, "inference" if mode == "inference" else "training", mask
    )
    want = per_channel(x, axis, weights, "inference" if mode == "inference" else "training", mask)
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9)


def test_reference_training_output_has_zero_mean_and_unit_variance_per_channel():
    rng = np.random.default_rng(2)
    x = (1e4 + rng.standard_normal((64, 3, 7))).astype(np.float32)
    weights = {**weights_for(3, rng), "scale": np.ones(3), "bias": np.zeros(3)}
    y = benchmark.reference(x, 1, weights, "training")
    np.testing.assert_allclose(y.mean(axis=(0, 2)), 0, atol=1e-9)
    var = x.astype(np.float64).var(axis=(0, 2))
    np.testing.assert_allclose(y.var(axis=(0, 2)), var / (var + benchmark.EPSILON), rtol=1e-9)


@pytest.mark.parametrize("transpose", [False, True])
def test_native_models_are_valid_and_match_the_reference(transpose):
    rng = np.random.default_rng(3)
    shape = (2, 3, 4, 5)  # NHWC when transposed, NCHW otherwise
    axis = 3 if transpose else 1
    weights = weights_for(shape[axis], rng)
    model = benchmark.native_model(shape, weights, transpose=transpose)
    onnx.checker.check_model(model, full_check=True)
    for attribute in model.graph.node[1 if transpose else 0].attribute:
        if attribute.name in ("epsilon", "momentum"):  # Keras's, not ONNX's defaults
            want = benchmark.EPSILON if attribute.name == "epsilon" else benchmark.MOMENTUM
            assert attribute.f == pytest.approx(want)
    x = rng.standard_normal(shape).astype(np.float32)
    (y,) = benchmark.session(model, threads=1).run(None, {"x": x})
    np.testing.assert_allclose(y, benchmark.reference(x, axis, weights, "inference"), atol=1e-5)


def test_timed_returns_a_median_per_variant_and_ticks_once_per_round():
    calls = {"a": 0, "b": 0}

    def count(name):
        def fn():
            calls[name] += 1

        return fn

    ticks = []
    times = benchmark.timed(
        {"a": count("a"), "b": count("b")}, runs=20, tick=lambda: ticks.append(1)
    )
    assert set(times) == {"a", "b"} and all(t >= 0 for t in times.values())
    assert len(ticks) == benchmark.rounds_for(20)
    # two warm-up calls, then at least `runs` timed ones, the same for every variant
    assert calls["a"] == calls["b"] >= 2 + 20


def fake_row(base: float, channel_last: bool) -> benchmark.Result:
    row: benchmark.Result = {"memcpy": (base, None)}
    for i, column in enumerate(benchmark.COLUMNS):
        if column == "tf2onnx T-BN-T" and not channel_last:
            continue
        row[column] = (base * (i + 1), 1e-6 * (i + 1))
    return row


def test_markdown_table_has_one_row_per_layout():
    results = {
        name: fake_row(1e-3 * (k + 1), name == "NHWC") for k, name in enumerate(benchmark.LAYOUTS)
    }
    text = benchmark.markdown(results, threads=1, runs=40)
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    header, body = rows[0], rows[2:]
    assert rows[1] == "| --- | --- | " + " | ".join("---" for _ in benchmark.COLUMNS) + " |"
    assert header == "| layout | memcpy | " + " | ".join(benchmark.COLUMNS) + " |"
    assert [r.split(" | ")[0] for r in body] == [
        f"| {name} {'x'.join(map(str, shape))}" for name, (shape, _) in benchmark.LAYOUTS.items()
    ]
    nchw = body[0].strip("| ").split(" | ")
    assert nchw[1] == "1.000 ms"
    assert nchw[2] == "1.00x (1.000 ms, err 1.0e-06)"
    assert nchw[3] == "-"  # no tf2onnx variant on a channel-first layout
    assert "x (" in body[1].split(" | ")[3]  # NHWC has it
    assert "QUICK" not in text  # a full run keeps the README's caption


def test_markdown_labels_runs_below_twenty_as_quick():
    text = benchmark.markdown({"small": fake_row(1e-5, False)}, threads=2, runs=6)
    caption = text.splitlines()[0]
    assert "intra_op_num_threads=2" in caption and "QUICK" in caption and "6 timed runs" in caption


def test_bench_layout_small_times_every_variant_within_the_error_target():
    row = benchmark.bench_layout("small", runs=2, threads=1)
    assert list(row) == [
        "memcpy",
        "native BN (NCHW)",
        "onnxbn inference",
        "onnxbn training",
        "onnxbn masked",
    ]
    assert row["memcpy"][1] is None
    for name, (seconds, error) in row.items():
        assert seconds > 0 and math.isfinite(seconds), name
        if name != "memcpy":
            assert math.isfinite(error), name
    # the target for the training variants on the hard input
    assert row["onnxbn training"][1] <= 1e-4
    assert row["onnxbn masked"][1] <= 1e-4


def test_run_reports_progress_lines_and_returns_the_table():
    lines: list[str] = []
    text = benchmark.run(repeats=2, layouts=["small"], report=lines.append)
    assert lines[0] == "intra_op_num_threads=1, runs per variant=2"
    assert lines[1].startswith("  small: memcpy=1.00x, ")
    assert text.count("| small 8x16 |") == 1


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"layouts": ["NCDHW"]}, "Unknown layouts"),
        ({"layouts": []}, "Unknown layouts"),
        ({"repeats": 0}, "repeats must be a positive integer"),
        ({"repeats": 2.5}, "repeats must be a positive integer"),
        ({"threads": [0]}, "threads must be positive integers"),
        ({"threads": []}, "threads must be positive integers"),
    ],
)
def test_run_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        benchmark.run(**kwargs)


def load_bench_portable():
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).parent.parent / "scripts" / "bench_portable.py"
    spec = importlib.util.spec_from_file_location("bench_portable", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_portable_alternates_the_pair_and_summarizes_paired_ratios():
    bench_portable = load_bench_portable()
    calls = []
    pairs = {"training": (lambda: calls.append("p"), lambda: calls.append("c"))}
    samples = bench_portable.paired_rounds(lambda: calls.append("m"), pairs, rounds=3)
    # Two warm-up calls each, then memcpy first and the pair's order flipping per round.
    assert calls == list("mmppcc") + list("mpcmcpmpc")
    assert {k: len(v) for k, v in samples["training"].items()} == dict.fromkeys(
        ("memcpy", "previous", "current"), 3
    )
    row = bench_portable.summarize(
        {"memcpy": [1.0, 1.0, 1.0], "previous": [2.0, 4.0, 3.0], "current": [3.0, 4.0, 6.0]}
    )
    assert row["ratio"] == 1.5  # median of 1.5, 1.0, 2.0
    assert row["of_medians"] == 4.0 / 3.0
    assert (row["previous_x"], row["current_x"]) == (3.0, 4.0)
    assert row["q1"] <= row["ratio"] <= row["q3"]
    row.update(previous_err=1e-6, current_err=2e-6)
    table = bench_portable.markdown({"small": {"training": row}}, "caption")
    assert table.splitlines()[-1].startswith("| small 8x16 | training | 1.50 (")
