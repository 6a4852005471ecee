"""The ``kiln`` command line: the server commands (serve, worker, db) live here; the user's
commands (compile, models, jobs, engines, workers, logs, cancel) come from ``kiln.cli``."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import click

from kiln import __version__
from kiln.cli import add_commands
from service import keys_cli
from service.settings import Settings


@click.group()
@click.version_option(__version__, prog_name="kiln")
def main() -> None:
    """Kiln: compile torch.export programs into engines, and reuse them."""


main.add_command(keys_cli.keys)


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
    if first_key := keys_cli.first_admin_key(settings):
        click.echo(f"first start: created an admin API key, shown only now: {first_key}")
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


add_commands(main)


if __name__ == "__main__":
    main()
