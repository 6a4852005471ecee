"""The ``kiln`` command line: the server commands (serve, worker, db) live here; the user's
commands (compile, models, jobs, engines, workers, logs, cancel) come from ``kiln.cli``."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import click

from kiln import __version__
from kiln.cli import add_commands
from service.settings import Settings


@click.group()
@click.version_option(__version__, prog_name="kiln")
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
@click.option("--no-worker", is_flag=True, help="serve the API only")
def serve(host: str, port: int, data_dir: str | None, no_worker: bool) -> None:
    """Start the API and one worker on the embedded defaults (or the configured servers)."""
    from werkzeug.serving import make_server

    from service.app import create_app
    from service.db import upgrade

    settings = Settings.from_env(data_dir=data_dir)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade(settings.database_url)
    env = {**os.environ, **settings.to_env()}
    proc = None
    if not no_worker:
        click.echo("starting a worker (probing this host's toolchains)...")
        proc = subprocess.Popen([sys.executable, "-m", "workers", "--name", "local"], env=env)
    try:
        if proc:
            _wait_for_worker(settings, proc, timeout_s=300)
        server = make_server(host, port, create_app(settings), threaded=True)
        click.echo(f"Kiln is serving on http://{host}:{server.server_port}  "
                   f"(data in {settings.data_dir}; dashboard at /admin)")
        signal.signal(signal.SIGTERM, _interrupt)  # stop like Ctrl-C: the worker goes too
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        if proc and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()


add_commands(main)


if __name__ == "__main__":
    main()
