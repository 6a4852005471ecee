"""The ``kiln`` command line: run the service, and compile models against a running one."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import click
from tqdm import tqdm

from service.client import KilnAPIError, KilnClient, parse_input
from service.settings import Settings

DEFAULT_SERVER = os.environ.get("KILN_SERVER", "http://127.0.0.1:8000")


@click.group()
def main() -> None:
    """Kiln: compile torch.export programs into engines, and reuse them."""


@main.group()
def db() -> None:
    """Database schema (Alembic)."""


@db.command("upgrade")
def db_upgrade() -> None:
    """Create or migrate the schema to the latest revision."""
    from service.db import upgrade

    settings = Settings.from_env()
    upgrade(settings.database_url)
    click.echo(f"schema at head: {settings.database_url}")


@main.command(context_settings={"ignore_unknown_options": True})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def worker(args: tuple[str, ...]) -> None:
    """Run a build worker (options: --gpu N, --backends aoti,onnx, --name NAME)."""
    os.execv(sys.executable, [sys.executable, "-m", "workers", *args])


def _wait_for_worker(settings: Settings, proc: subprocess.Popen[bytes], timeout_s: float) -> None:
    from service.db import Database
    from service.worker_registry import live_workers

    database = Database(settings.database_url)
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise click.ClickException(f"the worker exited with status {proc.returncode}")
            with database.session() as s:
                if live_workers(s, settings.worker_ttl_s):
                    return
            time.sleep(0.5)
        raise click.ClickException("the worker did not register in time")
    finally:
        database.dispose()


def _interrupt(*_: object) -> None:
    # shutdown() from a handler running inside serve_forever would wait for itself.
    raise KeyboardInterrupt


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--data-dir", type=click.Path(file_okay=False), help="default: $KILN_DATA_DIR "
              "or ./.kiln")
@click.option("--no-worker", "--api-only", "no_worker", is_flag=True,
              help="serve the API only (housekeeping still runs)")
@click.option("--backends", default="", help="the worker's backends, e.g. aoti,onnx "
              "(default: all this host can build)")
def serve(host: str, port: int, data_dir: str | None, no_worker: bool, backends: str) -> None:
    """Start the API and one supervised worker on the embedded defaults (or the configured
    servers). A worker that dies is restarted, and its jobs are requeued saying why."""
    from werkzeug.serving import make_server

    from service import housekeeping
    from service.app import create_app
    from service.db import upgrade
    from service.logging_setup import configure as configure_logging
    from service.worker_supervisor import WorkerSupervisor

    settings = Settings.from_env(data_dir=data_dir)
    configure_logging(settings.log_format)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade(settings.database_url)
    env = {**os.environ, **settings.to_env()}
    argv = [sys.executable, "-m", "workers", "--name", "local"]
    if backends:
        argv += ["--backends", backends]
    app = create_app(settings)
    services = app.extensions["kiln"]
    supervisor = None
    if not no_worker:
        click.echo("starting a worker (probing this host's toolchains)...")
        supervisor = WorkerSupervisor(services, lambda: subprocess.Popen(argv, env=env))
    # Sweeping here too: with the worker dead, a lapsed lease must still be swept.
    stop_housekeeping = housekeeping.start_thread(services, f"serve@{socket.gethostname()}-"
                                                  f"{os.getpid()}")
    try:
        if supervisor:
            _wait_for_worker(settings, supervisor.proc, timeout_s=300)
            supervisor.watch()
        server = make_server(host, port, app, threaded=True)
        click.echo(f"Kiln is serving on http://{host}:{server.server_port}  "
                   f"(data in {settings.data_dir}; dashboard at /admin)")
        signal.signal(signal.SIGTERM, _interrupt)  # stop like Ctrl-C: the worker goes too
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        stop_housekeeping.set()
        if supervisor:
            supervisor.stop()


@main.command("housekeeping")
def housekeeping_loop() -> None:
    """Run housekeeping in the foreground: sweep lost jobs, evict, collect orphans.

    Workers and `kiln serve` run it already; a deployment whose workers may all be down runs
    this too (each task still runs once per deployment: they share a lease).
    """
    import threading

    from service import housekeeping
    from service.logging_setup import configure as configure_logging
    from service.services import Services

    services = Services(Settings.from_env())
    configure_logging(services.settings.log_format)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    click.echo("housekeeping: sweeping every "
               f"{services.settings.sweep_interval_s} s, collecting a page of the store every "
               f"{services.settings.gc_interval_s} s")
    try:
        housekeeping.run_forever(services, f"housekeeping@{socket.gethostname()}-{os.getpid()}",
                                 stop)
    except KeyboardInterrupt:
        pass


@main.command()
@click.option("--dry-run", is_flag=True, help="only say what would be collected")
def gc(dry_run: bool) -> None:
    """Collect orphaned blobs and enforce the store budget now, over the whole store.

    Housekeeping does this a page at a time on its own; this is the full pass, on demand.
    """
    from service import store_budget
    from service.services import Services

    services = Services(Settings.from_env())
    settings = services.settings
    if dry_run:
        orphans = store_budget.find_orphans(services, settings.gc_grace_s)
        for uri in orphans:
            click.echo(f"would collect {uri}")
        click.echo(f"{len(orphans)} orphaned blob(s) older than {settings.gc_grace_s} s")
        return
    evicted = 0
    if settings.store_budget_bytes:
        report = store_budget.enforce_budget(services, settings.store_budget_bytes,
                                             settings.gc_grace_s)
        evicted = len(report.evicted)
        click.echo(f"evicted {evicted} engine(s): {report.bytes_before} -> "
                   f"{report.bytes_after} bytes (budget {settings.store_budget_bytes})")
    removed = store_budget.collect_orphans(services, settings.gc_grace_s)
    for uri in removed:
        click.echo(f"collected {uri}")
    click.echo(f"collected {len(removed)} orphaned blob(s) older than {settings.gc_grace_s} s")


def _option(text: str) -> tuple[str, object]:
    """``KEY=VALUE`` with a JSON value (``5``, ``true``), or a plain string."""
    import json

    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ValueError(f"--option {text!r}: write KEY=VALUE, e.g. optimization_level=5")
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value


def _bar(desc: str, total: int) -> tqdm:
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
                leave=True, file=sys.stderr)


@main.command()
@click.argument("model", type=click.Path(exists=True, dir_okay=False))
@click.option("--input", "inputs", multiple=True, metavar="NAME:MIN,OPT,MAX",
              help="shape profile of one input, shapes like 1x3x224x224 (repeat per input); "
                   "default: the program's own ranges")
@click.option("--backend", default="aoti", show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.option("--option", "options", multiple=True, metavar="KEY=VALUE",
              help="backend option, e.g. optimization_level=5 (JSON values)")
@click.option("--reuse", default="covering", show_default=True,
              type=click.Choice(["exact", "covering", "never"]))
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="where to save the engine")
@click.option("--server", default=DEFAULT_SERVER, show_default=True)
def compile(model: str, inputs: tuple[str, ...], backend: str, device: str,
            options: tuple[str, ...], reuse: str, output: str | None, server: str) -> None:
    """Upload MODEL (.pt2), build or reuse an engine, and download it."""
    import json

    kiln = KilnClient(server)
    try:
        profile = [parse_input(i) for i in inputs] or None
        opts = dict(_option(o) for o in options)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc
    try:
        with _bar("upload", Path(model).stat().st_size) as bar:
            record = kiln.upload(model, progress=bar.update)
        click.echo(f"model {record['id']} ({record['model_hash'][:12]})", err=True)
        t0 = time.monotonic()
        submitted = kiln.submit(record["id"], backend=backend, device=device, inputs=profile,
                                options=opts, reuse=reuse)
        cached = submitted["status"] == "cached"
        if cached:
            click.echo(f"cache hit: engine {submitted['engine_id']} ({submitted['reason']})",
                       err=True)
        else:
            click.echo(f"job {submitted['id']} {submitted['submit']}: {submitted['reason']}",
                       err=True)
        last = {"status": ""}

        def show(job: dict) -> None:
            if job["status"] != last["status"]:
                last["status"] = job["status"]
                click.echo(f"  [{time.monotonic() - t0:6.1f}s] {job['status']}", err=True)

        engine = kiln.wait(submitted, on_update=show)
        suffix = engine["build_report"].get("artifact_suffix", ".bin")
        dest = Path(output or f"{Path(model).stem}.{engine['target']['backend']}"
                    f".{engine['target']['device']}{suffix}")
        with _bar("download", engine["size"]) as bar:
            kiln.download(engine["id"], dest, progress=bar.update,
                          expected_sha256=engine["sha256"])
    except KilnAPIError as exc:
        detail = f"\n  details: {json.dumps(exc.details)[:2000]}" if exc.details else ""
        raise click.ClickException(f"{exc.code}: {exc.message}{detail}") from exc
    except OSError as exc:
        raise click.ClickException(f"cannot reach Kiln at {server}: {exc}") from exc
    bench = engine.get("benchmark", {}).get("shapes", {})
    for label, b in bench.items():
        click.echo(f"  {label:>4} {b['shapes']}: engine {b['engine_ms']:.3f} ms, "
                   f"eager {b['eager_ms']:.3f} ms", err=True)
    click.echo(f"engine {engine['id']} sha256 {engine['sha256']}")
    click.echo(f"saved to {dest}")
    click.echo(f"from cache: {'yes' if cached else 'no'}")


if __name__ == "__main__":
    main()
