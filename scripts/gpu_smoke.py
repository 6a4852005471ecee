"""Kiln end to end on a GPU host, one table out: what the lead runs on a lent GPU.

    scripts/gpu_smoke.sh                      # on the GPU host (sets up wheels, sandbox)
    python scripts/gpu_smoke.py --device cpu --quick   # the same path on a CPU machine

Starts Kiln on the embedded defaults (SQLite, local store, SQLite broker) with one worker,
exports the example convnet, the example encoder and MiniLM's architecture on CPU (as users
do), uploads them and submits each for AOTInductor on ``--device``; then a TensorRT-RTX build
when ``tensorrt_rtx`` imports; then, with two or more GPUs visible, a second Kiln with one
worker per GPU (``--gpu 0``, ``--gpu 1``) and four jobs at once (issue 13). Every step is in
its own try/except so one failure does not lose the rest. Prints one table and writes
everything as JSON to ``$OUT/gpu_smoke.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))

from kiln.client import KilnAPIError, KilnClient  # noqa: E402

START = time.monotonic()
# A worker's first start on a host probes its toolchains and tries each C++ compiler with a
# tiny AOTInductor build (cached afterwards): seconds on 16 cores, minutes on a busy 2-core box.
WORKER_WAIT_S = float(os.environ.get("KILN_SMOKE_WORKER_WAIT_S", "420"))
RESULTS: dict[str, Any] = {"steps": {}, "engines": [], "errors": []}


def elapsed() -> float:
    return time.monotonic() - START


def say(msg: str) -> None:
    print(f"[{elapsed():6.1f}s] {msg}", flush=True)


@contextmanager
def step(name: str) -> Iterator[dict[str, Any]]:
    """Record a step's outcome; an exception is recorded, printed and swallowed."""
    record: dict[str, Any] = {"ok": False}
    RESULTS["steps"][name] = record
    t0 = time.monotonic()
    say(f"step {name}")
    try:
        yield record
        record["ok"] = record.get("ok") or "error" not in record
    except Exception as exc:
        record["error"] = f"{type(exc).__name__}: {str(exc)[:1500]}"
        RESULTS["errors"].append({"step": name, "error": record["error"],
                                  "traceback": traceback.format_exc()[-3000:]})
        say(f"step {name} FAILED: {record['error'][:300]}")
    finally:
        record["seconds"] = round(time.monotonic() - t0, 1)


# --- programs --------------------------------------------------------------------------

def convnet_profile(quick: bool) -> list[dict[str, Any]]:
    return [{"name": "x", "min": [1, 3, 32, 32], "opt": [4 if quick else 8, 3, 32, 32],
             "max": [16 if quick else 64, 3, 32, 32]}]


def encoder_profile(quick: bool) -> list[dict[str, Any]]:
    return [{"name": "x", "min": [1, 4, 256], "opt": [8, 128, 256], "max": [32, 256, 256]}]


def minilm_profile(quick: bool) -> list[dict[str, Any]]:
    opt, top = ([2, 32], [4, 64]) if quick else ([8, 128], [32, 256])
    return [{"name": n, "dtype": "int64", "min": [1, 8], "opt": opt, "max": top}
            for n in ("input_ids", "attention_mask")]


def export_programs(work: Path, quick: bool) -> dict[str, tuple[Path, list[dict[str, Any]]]]:
    programs: dict[str, tuple[Path, list[dict[str, Any]]]] = {}
    exporters: list[tuple[str, str, Callable[[bool], list[dict[str, Any]]]]] = [
        ("convnet", "export_convnet", convnet_profile),
        ("encoder", "export_encoder", encoder_profile),
        ("minilm", "export_minilm", minilm_profile)]
    if quick:
        exporters = [exporters[0], exporters[2]]
    if only := os.environ.get("KILN_SMOKE_PROGRAMS"):  # e.g. "minilm,convnet": these, in order
        by_name = {e[0]: e for e in exporters}
        exporters = [by_name[n] for n in only.split(",") if n in by_name]
    for name, module, profile in exporters:
        with step(f"export {name}") as rec:
            path = work / f"{name}.pt2"
            __import__(module).export(str(path))
            rec["bytes"] = path.stat().st_size
            programs[name] = (path, profile(quick))
    return programs


