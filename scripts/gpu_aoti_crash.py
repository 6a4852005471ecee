"""Why does loading an AOTInductor package crash on the GPU hosts? Build small packages, load
each in a fresh process, and report how each load ended, with a native backtrace of the
first crash (cuda-gdb, which also debugs host-only programs). Run by scripts/gpu_run.sh."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

WORK = Path(os.environ.get("KILN_GPU_WORK", tempfile.mkdtemp(prefix="aoti-crash-")))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))


class ConstFree(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2 + 1


def program(name: str) -> torch.export.ExportedProgram:
    batch = torch.export.Dim("batch", min=1, max=64)
    if name == "const_free":
        return torch.export.export(ConstFree(), (torch.randn(4, 8),),
                                   dynamic_shapes={"x": {0: batch}})
    from export_convnet import ConvNet

    return torch.export.export(ConvNet().eval(), (torch.randn(4, 3, 32, 32),),
                               dynamic_shapes={"x": {0: batch}})


def build(name: str, device: str, configs: dict) -> tuple[Path, float]:
    ep = program(name)
    if device == "cuda":
        from torch.export.passes import move_to_device_pass

        ep = move_to_device_pass(ep, "cuda")
    tag = "-".join([name, device, *(f"{k.split('.')[-1]}" for k in configs)])
    out = WORK / f"{tag}.pt2"
    t0 = time.perf_counter()
    torch._inductor.aoti_compile_and_package(ep, package_path=str(out), inductor_configs=configs)
    return out, time.perf_counter() - t0


LOAD = """
import sys, torch
path, device, shape = sys.argv[1], sys.argv[2], [int(d) for d in sys.argv[3].split('x')]
{how}
x = torch.randn(*shape, device=device)
out = m(x)
torch.cuda.synchronize() if device == 'cuda' else None
print('LOADED-OK', tuple(out.shape) if hasattr(out, 'shape') else type(out))
"""
HOW = {
    "aoti_load_package": "m = torch._inductor.aoti_load_package(path)",
    "PackageLoader": "loader = torch._C._aoti.AOTIModelPackageLoader(path, 'model', False, 1, -1)\n"
                     "m = lambda x: loader.run([x])[0]",
}


def load(path: Path, device: str, shape: str, how: str, env: dict | None = None,
         debugger: bool = False) -> dict:
    script = WORK / f"load_{how}.py"
    script.write_text(LOAD.format(how=HOW[how]))
    cmd = [sys.executable, "-X", "faulthandler", str(script), str(path), device, shape]
    if debugger and shutil.which("cuda-gdb"):
        cmd = ["cuda-gdb", "-q", "-batch", "-ex", "run", "-ex", "bt 30", "-ex",
               "info sharedlibrary", "--args", *cmd]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240,
                          env={**os.environ, **(env or {})})
    ok = "LOADED-OK" in proc.stdout
    tail = (proc.stdout + proc.stderr)[-6000 if debugger else -1500:]
    return {"ok": ok, "returncode": proc.returncode, "tail": tail}


def main() -> None:
    print(f"torch {torch.__version__} cuda {torch.version.cuda} "
          f"gpu {torch.cuda.get_device_name() if torch.cuda.is_available() else None}")
    cases = [("const_free", "cpu", {}), ("const_free", "cuda", {}), ("convnet", "cpu", {}),
             ("convnet", "cuda", {}),
             ("convnet", "cpu", {"aot_inductor.package_constants_in_so": False})]
    rows, first_crash = [], None
    for name, device, configs in cases:
        if device == "cuda" and not torch.cuda.is_available():
            continue
        try:
            path, seconds = build(name, device, configs)
        except Exception as exc:  # a build failure is a result too
            rows.append({"case": f"{name}/{device}/{configs}", "build": f"FAILED {exc!r}"[:300]})
            continue
        shape = "4x8" if name == "const_free" else "4x3x32x32"
        for how in HOW:
            r = load(path, device, shape, how)
            rows.append({"case": f"{name}/{device}/{list(configs) or 'default'}", "how": how,
                         "build_s": round(seconds, 1), "load_ok": r["ok"],
                         "returncode": r["returncode"]})
            if not r["ok"]:
                print(f"--- {name}/{device} {how} failed (rc {r['returncode']}):\n{r['tail']}")
                first_crash = first_crash or (path, device, shape, how)
        if device == "cpu" and name == "convnet":
            r = load(path, device, shape, "aoti_load_package", env={"TMPDIR": str(WORK)})
            rows.append({"case": f"{name}/{device} TMPDIR=workdir", "how": "aoti_load_package",
                         "load_ok": r["ok"], "returncode": r["returncode"]})
    for row in rows:
        print(json.dumps(row))
    if first_crash:
        path, device, shape, how = first_crash
        r = load(path, device, shape, how, debugger=True)
        print("=== native backtrace of the first failing load ===")
        print(r["tail"])


if __name__ == "__main__":
    main()
