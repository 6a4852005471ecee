"""Blob storage for uploaded programs and built engines, chosen by URI scheme.

``file:///path`` is a local directory (the default); ``s3://bucket/prefix`` is any
S3-compatible store (endpoint from ``KILN_S3_ENDPOINT_URL`` / the usual AWS variables). The
database stores only the URI of each blob. Writes are atomic: a blob is either absent or
complete, never partial, so a row never points at half a file.

Blobs are content-addressed (``models/<sha256>.pt2``, ``engines/<sha256>.<suffix>``) and
written once: ``put_file`` never replaces a blob that is there, except a damaged one when the
caller says which sha256 the name stands for. So no upload can change bytes another user's row
points at.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlparse
from urllib.request import url2pathname

from service.errors import KilnError

CHUNK = 1024 * 1024


@dataclass(frozen=True)
class BlobInfo:
    uri: str
    size: int
    modified: float  # unix time


class ArtifactStore(Protocol):
    root_uri: str

    def put_file(self, local: Path, key: str, *, sha256: str | None = None,
                 handover: bool = False) -> str:
        """Store ``local`` under ``key`` atomically unless a blob is there; return its URI.

        With ``sha256`` (the hash of ``local``), an existing blob whose bytes do not hash to it
        is damaged and is replaced; without it, an existing blob is always kept. ``handover``
        says the caller will neither write ``local`` again nor let anyone else do so, so a
        local store may hard-link it instead of copying."""

    def get_file(self, uri: str, dest: Path) -> None: ...

    def exists(self, uri: str) -> bool: ...

    def read_range(self, uri: str, start: int, end: int) -> Iterator[bytes]:
        """Yield bytes ``[start, end)`` in chunks (for downloads with Range)."""

    def size(self, uri: str) -> int: ...

    def delete(self, uri: str) -> None: ...

    def list(self, prefix: str = "", start_after: str = "") -> Iterator[BlobInfo]:
        """Blobs in URI order; ``start_after`` (a URI) resumes a listing after that blob."""


class LocalArtifactStore:
    def __init__(self, root_uri: str) -> None:
        self.root_uri = root_uri.rstrip("/")
        self.root = Path(url2pathname(urlparse(root_uri).path))
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, uri: str) -> Path:
        path = Path(url2pathname(urlparse(uri).path)).resolve()
        if not path.is_relative_to(self.root.resolve()):
            raise KilnError("bad_artifact_uri", f"{uri} is outside the artifact store", 500)
        return path

    def put_file(self, local: Path, key: str, *, sha256: str | None = None,
                 handover: bool = False) -> str:
        dest = self.root / key
        if dest.exists() and (sha256 is None or _file_sha256(dest) == sha256):
            return dest.as_uri()  # written once: the same name holds the same bytes
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.parent / f".incoming-{os.getpid()}-{os.urandom(8).hex()}"
        try:
            try:
                if not handover:
                    raise OSError("copy: the caller keeps writing access to its file")
                # Same filesystem (scratch dir next to the store): a hard link, no copy. The
                # caller drops its name for the file afterwards; the store's name remains.
                os.link(local, tmp)
            except OSError:
                shutil.copyfile(local, tmp)
            try:
                os.link(tmp, dest)  # atomic and never replaces: fails if a blob appeared
            except FileExistsError:
                if sha256 is not None and _file_sha256(dest) != sha256:
                    os.replace(tmp, dest)  # repair a damaged blob, atomically
        finally:
            tmp.unlink(missing_ok=True)
        return dest.as_uri()

    def get_file(self, uri: str, dest: Path) -> None:
        shutil.copyfile(self._path(uri), dest)

    def exists(self, uri: str) -> bool:
        return self._path(uri).is_file()

    def read_range(self, uri: str, start: int, end: int) -> Iterator[bytes]:
        with open(self._path(uri), "rb") as f:
            f.seek(start)
            left = end - start
            while left > 0:
                chunk = f.read(min(CHUNK, left))
                if not chunk:
                    break
                left -= len(chunk)
                yield chunk

    def local_path(self, uri: str) -> Path:
        return self._path(uri)

    def size(self, uri: str) -> int:
        return self._path(uri).stat().st_size

    def delete(self, uri: str) -> None:
        self._path(uri).unlink(missing_ok=True)

    def list(self, prefix: str = "", start_after: str = "") -> Iterator[BlobInfo]:
        base = self.root / prefix
        if not base.exists():
            return
        for path in sorted(base.rglob("*")):
            if path.is_file() and not path.name.startswith(".incoming-"):
                uri = path.as_uri()
                if start_after and uri <= start_after:
                    continue
                st = path.stat()
                yield BlobInfo(uri, st.st_size, st.st_mtime)


class S3ArtifactStore:
    """Any S3-compatible store under ``s3://bucket/prefix``; this store owns only that prefix.

    ``presign_s`` > 0 lets downloads go straight to the store: :meth:`download_url` hands out
    a URL signed for that many seconds, and the API redirects to it instead of streaming.
    """

    def __init__(self, root_uri: str, presign_s: int = 0) -> None:
        import boto3  # only S3 deployments need it loaded

        parsed = urlparse(root_uri)
        self.root_uri = root_uri.rstrip("/")
        self.bucket = parsed.netloc
        self.prefix = parsed.path.strip("/")
        self.presign_s = presign_s
        self.client = boto3.client("s3", endpoint_url=os.environ.get("KILN_S3_ENDPOINT_URL"))

    def _key(self, uri: str) -> str:
        parsed = urlparse(uri)
        key = parsed.path.lstrip("/")
        # Another prefix of the same bucket belongs to someone else: never read or delete it.
        if (parsed.scheme != "s3" or parsed.netloc != self.bucket
                or (self.prefix and not key.startswith(self.prefix + "/"))
                or ".." in key.split("/")):
            raise KilnError("bad_artifact_uri", f"{uri} is outside the artifact store", 500)
        return key

    def put_file(self, local: Path, key: str, *, sha256: str | None = None,
                 handover: bool = False) -> str:
        full = f"{self.prefix}/{key}" if self.prefix else key
        head = self._head(full)
        if head is not None:
            stored = (head.get("Metadata") or {}).get("sha256")
            if sha256 is None or (stored == sha256
                                  and int(head["ContentLength"]) == local.stat().st_size):
                return f"s3://{self.bucket}/{full}"
        # An S3 PUT is atomic: the object appears whole once the upload completes. The sha256
        # goes along as metadata, so a later put can tell an intact blob from a damaged one.
        extra = {"Metadata": {"sha256": sha256}} if sha256 else None
        self.client.upload_file(str(local), self.bucket, full, ExtraArgs=extra)
        return f"s3://{self.bucket}/{full}"

    def _head(self, key: str) -> dict[str, Any] | None:
        from botocore.exceptions import ClientError

        try:
            return dict(self.client.head_object(Bucket=self.bucket, Key=key))
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise

    def get_file(self, uri: str, dest: Path) -> None:
        self.client.download_file(self.bucket, self._key(uri), str(dest))

    def exists(self, uri: str) -> bool:
        return self._head(self._key(uri)) is not None

    def read_range(self, uri: str, start: int, end: int) -> Iterator[bytes]:
        if end <= start:
            return
        obj = self.client.get_object(Bucket=self.bucket, Key=self._key(uri),
                                     Range=f"bytes={start}-{end - 1}")
        yield from obj["Body"].iter_chunks(CHUNK)

    def size(self, uri: str) -> int:
        return int(self.client.head_object(Bucket=self.bucket, Key=self._key(uri))
                   ["ContentLength"])

    def delete(self, uri: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._key(uri))

    def list(self, prefix: str = "", start_after: str = "") -> Iterator[BlobInfo]:
        """Blobs under ``prefix`` in key order, 1,000 per LIST request, lazily.

        ``start_after`` (a blob URI) resumes a listing there, so a collector can walk the
        store a page at a time across runs instead of listing all of it each time.
        """
        full = "/".join(p for p in (self.prefix, prefix) if p)
        # The trailing slash keeps prefix "store" from matching "store-other/...".
        full = f"{full}/" if full and not prefix else full
        args: dict[str, str] = {"Bucket": self.bucket, "Prefix": full}
        if start_after:
            args["StartAfter"] = self._key(start_after)
        for page in self.client.get_paginator("list_objects_v2").paginate(**args):
            for obj in page.get("Contents", []):
                yield BlobInfo(f"s3://{self.bucket}/{obj['Key']}", int(obj["Size"]),
                               obj["LastModified"].timestamp())

    def download_url(self, uri: str, filename: str) -> str | None:
        """A presigned GET URL for ``uri`` (None when presigning is off)."""
        if self.presign_s <= 0:
            return None
        return str(self.client.generate_presigned_url(
            "get_object", ExpiresIn=self.presign_s, Params={
                "Bucket": self.bucket, "Key": self._key(uri),
                "ResponseContentDisposition": f'attachment; filename="{filename}"',
                "ResponseContentType": "application/octet-stream"}))


def open_store(uri: str, presign_s: int = 0) -> ArtifactStore:
    """The store for ``uri``'s scheme; ``presign_s`` applies to stores that can presign."""
    scheme = urlparse(uri).scheme
    if scheme == "file":
        return LocalArtifactStore(uri)
    if scheme == "s3":
        return S3ArtifactStore(uri, presign_s=presign_s)
    raise ValueError(f"KILN_ARTIFACT_URI scheme {scheme!r} is not one of ['file', 's3']")


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def blob_age(info: BlobInfo) -> float:
    return time.time() - info.modified
