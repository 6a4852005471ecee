"""HTTP client for the Kiln API. Depends on ``requests`` only; ``kiln.compile`` and the
``kiln`` CLI use it.

    from kiln import Client as KilnClient
    kiln = KilnClient("http://127.0.0.1:8000")
    model = kiln.upload("convnet.pt2")
    job = kiln.submit(model["id"], inputs=[{"name": "x", "min": [1, 3, 32, 32], ...}])
    engine = kiln.wait(job)           # returns the engine record when built or cached
    kiln.download(engine["id"], "convnet-engine.pt2")
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import requests

from kiln.engine_format import file_sha256

Progress = Callable[[int], None]  # called with the number of bytes just moved
TERMINAL = ("succeeded", "failed", "cancelled")
DOWNLOAD_RETRIES = 5
_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[@-_]|[\x00-\x08\x0b-\x1f\x7f]")


def plain(text: str) -> str:
    """Server text with terminal escape codes and control characters removed."""
    return _ANSI.sub("", text)


class KilnAPIError(Exception):
    """An error answered by the server, in its one shape: code, message, details."""

    def __init__(self, status: int, code: str, message: str, details: dict[str, Any]) -> None:
        message = plain(message)
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
        # Bytes moved by this client: callers (and tests) see what a cache hit saved.
        self.bytes_uploaded = 0
        self.bytes_downloaded = 0
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

        def count(n: int) -> None:
            self.bytes_uploaded += n
            if progress:
                progress(n)

        with open(path, "rb") as f:
            body = _ProgressReader(f, path.stat().st_size, count)
            return self._request("POST", "/api/v1/models", data=body,
                                 params={"filename": path.name},
                                 headers={"Content-Type": "application/octet-stream"},
                                 timeout=None).json()

    def models(self, **query: Any) -> list[dict[str, Any]]:
        return self._request("GET", "/api/v1/models", params=query).json()["models"]

    def model(self, model_id: str) -> dict[str, Any]:
        return self._request("GET", f"/api/v1/models/{model_id}").json()

    def find_model(self, sha256: str | None = None, model_hash: str | None = None
                   ) -> dict[str, Any] | None:
        """The caller's model with these file bytes or this canonical hash, if uploaded."""
        query = {k: v for k, v in (("sha256", sha256), ("model_hash", model_hash)) if v}
        found = self.models(**query)
        return found[0] if found else None

    def upload_once(self, path: str | os.PathLike[str], model_hash: str | None = None,
                    progress: Progress | None = None) -> tuple[dict[str, Any], bool]:
        """The model record for this file, uploading only when the server lacks it.

        Returns (record, uploaded).
        """
        found = self.find_model(model_hash=model_hash) if model_hash else None
        found = found or self.find_model(sha256=file_sha256(Path(path)))
        if found is not None:
            return found, False
        return self.upload(path, progress=progress), True

    def targets(self) -> dict[str, Any]:
        return self._request("GET", "/api/v1/targets").json()["backends"]

    def submit(self, model_id: str, backend: str = "aoti", device: str = "cpu",
               inputs: list[dict[str, Any]] | None = None, options: dict[str, Any] | None = None,
               reuse: str = "covering", **target: Any) -> dict[str, Any]:
        """Submit a compile job. ``status`` is "cached" (with ``engine``) or the job's status."""
        body = {"model_id": model_id, "backend": backend, "device": device, "inputs": inputs,
                "options": options or {}, "reuse": reuse, **target}
        return self._request("POST", "/api/v1/jobs", json=body).json()

    def job(self, job_id: str) -> dict[str, Any]:
        return self._request("GET", f"/api/v1/jobs/{job_id}").json()

    def jobs(self, **query: Any) -> list[dict[str, Any]]:
        return self._request("GET", "/api/v1/jobs", params=query).json()["jobs"]

    def events(self, job_id: str, last_event_id: str | None = None, log: bool = False,
               reconnect: bool = True) -> Iterator[dict[str, Any]]:
        """Follow a job's Server-Sent Events: dicts with ``id``, ``event`` and ``data``.

        Ends after the terminal state. A dropped connection (or a server that ends the stream
        to free its worker) is resumed with ``Last-Event-ID``, so no event is lost or repeated.
        """
        last = last_event_id
        while True:
            headers = {"Accept": "text/event-stream"}
            if last:
                headers["Last-Event-ID"] = last
            try:
                resp = self._request("GET", f"/api/v1/jobs/{job_id}/events", headers=headers,
                                     params={"log": "1" if log else "0"}, stream=True,
                                     timeout=(self.timeout, 120))
                with resp:
                    for event in _parse_sse(str(line) for line in
                                            resp.iter_lines(decode_unicode=True)):
                        last = event.get("id") or last
                        yield event
                        if event["event"] == "end":
                            return
            except (requests.ConnectionError, requests.exceptions.ChunkedEncodingError):
                if not reconnect:
                    raise
            if not reconnect:
                return
            time.sleep(0.5)

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
        followed = False  # True once the events stream reported the end
        try:
            for event in self.events(job_id):
                if event["event"] == "state" and on_update:
                    on_update(event["data"])
                if event["event"] == "end" or time.monotonic() > deadline:
                    followed = event["event"] == "end"
                    break
        except KilnAPIError as exc:
            if exc.status != 404 or exc.details.get("what") == "job":
                raise  # only a server without the events route is polled instead
        while True:
            job = self.job(job_id)
            if on_update and not followed:
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
                 progress: Progress | None = None, expected_sha256: str | None = None,
                 expected_size: int | None = None) -> Path:
        """Download an engine to ``dest``, verified by sha256 before it is kept.

        Bytes land in ``dest.part``; an interrupted transfer (this call's, or an earlier
        process's) continues from there with a Range request guarded by If-Range, so a changed
        engine restarts from zero. A file that ends short or does not hash to the engine's
        sha256 is deleted, never kept: engines are native code.
        """
        dest = Path(dest)
        part = dest.with_name(dest.name + ".part")
        if expected_sha256 is None or expected_size is None:
            record = self.engine(engine_id)
            expected_sha256, expected_size = record["sha256"], record["size"]
        sha, size = expected_sha256, expected_size
        for attempt in range(DOWNLOAD_RETRIES + 1):
            have = part.stat().st_size if part.exists() else 0
            if have > size:
                part.unlink()
                have = 0
            if have == size:
                break
            headers = {"Range": f"bytes={have}-", "If-Range": f'"{sha}"'} if have else {}
            try:
                resp = self._request("GET", f"/api/v1/engines/{engine_id}/artifact",
                                     headers=headers, stream=True, timeout=(self.timeout, 120))
                with resp, open(part, "ab" if resp.status_code == 206 else "wb") as f:
                    if progress and resp.status_code == 206:
                        progress(have)
                    # Small reads: a connection that drops loses at most one read's bytes.
                    for chunk in resp.iter_content(1 << 16):
                        f.write(chunk)
                        self.bytes_downloaded += len(chunk)
                        if progress:
                            progress(len(chunk))
            except (requests.ConnectionError, requests.exceptions.ChunkedEncodingError):
                if attempt == DOWNLOAD_RETRIES:
                    raise
                time.sleep(min(0.2 * 2**attempt, 5))
        have = part.stat().st_size if part.exists() else 0
        got = file_sha256(part) if have == size else None
        if got != sha:
            part.unlink(missing_ok=True)
            what = (f"hashes to {got}" if got else f"has {have} of {size} bytes")
            raise KilnAPIError(200, "checksum_mismatch",
                               f"the downloaded engine {what}, not sha256 {sha}; it was deleted "
                               "(download again)", {"expected": sha, "got": got, "size": have})
        part.replace(dest)
        return dest


def _parse_sse(lines: Iterator[str]) -> Iterator[dict[str, Any]]:
    """Server-Sent Events from a line iterator (WHATWG event-stream rules, minus retry)."""
    event: dict[str, Any] = {"event": "message", "data": [], "id": None}
    for line in lines:
        if line == "":
            if event["data"]:
                text = "\n".join(event["data"])
                try:
                    data: Any = json.loads(text)
                except ValueError:
                    data = text
                yield {"event": event["event"], "id": event["id"], "data": data}
            event = {"event": "message", "data": [], "id": None}
            continue
        if line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if field == "data":
            event["data"].append(value)
        elif field in ("event", "id"):
            event[field] = value
