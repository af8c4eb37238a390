"""Writes the torch.onnx fixtures of the adaptation tests (`tests/fixtures/torch/`).

A small CNN (Conv-BN-ReLU twice, a residual add, global average pooling,
Linear) and an MLP (Linear-BatchNorm1d-ReLU-Linear), in eval mode with random
running statistics, exported by torch.onnx's TorchScript exporter (BN nodes
kept: no constant folding) at opsets 15 and 18, and by the dynamo exporter. torch
is not a dependency of onnxbn or its tests: run this once where torch is
installed (`pip install torch`), then commit the files.

Usage:
    python scripts/make_torch_fixtures.py [--out tests/fixtures/torch]
"""

from __future__ import annotations

import argparse
import os

import torch
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8, momentum=0.05)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        h = torch.relu(self.bn1(self.conv1(x)))
        h = torch.relu(self.bn2(self.conv2(h)) + h)
        return self.head(h.mean(dim=(2, 3)))


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(10, 16)
        self.bn = nn.BatchNorm1d(16)
        self.fc2 = nn.Linear(16, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.bn(self.fc1(x))))


def randomize(model: nn.Module) -> nn.Module:
    """Running statistics and affine parameters far from the defaults, then eval mode."""
    generator = torch.Generator().manual_seed(0)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            size = module.num_features
            module.running_mean.copy_(torch.randn(size, generator=generator))
            module.running_var.copy_(torch.rand(size, generator=generator) * 2 + 0.5)
            module.weight.data.copy_(torch.rand(size, generator=generator) + 0.5)
            module.bias.data.copy_(torch.randn(size, generator=generator))
    return model.eval()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(ROOT, "tests", "fixtures", "torch"))
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    torch.manual_seed(0)
    models = {"cnn": (randomize(SmallCNN()), torch.randn(2, 3, 8, 8)),
              "mlp": (randomize(MLP()), torch.randn(2, 10))}  # fmt: skip
    for name, (model, example) in models.items():
        for opset in (15, 18):
            path = os.path.join(args.out, f"{name}_torchscript_opset{opset}.onnx")
            torch.onnx.export(
                model, (example,), path, dynamo=False, opset_version=opset,
                training=torch.onnx.TrainingMode.EVAL, do_constant_folding=False,
                input_names=["x"], output_names=["y"],
                dynamic_axes={"x": {0: "N"}, "y": {0: "N"}},
            )  # fmt: skip
            print("wrote", path)
        path = os.path.join(args.out, f"{name}_dynamo.onnx")
        program = torch.onnx.export(
            model, (example,), dynamo=True, input_names=["x"], output_names=["y"],
            dynamic_shapes=({0: torch.export.Dim("N", min=1)},), optimize=False,
        )  # fmt: skip
        program.save(path)
        print("wrote", path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
