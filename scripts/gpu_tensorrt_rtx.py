"""On a GPU host: build the convnet with Kiln's tensorrt-rtx backend, try to run it, and print
what Kiln records for it.

    PYTHONPATH=. python3 scripts/gpu_tensorrt_rtx.py [--out DIR]

The build goes through the backend exactly as the build child does (the program moved to the
GPU, the backend's options normalised by service.targets). Then, as the child decides: if the
backend says this GPU cannot run the plan, Kiln records validation ``not_run`` with that reason
(on an H200: "compute capability 9.0 not supported by TensorRT-RTX ..."); otherwise the plan is
validated at min/opt/max against eager. Either way the script also asks TensorRT-RTX itself
(``Runtime.get_engine_validity`` and ``deserialize_cuda_engine``) so the record can be compared
with what the library says. ``run()`` returns the same dict for other scripts to call.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "examples")]

PROFILE = [{"name": "x", "dtype": "float32", "min": [1, 3, 32, 32], "opt": [4, 3, 32, 32],
            "max": [16, 3, 32, 32]}]


def _library_says(plan: bytes) -> dict[str, Any]:
    """What TensorRT-RTX itself answers when asked to load the plan on this GPU."""
    import tensorrt_rtx as trt

    messages: list[str] = []

    class Logger(trt.ILogger):  # type: ignore[misc]
        def __init__(self) -> None:
            trt.ILogger.__init__(self)

        def log(self, severity: Any, msg: str) -> None:
            if severity <= trt.ILogger.Severity.WARNING:
                messages.append(msg)

    runtime = trt.Runtime(Logger())
    validity, diagnostics = runtime.get_engine_validity(plan)
    engine = runtime.deserialize_cuda_engine(plan)
    return {"get_engine_validity": [validity.name, int(diagnostics)],
            "deserialized": engine is not None, "log": messages[-5:]}


def run() -> dict[str, Any]:
    import torch
    from export_convnet import ConvNet
    from torch.export.passes import move_to_device_pass

    from service.targets import normalize_options
    from workers.backends.base import AheadOfTimeBuilder, InputProfile
    from workers.backends.tensorrt import TensorRTRtxBackend
    from workers.validation import validate_and_time

    out: dict[str, Any] = {"gpu": torch.cuda.get_device_name() if torch.cuda.is_available()
                           else None, "torch": torch.__version__}
    backend = TensorRTRtxBackend()
    out["unavailable"] = backend.unavailable_reason()
    if out["unavailable"]:
        return out
    out["toolchain"] = backend.toolchain("cuda")
    out["runs_here"] = backend.run_capability()  # None, or why not
    torch.manual_seed(0)
    program = torch.export.export(ConvNet().eval(), (torch.randn(4, 3, 32, 32),),
                                  dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1,
                                                                            max=64)}})
    if torch.cuda.is_available():  # as the build child does
        program = move_to_device_pass(program, "cuda")
    profile = [InputProfile(p["name"], p["dtype"], tuple(p["min"]), tuple(p["opt"]),
                            tuple(p["max"])) for p in PROFILE]
    options = normalize_options("tensorrt-rtx", "cuda", {})
    log: list[str] = []
    with tempfile.TemporaryDirectory() as workdir:
        t0 = time.perf_counter()
        built = backend.build(program, profile, "cuda", options, Path(workdir), log.append)
        out["build_s"] = round(time.perf_counter() - t0, 3)
        out["plan_bytes"] = built.artifact.stat().st_size
        out["plan_profile"] = built.report["plan"]["inputs"]
        assert isinstance(backend, AheadOfTimeBuilder)
        reason = backend.cannot_run_reason(built, "cuda")
        if reason:
            out["kiln_records"] = {"validation_status": "not_run", "validation_reason": reason}
        else:
            try:
                runner = backend.load(built.artifact, "cuda", profile)
                validation, benchmark = validate_and_time(program.module(), runner, profile,
                                                          "cuda", seed=0)
                out["kiln_records"] = {"validation_status": "passed" if validation["passed"]
                                       else "failed", "validation": validation,
                                       "benchmark": benchmark}
            except Exception as exc:
                out["kiln_records"] = {"error": f"{type(exc).__name__}: {exc}"}
        try:
            out["library_says"] = _library_says(built.artifact.read_bytes())
        except Exception as exc:
            out["library_says"] = {"error": f"{type(exc).__name__}: {exc}"}
    out["build_log_tail"] = log[-8:]
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=os.environ.get("OUT"), help="write the JSON here too")
    args = parser.parse_args()
    try:
        result = run()
    except Exception:
        result = {"error": traceback.format_exc()}
    text = json.dumps(result, indent=1, default=str)
    print(text)
    if args.out:
        Path(args.out, "gpu_tensorrt_rtx.json").write_text(text)


if __name__ == "__main__":
    main()
