"""Benchmark: the ResNet-style model (`models/real_models.py`) on onnxruntime CPU.

1. Inference: the export with BatchNormalization folded (the default) against the
   same network built without any BN layer (target ratio <= 1.05), with the
   unfolded export (`fold_batchnorm=False`) and the channels-first network (no
   layout Transposes at all) for context. The Transposes a channels-last Conv
   needs are counted after onnxruntime's graph optimization (its layout
   optimizer cancels the inverse pairs between convolutions).
2. Training-mode forward pass: the training export (batch statistics, moving
   statistics updated as extra outputs) against PyTorch CPU eager in train mode
   (`torch.no_grad()`, BN running statistics updated in place) on the same network
   with the same weights, NCHW input. torch is imported lazily; without it the
   comparison is skipped with a message. torch's running variance uses the
   unbiased batch variance (Keras: biased), so only the outputs are compared.

Timings are medians over interleaved rounds (>= 20 runs each), all engines on
the same number of threads. Prints a Markdown table of the ratios.

Usage:
    python scripts/bench_models.py [--batch 32] [--runs 30] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

import numpy as np
import onnx
import onnxruntime as ort

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from models.real_models import resnet_cnn  # noqa: E402
from onnxbn import export_onnx  # noqa: E402
from onnxbn.layers.conv_arithmetic import conv_padding  # noqa: E402


def session(proto: onnx.ModelProto, threads: int) -> tuple[ort.InferenceSession, int]:
    """An onnxruntime CPU session, and the number of Transposes left after optimization."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    with tempfile.TemporaryDirectory() as folder:
        options.optimized_model_filepath = os.path.join(folder, "optimized.onnx")
        sess = ort.InferenceSession(
            proto.SerializeToString(), options, providers=["CPUExecutionProvider"]
        )
        optimized = onnx.load(options.optimized_model_filepath)
    return sess, sum(n.op_type == "Transpose" for n in optimized.graph.node)


def timed(fns: dict[str, Callable[[], object]], runs: int) -> dict[str, float]:
    """Median seconds per call of each function, over interleaved rounds."""
    for fn in fns.values():  # warm-up
        for _ in range(3):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(runs):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in samples.items()}


def bench_inference(batch: int, runs: int, threads: int) -> list[tuple]:
    with_bn, sample = resnet_cnn(batch=batch)
    no_bn, _ = resnet_cnn(batchnorm=False, batch=batch)
    first, sample_first = resnet_cnn(batch=batch, data_format="channels_first")
    exports = {
        "folded": (export_onnx(with_bn), sample),
        "no BN layers": (export_onnx(no_bn), sample),
        "unfolded (fold_batchnorm=False)": (export_onnx(with_bn, fold_batchnorm=False), sample),
        "folded, channels_first network": (export_onnx(first), sample_first),
    }
    fns, transposes = {}, {}
    for name, (proto, feed) in exports.items():
        sess, transposes[name] = session(proto, threads)
        fns[name] = lambda sess=sess, feed=feed: sess.run(None, feed)
    eager = with_bn(sample)
    got = fns["folded"]()[0]
    error = float(np.max(np.abs(got - eager)))
    times = timed(fns, runs)
    base = times["no BN layers"]
    rows = []
    for name, seconds in times.items():
        note = f"{transposes[name]} Transposes after optimization"
        if name == "folded":
            note += f"; max abs error vs eager {error:.1e}"
        rows.append((f"inference: {name}", seconds, seconds / base, "no BN layers", note))
    return rows


