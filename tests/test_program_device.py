"""A program exported on CPU is rewritten for CUDA with concrete devices only.

The GPU failure ("Tensor device mismatch! Expected: cuda, Got: cuda:0" at an
``aten._assert_tensor_metadata`` node) came from the graph saying ``cuda`` while its fake
tensors said ``cuda:0``. There is no GPU here, so this checks the graph side: after Kiln's
rewrite every device argument of a CPU-exported program with such nodes names ``cuda:0``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from workers.program_device import concrete_device, move_to_device_pass, pin_graph_devices

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


class MaskedScores(torch.nn.Module):
    """The transformers pattern: an int mask cast with ``.to(dtype)`` plus an ``arange`` on
    the input's device. Export puts ``_assert_tensor_metadata(..., device=cpu)`` nodes in."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(x.shape[1], device=x.device).to(x.dtype)
        bias = (1.0 - mask.to(x.dtype)) * torch.finfo(x.dtype).min
        return self.proj(x) + bias.unsqueeze(-1) + positions.unsqueeze(-1)


def _export() -> torch.export.ExportedProgram:
    seq = torch.export.Dim("seq", min=2, max=64)
    return torch.export.export(
        MaskedScores().eval(), (torch.randn(2, 5, 8), torch.ones(2, 5, dtype=torch.int64)),
        dynamic_shapes={"x": {1: seq}, "mask": {1: seq}})


def _device_args(program: torch.export.ExportedProgram) -> list[tuple[str, object]]:
    found = []
    for node in program.graph.nodes:
        if node.op == "call_function" and "device" in node.kwargs:
            found.append((str(node.target), node.kwargs["device"]))
        if node.target is torch.ops.aten.to.device:
            found.append((str(node.target), node.args[1]))
    return found


def test_unindexed_cuda_becomes_cuda_0_other_devices_stay() -> None:
    assert concrete_device("cuda") == torch.device("cuda", 0)
    assert concrete_device("cuda:1") == torch.device("cuda", 1)
    assert concrete_device("cpu") == torch.device("cpu")
    # The cause, in one line: the graph's "cuda" never equals a tensor's "cuda:0".
    assert torch.device("cuda") != torch.device("cuda:0")


def test_cpu_exported_assertion_nodes_name_cuda_0_after_the_rewrite() -> None:
    program = _export()
    before = _device_args(program)
    asserts = [d for t, d in before if "_assert_tensor_metadata" in t]
    assert asserts and all(torch.device(str(d)) == torch.device("cpu") for d in asserts)

    rewritten = pin_graph_devices(program, concrete_device("cuda"))

    after = _device_args(program)
    assert rewritten == len(before) == len(after)
    assert {t for t, _ in after} >= {"aten._assert_tensor_metadata.default",
                                     "aten.arange.start" if any(
                                         "arange.start" in t for t, _ in before)
                                     else "aten.arange.default"}
    for target, device in after:
        assert isinstance(device, torch.device), target
        assert device == torch.device("cuda", 0), (target, device)
    # The generated code says so too: nothing left that a CPU or unindexed device would hit.
    code = program.graph_module.code
    assert "device(type='cuda', index=0)" in code and "'cpu'" not in code


def test_rewritten_program_still_runs_and_agrees_on_its_own_device() -> None:
    program = _export()
    x, mask = torch.randn(2, 7, 8), torch.ones(2, 7, dtype=torch.int64)
    mask[:, -2:] = 0
    want = program.module()(x, mask)
    pin_graph_devices(program, concrete_device("cpu"))
    moved = move_to_device_pass(program, "cpu")
    torch.testing.assert_close(moved.module()(x, mask), want)


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                    reason="needs transformers")
def test_minilm_architecture_exported_on_cpu_is_rewritten_for_cuda(tmp_path: Path) -> None:
    import sys

    sys.path.insert(0, str(EXAMPLES))
    try:
        from export_minilm import export
    finally:
        sys.path.remove(str(EXAMPLES))
    program = export(str(tmp_path / "minilm.pt2"))
    asserts = [n for n in program.graph.nodes
               if n.target is torch.ops.aten._assert_tensor_metadata.default]
    assert asserts, "transformers' mask code no longer adds assertion nodes"
    pin_graph_devices(program, concrete_device("cuda"))
    assert all(n.kwargs["device"] == torch.device("cuda", 0) for n in asserts)
    assert {d for _, d in _device_args(program)} == {torch.device("cuda", 0)}
