"""Kiln end to end on a GPU host: `kiln serve` on the embedded defaults, then compile two
programs with dynamic dims for cuda (and cpu) through the Python client, and print each
engine's validation and latency against eager. Run by scripts/gpu_run.sh."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))

from kiln.client import KilnAPIError, KilnClient  # noqa: E402


def main() -> None:
    from export_convnet import export
    from export_encoder import export as export_encoder

    work = Path(tempfile.mkdtemp(prefix="kiln-gpu-"))
    export(str(work / "convnet.pt2"))
    export_encoder(str(work / "encoder.pt2"))
    env = {**os.environ, "KILN_DATA_DIR": str(work / "kiln"), "KILN_BUILD_TIMEOUT_S": "600",
           "KILN_MAX_ATTEMPTS": os.environ.get("KILN_GPU_MAX_ATTEMPTS", "2")}
    server = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--port", "8765"],
                              env=env, cwd=ROOT)
    kiln = KilnClient("http://127.0.0.1:8765")
    for _ in range(240):
        try:
            kiln.health()
            break
        except Exception:
            time.sleep(0.5)
    print("workers:", json.dumps(kiln.workers(), indent=1)[:3000])
    cases = [
        ("convnet", "cuda", [{"name": "x", "min": [1, 3, 32, 32], "opt": [8, 3, 32, 32],
                              "max": [64, 3, 32, 32]}]),
        ("encoder", "cuda", [{"name": "x", "min": [1, 4, 256], "opt": [8, 128, 256],
                              "max": [32, 256, 256]}]),
        ("convnet", "cpu", [{"name": "x", "min": [1, 3, 32, 32], "opt": [8, 3, 32, 32],
                             "max": [64, 3, 32, 32]}]),
    ]
    rows = []
    for name, device, inputs in cases:
        model = kiln.upload(work / f"{name}.pt2")
        t0 = time.perf_counter()
        try:
            sub = kiln.submit(model["id"], backend="aoti", device=device, inputs=inputs)
            engine = kiln.wait(sub, timeout_s=900)
            wall = time.perf_counter() - t0
            t1 = time.perf_counter()
            again = kiln.submit(model["id"], backend="aoti", device=device, inputs=inputs)
            hit_ms = (time.perf_counter() - t1) * 1000
            val = engine["validation"]["shapes"]
            for label, b in engine["benchmark"]["shapes"].items():
                rows.append({"model": name, "device": device, "shape": label,
                             "dims": b["shapes"][0], "engine_ms": round(b["engine_ms"], 4),
                             "eager_ms": round(b["eager_ms"], 4),
                             "speedup": round(b["speedup"], 2),
                             "max_abs": max(o.get("max_abs") or 0 for o in val[label]["outputs"]),
                             "build_s": engine["build_seconds"], "submit_to_engine_s":
                             round(wall, 1), "repeat": again["status"],
                             "repeat_ms": round(hit_ms, 1), "arch": engine["target"]["arch"],
                             "cache": engine["build_report"].get("compiler_cache")})
        except KilnAPIError as exc:
            job = exc.details.get("job", {})
            rows.append({"model": name, "device": device, "error": exc.code,
                         "message": exc.message[:400], "attempts": job.get("attempts"),
                         "log_tail": (job.get("log_tail") or "")[-1500:]})
    for row in rows:
        print(json.dumps(row))
    print("worker still up after all jobs:", kiln.workers() != [])
    out = os.environ.get("OUT")
    if out:
        Path(out, "gpu_e2e.json").write_text(json.dumps(rows, indent=1))
    server.terminate()
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.kill()


if __name__ == "__main__":
    main()
