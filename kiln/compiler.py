"""``kiln.compile``: the Torch-TensorRT workflow, with the build on a Kiln server.

    x = kiln.Input(min_shape=[1, 3, 224, 224], opt_shape=[4, 3, 224, 224],
                   max_shape=[8, 3, 224, 224], dtype=torch.float32)
    engine = kiln.compile(model, inputs=[x])          # a module, or an ExportedProgram
    y = engine(batch)                                 # refuses shapes outside the profile

A module is exported here with one ``torch.export.Dim`` per dim whose min and max differ (as
Torch-TensorRT's tracer does); an ExportedProgram is sent as it is. The program is hashed
locally and uploaded only when the server lacks it; the engine is downloaded only when the
local cache lacks it. torch is imported inside the functions, never at module level.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import re
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kiln.client import KilnClient
from kiln.engine_cache import LocalCache
from kiln.engine_format import metadata_from_record, write_sidecar
from kiln.loader import LoadedEngine, load

SERIALIZATION_ID = ".data/serialization_id"
SUFFIXES = {"aoti": ".pt2", "onnx": ".onnx", "tensorrt": ".engine"}


@dataclass(frozen=True)
class Input:
    """One input's shape range, as ``torch_tensorrt.Input``: min, opt and max shape.

    ``shape=`` alone means a static input. ``name`` defaults to the forward argument's name.
    """

    min_shape: Sequence[int] | None = None
    opt_shape: Sequence[int] | None = None
    max_shape: Sequence[int] | None = None
    dtype: Any = None
    name: str | None = None
    shape: Sequence[int] | None = None

    def ranges(self) -> tuple[list[int], list[int], list[int]]:
        if self.shape is not None:
            s = [int(d) for d in self.shape]
            return s, s, s
        if self.min_shape is None or self.max_shape is None:
            raise ValueError("kiln.Input needs min_shape and max_shape (opt_shape optional), or "
                             "shape= for a static input")
        lo, hi = [int(d) for d in self.min_shape], [int(d) for d in self.max_shape]
        opt = [int(d) for d in self.opt_shape] if self.opt_shape is not None else hi
        if not len(lo) == len(opt) == len(hi):
            raise ValueError(f"kiln.Input {self.name or ''}: min {lo}, opt {opt} and max {hi} "
                             "must have the same number of dims")
        for i, (a, o, b) in enumerate(zip(lo, opt, hi)):
            if not 0 <= a <= o <= b:
                raise ValueError(f"kiln.Input {self.name or ''}: dim {i} needs min <= opt <= max,"
                                 f" got {a}, {o}, {b}")
        return lo, opt, hi

    def dtype_name(self) -> str:
        if self.dtype is None:
            return "float32"
        return str(self.dtype).removeprefix("torch.")


@dataclass
class CompileStats:
    """What one compile call did: the figures behind "the second call is a cache hit"."""

    uploaded: bool = False
    exported: bool = False
    engine_from_server_cache: bool = False
    engine_from_local_cache: bool = False
    bytes_uploaded: int = 0
    bytes_downloaded: int = 0
    seconds: float = 0.0
    job_id: str | None = None
    phases: list[str] = field(default_factory=list)


def model_hash(path: str | Path) -> str:
    """The canonical hash the server computes for a ``.pt2``: its entries without the root
    folder, leaving out the random serialization id, so two saves of a program agree."""
    rows = []
    with zipfile.ZipFile(path) as zf:
        for info in zf.infolist():
            _, _, rest = info.filename.partition("/")
            if info.filename.endswith("/") or not rest or rest == SERIALIZATION_ID:
                continue
            h = hashlib.sha256()
            with zf.open(info) as f:
                while block := f.read(1 << 20):
                    h.update(block)
            rows.append([rest, h.hexdigest()])
    rows.sort()
    canonical = json.dumps(rows, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(b"kiln-model-v1\n" + canonical.encode()).hexdigest()


def _forward_names(module: Any, count: int) -> list[str]:
    params = [p for p in inspect.signature(module.forward).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    names = [p.name for p in params[:count]]
    return names + [f"input_{i}" for i in range(len(names), count)]


def _profile(inputs: Sequence[Input], names: list[str]) -> list[dict[str, Any]]:
    profile = []
    for spec, default in zip(inputs, names):
        lo, opt, hi = spec.ranges()
        profile.append({"name": spec.name or default, "dtype": spec.dtype_name(),
                        "min": lo, "opt": opt, "max": hi})
    return profile


def module_fingerprint(module: Any, profile: list[dict[str, Any]]) -> str:
    """What a module would export to: the source files of its classes, its weights and
    buffers, its mode, the input ranges and the torch version. Equal fingerprints let a fresh
    process skip the export (the slow part of a cache hit)."""
    import torch

    h = hashlib.sha256(b"kiln-module-v1\n")
    h.update(json.dumps({"torch": torch.__version__, "training": module.training,
                         "profile": profile}, sort_keys=True).encode())
    files: set[str] = set()
    for sub in module.modules():
        cls = type(sub)
        h.update(f"{cls.__module__}.{cls.__qualname__}\n".encode())
        try:
            src = inspect.getsourcefile(cls)
        except TypeError:
            src = None
        if src and src not in files and not src.startswith(sys.prefix):
            files.add(src)
            h.update(Path(src).read_bytes())
    tensors = {**dict(module.named_parameters()), **dict(module.named_buffers())}
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}:{t.dtype}:{list(tensors[name].shape)}\n".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _dim_name(text: str) -> str:
    name = re.sub(r"\W", "_", text)
    return name if name and not name[0].isdigit() else f"d_{name}"


def export_module(module: Any, profile: list[dict[str, Any]]) -> Any:
    """torch.export with a named Dim per dynamic dim; example inputs at the opt shape.

    Dims of different inputs that the model forces equal (a shared batch) cannot be separate
    Dims: torch refuses such an export, and then it is retried with range hints that let
    torch find the relations itself.
    """
    import torch

    params = next(iter(module.parameters()), None)
    device = params.device if params is not None else torch.device("cpu")
    examples, named, hinted = [], [], []
    for p in profile:
        # torch specializes sizes 0 and 1; an example of 1 would pin a dynamic dim to 1.
        shape = [o if lo == hi or o >= 2 else min(2, hi) for lo, o, hi in
                 zip(p["min"], p["opt"], p["max"])]
        examples.append(torch.zeros(shape, dtype=getattr(torch, p["dtype"]), device=device))
        named.append({i: torch.export.Dim(_dim_name(f"{p['name']}_dim{i}"), min=lo, max=hi)
                      for i, (lo, hi) in enumerate(zip(p["min"], p["max"])) if lo != hi} or None)
        hinted.append({i: torch.export.Dim.DYNAMIC(min=lo, max=hi)
                       for i, (lo, hi) in enumerate(zip(p["min"], p["max"])) if lo != hi}
                      or None)
    try:
        return torch.export.export(module, tuple(examples), dynamic_shapes=tuple(named))
    except torch._dynamo.exc.UserError:
        return torch.export.export(module, tuple(examples), dynamic_shapes=tuple(hinted))


def _program_input_names(program: Any) -> list[str]:
    from torch.export.graph_signature import InputKind

    return [s.arg.name for s in program.graph_signature.input_specs
            if s.kind == InputKind.USER_INPUT]


def _say(progress: bool, text: str) -> None:
    if progress:
        print(f"kiln: {text}", file=sys.stderr, flush=True)


def compile(module_or_program: Any, inputs: Sequence[Input] | None = None,
            backend: str = "aoti", device: str = "cpu", options: dict[str, Any] | None = None,
            server: str | None = None, api_key: str | None = None, reuse: str = "covering",
            cache_dir: str | Path | None = None, progress: bool = False,
            on_event: Callable[[dict[str, Any]], None] | None = None,
            timeout_s: float = 7200) -> LoadedEngine:
    """Build (or reuse) an engine on a Kiln server and return it loaded and profile-checked.

    ``inputs``: one :class:`Input` per forward argument. For an ExportedProgram they may be
    left out (the program's own ranges are used). The returned engine has ``.stats``
    (:class:`CompileStats`), ``.record`` (the server's engine record) and ``.path``.
    """
    import os

    import torch

    t0 = time.perf_counter()
    stats = CompileStats()
    cache = LocalCache(cache_dir)
    client = KilnClient(server or os.environ.get("KILN_SERVER", "http://127.0.0.1:8000"),
                        api_key=api_key)
    is_program = isinstance(module_or_program, torch.export.ExportedProgram)
    inputs = list(inputs or [])
    if is_program:
        names = _program_input_names(module_or_program)
        if inputs and len(inputs) != len(names):
            raise ValueError(f"the program takes {len(names)} inputs {names}, got "
                             f"{len(inputs)} kiln.Input")
    else:
        if not inputs:
            raise ValueError("kiln.compile of a module needs inputs=[kiln.Input(...)] per "
                             "forward argument")
        names = _forward_names(module_or_program, len(inputs))
    profile = _profile(inputs, names) if inputs else None

    record = None
    fingerprint = None
    if not is_program:
        assert profile is not None
        fingerprint = module_fingerprint(module_or_program, profile)
        known = cache.program_hash(fingerprint)
        record = client.find_model(model_hash=known) if known else None
    if record is None:
        with tempfile.TemporaryDirectory(prefix="kiln-export-") as tmp:
            program = module_or_program
            if not is_program:
                _say(progress, "exporting the module with torch.export")
                program = export_module(module_or_program, profile or [])
                stats.exported = True
            path = Path(tmp) / "program.pt2"
            torch.export.save(program, path)
            local_hash = model_hash(path)
            record, stats.uploaded = client.upload_once(path, model_hash=local_hash)
            if fingerprint:
                cache.remember_program(fingerprint, record["model_hash"],
                                       {"server": client.url})
    how = "uploaded" if stats.uploaded else "already on the server, not uploaded"
    _say(progress, f"model {record['id']} ({how})")

    submitted = client.submit(record["id"], backend=backend, device=device, inputs=profile,
                              options=options or {}, reuse=reuse)
    stats.engine_from_server_cache = submitted["status"] == "cached"
    if not stats.engine_from_server_cache:
        stats.job_id = submitted["id"]
        _say(progress, f"job {submitted['id']} {submitted['submit']}: {submitted['reason']}")

    def update(job: dict[str, Any]) -> None:
        stats.phases.append(job["status"])
        _say(progress, f"job {job['id']} {job['status']}")
        if on_event:
            on_event(job)

    engine = client.wait(submitted, on_update=update, timeout_s=timeout_s)
    suffix = engine["build_report"].get("artifact_suffix") or SUFFIXES.get(backend, ".bin")
    found = cache.cached_engine(engine["sha256"], suffix)
    if found is None:
        path = cache.engine_path(engine["sha256"], suffix)
        path.parent.mkdir(parents=True, exist_ok=True)
        _say(progress, f"downloading engine {engine['id']} ({engine['size']} bytes)")
        client.download(engine["id"], path, expected_sha256=engine["sha256"],
                        expected_size=engine["size"])
        write_sidecar(path, metadata_from_record(engine, record))
    else:
        path, stats.engine_from_local_cache = found, True
    loaded = load(path, verify=False)  # just verified: by the download, or by the cache
    stats.bytes_uploaded, stats.bytes_downloaded = client.bytes_uploaded, client.bytes_downloaded
    stats.seconds = time.perf_counter() - t0
    loaded.stats, loaded.record = stats, engine  # type: ignore[attr-defined]
    return loaded
