"""Benchmark: steps per second of the exported train step against PyTorch eager.

The ResNet-style example model (`models/real_models.py`, batch 32, float32,
sparse categorical cross-entropy, Adam): onnxbn's exported train step on
onnxruntime CPU (forward, backward and Adam in one graph, state fed back each
step) against the same step in PyTorch eager on the CPU (`torch.nn.Conv2d`,
`torch.nn.BatchNorm2d` in train mode, `loss.backward()`, `torch.optim.Adam`),
in the same process, interleaved, medians over repeats. Both use every core
(onnxruntime's and torch's default thread pools). The ratio is
onnxbn steps/s over PyTorch steps/s: above 1 is faster than PyTorch eager.

Usage:
    python scripts/bench_train_step.py [--batch 32] [--steps 20] [--repeats 5]
        [--data-format channels_first]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import onnxruntime as ort  # noqa: E402

import onnxbn  # noqa: E402
from models.real_models import resnet_cnn  # noqa: E402
from onnxbn.contract import state_pairs  # noqa: E402


def onnxbn_step(model, batch: int):
    """A function running one exported train step on onnxruntime, carrying the state."""
    model.compile(optimizer=onnxbn.optimizers.Adam(learning_rate=1e-3),
                  loss="sparse_categorical_crossentropy")  # fmt: skip
    step = onnxbn.export_onnx(model, train_step=True)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    # Idle onnxruntime threads spin-wait by default and would steal the cores from PyTorch's
    # interleaved runs (measured: PyTorch 18x slower); neither library spins here.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(step.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])  # fmt: skip
    pairs = state_pairs(step.graph)
    names = [o.name for o in step.graph.output]
    state = onnxbn.initial_state(step)
    shape = (batch,) + tuple(model.inputs[0].shape[1:])
    rng = np.random.default_rng(0)
    feeds = {
        model.inputs[0].name: rng.normal(size=shape).astype(np.float32),
        "y_true": rng.integers(0, 10, batch).astype(np.int64),
    }

    def run():
        nonlocal state
        results = dict(zip(names, session.run(None, {**feeds, **state})))
        state = {i: results[o] for i, o in pairs}
        return float(results["loss"])

    return run


def torch_step(batch: int):
    """The same network and step in PyTorch eager (NCHW, its native layout)."""
    import torch
    from torch import nn

    def conv_bn(cin, cout, k, stride=1):
        return nn.Sequential(
            nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, bias=False),
            nn.BatchNorm2d(cout, momentum=0.1, eps=1e-5),
        )

    class Block(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.a, self.b = conv_bn(cin, cout, 3, stride), conv_bn(cout, cout, 3)
            self.proj = conv_bn(cin, cout, 1, stride) if stride != 1 or cin != cout else None

        def forward(self, x):
            y = self.b(torch.relu(self.a(x)))
            return torch.relu(y + (x if self.proj is None else self.proj(x)))

    net = nn.Sequential(conv_bn(3, 16, 3), nn.ReLU(), Block(16, 16, 1), Block(16, 32, 2),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))  # fmt: skip
    net.train()
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3, eps=1e-7)
    x = torch.randn(batch, 3, 16, 16)
    y = torch.randint(0, 10, (batch,))

    def run():
        optimizer.zero_grad(set_to_none=True)
        # Keras's softmax head and cross-entropy on probabilities, clipped.
        probs = torch.softmax(net(x), dim=-1).clamp(1e-7, 1 - 1e-7)
        loss = nn.functional.nll_loss(torch.log(probs), y)
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    return run, torch.__version__, torch.get_num_threads()


def timed(fn, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    return steps / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--data-format", default="channels_last",
                        choices=["channels_last", "channels_first"])  # fmt: skip
    args = parser.parse_args(argv)
    model, _ = resnet_cnn(data_format=args.data_format)
    ours = onnxbn_step(model, args.batch)
    try:
        theirs, version, threads = torch_step(args.batch)
    except ImportError:
        theirs = None
    for fn in (ours, theirs):  # warm up: allocations, thread pools
        if fn is not None:
            for _ in range(3):
                fn()
    rates: dict[str, list[float]] = {"onnxbn": [], "torch": []}
    for _ in range(args.repeats):
        rates["onnxbn"].append(timed(ours, args.steps))
        if theirs is not None:
            rates["torch"].append(timed(theirs, args.steps))
    ours_rate = statistics.median(rates["onnxbn"])
    print(f"model: resnet_cnn ({args.data_format}), batch {args.batch}, float32, Adam")
    print(f"onnxbn train step on onnxruntime {ort.__version__} CPU: {ours_rate:.1f} steps/s")
    if theirs is None:
        print("PyTorch is not installed: no comparison.")
        return 0
    torch_rate = statistics.median(rates["torch"])
    print(f"PyTorch {version} eager CPU ({threads} threads): {torch_rate:.1f} steps/s")
    print(f"ratio onnxbn / PyTorch: {ours_rate / torch_rate:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
