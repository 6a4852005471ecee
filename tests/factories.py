"""Test factories: rows made the way the real code paths make them."""

from __future__ import annotations

from typing import Any

from service.engine_record import EngineRecord
from service.models import Job, Model


def record_engine(model: Model, job: Job, **overrides: Any) -> EngineRecord:
    """The record a worker would hand ``jobs.succeed`` for ``job``, with no compiler run:
    the key fields from the model and job, a placeholder artifact, and any overrides."""
    fields: dict[str, Any] = {
        "model_hash": model.model_hash, "graph_hash": model.graph_hash,
        "weights_hash": model.weights_hash, "backend": job.backend, "device": job.device,
        "arch": job.arch, "toolchain_id": job.toolchain_id, "toolchain": {},
        "options": job.options, "profile": job.profile, "artifact_uri": "file:///nowhere",
        "sha256": "0" * 64, "size": 1, "build_seconds": 1.0,
    }
    fields.update(overrides)
    return EngineRecord(**fields)
