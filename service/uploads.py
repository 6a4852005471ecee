"""Intake of uploaded programs: stream to disk while hashing, inspect, store, index.

The upload is written to a scratch file that nobody else sees, checked by
``service.archive.inspect_archive`` (zip directory and JSON only, nothing unpickled), and only
then moved into the artifact store and given a row. A refused or broken upload leaves nothing
behind; an upload of content already stored returns the existing record.
"""

from __future__ import annotations

import hashlib
import uuid
from pathlib import Path
from typing import BinaryIO

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from service.archive import inspect_archive
from service.errors import KilnError
from service.models import Model
from service.services import Services

CHUNK = 1024 * 1024


def stream_to_file(stream: BinaryIO, dest: Path, limit: int) -> tuple[str, int]:
    """Copy ``stream`` to ``dest`` in chunks; return (sha256, size). 413 past ``limit``."""
    sha, size = hashlib.sha256(), 0
    with open(dest, "wb") as out:
        while chunk := stream.read(CHUNK):
            size += len(chunk)
            if size > limit:
                raise KilnError("upload_too_large",
                                f"upload exceeds the limit of {limit} bytes", 413,
                                {"limit": limit})
            sha.update(chunk)
            out.write(chunk)
    if size == 0:
        raise KilnError("empty_upload", "the upload is empty: send the .pt2 file as the "
                        "request body or as multipart field 'file'")
    return sha.hexdigest(), size


def save_upload(services: Services, owner: str, stream: BinaryIO, filename: str
                ) -> tuple[Model, bool]:
    """Store an uploaded program; return (model, created)."""
    scratch = services.settings.scratch_dir / "uploads"
    scratch.mkdir(parents=True, exist_ok=True)
    tmp = scratch / f".partial-{uuid.uuid4().hex}"
    try:
        sha256, size = stream_to_file(stream, tmp, services.settings.max_upload_bytes)
        info = inspect_archive(tmp)
        with services.db.session() as session:
            existing = session.scalars(select(Model).where(
                Model.owner == owner, Model.model_hash == info.model_hash)).first()
            if existing is not None:
                return existing, False
        # Content-addressed by the canonical hash: one blob serves every owner of this program.
        blob_uri = services.store.put_file(tmp, f"models/{info.model_hash}.pt2")
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
