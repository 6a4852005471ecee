"""The build child: load the program, build, validate, time. One process per job attempt.

Started by ``workers.sandbox`` inside bubblewrap (its own user, pid and network namespaces,
only its work directory writable), with no credentials in its environment and under time,
memory and rlimit caps. It talks to its parent only through files in its work directory
(``request.json`` in, ``result.json`` and the engine out, both typed by
``workers.contracts``) and phase lines on stdout, so a crash here (a segfault in a compiler,
an OOM kill) costs one attempt and never the worker.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import time
import traceback
import zipfile
from pathlib import Path
from typing import Any

from kiln.engine_format import embed_metadata, engine_metadata
from workers.contracts import BuildRequest, finite_or_none

PHASE_PREFIX = "KILN-PHASE "
IN_SANDBOX_ENV = "KILN_IN_SANDBOX"  # set by workers.sandbox; kept here so the child imports
# nothing of the worker's supervision code


def phase(name: str) -> None:
    print(f"{PHASE_PREFIX}{name}", flush=True)
    inject_fault(name)


def inject_fault(at: str) -> None:
    """Fault injection for the fault suite: ``KILN_FAULT_INJECT=KIND:PHASE[:PROBABILITY]``.

    KIND is ``segv`` (the child dies by SIGSEGV, as a crashing compiler does), ``hang`` (it
    stops making progress until the time limit kills it) or ``oom`` (it allocates until the
    memory limit kills it). Unset in production; the worker passes it to the child only when
    it is set in the worker's own environment.
    """
    spec = os.environ.get("KILN_FAULT_INJECT")
    if not spec:
        return
    kind, _, rest = spec.partition(":")
    where, _, probability = rest.partition(":")
    if where != at or random.random() >= float(probability or 1):
        return
    print(f"kiln: injected fault {kind} at {at}", flush=True)
    if kind == "segv":
        os.kill(os.getpid(), signal.SIGSEGV)
    elif kind == "hang":
        time.sleep(10**6)
    elif kind == "oom":
        hog = []
        while True:
            hog.append(b"\x01" * (256 * 2**20))  # written, so it is resident


def run(workdir: Path) -> dict[str, Any]:
    import torch

    from service.errors import KilnError
    from workers.backends import get_backend
    from workers.backends.base import AheadOfTimeBuilder, InputProfile, WeightSwapper
    from workers.program_guard import load_program
    from workers.validation import validate_and_time

    req = BuildRequest.model_validate_json((workdir / "request.json").read_text())
    device = req.device
    profile = [InputProfile(p.name, p.dtype, tuple(p.min), tuple(p.opt), tuple(p.max))
               for p in req.profile]
    timings: dict[str, float] = {}

    def log(msg: str) -> None:
        print(msg, flush=True)

    t0 = time.perf_counter()
    try:
        program = load_program(workdir / req.program)
    except KilnError as exc:
        return {"ok": False, "error": {"code": exc.code, "message": exc.message,
                                       "details": exc.details}, "timings": timings}
    if device == "cuda" and torch.cuda.is_available():  # tensorrt-rtx builds without a GPU
        from workers.program_device import move_to_device_pass

        program = move_to_device_pass(program, "cuda")
    timings["load_s"] = time.perf_counter() - t0

    backend = get_backend(req.backend)
    t0 = time.perf_counter()
    try:
        if req.swap_from:
            if not isinstance(backend, WeightSwapper):
                raise KilnError("unsupported_options",
                                f"backend {req.backend!r} cannot swap weights")
            built = backend.swap_weights(workdir / req.swap_from, program, workdir, log)
            built.report["compile_seconds_saved"] = round(
                req.swap_from_build_seconds - (time.perf_counter() - t0), 3)
        else:
            built = backend.build(program, profile, device, dict(req.options), workdir, log)
    except KilnError as exc:  # a refusal the backend explained: keep its code and details
        traceback.print_exc()
        return {"ok": False, "timings": timings, "error": {
            "code": exc.code, "message": exc.message, "details": exc.details}}
    except Exception as exc:
        traceback.print_exc()
        return {"ok": False, "timings": timings, "error": {
            "code": "build_failed", "message": f"{req.backend} build failed: "
            f"{type(exc).__name__}: {str(exc)[:2000]}"}}
    timings["build_s"] = time.perf_counter() - t0
    if zipfile.is_zipfile(built.artifact):
        # A zip engine (an AOTInductor package) carries its own profile, so the file alone is
        # enough for kiln.load; added before validation, so the bytes validated are the bytes
        # stored. Other formats travel with the sidecar the client writes.
        embed_metadata(built.artifact, engine_metadata(
            req.backend, device, dict(req.options),
            [{"name": p.name, "dtype": p.dtype, "min": p.min, "opt": p.opt, "max": p.max}
             for p in profile]))

    # A backend that builds ahead of time may not be able to run what it built here: the
    # engine is stored unvalidated, with the reason and what the backend checked instead.
    not_run = (backend.cannot_run_reason(built, device)
               if isinstance(backend, AheadOfTimeBuilder) else None)
    if not_run:
        log(f"not validated: {not_run}")
        return {"ok": True, "artifact": built.artifact.name, "timings": timings,
                "build_report": {**built.report, "torch": torch.__version__},
                "validation": {"status": "not_run", "reason": not_run, "checked_without_running":
                               built.report.get("checked_without_running", [])}}

    phase("validating")
    t0 = time.perf_counter()
    try:
        runner = backend.load(built.artifact, device, profile)
        validation, benchmark = validate_and_time(program.module(), runner, profile, device,
                                                  seed=req.seed)
    except Exception as exc:
        traceback.print_exc()
        return {"ok": False, "timings": timings, "error": {
            "code": "validation_error", "message": "the built engine could not be run: "
            f"{type(exc).__name__}: {str(exc)[:2000]}"}}
    timings["validate_s"] = time.perf_counter() - t0
    result: dict[str, Any] = {
        "ok": validation["passed"], "artifact": built.artifact.name, "timings": timings,
        "build_report": {**built.report, "torch": torch.__version__},
        "validation": _finite_metrics(validation), "benchmark": benchmark,
    }
    if not validation["passed"]:
        bad = [f"{label} output {o['output']}: {_why(o)}"
               for label, v in validation["shapes"].items() for o in v["outputs"]
               if not o["passed"]]
        result["error"] = {"code": "validation_failed",
                           "message": "engine outputs differ from the program beyond "
                           f"tolerance: {'; '.join(bad[:5])}"}
    return result


def _finite_metrics(validation: dict[str, Any]) -> dict[str, Any]:
    """An engine that returns inf has an infinite error; the record keeps None there (the
    output's ``nonfinite`` count says so), as result.json carries finite numbers only."""
    for shape in validation.get("shapes", {}).values():
        for output in shape.get("outputs", []):
            for key in ("max_abs", "max_rel"):
                if key in output:
                    output[key] = finite_or_none(output[key])
    return validation


def _why(output: dict[str, Any]) -> str:
    if output.get("reason"):
        return str(output["reason"])
    if output.get("nonfinite"):
        return f"{output['nonfinite']} NaN/Inf values where eager has none"
    if output.get("max_abs") is not None:
        return f"max_abs={output['max_abs']:.3g} max_rel={output.get('max_rel', 0):.3g}"
    return f"{output.get('mismatched')} mismatched values"


def die_with_parent() -> None:
    """Ask Linux to SIGKILL this child when its worker dies, even by SIGKILL.

    The child runs in its own session (so a cancel can kill its whole group), which a kill
    of the worker's group does not reach; and only the worker enforces its time and memory
    limits. Without this, a child of a killed worker would run on unbounded.
    """
    if sys.platform != "linux":
        return
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
    # In the sandbox the parent is bubblewrap, pid 1 of the namespace, which dies with the
    # worker (--die-with-parent); outside it, a parent of 1 means the worker died before the
    # request above took effect.
    if os.getppid() == 1 and not os.environ.get(IN_SANDBOX_ENV):
        os._exit(1)


SPARE_FLAG = "--spare"
SPARE_READY = "KILN-SPARE-READY"
SPARE_GO = b"go\n"


def warm_up() -> None:
    """What every build pays before it starts, paid while the worker is idle: import torch,
    the backends, the loader and validation, export, save, load and run a tiny built-in
    program (a trusted one: nothing of any job is here yet), and on a GPU make the CUDA
    context and move the program there, as the build's load does (the H200 run: 5-7 s of a
    CUDA build's load and start-up was this)."""
    import io

    import torch

    import workers.backends  # noqa: F401
    import workers.program_guard  # noqa: F401
    import workers.validation  # noqa: F401
    from workers.backends import get_backend

    for name in ("aoti", "onnx"):
        try:
            get_backend(name)
        except Exception:  # a backend this host lacks is not the spare's problem
            pass

    class Tiny(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.relu(x) + 1

    tiny = torch.export.export(Tiny(), (torch.randn(2, 4),))
    saved = io.BytesIO()
    torch.export.save(tiny, saved)
    saved.seek(0)
    tiny = torch.export.load(saved)
    tiny.module()(torch.randn(2, 4))
    if torch.cuda.is_available():  # holds a CUDA context while idle: a GPU worker's spare
        from workers.program_device import move_to_device_pass

        on_gpu = move_to_device_pass(tiny, "cuda")
        on_gpu.module()(torch.randn(2, 4, device="cuda"))
        torch.cuda.synchronize()


def main() -> None:
    die_with_parent()
    workdir = Path(sys.argv[1])
    if os.environ.get(IN_SANDBOX_ENV):
        # The seed's precompiled headers, before anything compiles (outside the sandbox torch
        # already finds the host's own).
        from workers.inductor_seed import use_seeded_headers

        use_seeded_headers()
    if SPARE_FLAG in sys.argv[2:]:
        # A warm spare: ready now, and it waits for its job. The worker writes the program
        # and request.json into this work dir, then sends one line; limits start then.
        warm_up()
        print(SPARE_READY, flush=True)
        if sys.stdin.buffer.readline() != SPARE_GO:
            os._exit(0)  # the worker discarded this spare
    phase("building")
    result = run(workdir)
    tmp = workdir / "result.json.tmp"
    tmp.write_text(json.dumps(result, default=str, allow_nan=False))
    tmp.replace(workdir / "result.json")
    # Everything is handed over: end without the interpreter's teardown (Inductor's compile
    # pool, CUDA, module finalisers), which took 1.6 s after a small AOTInductor build on 2
    # cores, on every build's critical path. The worker reaps whatever the child left running.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
