"""The ONNX frontend: the program through Kiln's ONNX export, the file TensorRT's parser reads.

The export is the ``onnx`` backend's (same exporter, dim names, opset check and profile check),
so a model that exports for ``onnx`` exports here, for the same reasons when it does not.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from workers.backends.base import InputProfile
from workers.backends.onnx import OnnxBackend


def export_onnx(
    program: torch.export.ExportedProgram,
    profile: Sequence[InputProfile],
    opset: int,
    workdir: Path,
    log: Callable[[str], None],
) -> tuple[Path, dict[str, Any]]:
    """Write ``workdir/onnx/model.onnx``; return it with the export's report."""
    out = Path(workdir) / "onnx"
    out.mkdir(parents=True, exist_ok=True)
    # The device only picks the runner of the onnx backend; the file is the same for both.
    built = OnnxBackend().build(program, profile, "cpu", {"opset": opset, "optimize": True},
                                out, log)
    report = {k: built.report[k] for k in ("opset", "node_count", "size_bytes", "versions")}
    return built.artifact, report


def toolchain() -> dict[str, str]:
    """The exporter's versions: they change the graph TensorRT parses."""
    import onnx
    import onnxscript

    return {"onnx": onnx.__version__, "onnxscript": onnxscript.__version__}
