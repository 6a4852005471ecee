"""The dashboard in a real browser: headless Chromium (Debian's ``chromium``) driven by
Playwright, against a real Kiln served by a thread, with real jobs and engines in its database
(made through upload, submit, claim and succeed; no build runs).

An operator signs in, visits every page, filters and pages through lists, follows a job,
cancels a running job, pins and evicts an engine, creates and revokes a key, drains a worker,
and finds each action in the audit log. A user key gets only the 403 page. Screenshots of every
page go to ``tests/artifacts/screenshots/`` (git-ignored).

Set-up: ``apt-get install -y chromium`` and ``pip install playwright==1.49.1`` (no
``playwright install``: the system browser is used through ``executable_path``).
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask

from service.db import upgrade
from service.models import AuditEntry, Engine, Job
from tests.conftest import ROOT, _ServerThread, make_settings
from tests.test_dashboard import World, make_world

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SHOTS = ROOT / "tests" / "artifacts" / "screenshots"
ADMIN_KEY, USER_KEY = "browser-admin-key-0123456789", "browser-user-key-0123456789"

sync_api = pytest.importorskip("playwright.sync_api",
                               reason="Playwright for Python is not installed "
                                      "(pip install playwright==1.49.1)")
if CHROMIUM is None:
    pytest.skip("Debian's chromium is not installed (apt-get install -y chromium)",
                allow_module_level=True)


@pytest.fixture
def kiln(tmp_path: Path, programs: dict[str, Path]) -> Iterator[tuple[str, Flask, World]]:
    from service.app import create_app

    settings = make_settings(tmp_path / "kiln", api_keys={ADMIN_KEY: ("root", "admin"),
                                                          USER_KEY: ("alice", "user")})
    upgrade(settings.database_url)
    app = create_app(settings)
    world = make_world(app, programs)
    with world.services.db.session() as s:  # enough failed jobs for two pages of the list
        template = s.get(Job, world.done_job)
        for i in range(30):
            s.add(Job(owner="bob", model_id=world.model_id, backend="aoti", device="cpu",
                      arch=template.arch, toolchain_id=template.toolchain_id,
                      queue=template.queue, options={}, profile=template.profile,
                      cache_key=f"old-{i}", status="failed", error_code="build_failed",
                      started_at=template.started_at, finished_at=template.finished_at,
                      error_message="\x1b[31merror:\x1b[0m compiler exited 1", timings={},
                      log="", miss_reasons=[]))
    server = _ServerThread(app)
    server.start()
    try:
        yield f"http://127.0.0.1:{server.server.server_port}", app, world
    finally:
        server.server.shutdown()


@pytest.fixture
def browser() -> Iterator[Any]:
    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as p:
        # --no-sandbox: the tests may run as root in a container, where Chromium's own
        # sandbox cannot start; the pages are Kiln's own.
        chromium = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                     args=["--no-sandbox", "--disable-dev-shm-usage"])
        try:
            yield chromium
        finally:
            chromium.close()


def shot(page: Any, name: str) -> None:
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def sign_in(page: Any, base: str, key: str) -> None:
    page.goto(f"{base}/admin/")
    assert page.locator("h1").inner_text() == "Sign in"
    page.fill("input[name=key]", key)
    page.click("button:has-text('Sign in')")


def test_an_operator_finds_and_acts_on_everything(kiln: tuple[str, Flask, World],
                                                  browser: Any) -> None:
    base, app, world = kiln
    page = browser.new_page(viewport={"width": 1366, "height": 900})
    page.on("dialog", lambda dialog: dialog.accept())  # the confirm() before an action
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    # The sign-in page answers 401, which Chromium logs as a failed load: not a script error.
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" and
            "Failed to load resource" not in m.text else None)

    page.goto(f"{base}/")  # the root sends a browser to the dashboard
    shot(page, "01-sign-in")
    sign_in(page, base, ADMIN_KEY)
    assert page.url == f"{base}/admin/"
    assert "root" in page.locator("form.who").inner_text()
    shot(page, "02-overview")

    # Every page from the navigation renders, with no script error.
    for name, title in [("Jobs", "Jobs"), ("Engines", "Engines"), ("Models", "Models"),
                        ("Workers", "Workers"), ("Trends", "Trends"), ("Keys", "API keys"),
                        ("Audit log", "Audit log")]:
        page.click(f"header nav a:text-is('{name}')")
        assert page.locator("h1").inner_text().startswith(title)
        shot(page, f"03-{name.lower().replace(' ', '-')}")

    # Filter and page through the jobs list.
    page.click("header nav a:text-is('Jobs')")
    assert "page 1 of 2 · 32 in all" in page.locator("nav.pager").inner_text()
    page.click("a[rel=next]")
    assert "page 2 of 2" in page.locator("nav.pager").inner_text()
    assert page.locator("#jobs tbody tr").count() == 7
    page.select_option("select[name=state]", "succeeded")
    page.click("form.filters button")
    assert "state=succeeded" in page.url
    rows = page.locator("#jobs tbody tr")
    assert rows.count() == 1 and world.done_job in rows.inner_text()
    shot(page, "04-jobs-filtered")
    page.fill("input[name=q]", world.active_job)
    page.select_option("select[name=state]", "")
    page.click("form.filters button")
    assert page.locator("#jobs tbody tr").count() == 1

    # Follow the running job to its page and cancel it.
    page.click(f"#jobs a:text-is('{world.active_job}')")
    assert page.url.endswith(f"/admin/jobs/{world.active_job}")
    assert "building" in page.locator("h1").inner_text()
    shot(page, "05-job-running")
    page.click("button:has-text('Cancel job')")
    assert "Cancelled job" in page.locator(".flash").inner_text()
    assert "cancelled" in page.locator("h1 .badge").inner_text()
    shot(page, "06-job-cancelled")

    # A failed job: error text without colour codes, the failing phase on the timeline.
    page.goto(f"{base}/admin/jobs?state=failed")
    page.locator("#jobs tbody a.id").first.click()
    assert "error: compiler exited 1" in page.locator("pre.error-text").inner_text()
    assert "[31m" not in page.content()
    shot(page, "07-job-failed")

    # Pin the engine, then evict it once unpinned. Its build report holds a long unbroken
    # value (a compiler command line, a path), which must wrap inside its card.
    with app.extensions["kiln"].db.session() as s:
        engine = s.get(Engine, world.engine.id)
        engine.build_report = {**engine.build_report, "cmd": "/opt/toolchain/" + "x" * 400}
    page.goto(f"{base}/admin/engines/{world.engine.id}")
    shot(page, "08-engine")
    overflowing = page.evaluate("""() => [...document.querySelectorAll('.card')]
        .filter(c => c.scrollWidth > c.clientWidth + 1)
        .map(c => c.querySelector('h2').textContent)""")
    assert overflowing == []
    page.get_by_role("button", name="Pin (never evict)", exact=True).click()
    assert page.locator("h1 .badge.pinned").count() == 1
    # A pinned engine offers no eviction.
    assert page.get_by_role("button", name="Evict", exact=True).count() == 0
    page.get_by_role("button", name="Unpin", exact=True).click()
    page.get_by_role("button", name="Evict", exact=True).click()
    assert page.url.endswith("/admin/engines")
    assert "No engines match" in page.content()

    # Create a key, see it once, use it, revoke it.
    page.click("header nav a:text-is('Keys')")
    page.fill("input[name=owner]", "carol")
    page.select_option("select[name=role]", "user")
    page.fill("input[name=note]", "notebook")
    page.click("button:has-text('Create key')")
    secret = page.locator("pre.secret").inner_text().strip()
    assert secret.startswith("kiln_")
    shot(page, "09-key-created")
    response = page.request.get(f"{base}/api/v1/jobs",
                                headers={"Authorization": f"Bearer {secret}"})
    assert response.status == 200
    page.click("header nav a:text-is('Keys')")
    assert secret not in page.content()
    page.locator("#keys tr", has_text="carol").locator("button:has-text('Revoke')").click()
    assert "Revoked key" in page.locator(".flash").inner_text()
    assert page.request.get(f"{base}/api/v1/jobs",
                            headers={"Authorization": f"Bearer {secret}"}).status == 401

    # Drain the worker.
    page.click("header nav a:text-is('Workers')")
    page.click("button:has-text('Drain')")
    assert "draining" in page.locator("#workers").inner_text()
    shot(page, "10-workers-draining")

    # The audit log shows each action, by whom and from where.
    page.click("header nav a:text-is('Audit log')")
    shot(page, "11-audit")
    log = page.locator("#audit").inner_text()
    for action in ("job.cancel", "engine.pin", "engine.unpin", "engine.evict", "key.create",
                   "key.revoke", "worker.drain", "session.sign_in"):
        assert action in log, action
    assert "127.0.0.1" in log and "root" in log
    with app.extensions["kiln"].db.session() as s:
        assert s.get(Engine, world.engine.id) is None
        assert s.query(AuditEntry).count() == 8

    page.click("form.who button")  # sign out (a POST with its token)
    assert page.locator("h1").inner_text() == "Sign in"
    page.goto(f"{base}/admin/jobs")
    assert page.locator("h1").inner_text() == "Sign in"
    assert errors == []


def test_a_user_key_sees_only_the_403_page(kiln: tuple[str, Flask, World], browser: Any
                                           ) -> None:
    base, app, world = kiln
    page = browser.new_page()
    sign_in(page, base, USER_KEY)
    assert "user key" in page.locator(".error").inner_text()
    shot(page, "12-user-key-refused")
    # Nothing was stored: every page still asks for a key.
    for path in ("/admin/", f"/admin/jobs/{world.done_job}", f"/admin/engines/{world.engine.id}",
                 "/admin/keys", "/admin/audit"):
        page.goto(base + path)
        assert page.locator("h1").inner_text() == "Sign in", path
        assert world.engine.id not in page.locator("main").inner_text()
    # With the key in a header (a script, a proxy), the 403 page offers only a way out.
    context = browser.new_context(extra_http_headers={"Authorization": f"Bearer {USER_KEY}"})
    forbidden = context.new_page()
    response = forbidden.goto(f"{base}/admin/engines/{world.engine.id}")
    assert response.status == 403
    shot(forbidden, "13-forbidden")
    hrefs = {a.get_attribute("href") for a in forbidden.locator("a").all()}
    assert hrefs == {"/admin/login"}
    assert world.engine.id not in forbidden.content()
    context.close()


def test_screenshots_are_kept(kiln: tuple[str, Flask, World], browser: Any) -> None:
    """Every page's screenshot from this run exists and is a real image."""
    base, _, world = kiln
    page = browser.new_page(viewport={"width": 1366, "height": 900})
    sign_in(page, base, ADMIN_KEY)
    for name, path in [("20-trends", "/admin/trends"), ("21-models", "/admin/models"),
                       ("22-job-done", f"/admin/jobs/{world.done_job}"),
                       ("23-engines", "/admin/engines")]:
        page.goto(base + path)
        shot(page, name)
    for png in SHOTS.glob("2*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert re.search(r"\d", page.locator("h1").inner_text())  # "N match"
