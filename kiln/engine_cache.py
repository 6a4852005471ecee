"""The local cache: engines by sha256, and what a module last exported to, so a second
``kiln.compile`` (also in a fresh process) loads from disk without uploading, exporting or
downloading anything.

Layout under ``$KILN_CACHE_DIR`` (default ``~/.cache/kiln``)::

    engines/<sha256><suffix>             the engine bytes, verified when written and when read
    engines/<sha256><suffix>.kiln.json   its profile (kiln.engine_format sidecar)
    programs/<fingerprint>.json          a module's fingerprint -> the model hash it exported to
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from kiln.engine_format import file_sha256, sidecar_path


def cache_dir() -> Path:
    root = os.environ.get("KILN_CACHE_DIR")
    if root:
        return Path(root)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "kiln"


class LocalCache:
    def __init__(self, root: str | os.PathLike[str] | None = None) -> None:
        self.root = Path(root) if root else cache_dir()
        self.engines = self.root / "engines"
        self.programs = self.root / "programs"

    def engine_path(self, sha256: str, suffix: str) -> Path:
        if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
            raise ValueError(f"not a sha256: {sha256!r}")
        if not suffix.startswith(".") or "/" in suffix or len(suffix) > 16:
            suffix = ".bin"
        return self.engines / f"{sha256}{suffix}"

    def cached_engine(self, sha256: str, suffix: str) -> Path | None:
        """The cached engine with this sha256, or None. A file that no longer hashes to its
        name (altered on disk) is deleted rather than loaded."""
        path = self.engine_path(sha256, suffix)
        if not path.is_file() or not sidecar_path(path).is_file():
            return None
        if file_sha256(path) != sha256:
            path.unlink(missing_ok=True)
            sidecar_path(path).unlink(missing_ok=True)
            return None
        return path

    def program_hash(self, fingerprint: str) -> str | None:
        try:
            doc = json.loads((self.programs / f"{fingerprint}.json").read_text())
        except (OSError, ValueError):
            return None
        value = doc.get("model_hash") if isinstance(doc, dict) else None
        return value if isinstance(value, str) else None

    def remember_program(self, fingerprint: str, model_hash: str, meta: dict[str, Any]) -> None:
        self.programs.mkdir(parents=True, exist_ok=True)
        target = self.programs / f"{fingerprint}.json"
        tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"model_hash": model_hash, **meta}))
        tmp.replace(target)
