"""The user's ``kiln`` commands: compile, and list / show / follow / cancel what the API holds.

Every command takes ``--server`` (``$KILN_SERVER``), ``--api-key`` (``$KILN_API_KEY``) and
``--json`` (the API's records, for scripts). Errors print one line per problem, with terminal
escape codes removed from anything the server sent. The server commands (serve, worker, db)
live in ``service.cli``, which adds these to the same ``kiln`` group.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from tqdm import tqdm

from kiln.client import KilnAPIError, KilnClient, parse_input, plain
from kiln.engine_format import file_sha256, metadata_from_record, write_sidecar

DEFAULT_SERVER = "http://127.0.0.1:8000"


# ---- shared plumbing ---------------------------------------------------------------------

def _server() -> str:
    return os.environ.get("KILN_SERVER", DEFAULT_SERVER)


def problem_lines(exc: KilnAPIError) -> list[str]:
    """An API error as one line per problem: the error, then each listed sub-problem."""
    lines = [f"{exc.code}: {plain(exc.message)}"]
    for item in exc.details.get("errors", []) or []:
        if isinstance(item, dict):
            where = item.get("field") or item.get("input") or ""
            dims = f" dim {item['dim']}" if item.get("dim") is not None else ""
            code = f"{item['code']}: " if item.get("code") else ""
            text = plain(str(item.get("message", ""))).replace("\n", " ")
            lines.append(f"  - {code}{where}{dims}{': ' if where else ''}{text}".rstrip(": "))
    for key in ("misses", "live_targets"):
        if exc.details.get(key) and not exc.details.get("errors"):
            lines.append(f"  {key}: {json.dumps(exc.details[key])[:300]}")
    return lines


class KilnCommand(click.Command):
    """A command whose API errors leave as one line per problem and exit status 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except KilnAPIError as exc:
            for line in problem_lines(exc):
                click.echo(f"error: {line}" if not line.startswith("  ") else line, err=True)
            ctx.exit(1)
        except OSError as exc:  # requests' ConnectionError is an OSError
            server = ctx.params.get("server", _server())
            reason = plain(str(exc)).splitlines()[0][:300] if str(exc) else type(exc).__name__
            click.echo(f"error: cannot reach Kiln at {server}: {reason}", err=True)
            ctx.exit(1)


def common(fn: Callable[..., Any]) -> Callable[..., Any]:
    """--server, --api-key, --json; passes ``kiln`` (a client) and ``as_json``."""

    @click.option("--server", default=_server, show_default="$KILN_SERVER or "
                  f"{DEFAULT_SERVER}", help="Kiln API address")
    @click.option("--api-key", default=None, help="API key (default: $KILN_API_KEY)")
    @click.option("--json", "as_json", is_flag=True, help="print the API's JSON records")
    @functools.wraps(fn)
    def wrapper(server: str, api_key: str | None, as_json: bool, **kw: Any) -> Any:
        return fn(KilnClient(server, api_key=api_key), as_json, **kw)

    return wrapper


def _emit(as_json: bool, data: Any, text: Callable[[Any], list[str]]) -> None:
    if as_json:
        click.echo(json.dumps(data, indent=2, sort_keys=True))
    else:
        for line in text(data):
            click.echo(line)


def _shape(p: dict[str, Any]) -> str:
    return f"{p['name']} {p['min']}..{p['max']} (opt {p['opt']})"


def _model_lines(m: dict[str, Any]) -> str:
    dims = "; ".join(f"{i['name']} {i.get('dtype', '')} {i.get('shape')}" for i in m["inputs"])
    return f"{m['id']}  {m['model_hash'][:12]}  {m['size']:>10} B  {m['filename']}  {dims}"


def _job_line(j: dict[str, Any]) -> str:
    t = j["target"]
    err = f"  {j['error']['code']}: {plain(j['error']['message'] or '')}" if j.get("error") else ""
    return (f"{j['id']}  {j['status']:<10} {t['backend']}/{t['device']}  model {j['model_id']}"
            f"  engine {j.get('engine_id') or '-'}{err}")


def _engine_line(e: dict[str, Any]) -> str:
    t = e["target"]
    shapes = "; ".join(_shape(p) for p in e["inputs"])
    return (f"{e['id']}  {t['backend']}/{t['device']}/{t['arch']}  {e['size']:>10} B  "
            f"hits {e['hits']}  {shapes}")


def _detail_lines(record: dict[str, Any]) -> list[str]:
    lines = []
    for key in sorted(record):
        value = record[key]
        text = value if isinstance(value, str) else json.dumps(value)
        lines.append(f"{key}: {plain(str(text))[:400]}")
    return lines


