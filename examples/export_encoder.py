"""Export a small transformer encoder block with dynamic batch and sequence dims.

Written out (projections + scaled_dot_product_attention) rather than nn.TransformerEncoderLayer:
with torch 2.11, AOTInductor fails to build the latter with both dims dynamic (a view of a
permuted tensor; see docs/gpu-runs.md).

    python examples/export_encoder.py encoder.pt2
"""

import sys

import torch
import torch.nn.functional as F


class EncoderBlock(torch.nn.Module):
    def __init__(self, dim: int = 256, heads: int = 8) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.out = torch.nn.Linear(dim, dim)
        self.norm1 = torch.nn.LayerNorm(dim)
        self.norm2 = torch.nn.LayerNorm(dim)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(dim, 4 * dim), torch.nn.GELU(),
                                       torch.nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).chunk(3, dim=-1)
        q, k, v = (t.reshape(b, s, self.heads, d // self.heads).transpose(1, 2)
                   for t in (q, k, v))
        attn = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, s, d)
        x = x + self.out(attn)
        return x + self.mlp(self.norm2(x))


def export(path: str) -> None:
    torch.manual_seed(0)
    batch = torch.export.Dim("batch", min=1, max=32)
    seq = torch.export.Dim("seq", min=4, max=256)
    program = torch.export.export(EncoderBlock().eval(), (torch.randn(4, 64, 256),),
                                  dynamic_shapes={"x": {0: batch, 1: seq}})
    torch.export.save(program, path)


if __name__ == "__main__":
    export(sys.argv[1] if len(sys.argv) > 1 else "encoder.pt2")
