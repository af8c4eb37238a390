"""Benchmark: onnxbn.reference vs onnx.reference.ReferenceEvaluator.

By default it runs the graphs `onnxbn.export_onnx` writes for a
BatchNormalization layer (inference, training and masked-training exports,
built as `onnxbn.cli.benchmark` builds them) on float32 NCHW 32x64x56x56, NHWC
32x56x56x64, 2-D 4096x1024 and 8x16 inputs (`x = 1e4 + N(0, 1)`), and prints
a Markdown table of each engine's median time and their ratio (onnx.reference
time / onnxbn.reference time; medians over >= 20 runs on the small shape,
>= 5 on the large ones, the engines interleaved), then the per-node overhead
on the small shape (a chain of trivial Identity/Add nodes, total time / node
count). Both engines' outputs are compared before timing.

    .venv/bin/python scripts/bench_reference.py [--repeats 20] [--large-repeats 5]
        [--layouts NCHW,NHWC,2D,small] [--synthetic] [--model path.onnx]

`--synthetic` adds the hand-built graphs (Mul+Add scale/shift, a decomposed
training graph, the BatchNormalization op). `--model` benchmarks one model
file instead (random feeds; dynamic dims take `--dim`).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from onnxbn.cli import benchmark
from onnxbn.reference import Interpreter

SHAPES = {"NCHW 32x64x56x56": (32, 64, 56, 56), "2-D 4096x1024": (4096, 1024), "8x16": (8, 16)}
OPSET = 18
LAYOUT_LABELS = {
    "NCHW": "NCHW 32x64x56x56",
    "NHWC": "NHWC 32x56x56x64",
    "2D": "2-D 4096x1024",
    "small": "8x16",
}
# Fewer runs than this per engine would not give a meaningful median.
MIN_SMALL_REPEATS, MIN_LARGE_REPEATS = 20, 5


def _channel_shape(shape: tuple[int, ...]) -> list[int]:
    return [1, shape[1]] + [1] * (len(shape) - 2)


def _model(nodes, inputs, outputs, initializers, name: str) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, name, inputs, outputs, initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])


def _value(name: str, shape) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape))


def scale_shift(shape: tuple[int, ...]) -> onnx.ModelProto:
    """Inference BatchNormalization folded to y = x * scale + shift."""
    rng = np.random.default_rng(0)
    cs = _channel_shape(shape)
    inits = [
        numpy_helper.from_array(rng.uniform(0.5, 2, cs).astype(np.float32), "bn/scale"),
        numpy_helper.from_array(rng.normal(size=cs).astype(np.float32), "bn/shift"),
    ]
    nodes = [
        helper.make_node("Mul", ["x", "bn/scale"], ["bn/scaled"]),
        helper.make_node("Add", ["bn/scaled", "bn/shift"], ["y"]),
    ]
    return _model(nodes, [_value("x", shape)], [_value("y", shape)], inits, "scale_shift")


def training_graph(shape: tuple[int, ...]) -> onnx.ModelProto:
    """Training BatchNormalization decomposed into ReduceMean/Sub/Mul/Sqrt/Div, with state."""
    c = shape[1]
    cs = _channel_shape(shape)
    axes = [0] + list(range(2, len(shape)))
    f32 = np.float32
    inits = [
        numpy_helper.from_array(np.array(axes, np.int64), "bn/axes"),
        numpy_helper.from_array(np.array([c], np.int64), "bn/c"),
        numpy_helper.from_array(np.array(1e-3, f32), "bn/epsilon"),
        numpy_helper.from_array(np.array(0.99, f32), "bn/momentum"),
        numpy_helper.from_array(np.array(0.01, f32), "bn/one_minus_momentum"),
        numpy_helper.from_array(np.ones(cs, f32), "bn/gamma"),
        numpy_helper.from_array(np.zeros(cs, f32), "bn/beta"),
        numpy_helper.from_array(np.zeros(c, f32), "bn/moving_mean"),
        numpy_helper.from_array(np.ones(c, f32), "bn/moving_variance"),
    ]
    n = helper.make_node
    nodes = [
        n("ReduceMean", ["x", "bn/axes"], ["bn/mean"]),
        n("Sub", ["x", "bn/mean"], ["bn/centered"]),
        n("Mul", ["bn/centered", "bn/centered"], ["bn/squared"]),
        n("ReduceMean", ["bn/squared", "bn/axes"], ["bn/var"]),
        n("Add", ["bn/var", "bn/epsilon"], ["bn/var_eps"]),
        n("Sqrt", ["bn/var_eps"], ["bn/std"]),
        n("Div", ["bn/centered", "bn/std"], ["bn/normalized"]),
        n("Mul", ["bn/normalized", "bn/gamma"], ["bn/scaled"]),
        n("Add", ["bn/scaled", "bn/beta"], ["y"]),
        n("Reshape", ["bn/mean", "bn/c"], ["bn/mean_c"]),
        n("Reshape", ["bn/var", "bn/c"], ["bn/var_c"]),
        n("Mul", ["bn/moving_mean", "bn/momentum"], ["bn/mm_kept"]),
        n("Mul", ["bn/mean_c", "bn/one_minus_momentum"], ["bn/mm_new"]),
        n("Add", ["bn/mm_kept", "bn/mm_new"], ["bn/moving_mean/new"]),
        n("Mul", ["bn/moving_variance", "bn/momentum"], ["bn/mv_kept"]),
        n("Mul", ["bn/var_c", "bn/one_minus_momentum"], ["bn/mv_new"]),
        n("Add", ["bn/mv_kept", "bn/mv_new"], ["bn/moving_variance/new"]),
    ]
    inputs = [_value("x", shape), _value("bn/moving_mean", [c]), _value("bn/moving_variance", [c])]
    outputs = [
        _value("y", shape),
        _value("bn/moving_mean/new", [c]),
        _value("bn/moving_variance/new", [c]),
    ]
    return _model(nodes, inputs, outputs, inits, "training")


def batchnorm_op(shape: tuple[int, ...], training: bool) -> onnx.ModelProto:
    """The BatchNormalization op itself (opset 15), inference or training_mode=1."""
    c = shape[1]
    rng = np.random.default_rng(1)
    inits = [
        numpy_helper.from_array(rng.uniform(0.5, 2, c).astype(np.float32), "bn/gamma"),
        numpy_helper.from_array(rng.normal(size=c).astype(np.float32), "bn/beta"),
        numpy_helper.from_array(rng.normal(size=c).astype(np.float32), "bn/moving_mean"),
        numpy_helper.from_array(rng.uniform(0.5, 2, c).astype(np.float32), "bn/moving_variance"),
    ]
    outputs = ["y", "bn/moving_mean/new", "bn/moving_variance/new"] if training else ["y"]
    node = helper.make_node(
        "BatchNormalization",
        ["x", "bn/gamma", "bn/beta", "bn/moving_mean", "bn/moving_variance"],
        outputs,
        epsilon=1e-3,
        momentum=0.99,
        training_mode=int(training),
    )
    values = [_value("y", shape)] + [_value(o, [c]) for o in outputs[1:]]
    return _model([node], [_value("x", shape)], values, inits, "batchnorm")


def identity_add_chain(shape: tuple[int, ...], count: int) -> onnx.ModelProto:
    """`count` trivial nodes (alternating Identity and Add) for per-node overhead."""
    nodes, previous = [], "x"
    for i in range(count):
        inputs = [previous, "one"] if i % 2 else [previous]
        nodes.append(helper.make_node("Add" if i % 2 else "Identity", inputs, [f"t{i}"]))
        previous = f"t{i}"
    one = numpy_helper.from_array(np.ones(shape, np.float32), "one")
    return _model(nodes, [_value("x", shape)], [_value(previous, shape)], [one], "chain")


def median_seconds(fns: list[Callable[[], object]], repeats: int) -> list[float]:
    """Median wall time of each function, runs interleaved so load changes hit all alike."""
    for fn in fns:
        fn()  # warm-up
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, bucket in zip(fns, times):
            start = time.perf_counter()
            fn()
            bucket.append(time.perf_counter() - start)
    return [statistics.median(bucket) for bucket in times]


def compare(
    model: onnx.ModelProto,
    feeds: dict[str, np.ndarray],
    repeats: int,
    tolerance: float = 1e-4,
) -> tuple[float, float]:
    """Median seconds of (onnxbn.reference, onnx.reference) after checking they agree."""
    ours = Interpreter(model)
    theirs = ReferenceEvaluator(model)
    got = ours.run(feeds)
    want = theirs.run(None, feeds)
    for name, a, b in zip(ours.output_names, got, want):
        np.testing.assert_allclose(a, b, rtol=tolerance, atol=tolerance, err_msg=f"output {name!r}")
    ours_s, theirs_s = median_seconds(
        [lambda: ours.run(feeds), lambda: theirs.run(None, feeds)], repeats
    )
    return ours_s, theirs_s


def random_feeds(model: onnx.ModelProto, dim: int, rng: np.random.Generator) -> dict:
    initialized = {t.name for t in model.graph.initializer}
    feeds = {}
    for value_info in model.graph.input:
        if value_info.name in initialized:
            continue
        tensor_type = value_info.type.tensor_type
        dtype = helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)
        shape = [d.dim_value if d.HasField("dim_value") else dim for d in tensor_type.shape.dim]
        if np.dtype(dtype) == np.bool_:
            feeds[value_info.name] = rng.random(shape) < 0.5
        else:
            feeds[value_info.name] = rng.normal(size=shape).astype(dtype)
    return feeds


def export_cases(layout: str) -> tuple[list[tuple[str, onnx.ModelProto, dict]], str]:
    """The three exports of one `onnxbn.cli.benchmark.LAYOUTS` layout, with their feeds."""
    shape, axis = benchmark.LAYOUTS[layout]
    _, weights, feeds = benchmark.layout_data(layout)
    exports = benchmark.onnxbn_exports(shape, axis, weights)
    cases = [(f"export: {mode}", exports[mode], feeds[mode]) for mode in feeds]
    return cases, LAYOUT_LABELS[layout]


def _row(label: str, shape: str, ours: float, theirs: float) -> str:
    return f"| {label:<34} | {shape:<17} | {ours * 1e3:10.3f} | {theirs * 1e3:14.3f} | {theirs / ours:6.1f}x |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20, help="timed runs on small shapes")
    parser.add_argument("--large-repeats", type=int, default=5, help="timed runs on large shapes")
    parser.add_argument(
        "--layouts", default=",".join(benchmark.LAYOUTS), help="comma-separated export layouts"
    )
    parser.add_argument("--synthetic", action="store_true", help="also the hand-built graphs")
    parser.add_argument("--model", help="benchmark this .onnx file instead of the built-in graphs")
    parser.add_argument("--dim", type=int, default=8, help="size of dynamic dims for --model")
    parser.add_argument("--nodes", type=int, default=200, help="chain length for the overhead case")
    args = parser.parse_args()
    small = max(args.repeats, MIN_SMALL_REPEATS)
    large = max(args.large_repeats, MIN_LARGE_REPEATS)
    print(
        f"medians over {small} runs (small) / {large} runs (large), engines interleaved; "
        f"numpy {np.__version__}, onnx {onnx.__version__}"
    )
    print(
        "| graph                              | shape             | ours (ms)  | onnx.ref (ms)  | ratio   |"
    )
    print(
        "|------------------------------------|-------------------|------------|----------------|---------|"
    )
    rng = np.random.default_rng(0)
    if args.model:
        model = onnx.load(args.model)
        feeds = random_feeds(model, args.dim, rng)
        shapes = ", ".join(f"{n}{list(v.shape)}" for n, v in feeds.items())
        print(_row(args.model, shapes[:17], *compare(model, feeds, small)))
        return
    for layout in args.layouts.split(","):
        cases, shape_name = export_cases(layout)
        repeats = small if layout == "small" else large
        for label, model, feeds in cases:
            # x = 1e4 + noise: y is O(1) after removing a 1e4 mean, so compare loosely.
            ours, theirs = compare(model, feeds, repeats, tolerance=2e-3)
            print(_row(label, shape_name, ours, theirs), flush=True)
    if args.synthetic:
        for shape_name, shape in SHAPES.items():
            x = {"x": rng.normal(size=shape).astype(np.float32)}
            repeats = small if math.prod(shape) < 1 << 16 else large
            cases = [
                ("inference: Mul+Add scale/shift", scale_shift(shape)),
                ("inference: BatchNormalization op", batchnorm_op(shape, training=False)),
                ("training: decomposed, with state", training_graph(shape)),
                ("training: BatchNormalization op", batchnorm_op(shape, training=True)),
            ]
            for label, model in cases:
                print(_row(label, shape_name, *compare(model, x, repeats)), flush=True)
    count = args.nodes
    chain = identity_add_chain((8, 16), count)
    ours, theirs = compare(chain, {"x": np.ones((8, 16), np.float32)}, small)
    print(_row(f"{count} Identity/Add nodes", "8x16", ours, theirs))
    print(
        f"\nper-node overhead on 8x16: ours {ours / count * 1e6:.2f} us, "
        f"onnx.reference {theirs / count * 1e6:.2f} us"
    )


if __name__ == "__main__":
    main()