# ---- list / show ---------------------------------------------------------------------------

@click.group()
def models() -> None:
    """Uploaded programs."""


@models.command("list", cls=KilnCommand)
@common
def models_list(kiln: KilnClient, as_json: bool) -> None:
    """Your uploaded models, newest first."""
    _emit(as_json, kiln.models(), lambda rows: [_model_lines(m) for m in rows])


@models.command("show", cls=KilnCommand)
@click.argument("model_id")
@common
def models_show(kiln: KilnClient, as_json: bool, model_id: str) -> None:
    """One model: hashes, input signature."""
    _emit(as_json, kiln.model(model_id), _detail_lines)


@click.group()
def jobs() -> None:
    """Compile jobs."""


@jobs.command("list", cls=KilnCommand)
@click.option("--status", type=click.Choice(["queued", "building", "validating", "succeeded",
                                             "failed", "cancelled"]))
@common
def jobs_list(kiln: KilnClient, as_json: bool, status: str | None) -> None:
    """Your jobs, newest first."""
    rows = kiln.jobs(**({"status": status} if status else {}))
    _emit(as_json, rows, lambda rows: [_job_line(j) for j in rows])


@jobs.command("show", cls=KilnCommand)
@click.argument("job_id")
@common
def jobs_show(kiln: KilnClient, as_json: bool, job_id: str) -> None:
    """One job: state, timings, error, log tail."""
    _emit(as_json, kiln.job(job_id), _detail_lines)


@click.group()
def engines() -> None:
    """Built engines."""


@engines.command("list", cls=KilnCommand)
@click.option("--model", help="model id, model hash or file sha256")
@click.option("--backend")
@click.option("--device")
@common
def engines_list(kiln: KilnClient, as_json: bool, model: str | None, backend: str | None,
                 device: str | None) -> None:
    """Engines of your models."""
    query = {k: v for k, v in (("model", model), ("backend", backend), ("device", device)) if v}
    _emit(as_json, kiln.engines(**query), lambda rows: [_engine_line(e) for e in rows])


@engines.command("show", cls=KilnCommand)
@click.argument("engine_id")
@common
def engines_show(kiln: KilnClient, as_json: bool, engine_id: str) -> None:
    """One engine: target, toolchain, profile, validation and benchmark."""
    _emit(as_json, kiln.engine(engine_id), _detail_lines)


@engines.command("download", cls=KilnCommand)
@click.argument("engine_id")
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="default: ENGINE_ID.SUFFIX")
@common
def engines_download(kiln: KilnClient, as_json: bool, engine_id: str, output: str | None
                     ) -> None:
    """Download an engine (sha256-checked, resumable) with its profile beside it."""
    engine = kiln.engine(engine_id)
    dest = Path(output or f"{engine_id}{engine['build_report'].get('artifact_suffix', '.bin')}")
    fetched = _fetch(kiln, engine, None, dest)
    _emit(as_json, {"engine": engine, "path": str(dest), "downloaded": fetched},
          lambda d: [f"{'saved' if fetched else 'already have'} {d['path']}"])


@click.group()
def workers() -> None:
    """Live build workers."""


@workers.command("list", cls=KilnCommand)
@common
def workers_list(kiln: KilnClient, as_json: bool) -> None:
    """Workers that renewed their registration recently, with their targets."""
    def lines(rows: list[dict[str, Any]]) -> list[str]:
        return [f"{w['id']}  {w['hostname']}  job {w.get('current_job_id') or '-'}  "
                + ", ".join(f"{t['backend']}/{t['device']}/{t['arch']}" for t in w["targets"])
                for w in rows]
    _emit(as_json, kiln.workers(), lines)


@workers.command("show", cls=KilnCommand)
@click.argument("worker_id")
@common
def workers_show(kiln: KilnClient, as_json: bool, worker_id: str) -> None:
    """One worker: host, toolchains, current job."""
    found = [w for w in kiln.workers() if w["id"] == worker_id]
    if not found:
        raise KilnAPIError(404, "not_found", f"worker {worker_id} not found (or not live)", {})
    _emit(as_json, found[0], _detail_lines)


@click.command(cls=KilnCommand)
@common
def targets(kiln: KilnClient, as_json: bool) -> None:
    """Backends, their devices and options (types, defaults)."""
    data = kiln.targets()
    _emit(as_json, data, lambda d: [line for name in sorted(d) for line in
                                    [f"{name} (devices: {', '.join(d[name]['devices'])})"]
                                    + [f"  {o}" for o in option_lines(d[name])]])


