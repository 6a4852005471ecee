"""Move an exported program to the device it is built for, with every device in it concrete.

Users export on CPU and ask for a CUDA engine, so the build child moves the program first.
``torch.export.passes.move_to_device_pass(program, "cuda")`` writes the string it is given into
the graph's device arguments ("cuda", no index) while the fake tensors it moves become
``cuda:0``. ``aten._assert_tensor_metadata`` nodes (transformers' attention-mask code adds them
with ``.to(dtype)``) compare the two with ``==``, and ``torch.device("cuda") !=
torch.device("cuda:0")``: the build failed with "Tensor device mismatch! Expected: cuda, Got:
cuda:0". Moving to an indexed device makes the arguments and the tensors say the same thing.

The build child sees one GPU (its worker is pinned with ``CUDA_VISIBLE_DEVICES``), so an
unindexed ``cuda`` means index 0.
"""

from __future__ import annotations

import torch
from torch.export import ExportedProgram


def concrete_device(device: str | torch.device) -> torch.device:
    """``cuda`` -> ``cuda:0``; devices that carry an index, and CPU, stay as they are."""
    dev = torch.device(device)
    if dev.type in ("cuda", "xpu", "mps") and dev.index is None:
        return torch.device(dev.type, 0)
    return dev


def pin_graph_devices(program: ExportedProgram, device: torch.device) -> int:
    """Rewrite every device argument in the program's graphs (kwargs ``device=`` and
    ``aten.to.device``'s positional device) to ``device``, as a ``torch.device``.

    Returns how many arguments were rewritten. Only the graph is touched, so this runs on a
    host without the target device (tests do exactly that).
    """
    rewritten = 0
    for module in program.graph_module.modules():
        if not isinstance(module, torch.fx.GraphModule):
            continue
        for node in module.graph.nodes:
            if node.op != "call_function":
                continue
            if node.kwargs.get("device") is not None:
                node.kwargs = {**node.kwargs, "device": device}
                rewritten += 1
            if node.target is torch.ops.aten.to.device and len(node.args) > 1:
                node.args = (node.args[0], device, *node.args[2:])
                rewritten += 1
        module.recompile()
    return rewritten


def move_to_device_pass(program: ExportedProgram, device: str | torch.device) -> ExportedProgram:
    """Drop-in for torch's ``move_to_device_pass`` that leaves no unindexed device behind."""
    from torch.export.passes import move_to_device_pass as torch_move

    target = concrete_device(device)
    if target.type == "cpu" and all(
            t.device.type == "cpu" for t in program.state_dict.values()
            if isinstance(t, torch.Tensor)):
        return program  # already there: nothing to move, nothing to rewrite
    program = torch_move(program, str(target))
    pin_graph_devices(program, target)
    return program
