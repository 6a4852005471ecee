"""Intake of uploaded programs: stream to disk while hashing, inspect, store, index.

The upload is written to a scratch file that nobody else sees (hashed in the same pass),
checked by ``service.archive`` in a memory-limited child process (zip directory and JSON only,
nothing unpickled), and only then linked into the artifact store and given a row. A refused or
broken upload leaves nothing behind.

The blob is stored under the sha256 of the uploaded bytes (``models/<sha256>.pt2``), never
under the canonical model hash: two uploads of "the same program" with other bytes (another
root folder, serialization id, ...) are two blobs, so no user's upload can change the bytes
another user's row points at. The canonical model hash stays the cache key. A re-upload of a
program the caller already has returns the existing record, and repairs its blob first when
that blob is missing or damaged.
"""

from __future__ import annotations

import hashlib
import queue
import threading
import uuid
from pathlib import Path
from typing import BinaryIO

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from service.archive.isolated import inspect_isolated
from service.artifacts import ArtifactStore
from service.errors import KilnError
from service.models import Model
from service.services import Services

CHUNK = 1024 * 1024


def stream_to_file(stream: BinaryIO, dest: Path, limit: int) -> tuple[str, int]:
    """Copy ``stream`` to ``dest`` in chunks; return (sha256, size). 413 past ``limit``.

    The sha256 runs on a second thread, a few chunks behind the writes: hashlib and file
    writes both release the GIL, so hashing (~0.8 s/GB here) overlaps the write (~1.1 s/GB)
    instead of adding to it. The queue bounds what is held to a few chunks.
    """
    sha, size = hashlib.sha256(), 0
    chunks: queue.Queue[bytes | None] = queue.Queue(maxsize=8)

    def hash_chunks() -> None:
        while (chunk := chunks.get()) is not None:
            sha.update(chunk)

    hasher = threading.Thread(target=hash_chunks, name="upload-sha256", daemon=True)
    hasher.start()
    try:
        with open(dest, "wb") as out:
            while chunk := stream.read(CHUNK):
                size += len(chunk)
                if size > limit:
                    raise KilnError("upload_too_large",
                                    f"upload exceeds the limit of {limit} bytes", 413,
                                    {"limit": limit})
                chunks.put(chunk)
                out.write(chunk)
    finally:
        chunks.put(None)
        hasher.join()
    if size == 0:
        raise KilnError("empty_upload", "the upload is empty: send the .pt2 file as the "
                        "request body or as multipart field 'file'")
    return sha.hexdigest(), size


def blob_key(sha256: str) -> str:
    return f"models/{sha256}.pt2"


def blob_intact(store: ArtifactStore, uri: str, sha256: str, size: int) -> bool:
    """Whether the blob at ``uri`` exists and holds exactly the bytes hashed ``sha256``."""
    if not uri or not store.exists(uri) or store.size(uri) != size:
        return False
    digest = hashlib.sha256()
    for chunk in store.read_range(uri, 0, size):
        digest.update(chunk)
    return digest.hexdigest() == sha256


def save_upload(services: Services, owner: str, stream: BinaryIO, filename: str
                ) -> tuple[Model, bool]:
    """Store an uploaded program; return (model, created)."""
    scratch = services.settings.scratch_dir / "uploads"
    scratch.mkdir(parents=True, exist_ok=True)
    tmp = scratch / f".partial-{uuid.uuid4().hex}"
    store = services.store
    try:
        sha256, size = stream_to_file(stream, tmp, services.settings.max_upload_bytes)
        info = inspect_isolated(tmp)
        with services.db.session() as session:
            existing = session.scalars(select(Model).where(
                Model.owner == owner, Model.model_hash == info.model_hash)).first()
            if existing is not None:
                if not blob_intact(store, existing.blob_uri, existing.sha256, existing.size):
                    # Repair: the caller's own row now points at the bytes just uploaded
                    # (the same program by its canonical hash), stored under their sha256.
                    existing.blob_uri = store.put_file(tmp, blob_key(sha256), sha256=sha256,
                                                      handover=True)
                    existing.sha256, existing.size = sha256, size
                return existing, False
        blob_uri = store.put_file(tmp, blob_key(sha256), sha256=sha256, handover=True)
        signature = info.to_json()
        model = Model(owner=owner, model_hash=info.model_hash, graph_hash=info.graph_hash,
                      weights_hash=info.weights_hash, sha256=sha256, size=size,
                      filename=filename[:255], torch_version=info.torch_version,
                      signature={"inputs": signature["inputs"],
                                 "outputs": signature["outputs"],
                                 "pickled_entries": signature.get("pickled_entries", [])},
                      blob_uri=blob_uri)
        try:
            with services.db.session() as session:
                session.add(model)
            return model, True
        except IntegrityError:  # the same owner uploaded the same program concurrently
            with services.db.session() as session:
                return session.scalars(select(Model).where(
                    Model.owner == owner, Model.model_hash == info.model_hash)).one(), False
    finally:
        tmp.unlink(missing_ok=True)