@click.command(cls=KilnCommand)
@click.argument("job_id")
@click.option("-f", "--follow", is_flag=True, help="keep printing until the job ends")
@common
def logs(kiln: KilnClient, as_json: bool, job_id: str, follow: bool) -> None:
    """A job's build log (live with --follow, over Server-Sent Events)."""
    if not follow:
        text = kiln.job_log(job_id)
        _emit(as_json, {"job_id": job_id, "log": text}, lambda d: [plain(d["log"]).rstrip()])
        return
    for event in kiln.events(job_id, log=True):
        if as_json:
            click.echo(json.dumps(event))
        elif event["event"] == "log":
            click.echo(plain(event["data"]["text"]), nl=False)
        elif event["event"] == "state":
            click.echo(f"[{event['data']['status']}]", err=True)


@click.command(cls=KilnCommand)
@click.argument("job_id")
@common
def cancel(kiln: KilnClient, as_json: bool, job_id: str) -> None:
    """Cancel a queued or running job."""
    _emit(as_json, kiln.cancel(job_id), lambda j: [f"job {j['id']} {j['status']}"])


# ---- compile ---------------------------------------------------------------------------

def option_lines(backend: dict[str, Any]) -> list[str]:
    """``name (type, default X): description`` per option of one backend's schema."""
    props = backend.get("options", {}).get("properties", {})
    out = []
    for name in sorted(props):
        p = props[name]
        kind = p.get("type") or "|".join(str(a.get("type", a.get("const", "?")))
                                         for a in p.get("anyOf", []))
        if p.get("enum"):
            kind = "|".join(map(str, p["enum"]))
        out.append(f"{name} ({kind}, default {json.dumps(p.get('default'))}): "
                   f"{p.get('description', '')}".rstrip(": "))
    return out


def _targets_or_none(server: str) -> dict[str, Any] | None:
    try:
        return KilnClient(server, timeout=3).targets()
    except (OSError, KilnAPIError):
        return None


