"""Python client for the Kiln API. Depends on ``requests`` only; the ``kiln`` CLI uses it.

    from service.client import KilnClient
    kiln = KilnClient("http://127.0.0.1:8000")
    model = kiln.upload("convnet.pt2")
    job = kiln.submit(model["id"], inputs=[{"name": "x", "min": [1, 3, 32, 32], ...}])
    engine = kiln.wait(job)           # returns the engine record when built or cached
    kiln.download(engine["id"], "convnet-engine.pt2")
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import requests

Progress = Callable[[int], None]  # called with the number of bytes just moved
TERMINAL = ("succeeded", "failed", "cancelled")


class KilnAPIError(Exception):
    """An error answered by the server, in its one shape: code, message, details."""

    def __init__(self, status: int, code: str, message: str, details: dict[str, Any]) -> None:
        super().__init__(f"{code}: {message}")
        self.status, self.code, self.message, self.details = status, code, message, details


class _ProgressReader:
    """A file wrapper with a length, so requests sends Content-Length and streams it."""

    def __init__(self, f: BinaryIO, size: int, progress: Progress | None) -> None:
        self.f, self.size, self.progress = f, size, progress

    def __len__(self) -> int:
        return self.size

    def read(self, n: int = -1) -> bytes:
        chunk = self.f.read(n if n and n > 0 else 1 << 20)
        if chunk and self.progress:
            self.progress(len(chunk))
        return chunk


def parse_shape(text: str) -> list[int]:
    """``"1x3x224x224"`` -> ``[1, 3, 224, 224]``."""
    try:
        return [int(d) for d in text.lower().split("x")]
    except ValueError as exc:
        raise ValueError(f"shape {text!r}: write dims separated by x, like 1x3x224x224") from exc


def parse_input(text: str) -> dict[str, Any]:
    """``"x:1x3x32x32,4x3x32x32,8x3x32x32"`` -> ``{"name", "min", "opt", "max"}``."""
    name, sep, shapes = text.partition(":")
    parts = shapes.split(",")
    if not sep or len(parts) != 3:
        raise ValueError(f"--input {text!r}: write NAME:MIN,OPT,MAX, like "
                         "x:1x3x224x224,8x3x224x224,32x3x224x224")
    lo, opt, hi = (parse_shape(p) for p in parts)
    return {"name": name, "min": lo, "opt": opt, "max": hi}


class KilnClient:
    def __init__(self, url: str = "http://127.0.0.1:8000", api_key: str | None = None,
                 timeout: float = 60.0) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.http = requests.Session()
        key = api_key or os.environ.get("KILN_API_KEY")
        if key:
            self.http.headers["Authorization"] = f"Bearer {key}"

    def _request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        kwargs.setdefault("timeout", self.timeout)
        resp = self.http.request(method, f"{self.url}{path}", **kwargs)
        if resp.status_code >= 400:
            try:
                err = resp.json()["error"]
            except (ValueError, KeyError, TypeError):
                err = {"code": "http_error", "message": resp.text[:500], "details": {}}
            raise KilnAPIError(resp.status_code, err["code"], err["message"], err["details"])
        return resp

    def health(self) -> dict[str, Any]:
        return self._request("GET", "/healthz").json()

    def upload(self, path: str | os.PathLike[str], progress: Progress | None = None
               ) -> dict[str, Any]:
        """Upload a .pt2 as a raw streamed body; returns the model record."""
        path = Path(path)
        with open(path, "rb") as f:
            body = _ProgressReader(f, path.stat().st_size, progress)
            return self._request("POST", "/api/v1/models", data=body,
                                 params={"filename": path.name},
                                 headers={"Content-Type": "application/octet-stream"},
                                 timeout=None).json()

    def submit(self, model_id: str, backend: str = "aoti", device: str = "cpu",
               inputs: list[dict[str, Any]] | None = None, options: dict[str, Any] | None = None,
               reuse: str = "covering", **target: Any) -> dict[str, Any]:
        """Submit a compile job. ``status`` is "cached" (with ``engine``) or the job's status."""
        body = {"model_id": model_id, "backend": backend, "device": device, "inputs": inputs,
                "options": options or {}, "reuse": reuse, **target}
        return self._request("POST", "/api/v1/jobs", json=body).json()

    def job(self, job_id: str) -> dict[str, Any]:
        return self._request("GET", f"/api/v1/jobs/{job_id}").json()

    def job_log(self, job_id: str) -> str:
        return self._request("GET", f"/api/v1/jobs/{job_id}/log").text

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self._request("DELETE", f"/api/v1/jobs/{job_id}").json()

    def engine(self, engine_id: str) -> dict[str, Any]:
        return self._request("GET", f"/api/v1/engines/{engine_id}").json()

    def engines(self, **query: Any) -> list[dict[str, Any]]:
        return self._request("GET", "/api/v1/engines", params=query).json()["engines"]

    def workers(self) -> list[dict[str, Any]]:
        return self._request("GET", "/api/v1/workers").json()["workers"]

    def wait(self, submitted: dict[str, Any], on_update: Callable[[dict[str, Any]], None]
             | None = None, poll_s: float = 0.5, timeout_s: float = 7200) -> dict[str, Any]:
        """Follow a submitted job to its end; return the engine record, or raise on failure."""
        if submitted.get("status") == "cached":
            return submitted["engine"]
        job_id, deadline = submitted["id"], time.monotonic() + timeout_s
        while True:
            job = self.job(job_id)
            if on_update:
                on_update(job)
            if job["status"] == "succeeded":
                return self.engine(job["engine_id"])
            if job["status"] in TERMINAL:
                err = job.get("error") or {}
                raise KilnAPIError(200, err.get("code", job["status"]),
                                   err.get("message", f"job {job['status']}"), {"job": job})
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job['status']} after {timeout_s} s")
            time.sleep(poll_s)

    def download(self, engine_id: str, dest: str | os.PathLike[str],
                 progress: Progress | None = None, expected_sha256: str | None = None) -> Path:
        """Download an engine, resuming a partial file, and verify its sha256 before keeping it.

        Engines are native code: a file that does not match the sha256 is deleted, not kept.
        """
        dest = Path(dest)
        part = dest.with_name(dest.name + ".part")
        sha = expected_sha256 or self.engine(engine_id)["sha256"]
        have = part.stat().st_size if part.exists() else 0
        headers = {"Range": f"bytes={have}-", "If-Range": f'"{sha}"'} if have else {}
        resp = self._request("GET", f"/api/v1/engines/{engine_id}/artifact", headers=headers,
                             stream=True, timeout=None)
        mode = "ab" if resp.status_code == 206 else "wb"
        if progress and mode == "ab":
            progress(have)
        with open(part, mode) as f:
            for chunk in resp.iter_content(1 << 20):
                f.write(chunk)
                if progress:
                    progress(len(chunk))
        h = hashlib.sha256()
        with open(part, "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
        if h.hexdigest() != sha:
            part.unlink()
            raise KilnAPIError(200, "checksum_mismatch",
                               f"downloaded engine's sha256 {h.hexdigest()} != {sha}; deleted",
                               {"expected": sha, "got": h.hexdigest()})
        part.replace(dest)
        return dest