# --- a Kiln on the embedded defaults -----------------------------------------------------

class Kiln:
    """``kiln serve --no-worker`` plus the workers asked for, on one data dir."""

    def __init__(self, data_dir: Path, gpus: list[int | None], cache_root: Path) -> None:
        self.env = {**os.environ, "KILN_DATA_DIR": str(data_dir), "KILN_BUILD_TIMEOUT_S": "600",
                    "KILN_MAX_ATTEMPTS": "1", "PYTHONUNBUFFERED": "1"}
        self.logs = data_dir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.procs: list[subprocess.Popen[bytes]] = []
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        try:
            self._spawn("serve", [sys.executable, "-m", "service.cli", "serve", "--port",
                                  str(port), "--no-worker"], self.env)
            self.client = KilnClient(self.url)
            self._until(lambda: bool(self.client.health()), 120, "the API did not come up")
            for gpu in gpus:
                env = dict(self.env)
                # Each worker its own compiler cache, so builds are cold alike (what a user
                # pays on a first build) and a shared cache does not make one worker fast.
                env["TORCHINDUCTOR_CACHE_DIR"] = str(cache_root / f"inductor-{gpu}")
                args = ["--gpu", str(gpu)] if gpu is not None else ["--name", "smoke"]
                self._spawn(f"worker-{gpu}", [sys.executable, "-m", "workers", *args], env)
            self._until(lambda: len(self.client.workers()) >= len(gpus), WORKER_WAIT_S,
                        "the workers did not register")
        except BaseException:
            self.stop()  # never leave a server or worker behind for the next step to meet
            raise

    def _spawn(self, name: str, cmd: list[str], env: dict[str, str]) -> None:
        log = open(self.logs / f"{name}.log", "wb")
        self.procs.append(subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=log,
                                           stderr=subprocess.STDOUT))

    def _until(self, ready: Callable[[], bool], timeout_s: float, why: str) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if any(p.poll() is not None for p in self.procs):
                raise RuntimeError(f"{why}: a process exited; logs in {self.logs}: "
                                   + self.log_tails())
            try:
                if ready():
                    return
            except Exception:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{why} in {timeout_s:.0f} s; " + self.log_tails())

    def log_tails(self, n: int = 1500) -> str:
        return " | ".join(f"{p.name}: {p.read_text(errors='replace')[-n:]}"
                          for p in sorted(self.logs.glob("*.log")))

    def stop(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def build_one(kiln: Kiln, name: str, program: Path, profile: list[dict[str, Any]],
              device: str) -> dict[str, Any]:
    """Upload, submit, wait: one engine's row (or its error), with the service's overhead."""
    row: dict[str, Any] = {"model": name, "device": device}
    model = kiln.client.upload(program)
    t0 = time.perf_counter()
    sub = kiln.client.submit(model["id"], backend="aoti", device=device, inputs=profile)
    try:
        engine = kiln.client.wait(sub, timeout_s=600)
    except KilnAPIError as exc:
        job = exc.details.get("job", {})
        row.update(error=exc.code, message=exc.message[:600],
                   log_tail=(job.get("log_tail") or "")[-2500:], timings=job.get("timings"))
        return row
    wall = time.perf_counter() - t0
    job = kiln.client.job(sub["id"]) if sub.get("id") else {}
    report = engine.get("build_report") or {}
    build_s = float(engine.get("build_seconds") or 0)
    val = engine["validation"]["shapes"]
    row.update(engine_id=engine["id"], arch=engine["target"]["arch"], build_s=round(build_s, 1),
               submit_to_engine_s=round(wall, 1), overhead_s=round(wall - build_s, 1),
               timings=job.get("timings"), cxx=report.get("cxx"), gpu=report.get("gpu"),
               compiler_cache=report.get("compiler_cache"),
               validation_passed=engine["validation"]["passed"],
               validation_status=engine.get("validation_status"), shapes={})
    for label, b in (engine.get("benchmark") or {}).get("shapes", {}).items():
        outputs = val.get(label, {}).get("outputs", [])
        row["shapes"][label] = {
            "dims": b["shapes"][0], "engine_ms": b.get("engine_ms"), "eager_ms": b.get("eager_ms"),
            "speedup": b.get("speedup"), "engine_spread": b.get("engine_spread"),
            "eager_spread": b.get("eager_spread"), "flagged": b.get("flagged"),
            "max_abs": max((o.get("max_abs") or 0 for o in outputs), default=None)}
    t1 = time.perf_counter()
    again = kiln.client.submit(model["id"], backend="aoti", device=device, inputs=profile)
    row.update(repeat=again["status"], repeat_ms=round((time.perf_counter() - t1) * 1000, 1))
    return row


# --- steps -------------------------------------------------------------------------------

def host_step(device: str) -> None:
    with step("host") as rec:
        import torch

        rec.update(python=sys.version.split()[0], torch=torch.__version__,
                   cuda=torch.version.cuda, cores=os.cpu_count(),
                   cxx_env=os.environ.get("CXX"), sandbox=os.environ.get("KILN_SANDBOX", "on"),
                   warm_spare=os.environ.get("KILN_WARM_SPARE", "auto"),
                   bwrap=os.environ.get("BWRAP"))
        if shutil.which("nvidia-smi"):
            rec["nvidia_smi"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=index,name,uuid,pci.bus_id,memory.total,"
                 "driver_version", "--format=csv,noheader"], capture_output=True, text=True,
                timeout=60).stdout.strip().splitlines()
        if device == "cuda":
            rec["gpus"] = torch.cuda.device_count()
        RESULTS["host"] = rec


