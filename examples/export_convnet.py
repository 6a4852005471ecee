"""Export a small conv net with a dynamic batch dim: the program the README compiles.

    python examples/export_convnet.py convnet.pt2
"""

import sys

import torch


class ConvNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(),
            torch.nn.Conv2d(16, 32, 3, stride=2, padding=1), torch.nn.ReLU(),
        )
        self.head = torch.nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


def export(path: str, seed: int = 0) -> None:
    """Same architecture for every seed; the seed picks the weights."""
    torch.manual_seed(seed)
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.export.export(ConvNet().eval(), (torch.randn(4, 3, 32, 32),),
                                  dynamic_shapes={"x": {0: batch}})
    torch.export.save(program, path)


if __name__ == "__main__":
    export(sys.argv[1] if len(sys.argv) > 1 else "convnet.pt2")
    print(f"wrote {sys.argv[1] if len(sys.argv) > 1 else 'convnet.pt2'}")
