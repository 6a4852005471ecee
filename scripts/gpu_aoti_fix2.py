"""Fourth GPU step: is the static C++ runtime in the wrapper the compiler's default? Print the
compiler's set-up, then build the constant-free package with other compilers and with the
static copy's symbols hidden, and load each in a fresh process. Run by gpu_run4.sh."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

VARIANT = sys.argv[1] if len(sys.argv) > 1 else ""


def build_and_load(out: Path) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import torch
    from gpu_aoti_crash import load, program
    from torch._inductor import cpp_builder

    if VARIANT == "exclude_libs":
        original = cpp_builder._run_compile_cmd

        def run(cmd_line: str, cwd: str) -> None:
            original(cmd_line + (" -Wl,--exclude-libs,ALL" if " -shared" in cmd_line else ""),
                     cwd)

        cpp_builder._run_compile_cmd = run
    torch._inductor.aoti_compile_and_package(program("const_free"), package_path=str(out))
    r = load(out, "cpu", "4x8", "aoti_load_package")
    print(f"RESULT {VARIANT} CXX={os.environ.get('CXX', '-')}: ok={r['ok']} rc={r['returncode']}")


def main() -> None:
    if VARIANT:
        build_and_load(Path(tempfile.mkdtemp()) / f"fix2-{VARIANT}.pt2")
        return
    sh = ("env | grep -i -E '^(CXX|CC|LDFLAGS|CXXFLAGS|CFLAGS)=' ; file -L /usr/bin/g++; "
          "g++ -v 2>&1 | tail -2; g++ -dumpspecs | grep -B1 -A3 -E 'libstdc|static' | head -20")
    print(subprocess.run(sh, shell=True, capture_output=True, text=True).stdout)
    for variant, env in (("gxx12", {"CXX": "g++-12"}), ("clang16", {"CXX": "clang++-16"}),
                         ("exclude_libs", {})):
        proc = subprocess.run([sys.executable, __file__, variant], env={**os.environ, **env},
                              capture_output=True, text=True, timeout=120)
        lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if "RESULT" in ln]
        print(lines or (proc.stdout + proc.stderr)[-800:])


if __name__ == "__main__":
    main()
