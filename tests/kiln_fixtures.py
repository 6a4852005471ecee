"""Session fixtures shared by the client, CLI and job-event tests: one module compiled through
``kiln.compile`` against the live Kiln (a real AOTInductor build, shared because it is slow)."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

import kiln
from tests.conftest import ROOT, LiveKiln

sys.path.insert(0, str(ROOT / "examples"))
from export_convnet import ConvNet  # noqa: E402

INPUT = dict(min_shape=[1, 3, 32, 32], opt_shape=[4, 3, 32, 32], max_shape=[16, 3, 32, 32],
             dtype=torch.float32)


def convnet(seed: int = 7) -> torch.nn.Module:
    torch.manual_seed(seed)
    return ConvNet().eval()


@pytest.fixture(scope="session")
def client_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("kiln-cache")


@pytest.fixture(scope="session")
def compiled_module(live: LiveKiln, client_cache: Path) -> dict[str, Any]:
    """``kiln.compile(module, inputs=[Input(...)])`` from nothing: export, upload, build."""
    events: list[dict[str, Any]] = []
    module = convnet()
    t0 = time.perf_counter()
    engine = kiln.compile(module, inputs=[kiln.Input(**INPUT)], server=live.url,
                          cache_dir=client_cache, on_event=events.append, timeout_s=900)
    return {"engine": engine, "module": module, "events": events,
            "seconds": time.perf_counter() - t0}
