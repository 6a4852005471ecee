"""Second GPU step: where exactly does loading an AOTInductor package crash? Build a
constant-free CPU package (plain, and with -O0 -g), load each under cuda-gdb, and print the
native backtrace, the faulting instruction and the libraries loaded. Run by gpu_run2.sh."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_aoti_crash import HOW, LOAD, program  # noqa: E402

WORK = Path(tempfile.mkdtemp(prefix="aoti-debug-"))


def main() -> None:
    print("cxx11 abi", torch._C._GLIBCXX_USE_CXX11_ABI, "torch", torch.__version__)
    ep = program("const_free")
    script = WORK / "load.py"
    script.write_text(LOAD.format(how=HOW["aoti_load_package"]))
    for tag, configs in (("plain", {}), ("debug", {"aot_inductor.debug_compile": True})):
        path = WORK / f"{tag}.pt2"
        torch._inductor.aoti_compile_and_package(ep, package_path=str(path),
                                                 inductor_configs=configs)
        so = [n for n in zipfile.ZipFile(path).namelist() if n.endswith(".so")]
        zipfile.ZipFile(path).extractall(WORK / tag)
        for name in so:
            print(f"== {tag}: ldd {name}")
            print(subprocess.run(["ldd", str(WORK / tag / name)], capture_output=True,
                                 text=True).stdout)
        cmd = ["cuda-gdb", "-q", "-batch", "-ex", "set pagination off", "-ex", "run",
               "-ex", "bt 40", "-ex", "x/4i $pc", "-ex", "info registers rip rsp rdi rsi",
               "--args", sys.executable, str(script), str(path), "cpu", "4x8"]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=200)
        text = out.stdout + out.stderr
        lines = [ln for ln in text.splitlines() if not ln.startswith(("[New Thread",
                                                                        "[Thread"))]
        print(f"=== {tag} under cuda-gdb ===")
        print("\n".join(lines[-90:]))


if __name__ == "__main__":
    main()
