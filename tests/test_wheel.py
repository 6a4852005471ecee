"""The package as users install it: a wheel in a fresh virtual environment, without torch.

An editable install (what `make` uses) reads templates and migrations from the checkout, so it
hides a wheel that lacks them. This builds the wheel from the working tree, installs it
non-editable into a venv that sees no other site-packages, and runs the API host's commands
from there, away from the checkout.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from tests.conftest import ROOT

ADMIN_KEY = "wheel-admin-key"
# Installing from the local package index takes about a minute here; past this the test
# fails, so a change that drags a large dependency into the base install is noticed.
INSTALL_BUDGET_S = 120.0


@dataclass
class InstalledKiln:
    wheel: Path
    venv: Path
    install_s: float
    env: dict[str, str]

    def bin(self, name: str) -> str:
        return str(self.venv / "bin" / name)


def _clean_env(data_dir: Path) -> dict[str, str]:
    # No PYTHONPATH and no KILN_* from the caller: the venv must find everything by itself.
    env = {k: v for k, v in os.environ.items()
           if k != "PYTHONPATH" and not k.startswith("KILN_") and k != "VIRTUAL_ENV"}
    env.update(KILN_DATA_DIR=str(data_dir), KILN_API_KEYS=f"{ADMIN_KEY}:root:admin",
               PYTHONUNBUFFERED="1")
    return env


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InstalledKiln]:
    base = tmp_path_factory.mktemp("wheel")
    # Build from a copy of the working tree: an in-tree build leaves build/ and egg-info behind.
    src = base / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".kiln", ".*_cache",
        ".hypothesis", "bench"))
    dist = base / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(dist), str(src)], check=True, cwd=base)
    (wheel,) = dist.glob("kiln-*.whl")
    venv = base / "venv"
    env = _clean_env(base / "data")
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, env=env)
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", str(wheel)], check=True,
                   env=env, cwd=base)
    yield InstalledKiln(wheel, venv, time.perf_counter() - t0, env)


def test_wheel_carries_every_module_template_and_migration(installed: InstalledKiln) -> None:
    names = set(zipfile.ZipFile(installed.wheel).namelist())
    expected = {p.relative_to(ROOT).as_posix() for top in ("service", "workers")
                for p in (ROOT / top).rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    expected |= {f"service/{p.relative_to(ROOT).as_posix()}"
                 for p in (ROOT / "migrations").rglob("*")
                 if p.is_file() and "__pycache__" not in p.parts}
    missing = sorted(expected - names)
    assert not missing, f"the wheel lacks {missing}: add the package to pyproject.toml"
    assert any(re.search(r"templates/dashboard/overview\.html$", n) for n in names)
    assert "service/migrations/env.py" in names


def test_installed_api_host_runs_without_torch(installed: InstalledKiln) -> None:
    assert installed.install_s < INSTALL_BUDGET_S, f"install took {installed.install_s:.0f} s"
    no_torch = subprocess.run([installed.bin("python"), "-c", "import torch"],
                              capture_output=True, text=True, env=installed.env,
                              cwd=installed.venv)
    assert no_torch.returncode != 0 and "No module named 'torch'" in no_torch.stderr
    upgraded = subprocess.run([installed.bin("kiln"), "db", "upgrade"], capture_output=True,
                              text=True, env=installed.env, cwd=installed.venv)
    assert upgraded.returncode == 0, upgraded.stderr[-3000:]
    assert "schema at head" in upgraded.stdout

    proc = subprocess.Popen([installed.bin("kiln"), "serve", "--no-worker", "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=installed.env, cwd=installed.venv)
    try:
        url, seen = None, []
        deadline = time.monotonic() + 60
        while url is None and time.monotonic() < deadline:
            line = proc.stdout.readline() if proc.stdout else ""
            assert line or proc.poll() is None, f"kiln serve exited: {''.join(seen)[-3000:]}"
            seen.append(line)
            match = re.search(r"serving on (http://\S+)", line)
            url = match.group(1) if match else None
        assert url, "kiln serve printed no URL"
        assert requests.get(f"{url}/healthz", timeout=10).json() == {"status": "ok"}
        assert requests.get(f"{url}/admin/", timeout=10).status_code == 401  # sign-in page
        admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
        page = requests.get(f"{url}/admin/", headers=admin, timeout=10)
        assert page.status_code == 200, page.text[:2000]
        assert "<html" in page.text.lower()
        css = requests.get(f"{url}/admin/static/kiln.css", timeout=10)
        assert css.status_code == 200 and len(css.content) > 100
    finally:
        proc.terminate()
        proc.wait(timeout=30)