class CompileCommand(KilnCommand):
    """``kiln compile``: its --help lists the server's backends and their options."""

    def format_help(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        super().format_help(ctx, formatter)
        server = ctx.params.get("server") or _server()
        found = _targets_or_none(server)
        with formatter.section(f"Backends and --option KEY=VALUE (from {server})"):
            if found is None:
                formatter.write_text(f"(server {server} unreachable: run `kiln targets` "
                                     "against your server)")
                return
            for name in sorted(found):
                formatter.write_text(f"{name} (devices: {', '.join(found[name]['devices'])})")
                with formatter.indentation():
                    for line in option_lines(found[name]) or ["(no options)"]:
                        formatter.write_text(line)


def _parse_option(text: str) -> tuple[str, object]:
    """``KEY=VALUE`` with a JSON value (``5``, ``true``), or a plain string."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise click.BadParameter(f"{text!r}: write KEY=VALUE, e.g. max_autotune=true",
                                 param_hint="--option")
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value


def check_options(found: dict[str, Any] | None, backend: str, options: dict[str, Any]) -> None:
    """Refuse an unknown backend or option before uploading, naming what is valid."""
    if found is None:
        return
    if backend not in found:
        raise click.BadParameter(f"{backend!r} is not one of {', '.join(sorted(found))}",
                                 param_hint="--backend")
    props = found[backend].get("options", {}).get("properties", {})
    unknown = sorted(set(options) - set(props))
    if unknown:
        valid = "; ".join(option_lines(found[backend])) or "none"
        raise click.BadParameter(f"{', '.join(unknown)} not an option of backend {backend}; "
                                 f"its options: {valid}", param_hint="--option")


def _bar(desc: str, total: int) -> tqdm:
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
                leave=True, file=sys.stderr, disable=None)


def _fetch(kiln: KilnClient, engine: dict[str, Any], model: dict[str, Any] | None,
           dest: Path) -> bool:
    """Put the engine at ``dest`` with its sidecar; False when ``dest`` already held it."""
    if dest.is_file() and dest.stat().st_size == engine["size"] and \
            file_sha256(dest) == engine["sha256"]:
        fetched = False
    else:
        with _bar("download", engine["size"]) as bar:
            kiln.download(engine["id"], dest, progress=bar.update,
                          expected_sha256=engine["sha256"], expected_size=engine["size"])
        fetched = True
    write_sidecar(dest, metadata_from_record(engine, model))
    return fetched


def _interrupted(kiln: KilnClient, job_id: str) -> None:
    """Ctrl-C while a job runs: ask whether to cancel it; without a terminal, say how."""
    if sys.stdin.isatty():
        try:
            answer = click.confirm(f"\ncancel job {job_id} on the server?", default=False,
                                   err=True)
        except (click.Abort, EOFError, KeyboardInterrupt):
            answer = False
        if answer:
            kiln.cancel(job_id)
            click.echo(f"job {job_id} cancelled", err=True)
            sys.exit(130)
    click.echo(f"interrupted: job {job_id} keeps running on the server; follow it with "
               f"`kiln logs {job_id} --follow`, cancel it with `kiln cancel {job_id}`", err=True)
    sys.exit(130)


@click.command(cls=CompileCommand)
@click.argument("model", type=click.Path(exists=True, dir_okay=False))
@click.option("--input", "inputs", multiple=True, metavar="NAME:MIN,OPT,MAX",
              help="shape profile of one input, shapes like 1x3x224x224 (repeat per input); "
                   "default: the program's own ranges")
@click.option("--backend", default="aoti", show_default=True,
              help="a backend the server builds (listed below)")
@click.option("--device", default="cpu", show_default=True, type=click.Choice(["cpu", "cuda"]))
@click.option("--option", "options", multiple=True, metavar="KEY=VALUE",
              help="backend option, JSON value (listed below per backend)")
@click.option("--reuse", default="covering", show_default=True,
              type=click.Choice(["exact", "covering", "never"]))
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="where to save the engine")
@common
def compile(kiln: KilnClient, as_json: bool, model: str, inputs: tuple[str, ...], backend: str,
            device: str, options: tuple[str, ...], reuse: str, output: str | None) -> None:
    """Upload MODEL (.pt2) unless the server has it, build or reuse an engine, download it
    unless the output file already is that engine."""
    from kiln.compiler import model_hash

    try:
        profile = [parse_input(i) for i in inputs] or None
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--input") from None
    opts = dict(_parse_option(o) for o in options)
    check_options(_targets_or_none(kiln.url), backend, opts)
    size = Path(model).stat().st_size
    with _bar("upload", size) as bar:
        record, uploaded = kiln.upload_once(model, model_hash=model_hash(model),
                                            progress=bar.update)
    click.echo(f"model {record['id']} ({record['model_hash'][:12]}): "
               f"{'uploaded' if uploaded else 'already on the server, not uploaded'}", err=True)
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

    def show(job: dict[str, Any]) -> None:
        click.echo(f"  [{time.monotonic() - t0:6.1f}s] {job['status']}", err=True)

    previous = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        engine = kiln.wait(submitted, on_update=show)
    except KeyboardInterrupt:
        _interrupted(kiln, submitted["id"])
    except KilnAPIError as exc:
        job = exc.details.get("job")
        if job:  # a failed build: its error, then the end of its log, not a bare code
            click.echo(f"error: build {job['status']}: {exc.code}: {plain(exc.message)}",
                       err=True)
            tail = plain(kiln.job_log(job["id"])).rstrip().splitlines()[-20:]
            for line in tail:
                click.echo(f"  | {line}", err=True)
            click.echo(f"full log: kiln logs {job['id']}", err=True)
            sys.exit(1)
        raise
    finally:
        signal.signal(signal.SIGINT, previous)
    suffix = engine["build_report"].get("artifact_suffix", ".bin")
    dest = Path(output or f"{Path(model).stem}.{engine['target']['backend']}"
                f".{engine['target']['device']}{suffix}")
    fetched = _fetch(kiln, engine, record, dest)
    if as_json:
        click.echo(json.dumps({"engine": engine, "path": str(dest), "from_cache": cached,
                               "uploaded": uploaded, "downloaded": fetched}, indent=2))
        return
    for label, b in engine.get("benchmark", {}).get("shapes", {}).items():
        click.echo(f"  {label:>4} {b['shapes']}: engine {b['engine_ms']:.3f} ms, "
                   f"eager {b['eager_ms']:.3f} ms", err=True)
    click.echo(f"engine {engine['id']} sha256 {engine['sha256']}")
    click.echo(f"saved to {dest}" if fetched else f"{dest} already is this engine: not "
               "downloaded")
    click.echo(f"from cache: {'yes' if cached else 'no'}")
    click.echo(f"load it with: kiln.load({str(dest)!r})")


COMMANDS = [compile, models, jobs, engines, workers, targets, logs, cancel]


def add_commands(group: click.Group) -> None:
    for command in COMMANDS:
        group.add_command(command)


@click.group(commands=COMMANDS)
@click.version_option(package_name="kiln", prog_name="kiln")
def main() -> None:
    """Kiln client: compile PyTorch programs on a Kiln server, inspect jobs, engines, workers.

    (A client-only entry point; ``service.cli:main`` adds the server commands to these.)"""
