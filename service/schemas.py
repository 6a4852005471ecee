"""Request models (validated by spectree, described in the OpenAPI document) and the JSON
shape of each resource."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from service.cache import CacheRequest
from service.models import Engine, Job, Model, Worker

# Identifiers and names a request carries into SQL: bounded, and without NUL (PostgreSQL
# refuses it in text, which would otherwise surface as a 500).
Name = Annotated[str, StringConstraints(max_length=255, pattern=r"^[^\x00]*$")]


class InputShapes(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Name
    dtype: Name | None = Field(None, description="Optional; must match the program's dtype.")
    min: list[int]
    opt: list[int]
    max: list[int]


class JobRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model_id: Name
    backend: Name = Field("aoti", description="aoti, onnx or tensorrt")
    device: Name = Field("cpu", description="cpu or cuda")
    arch: Name | None = Field(None, description="e.g. sm_90 or x86_64-avx512; default: any live")
    toolchain: Name | None = Field(None, description="A toolchain id; default: a live worker's.")
    inputs: list[InputShapes] | None = Field(
        None, description="Profile per input; omitted: the program's ranges, opt = example.")
    options: dict[str, Any] = Field(default_factory=dict)
    reuse: Literal["exact", "covering", "never"] = "covering"
    accept_unvalidated: bool = Field(
        False, description="Let engines whose validation did not run (no device to run them "
        "on) serve the request; by default only validated engines do.")

    def cache_request(self) -> CacheRequest:
        return CacheRequest(
            model_id=self.model_id, backend=self.backend, device=self.device, arch=self.arch,
            toolchain=self.toolchain, options=self.options, reuse=self.reuse,
            accept_unvalidated=self.accept_unvalidated,
            inputs=None if self.inputs is None else [i.model_dump() for i in self.inputs])


class EngineQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: Name | None = Field(None, description="A model id or its model_hash / sha256.")
    backend: Name | None = None
    device: Name | None = None
    covers: list[Name] = Field(
        default_factory=list,
        description="NAME:MIN,MAX (or NAME:MIN,OPT,MAX) with shapes like 1x3x224x224: only "
        "engines that would serve a job request for these shapes, best first. Needs `model`; "
        "backend and device default to aoti and cpu as for a job.")
    arch: Name | None = None
    toolchain: Name | None = None
    accept_unvalidated: bool = False
    limit: int = Field(50, ge=1, le=500)


class ErrorBody(BaseModel):
    code: str
    message: str
    details: dict[str, Any]


class Error(BaseModel):
    error: ErrorBody


def _ts(value: datetime | None) -> str | None:
    return value.isoformat() + "Z" if value else None


def model_json(model: Model) -> dict[str, Any]:
    return {
        "id": model.id, "sha256": model.sha256, "model_hash": model.model_hash,
        "graph_hash": model.graph_hash, "weights_hash": model.weights_hash, "size": model.size,
        "filename": model.filename, "torch_version": model.torch_version,
        "inputs": model.signature["inputs"], "outputs": model.signature.get("outputs", []),
        "created_at": _ts(model.created_at),
    }


def job_json(job: Job, log_tail: int = 4000) -> dict[str, Any]:
    return {
        "id": job.id, "model_id": job.model_id, "status": job.status,
        "target": {"backend": job.backend, "device": job.device, "arch": job.arch,
                   "toolchain": job.toolchain_id},
        "options": job.options, "inputs": job.profile, "cache_key": job.cache_key,
        "attempts": job.attempts, "max_attempts": job.max_attempts, "timings": job.timings,
        "error": ({"code": job.error_code, "message": job.error_message}
                  if job.error_code else None),
        "engine_id": job.engine_id, "miss_reasons": job.miss_reasons,
        "swap_from_engine_id": job.swap_from_engine_id,
        "log_tail": job.log[-log_tail:] if job.log else "",
        "created_at": _ts(job.created_at), "started_at": _ts(job.started_at),
        "finished_at": _ts(job.finished_at),
    }


def engine_json(engine: Engine) -> dict[str, Any]:
    return {
        "id": engine.id, "model_hash": engine.model_hash, "graph_hash": engine.graph_hash,
        "weights_hash": engine.weights_hash,
        "target": {"backend": engine.backend, "device": engine.device, "arch": engine.arch,
                   "toolchain": engine.toolchain_id},
        "toolchain": engine.toolchain, "options": engine.options, "inputs": engine.profile,
        "sha256": engine.sha256, "size": engine.size, "build_seconds": engine.build_seconds,
        "build_report": engine.build_report, "validation": engine.validation,
        "benchmark": engine.benchmark, "validation_status": engine.validation_status,
        "validation_reason": engine.validation_reason, "hits": engine.hits, "pinned": engine.pinned,
        "created_at": _ts(engine.created_at), "last_used_at": _ts(engine.last_used_at),
    }


def worker_json(worker: Worker) -> dict[str, Any]:
    return {
        "id": worker.id, "hostname": worker.hostname, "targets": worker.targets,
        "host": worker.host, "current_job_id": worker.current_job_id,
        "started_at": _ts(worker.started_at), "last_seen_at": _ts(worker.last_seen_at),
    }
