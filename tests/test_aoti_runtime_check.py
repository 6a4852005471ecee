"""The AOTInductor build refuses a package whose wrapper carries its own libstdc++: loading one
crashed every process on the GPU hosts (docs/gpu-runs.md). Built with the real g++ here."""

from __future__ import annotations

import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest

from service.errors import KilnError
from workers.backends.aoti import check_cxx_runtime

SOURCE = '#include <regex>\nextern "C" int f() { return std::regex("(cpu|cuda)").mark_count(); }\n'


def _package(tmp_path: Path, *flags: str) -> Path:
    src = tmp_path / "w.cpp"
    src.write_text(SOURCE)
    so = tmp_path / "model.wrapper.so"
    subprocess.run(["g++", "-shared", "-fPIC", "-O1", str(src), "-o", str(so), *flags],
                   check=True)
    pkg = tmp_path / "engine.pt2"
    with zipfile.ZipFile(pkg, "w") as zf:
        zf.write(so, "engine/data/aotinductor/model/model.wrapper.so")
    return pkg


@pytest.mark.skipif(not shutil.which("g++") or not shutil.which("readelf"),
                    reason="needs g++ and readelf")
def test_static_cxx_runtime_is_refused_dynamic_is_accepted(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    ok = check_cxx_runtime(_package(tmp_path / "a"), tmp_path / "a")
    assert any("libstdc++" in n for n in ok["model.wrapper.so"])
    with pytest.raises(KilnError) as err:
        check_cxx_runtime(_package(tmp_path / "b", "-static-libstdc++"), tmp_path / "b")
    assert err.value.code == "aoti_static_cxx_runtime"
    assert "KILN_AOTI_CXX" in err.value.message