def gpu_count() -> int:
    if not shutil.which("nvidia-smi"):
        return 0
    out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=60)
    return sum(1 for ln in out.stdout.splitlines() if ln.startswith("GPU "))


def one_worker_step(work: Path, programs: dict[str, tuple[Path, list[dict[str, Any]]]],
                    device: str) -> None:
    kiln = None
    with step("kiln one worker") as rec:
        kiln = Kiln(work / "kiln1", [0 if device == "cuda" else None], work / "cache1")
        workers = kiln.client.workers()
        rec["workers"] = [{"id": w["id"], "targets": [f"{t['backend']}/{t['device']}/{t['arch']}"
                                                      for t in w["targets"]],
                           "aoti_cxx": (w["host"] or {}).get("aoti_cxx"),
                           "unavailable": (w["host"] or {}).get("unavailable"),
                           "sandbox": (w["host"] or {}).get("sandbox")} for w in workers]
        RESULTS["worker"] = rec["workers"]
    if kiln is None:
        return
    try:
        for name, (path, profile) in programs.items():
            with step(f"build {name} aoti/{device}") as rec:
                row = build_one(kiln, name, path, profile, device)
                RESULTS["engines"].append(row)
                rec.update(ok="error" not in row, result=row.get("error", "engine"))
        if device == "cuda":
            tensorrt_rtx_step(kiln, work, programs)
    finally:
        kiln.stop()