# -- PyTorch ------------------------------------------------------------------------------
def torch_resnet(model, torch):
    """The onnxbn ResNet as a torch module (NCHW), weights copied, TF-style `same` padding."""
    nn, functional = torch.nn, torch.nn.functional
    layers = {layer.name: layer for layer in model.layers}

    class ConvBN(nn.Module):
        def __init__(self, prefix: str) -> None:
            super().__init__()
            conv, bn = layers[f"{prefix}_conv"], layers[f"{prefix}_bn"]
            kernel = conv.kernel.numpy()  # (kh, kw, cin, cout) -> (cout, cin, kh, kw)
            self.conv = nn.Conv2d(kernel.shape[2], kernel.shape[3], kernel.shape[:2],
                                  stride=conv.strides, bias=False)  # fmt: skip
            self.conv.weight.data = torch.from_numpy(
                np.ascontiguousarray(kernel.transpose(3, 2, 0, 1))
            )
            self.strides, self.kernel_size = conv.strides, conv.kernel_size
            # torch: running = (1 - m) * running + m * batch, with m = 1 - Keras momentum.
            self.bn = nn.BatchNorm2d(kernel.shape[3], eps=bn.epsilon, momentum=1 - bn.momentum)
            for name, weight in zip(("weight", "bias", "running_mean", "running_var"),
                                    bn.get_weights()):  # fmt: skip
                getattr(self.bn, name).data = torch.from_numpy(np.asarray(weight, np.float32))

        def forward(self, x):
            pads = [conv_padding(n, k, s, 1, "same") for n, k, s in
                    zip(x.shape[2:], self.kernel_size, self.strides)]  # fmt: skip
            x = functional.pad(x, [pads[1][0], pads[1][1], pads[0][0], pads[0][1]])
            return self.bn(self.conv(x))

    class ResNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = ConvBN("stem")
            self.b1a, self.b1b = ConvBN("block1_a"), ConvBN("block1_b")
            self.b2a, self.b2b, self.b2p = (
                ConvBN("block2_a"),
                ConvBN("block2_b"),
                ConvBN("block2_proj"),
            )
            head = layers["head"]
            self.head = nn.Linear(*head.kernel.shape)
            self.head.weight.data = torch.from_numpy(np.ascontiguousarray(head.kernel.numpy().T))
            self.head.bias.data = torch.from_numpy(head.bias.numpy())

        def forward(self, x):
            relu = functional.relu
            h = relu(self.stem(x))
            h = relu(self.b1b(relu(self.b1a(h))) + h)
            h = relu(self.b2b(relu(self.b2a(h))) + self.b2p(h))
            return torch.softmax(self.head(h.mean(dim=(2, 3))), dim=-1)

    return ResNet()


def bench_training(batch: int, runs: int, threads: int) -> list[tuple]:
    model, sample = resnet_cnn(batch=batch)
    sess, transposes = session(export_onnx(model, training=True), threads)
    fns = {"onnxruntime": lambda: sess.run(None, sample)}
    note = f"{transposes} Transposes after optimization"
    # The channels-first network needs no layout Transposes: what they cost in training.
    first, sample_first = resnet_cnn(batch=batch, data_format="channels_first")
    sess_first, transposes_first = session(export_onnx(first, training=True), threads)
    fns["onnxruntime, channels_first"] = lambda: sess_first.run(None, sample_first)
    note_first = f"{transposes_first} Transposes after optimization"
    try:
        import torch
    except ImportError:
        print("torch is not installed: skipping the PyTorch comparison "
              "(pip install torch to measure it).")  # fmt: skip
        times = timed(fns, runs)
        return [
            ("training forward: onnxruntime", times["onnxruntime"], None, "-", note),
            ("training forward: onnxruntime, channels_first network",
             times["onnxruntime, channels_first"], None, "-", note_first),
        ]  # fmt: skip
    torch.set_num_threads(threads)
    net = torch_resnet(model, torch).train()
    x = torch.from_numpy(np.ascontiguousarray(sample["image"].transpose(0, 3, 1, 2)))

    def torch_forward():
        with torch.no_grad():
            return net(x)

    want = model(sample, training=True)
    error_ort = float(np.max(np.abs(fns["onnxruntime"]()[0] - want)))
    error_torch = float(np.max(np.abs(torch_forward().numpy() - want)))
    fns["pytorch"] = torch_forward
    times = timed(fns, runs)
    base = times["pytorch"]
    return [
        ("training forward: onnxruntime", times["onnxruntime"], times["onnxruntime"] / base,
         f"PyTorch {torch.__version__} eager", f"{note}; max abs error vs eager {error_ort:.1e}"),
        ("training forward: onnxruntime, channels_first network",
         times["onnxruntime, channels_first"], times["onnxruntime, channels_first"] / base,
         f"PyTorch {torch.__version__} eager", note_first),
        ("training forward: PyTorch eager", base, 1.0, f"PyTorch {torch.__version__} eager",
         f"max abs error vs eager {error_torch:.1e}"),
    ]  # fmt: skip


def markdown(rows: list[tuple], batch: int, threads: int, runs: int) -> str:
    lines = [
        f"ResNet-style CNN, batch {batch}, 16x16x3, onnxruntime {ort.__version__} CPU, "
        f"{threads} thread(s), median of {runs} interleaved runs",
        "",
        "| case | median ms | ratio | relative to | notes |",
        "| --- | ---: | ---: | --- | --- |",
    ]
    for name, seconds, ratio, base, note in rows:
        shown = "-" if ratio is None else f"{ratio:.3f}"
        lines.append(f"| {name} | {seconds * 1e3:.3f} | {shown} | {base} | {note} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--runs", type=int, default=30, help="timed runs per case (>= 20)")
    # One thread by default: on a small shared machine more threads mostly measure contention.
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    if args.runs < 20:
        parser.error(f"--runs must be at least 20 for stable medians, received {args.runs}.")
    rows = bench_inference(args.batch, args.runs, args.threads)
    rows += bench_training(args.batch, args.runs, args.threads)
    print(markdown(rows, args.batch, args.threads, args.runs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
