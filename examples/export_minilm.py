"""Export MiniLM's architecture (all-MiniLM-L6-v2's BERT configuration) with dynamic batch and
sequence dims, on CPU, as a user would before uploading it to Kiln.

Random weights: the architecture is what the compiler sees, and it needs no download.
transformers' attention-mask code puts ``aten._assert_tensor_metadata`` nodes into the graph,
which is what made CPU-exported programs fail to build for CUDA (docs/gpu-runs.md).

    python examples/export_minilm.py minilm.pt2
"""

from __future__ import annotations

import sys

import torch

VOCAB = 30522
MINILM_L6_CONFIG: dict[str, int] = {
    "hidden_size": 384, "num_hidden_layers": 6, "num_attention_heads": 12,
    "intermediate_size": 1536, "vocab_size": VOCAB, "max_position_embeddings": 512,
    "type_vocab_size": 2,
}
MAX_BATCH, MIN_SEQ, MAX_SEQ = 32, 8, 256


class Encoder(torch.nn.Module):
    """BertModel returning the last hidden state only (one tensor output, no dataclass)."""

    def __init__(self) -> None:
        super().__init__()
        from transformers import BertConfig, BertModel

        config = BertConfig(hidden_act="gelu", **MINILM_L6_CONFIG)  # type: ignore[arg-type]
        self.bert = BertModel(config, add_pooling_layer=False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def export(path: str, seed: int = 0) -> torch.export.ExportedProgram:
    torch.manual_seed(seed)
    model = Encoder().eval()
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    seq = torch.export.Dim("seq", min=MIN_SEQ, max=MAX_SEQ)
    ids = torch.randint(0, VOCAB, (4, 64))
    mask = torch.ones(4, 64, dtype=torch.int64)
    with torch.no_grad():
        program = torch.export.export(
            model, (ids, mask),
            dynamic_shapes={"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}})
    torch.export.save(program, path)
    return program


if __name__ == "__main__":
    export(sys.argv[1] if len(sys.argv) > 1 else "minilm.pt2")