def tensorrt_rtx_step(kiln: Kiln, work: Path,
                      programs: dict[str, tuple[Path, list[dict[str, Any]]]]) -> None:
    """The convnet through Kiln's tensorrt-rtx backend on the same Kiln, then the plan handed
    to the runtime directly: what Kiln records, and what TensorRT-RTX itself says."""
    with step("tensorrt-rtx") as rec:
        try:
            import tensorrt_rtx as trt
        except Exception as exc:
            rec.update(ok=True, skipped=f"tensorrt_rtx does not import: {exc}")
            return
        rec["version"] = getattr(trt, "__version__", "?")
        targets = [t for w in kiln.client.workers() for t in w["targets"]
                   if t["backend"] == "tensorrt-rtx"]
        rec["announced"] = [{k: t.get(k) for k in ("arch", "builds", "runs", "runs_reason")}
                            for t in targets]
        path, profile = programs["convnet"]
        model = kiln.client.upload(path)
        t0 = time.perf_counter()
        sub = kiln.client.submit(model["id"], backend="tensorrt-rtx", device="cuda",
                                 inputs=profile)
        engine = kiln.client.wait(sub, timeout_s=300)
        rec.update(via="kiln", engine_id=engine["id"], submit_to_engine_s=round(
            time.perf_counter() - t0, 1), build_s=engine["build_seconds"],
            validation_status=engine.get("validation_status"),
            validation_reason=engine.get("validation_reason"), size=engine.get("size"))
        # Not validated, so not served by default; served when the request accepts it.
        again = kiln.client.submit(model["id"], backend="tensorrt-rtx", device="cuda",
                                   inputs=profile)
        rec["repeat_default"] = again.get("status")
        accepted = kiln.client.submit(model["id"], backend="tensorrt-rtx", device="cuda",
                                      inputs=profile, accept_unvalidated=True)
        rec["repeat_accept_unvalidated"] = accepted.get("status")
        plan = work / "kiln.rtx.plan"
        kiln.client.download(engine["id"], plan)
        rec.update(runtime_on_this_gpu=deserialize(trt, plan.read_bytes()))


def deserialize(trt: Any, plan: bytes) -> dict[str, Any]:
    """Hand a plan to TensorRT-RTX's runtime here and keep what it logs."""
    logs: list[str] = []

    class Capture(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)

        def log(self, severity: Any, msg: str) -> None:
            logs.append(f"{severity}: {msg}")

    runtime = trt.Runtime(Capture())
    engine = runtime.deserialize_cuda_engine(plan)
    return {"deserialized": engine is not None, "runtime_log": logs[-6:]}


def direct_rtx_build(trt: Any, work: Path) -> dict[str, Any]:
    """ONNX of the convnet -> TensorRT-RTX plan -> deserialize, with what the runtime logs."""
    import torch
    from export_convnet import ConvNet

    onnx_path = work / "convnet.onnx"
    torch.onnx.export(ConvNet().eval(), (torch.randn(4, 3, 32, 32),), str(onnx_path),
                      dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1, max=64)}},
                      dynamo=True)
    messages: list[str] = []

    class Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)

        def log(self, severity: Any, msg: str) -> None:
            messages.append(f"{severity}: {msg}")

    logger = Logger()
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes()):
        return {"parse_errors": [str(parser.get_error(i)) for i in range(parser.num_errors)]}
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    name = network.get_input(0).name
    profile.set_shape(name, (1, 3, 32, 32), (8, 3, 32, 32), (64, 3, 32, 32))
    config.add_optimization_profile(profile)
    t0 = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    build_s = time.perf_counter() - t0
    if plan is None:
        return {"build_s": build_s, "plan": None, "log": messages[-30:]}
    (work / "convnet.rtx.plan").write_bytes(bytes(plan))
    before = len(messages)
    runtime = trt.Runtime(logger)
    engine = runtime.deserialize_cuda_engine(bytes(plan))
    return {"build_s": round(build_s, 2), "plan_bytes": len(bytes(plan)),
            "deserialized": engine is not None, "runtime_log": messages[before:][-30:],
            "build_log_tail": messages[:before][-10:]}


