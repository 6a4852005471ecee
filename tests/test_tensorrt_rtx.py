"""A TensorRT-RTX engine built by Kiln end to end on this CPU-only machine, honest about it.

Upload, submit ``backend=tensorrt-rtx``, a real worker builds the plan in CPU-only mode, stores
it with validation ``not_run`` and the reason, and the download is the plan. A dtype TensorRT
cannot take is refused at submit.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import requests
import torch

from kiln.client import KilnAPIError
from service.db import Database
from service.models import Engine
from tests.conftest import make_settings, running_kiln

pytestmark = pytest.mark.skipif(importlib.util.find_spec("tensorrt_rtx") is None,
                                reason="tensorrt_rtx is not installed (the [tensorrt-rtx] extra)")

PROFILE = [{"name": "x", "min": [1, 3, 32, 32], "opt": [4, 3, 32, 32], "max": [16, 3, 32, 32]}]


class Double(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only worker's answer")
def test_tensorrt_rtx_engine_through_kiln_is_stored_not_run(tmp_path: Path,
                                                            programs: dict[str, Path]) -> None:
    settings = make_settings(tmp_path / "kiln", sweep_interval_s=2)
    with running_kiln(settings, tmp_path, "--backends", "tensorrt-rtx") as live:
        (worker,) = requests.get(f"{live.url}/api/v1/workers", timeout=10).json()["workers"]
        (target,) = worker["targets"]
        assert (target["backend"], target["builds"], target["runs"]) == (
            "tensorrt-rtx", True, False)
        assert target["runs_reason"].startswith("no CUDA GPU on this worker")

        model = live.client.upload(programs["convnet"])
        submitted = live.client.submit(model["id"], backend="tensorrt-rtx", device="cuda",
                                       inputs=PROFILE)
        engine = live.client.wait(submitted, timeout_s=600)
        assert engine["target"]["backend"] == "tensorrt-rtx"
        assert "tensorrt_rtx=1.7.1" in engine["target"]["toolchain"]
        assert engine["validation"]["status"] == "not_run"
        assert engine["validation"]["reason"].startswith(
            "no CUDA GPU on this worker: TensorRT-RTX 1.7.1")
        assert engine["validation"]["checked_without_running"]
        assert engine["build_report"]["plan"]["inputs"][0]["profile"] == {
            k: PROFILE[0][k] for k in ("min", "opt", "max")}
        db = Database(settings.database_url)
        try:
            with db.session() as s:
                row = s.get(Engine, engine["id"])
                assert row is not None and row.validation_status == "not_run"
                assert row.validation_reason == engine["validation"]["reason"]
        finally:
            db.dispose()
        plan = requests.get(f"{live.url}/api/v1/engines/{engine['id']}/artifact", timeout=30)
        assert plan.status_code == 200 and plan.content[:4] == b"vtrt"

        program = torch.export.export(Double(), (torch.randn(2, 3, dtype=torch.float64),))
        torch.export.save(program, tmp_path / "double.pt2")
        doubled = live.client.upload(tmp_path / "double.pt2")
        with pytest.raises(KilnAPIError) as err:
            live.client.submit(doubled["id"], backend="tensorrt-rtx", device="cuda")
        assert (err.value.status, err.value.code) == (422, "unsupported_dtype")
        assert "input 'x' is float64" in err.value.message
        with pytest.raises(KilnAPIError) as err:
            live.client.submit(model["id"], backend="tensorrt-rtx", device="cuda",
                               inputs=PROFILE, options={"hardware_compatible": True})
        assert err.value.code == "invalid_options"
        assert "'hardware_compatible' is a standard TensorRT option" in err.value.message
