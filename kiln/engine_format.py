"""What a Kiln engine file carries besides its compiled code: the shape profile it serves.

Engines are stored and served as the bytes the worker built (their sha256 is the engine's
identity), so the profile travels beside the file in a sidecar, ``<engine>.kiln.json``, written
by the client when it downloads an engine. A zip engine (an AOTInductor package, the swappable
package) also carries the same document inside, as the entry ``kiln/engine.json`` under the
archive's root folder (the worker adds it before the engine is validated and hashed); the
loader prefers that one, so such a file alone is enough. Plain data: no torch here.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path
from typing import Any

ENGINE_FORMAT = "kiln-engine/1"
SWAPPABLE_FORMAT = "kiln-aoti-swappable/1"
EMBEDDED_ENTRY = "kiln/engine.json"
SIDECAR_SUFFIX = ".kiln.json"


class EngineFormatError(ValueError):
    """The file is not a Kiln engine, or its metadata does not belong to it."""


def sidecar_path(engine: str | Path) -> Path:
    engine = Path(engine)
    return engine.with_name(engine.name + SIDECAR_SUFFIX)


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def engine_metadata(backend: str, device: str, options: dict[str, Any],
                    inputs: list[dict[str, Any]]) -> dict[str, Any]:
    """The profile document: what the engine was built for and the shapes it serves."""
    return {"format": ENGINE_FORMAT, "backend": backend, "device": device, "options": options,
            "inputs": [{"name": p["name"], "dtype": p.get("dtype"), "min": list(p["min"]),
                        "opt": list(p["opt"]), "max": list(p["max"])} for p in inputs]}


def metadata_from_record(engine: dict[str, Any], model: dict[str, Any] | None = None
                         ) -> dict[str, Any]:
    """The document stored with an engine, from the API's engine record (and its model's)."""
    dtypes = {i["name"]: i.get("dtype") for i in (model or {}).get("inputs", [])}
    inputs = [{**p, "dtype": p.get("dtype") or dtypes.get(p["name"])} for p in engine["inputs"]]
    return {**engine_metadata(engine["target"]["backend"], engine["target"]["device"],
                              engine.get("options", {}), inputs),
            "engine_id": engine["id"], "sha256": engine["sha256"]}


def write_sidecar(engine: str | Path, metadata: dict[str, Any]) -> Path:
    path = sidecar_path(engine)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(metadata, indent=1, sort_keys=True))
    tmp.replace(path)
    return path


def _embedded_name(names: list[str]) -> str:
    """Where the document goes: under the archive's root folder when every entry has the same
    one (torch's zip reader refuses entries outside it), else at the top."""
    roots = {n.split("/", 1)[0] for n in names if "/" in n}
    if len(roots) == 1 and all("/" in n for n in names):
        return f"{roots.pop()}/{EMBEDDED_ENTRY}"
    return EMBEDDED_ENTRY


def embed_metadata(package: str | Path, metadata: dict[str, Any]) -> None:
    """Add ``kiln/engine.json`` to a zip engine (for a worker, before the sha256 is taken)."""
    body = {k: v for k, v in metadata.items() if k not in ("sha256", "engine_id")}
    with zipfile.ZipFile(package, "a") as zf:
        zf.writestr(_embedded_name(zf.namelist()), json.dumps(body, sort_keys=True))


def _check(doc: Any, where: str) -> dict[str, Any]:
    if not isinstance(doc, dict) or doc.get("format") != ENGINE_FORMAT:
        raise EngineFormatError(f"{where} is not Kiln engine metadata ({ENGINE_FORMAT})")
    inputs = doc.get("inputs")
    ok = isinstance(inputs, list) and all(
        isinstance(i, dict) and isinstance(i.get("name"), str)
        and all(isinstance(i.get(k), list) and all(isinstance(d, int) for d in i[k])
                for k in ("min", "opt", "max"))
        and len(i["min"]) == len(i["opt"]) == len(i["max"]) for i in inputs)
    if not ok:
        raise EngineFormatError(f"{where}: 'inputs' must list {{name, min, opt, max}} per input")
    return doc


def read_metadata(engine: str | Path, verify: bool = True) -> dict[str, Any]:
    """The profile document of an engine file: embedded if the zip has one, else the sidecar.

    A sidecar names the sha256 of the file it describes; with ``verify`` a sidecar that belongs
    to other bytes (a replaced or tampered engine) is refused rather than trusted.
    """
    engine = Path(engine)
    if zipfile.is_zipfile(engine):
        try:
            with zipfile.ZipFile(engine) as zf:
                names = zf.namelist()
                for name in (_embedded_name(names), EMBEDDED_ENTRY):
                    if name in names:
                        return _check(json.loads(zf.read(name)), f"{engine}:{name}")
        except zipfile.BadZipFile as exc:
            raise EngineFormatError(f"{engine} is a damaged zip file ({exc}); download the "
                                    "engine again") from None
    side = sidecar_path(engine)
    if not side.exists():
        raise EngineFormatError(
            f"{engine} carries no Kiln profile and has no {side.name} beside it; download it "
            "with kiln.compile / `kiln engines download`, which write that file, or pass "
            "profile= to kiln.load")
    try:
        doc = _check(json.loads(side.read_text()), str(side))
    except json.JSONDecodeError as exc:
        raise EngineFormatError(f"{side} is not valid JSON ({exc})") from None
    if verify:
        actual = file_sha256(engine)
        if doc.get("sha256") != actual:
            raise EngineFormatError(
                f"{side.name} describes an engine with sha256 {doc.get('sha256')}, but {engine} "
                f"has sha256 {actual}; the file was replaced or altered: download it again")
    return doc


def is_swappable(path: str | Path) -> bool:
    """True for the zip of a package and its weights (built with ``swappable_weights``)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        if "kiln.json" not in zf.namelist():
            return False
        return bool(json.loads(zf.read("kiln.json")).get("format") == SWAPPABLE_FORMAT)