class GpuSampler:
    """``nvidia-smi`` once a second: which GPU had compute processes, and when."""

    def __init__(self) -> None:
        self.samples: list[dict[str, Any]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.wait(1.0):
            try:
                out = subprocess.run(["nvidia-smi", "--query-compute-apps=gpu_uuid,pid,"
                                      "used_memory", "--format=csv,noheader"],
                                     capture_output=True, text=True, timeout=10).stdout
                # This script's own CUDA context (the TensorRT-RTX step) is not a build.
                self.samples.append({"t": round(elapsed(), 1), "apps": [
                    ln.strip() for ln in out.splitlines() if ln.strip()
                    and ln.split(",")[1:2] != [f" {os.getpid()}"]]})
            except Exception:
                pass

    def close(self) -> dict[str, Any]:
        self.stop.set()
        self.thread.join(timeout=5)
        busy = [s for s in self.samples if s["apps"]]
        both = [s for s in busy if len({a.split(",")[0] for a in s["apps"]}) > 1]
        return {"samples": len(self.samples), "busy_samples": len(busy),
                "samples_with_two_gpus_busy": len(both), "first_two_busy": both[:3]}


def two_worker_step(work: Path, programs: dict[str, tuple[Path, list[dict[str, Any]]]],
                    budget_s: float) -> None:
    """Issue 13: one worker per GPU, four jobs at once; each build's GPU from its own report."""
    if gpu_count() < 2:
        RESULTS["steps"]["two workers"] = {"ok": True, "skipped": f"{gpu_count()} GPU visible"}
        return
    jobs = [(n, programs[n][0], prof) for n in ("convnet", "encoder") if n in programs
            for prof in (programs[n][1], shifted(programs[n][1]))]
    with step("two workers, four jobs") as rec:
        kiln = Kiln(work / "kiln2", [0, 1], work / "cache2")
        sampler = GpuSampler()
        try:
            t0 = time.perf_counter()
            with ThreadPoolExecutor(len(jobs)) as pool:
                rows = list(pool.map(lambda j: build_one(kiln, j[0], j[1], j[2], "cuda"), jobs))
            rec["wall_s"] = round(time.perf_counter() - t0, 1)
        finally:
            rec["nvidia_smi"] = sampler.close()
            kiln.stop()
        rec["jobs"] = [{"model": r["model"], "gpu": r.get("gpu"), "build_s": r.get("build_s"),
                        "compiler_cache": r.get("compiler_cache"),
                        "submit_to_engine_s": r.get("submit_to_engine_s"),
                        "error": r.get("error"), "message": r.get("message")} for r in rows]
        rec["uuids"] = sorted({(r.get("gpu") or {}).get("uuid") or "?" for r in rows})
        one = {r["model"]: r.get("submit_to_engine_s") for r in RESULTS["engines"]
               if "error" not in r}
        rec["one_worker_estimate_s"] = round(sum(one.get(j[0]) or 0 for j in jobs), 1)
        if budget_s - elapsed() > 1.3 * rec["one_worker_estimate_s"] + 60:
            kiln1 = Kiln(work / "kiln3", [0], work / "cache3")
            try:
                t0 = time.perf_counter()
                with ThreadPoolExecutor(len(jobs)) as pool:
                    list(pool.map(lambda j: build_one(kiln1, j[0], j[1], shifted(j[2], 2),
                                                      "cuda"), jobs))
                rec["one_worker_measured_s"] = round(time.perf_counter() - t0, 1)
            finally:
                kiln1.stop()
        else:
            rec["one_worker_measured_s"] = None
            rec["note"] = "one-worker wall time estimated from the single builds above (budget)"


def shifted(profile: list[dict[str, Any]], by: int = 1) -> list[dict[str, Any]]:
    """Another profile of the same program (a different opt shape): a distinct engine."""
    out = []
    for p in profile:
        opt = list(p["opt"])
        opt[0] = max(p["min"][0], min(p["max"][0], opt[0] + by))
        out.append({**p, "opt": opt})
    return out


# --- report ------------------------------------------------------------------------------

def fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}g}" if abs(x) < 1000 else f"{x:.0f}"
    return str(x)


