"""Weight-swap reuse: a model with the architecture of a stored swappable engine but other
weights gets its engine without compiling, validated against its own program."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from kiln import load as load_engine
from tests.conftest import ROOT, LiveKiln

PROFILE = [{"name": "x", "min": [1, 3, 32, 32], "opt": [4, 3, 32, 32], "max": [16, 3, 32, 32]}]
OPTIONS = {"swappable_weights": True}


def test_other_weights_reuse_the_compiled_code(live: LiveKiln, tmp_path: Path) -> None:
    sys.path.insert(0, str(ROOT / "examples"))
    from export_convnet import export

    export(str(tmp_path / "a.pt2"), seed=0)
    export(str(tmp_path / "b.pt2"), seed=7)
    kiln = live.client
    first = kiln.upload(tmp_path / "a.pt2")
    second = kiln.upload(tmp_path / "b.pt2")
    assert first["graph_hash"] == second["graph_hash"]
    assert first["weights_hash"] != second["weights_hash"]

    base = kiln.wait(kiln.submit(first["id"], inputs=PROFILE, options=OPTIONS), timeout_s=900)
    assert base["build_report"]["artifact_suffix"] == ".zip"

    submitted = kiln.submit(second["id"], inputs=PROFILE, options=OPTIONS)
    assert submitted["swap_from_engine_id"] == base["id"]
    assert "reusing the compiled code" in submitted["reason"]
    swapped = kiln.wait(submitted, timeout_s=600)
    report = swapped["build_report"]
    assert report["weight_swap"] is True and report["swap_from_engine_id"] == base["id"]
    assert report["compile_seconds_saved"] > 0
    print(f"weight swap: base build {base['build_seconds']:.1f} s, swap "
          f"{swapped['build_seconds']:.2f} s, saved {report['compile_seconds_saved']:.1f} s")
    assert swapped["validation"]["passed"] is True
    assert swapped["sha256"] != base["sha256"]

    path = kiln.download(swapped["id"], tmp_path / "swapped.zip")
    run = load_engine(path, profile=swapped["inputs"])
    eager = torch.export.load(tmp_path / "b.pt2").module()
    other = torch.export.load(tmp_path / "a.pt2").module()
    x = torch.randn(3, 3, 32, 32)
    torch.testing.assert_close(run(x), eager(x), rtol=1e-3, atol=1e-3)
    assert not torch.allclose(run(x), other(x), atol=1e-3), "the new weights are in use"
    with pytest.raises(ValueError, match="dim 0 of input 'x' is 17, outside the engine's range"):
        run(torch.randn(17, 3, 32, 32))
