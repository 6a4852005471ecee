"""The programs the suite uploads and builds, exported with ``torch.export`` in a child process
(``python -m bench.programs OUT_DIR NAME...``) so the suite's own process never loads torch.

- ``convnet``: a small ResNet-style convnet on 32x32 images, dynamic batch 1..32 (the "small"
  build).
- ``encoder``: a transformer encoder over token ids, dynamic batch 1..32 and sequence 2..128
  (the "larger" build).
- ``tiny``: one linear layer, dynamic batch (single flight: a build that only starts).
- ``big-<MB>``: a valid program whose weights take about MB megabytes (10^6 bytes), for uploads.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch


class Block(torch.nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(cout)
        self.conv2 = torch.nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = torch.nn.BatchNorm2d(cout)
        self.skip = (torch.nn.Identity() if stride == 1 and cin == cout else torch.nn.Sequential(
            torch.nn.Conv2d(cin, cout, 1, stride=stride, bias=False), torch.nn.BatchNorm2d(cout)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.skip(x))


class ConvNet(torch.nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1, bias=False),
                                        torch.nn.BatchNorm2d(16), torch.nn.ReLU())
        self.blocks = torch.nn.Sequential(Block(16, 16, 1), Block(16, 32, 2), Block(32, 64, 2))
        self.head = torch.nn.Linear(64, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)).mean(dim=(2, 3)))


class Encoder(torch.nn.Module):
    def __init__(self, vocab: int = 1000, d: int = 128, heads: int = 4, layers: int = 2) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, d)
        layer = torch.nn.TransformerEncoderLayer(d, heads, dim_feedforward=4 * d, dropout=0.0,
                                                 batch_first=True)
        self.encoder = torch.nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = torch.nn.Linear(d, 2)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(tokens)).mean(dim=1))


class Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.proj(x))


class BigWeights(torch.nn.Module):
    """One large weight tensor and a tiny graph: the upload is almost all weight bytes."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.empty(n).uniform_(-1, 1), requires_grad=False)
        self.proj = torch.nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x) * self.w[:8]


def export(name: str, path: Path) -> dict[str, object]:
    torch.manual_seed(0)
    t0 = time.perf_counter()
    if name == "convnet":
        batch = torch.export.Dim("batch", min=1, max=32)
        program = torch.export.export(ConvNet().eval(), (torch.randn(4, 3, 32, 32),),
                                      dynamic_shapes={"x": {0: batch}})
    elif name == "encoder":
        batch = torch.export.Dim("batch", min=1, max=32)
        seq = torch.export.Dim("seq", min=2, max=128)
        program = torch.export.export(Encoder().eval(), (torch.randint(0, 1000, (4, 16)),),
                                      dynamic_shapes={"tokens": {0: batch, 1: seq}})
    elif name == "tiny":
        batch = torch.export.Dim("batch", min=1, max=64)
        program = torch.export.export(Tiny().eval(), (torch.randn(4, 16),),
                                      dynamic_shapes={"x": {0: batch}})
    elif name.startswith("big-"):
        megabytes = int(name.removeprefix("big-"))
        module = BigWeights(megabytes * 1_000_000 // 4).eval()
        program = torch.export.export(module, (torch.randn(2, 8),))
    else:
        raise SystemExit(f"unknown program {name!r}")
    torch.export.save(program, path)
    return {"name": name, "path": str(path), "size": path.stat().st_size,
            "export_s": round(time.perf_counter() - t0, 2)}


def main() -> None:
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    done = [export(name, out / f"{name}.pt2") for name in sys.argv[2:]]
    print(json.dumps(done))


if __name__ == "__main__":
    main()