def table() -> str:
    lines = ["| program | target | shape | dims | engine ms | eager ms | speedup | max abs | "
             "build s | submit->engine s | overhead s | compiler | GPU (child) |",
             "|" + "---|" * 13]
    for r in RESULTS["engines"]:
        target = f"aoti/{r['device']}/{r.get('arch', '?')}"
        if "error" in r:
            lines.append(f"| {r['model']} | {target} | - | - | - | - | - | - | - | - | - | - | "
                         f"{r['error']}: {r['message'][:200]} |")
            continue
        gpu = r.get("gpu") or {}
        for label, s in r["shapes"].items():
            flag = " (flagged)" if s.get("flagged") else ""
            lines.append(
                f"| {r['model']} | {target} | {label} | {'x'.join(map(str, s['dims']))} | "
                f"{fmt(s['engine_ms'])}{flag} | {fmt(s['eager_ms'])} | {fmt(s['speedup'])} | "
                f"{fmt(s['max_abs'])} | {fmt(r['build_s'])} | {fmt(r['submit_to_engine_s'])} | "
                f"{fmt(r['overhead_s'])} | {r.get('cxx') or '-'} | "
                f"{gpu.get('name', '-')} {gpu.get('uuid') or ''} |")
    host = RESULTS.get("host") or {}
    extra = [f"sandbox {host.get('sandbox')}, warm spare {host.get('warm_spare')}"]
    for r in RESULTS["engines"]:  # where the overhead goes: the job's phase timings
        extra.append(f"{r['model']} timings: {json.dumps(r.get('timings'))}")
    worker = RESULTS.get("worker") or []
    for w in worker:
        cxx = w.get("aoti_cxx") or {}
        tried = [(t.get("compiler"), t.get("ok"), t.get("reason")) for t in cxx.get("tried", [])]
        extra.append(f"worker {w['id']}: targets {w['targets']}; compiler {cxx.get('compiler')}"
                     f" ({cxx.get('version', '')}; cached={cxx.get('cached')}; tried {tried})")
    rtx = RESULTS["steps"].get("tensorrt-rtx", {})
    extra.append("tensorrt-rtx: " + json.dumps({k: rtx.get(k) for k in (
        "skipped", "via", "version", "announced", "build_s", "submit_to_engine_s",
        "validation_status", "validation_reason", "repeat_default", "repeat_accept_unvalidated",
        "runtime_on_this_gpu", "deserialized", "runtime_log", "error")
        if rtx.get(k) is not None})[:2000])
    two = RESULTS["steps"].get("two workers, four jobs") or RESULTS["steps"].get("two workers")
    if two:
        extra.append("two workers: " + json.dumps({k: two.get(k) for k in (
            "skipped", "wall_s", "one_worker_measured_s", "one_worker_estimate_s", "uuids",
            "jobs", "nvidia_smi", "error") if two.get(k) is not None})[:3000])
    failed = [f"{k}: {v.get('error')}" for k, v in RESULTS["steps"].items() if v.get("error")]
    extra.append(f"steps: {len(RESULTS['steps'])}, failed: {failed or 'none'}; "
                 f"total {elapsed():.0f} s")
    return "\n".join(lines + [""] + extra)


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--quick", action="store_true",
                        help="convnet and MiniLM only, smaller profiles (a check of the path)")
    parser.add_argument("--out", default=os.environ.get("OUT") or ".")
    parser.add_argument("--budget-s", type=float, default=510.0,
                        help="skip optional measurements that would run past this")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="kiln-smoke-"))
    RESULTS["args"] = vars(args)
    # `timeout` in gpu_smoke.sh sends SIGTERM: unwind, so the table and the JSON still come out.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        host_step(args.device)
        programs = export_programs(work, args.quick)
        one_worker_step(work, programs, args.device)
        if args.device == "cuda":
            two_worker_step(work, programs, args.budget_s)
    except KeyboardInterrupt:
        RESULTS["errors"].append({"step": "run", "error": f"stopped at {elapsed():.0f} s "
                                  "(time limit); the steps so far are reported"})
    finally:
        report = table()
        print("\n" + report, flush=True)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "gpu_smoke.json").write_text(json.dumps(RESULTS, indent=1, default=str))
        (out / "gpu_smoke.md").write_text(report + "\n")
        for log in work.glob("kiln*/logs/*.log"):
            shutil.copy(log, out / f"{log.parent.parent.name}-{log.name}")


if __name__ == "__main__":
    main()
