"""Load a downloaded AOTInductor engine, and keep calls inside the engine's shape profile.

For clients (and the build child's validation): needs torch, imported here lazily so the API
host never loads it. AOTInductor packages do not check their shape range themselves (a batch
outside it ran without error in our tests), so the wrapper returned here does.

    from service.engine_loader import load_engine
    engine = kiln.engine(engine_id)                      # the metadata, with its profile
    run = load_engine("model.pt2", profile=engine["inputs"])
    outputs = run(x)
"""

from __future__ import annotations

import json
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

SWAPPABLE_FORMAT = "kiln-aoti-swappable/1"


def is_swappable(path: str | Path) -> bool:
    """True for the zip of a package and its weights (built with ``swappable_weights``)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        if "kiln.json" not in zf.namelist():
            return False
        return json.loads(zf.read("kiln.json")).get("format") == SWAPPABLE_FORMAT


def _load_aoti(path: Path) -> Any:
    import torch

    if not is_swappable(path):
        return torch._inductor.aoti_load_package(str(path))
    workdir = Path(tempfile.mkdtemp(prefix="kiln-engine-"))
    with zipfile.ZipFile(path) as zf:
        zf.extract("package.pt2", workdir)
        zf.extract("weights.pt", workdir)
    compiled = torch._inductor.aoti_load_package(str(workdir / "package.pt2"))
    weights = torch.load(workdir / "weights.pt", weights_only=True)
    needed = compiled.get_constant_fqns()
    missing = [n for n in needed if n not in weights]
    if missing:
        raise ValueError(f"engine weights lack {missing[:5]}")
    compiled.load_constants({n: weights[n] for n in needed}, check_full_update=True)
    return compiled


def check_shapes(profile: Sequence[dict[str, Any]], inputs: Sequence[Any]) -> None:
    """Raise ValueError when an input lies outside the engine's [min, max] profile."""
    if len(inputs) != len(profile):
        raise ValueError(f"the engine takes {len(profile)} inputs, got {len(inputs)}")
    for spec, x in zip(profile, inputs):
        shape = list(x.shape)
        if len(shape) != len(spec["min"]) or any(
                not lo <= d <= hi for d, lo, hi in zip(shape, spec["min"], spec["max"])):
            raise ValueError(f"input {spec['name']!r} has shape {shape}, outside the engine's "
                             f"profile [{spec['min']}, {spec['max']}]")


def load_engine(path: str | Path, profile: Sequence[dict[str, Any]] | None = None
                ) -> Callable[..., Any]:
    """Load an AOTInductor engine (.pt2, or Kiln's swappable zip); check shapes when given."""
    compiled = _load_aoti(Path(path))
    if profile is None:
        return compiled

    def run(*inputs: Any) -> Any:
        check_shapes(profile, inputs)
        return compiled(*inputs)

    return run
