"""The ``kiln`` command line: run the service, and compile models against a running one."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import click
from tqdm import tqdm

from service import keys_cli
from service.client import KilnAPIError, KilnClient, parse_input
from service.settings import Settings

DEFAULT_SERVER = os.environ.get("KILN_SERVER", "http://127.0.0.1:8000")


@click.group()
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
@click.option("--no-worker", is_flag=True, help="serve the API only")
def serve(host: str, port: int, data_dir: str | None, no_worker: bool) -> None:
    """Start the API and one worker on the embedded defaults (or the configured servers)."""
    from werkzeug.serving import make_server

    from service.app import create_app
    from service.db import upgrade

    settings = Settings.from_env(data_dir=data_dir)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade(settings.database_url)
    if first_key := keys_cli.first_admin_key(settings):
        click.echo(f"first start: created an admin API key, shown only now: {first_key}")
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
