"""Third GPU step: why the AOTInductor wrapper carries its own libstdc++, and whether linking
the C++ runtime dynamically (workers.backends.aoti.dynamic_cxx_runtime) or hiding the static
copy's symbols stops the load crash. Run by gpu_run3.sh."""

from __future__ import annotations

import glob
import shlex
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch
from torch._inductor import cpp_builder

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
from gpu_aoti_crash import load, program  # noqa: E402

from workers.backends.aoti import dynamic_cxx_runtime  # noqa: E402

WORK = Path(tempfile.mkdtemp(prefix="aoti-fix-"))
COMMANDS: list[str] = []
ORIGINAL = cpp_builder._run_compile_cmd


def recording(cmd_line: str, cwd: str) -> None:
    COMMANDS.append(cmd_line)
    ORIGINAL(cmd_line, cwd)


def exclude_libs(cmd_line: str, cwd: str) -> None:
    if " -shared" in cmd_line:
        cmd_line += " -Wl,--exclude-libs,ALL"
    ORIGINAL(cmd_line, cwd)


def build(tag: str, device: str = "cpu") -> Path:
    ep = program("const_free")
    if device == "cuda":
        from torch.export.passes import move_to_device_pass

        ep = move_to_device_pass(ep, "cuda")
    path = WORK / f"{tag}-{device}.pt2"
    torch._inductor.aoti_compile_and_package(ep, package_path=str(path))
    return path


def needed(path: Path) -> str:
    out = WORK / path.stem
    zipfile.ZipFile(path).extractall(out)
    so = glob.glob(f"{out}/**/*.so", recursive=True)
    return subprocess.run(["ldd", so[0]], capture_output=True, text=True).stdout if so else "-"


def main() -> None:
    print("compilers:", glob.glob("/usr/bin/g++*") + glob.glob("/usr/bin/clang++*"))
    maps = Path("/proc/self/maps").read_text()
    print("process libstdc++:", sorted({ln.split()[-1] for ln in maps.splitlines()
                                        if "libstdc++" in ln}))
    print("g++ libstdc++.a:", subprocess.run(["g++", "-print-file-name=libstdc++.a"],
                                             capture_output=True, text=True).stdout.strip())
    cpp_builder._run_compile_cmd = recording
    plain = build("plain")
    cpp_builder._run_compile_cmd = ORIGINAL
    for cmd in COMMANDS:
        flags = [t for t in shlex.split(cmd) if "static" in t or t.startswith(("-l", "-Wl"))]
        print("compile cmd link-related flags:", flags)
    print("plain ldd:", needed(plain))
    results = {"plain": load(plain, "cpu", "4x8", "aoti_load_package")}
    removed: list[str] = []
    with dynamic_cxx_runtime(removed):
        dyn = build("dynamic")
    print("dynamic_cxx_runtime removed:", removed, "ldd:", needed(dyn))
    results["dynamic_cxx_runtime"] = load(dyn, "cpu", "4x8", "aoti_load_package")
    cpp_builder._run_compile_cmd = exclude_libs
    excl = build("exclude")
    cpp_builder._run_compile_cmd = ORIGINAL
    results["exclude_libs"] = load(excl, "cpu", "4x8", "aoti_load_package")
    if torch.cuda.is_available():
        with dynamic_cxx_runtime([]):
            results["dynamic_cxx_runtime_cuda"] = load(build("dynamic", "cuda"), "cuda", "4x8",
                                                       "aoti_load_package")
    for name, r in results.items():
        print(f"RESULT {name}: ok={r['ok']} rc={r['returncode']}")
        if not r["ok"]:
            print(r["tail"][-600:])


if __name__ == "__main__":
    main()
