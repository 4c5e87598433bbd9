"""The web page at /ui, in a real headless Chromium (Debian's), on a real fleet of llama-servers.

The browser is Debian's ``chromium`` driven by Python playwright (no browser download:
``scripts/bootstrap.sh`` installs both). Each test starts a stack with its front door,
opens the page and acts as a person would: clicks, types, reads rows.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from conftest import StackFactory, free_ports, process_of
from test_api import FAST_MONITOR, Fleet, srv

playwright_api = pytest.importorskip("playwright.sync_api")

CHROMIUM = os.environ.get("MODELFLEET_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
SHOT_DIR = os.environ.get("MODELFLEET_UI_SHOTS")  # set to write screenshots (docs/ui-*.png)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"no chromium at {CHROMIUM}: run scripts/bootstrap.sh (apt-get install -y chromium)")
    with playwright_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        yield b
        b.close()


class Page:
    """One browser tab on the fleet's page, recording every console error and uncaught exception."""

    def __init__(self, browser: Any, fleet: Fleet) -> None:
        self.fleet = fleet
        self.context = browser.new_context(viewport={"width": 1500, "height": 1100})
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.goto(fleet.url + "/ui")

    def row(self, name: str) -> Any:
        return self.page.locator(f'tr[data-instance="{name}"]')

    def state(self, name: str) -> str | None:
        value = self.row(name).get_attribute("data-state", timeout=5000)
        return str(value) if value is not None else None

    def wait_state(self, name: str, state: str, timeout_s: float = 30.0) -> float:
        """Seconds until the row shows ``state``."""
        t0 = time.monotonic()
        self.page.wait_for_selector(f'tr[data-instance="{name}"][data-state="{state}"]', timeout=timeout_s * 1000)
        return time.monotonic() - t0

    def button(self, name: str, verb: str) -> Any:
        return self.row(name).locator(f'button[data-verb="{verb}"]')

    def shot(self, name: str) -> None:
        if SHOT_DIR:
            self.page.screenshot(path=str(Path(SHOT_DIR) / f"ui-{name}.png"), full_page=True)

    def unexpected_errors(self) -> list[str]:
        """Console errors other than the browser's note on a refused fetch (a 4xx the page then shows)."""
        return [e for e in self.errors if "the server responded with a status of 4" not in e]

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def ui(make_stack: StackFactory, browser: Any) -> Iterator[Callable[..., Page]]:
    pages: list[Page] = []

    def open_page(servers_yaml: str, extra: str = "", api_extra: str = "", key: str | None = None) -> Page:
        (api_port,) = free_ports(1)
        text = servers_yaml + extra + FAST_MONITOR + f"api: {{port: {api_port}{api_extra}}}\n"
        stack = make_stack(text)
        stack.start(stack.select())
        page = Page(browser, Fleet(stack, api_port, key))
        pages.append(page)
        return page

    yield open_page
    for p in pages:
        p.close()


def hot_and_warm(tiny_model: Path) -> str:
    a, b = free_ports(2)
    return "servers:\n" + srv("chat", tiny_model, a, "[chat]") + srv("spare", tiny_model, b, "[spare]", tier="warm")


def test_page_loads_clean_with_a_strict_policy_and_shows_the_stack_healthy(
    ui: Callable[..., Page], tiny_model: Path
) -> None:
    p = ui(hot_and_warm(tiny_model))
    p.wait_state("chat", "ready")
    assert p.state("spare") == "stopped"
    p.page.wait_for_selector("#conn.up")  # the event stream is live
    for column in ("tier", "port", "load"):
        assert p.row("chat").locator(f"td.{column}").inner_text() != ""
    assert p.row("chat").locator("td.load").inner_text() == "0 / 1"
    assert "Total RAM" in p.page.locator("#plan").inner_text()
    p.page.wait_for_selector('.role[data-role="chat"] canvas')
    resp = httpx.get(p.fleet.url + "/ui", timeout=10)
    csp = resp.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp and "frame-ancestors 'none'" in csp
    p.fleet.chat("chat")
    p.page.wait_for_function(
        "() => document.querySelector('tr[data-instance=\"chat\"] td.rps').textContent !== '0.00'", timeout=5000
    )
    p.shot("healthy")
    assert p.errors == []


def test_a_warm_instance_started_and_stopped_from_the_page_changes_its_row_within_a_second(
    ui: Callable[..., Page], tiny_model: Path
) -> None:
    p = ui(hot_and_warm(tiny_model))
    p.wait_state("spare", "stopped")
    p.button("spare", "start").click()
    assert p.page.wait_for_selector('tr[data-instance="spare"]:not([data-state="stopped"])', timeout=1000)
    p.fleet.wait_for("spare ready", lambda: p.fleet.status()["spare"]["state"] == "ready")
    assert p.wait_state("spare", "ready", timeout_s=1.0) <= 1.0
    assert p.row("spare").locator("td.pid").inner_text().isdigit()
    p.button("spare", "stop").click()
    p.fleet.wait_for("spare stopped", lambda: p.fleet.status()["spare"]["state"] == "stopped")
    assert p.wait_state("spare", "stopped", timeout_s=1.0) <= 1.0
    assert p.errors == []


def test_a_hot_instance_that_dies_shows_its_restart(ui: Callable[..., Page], tiny_model: Path) -> None:
    p = ui(hot_and_warm(tiny_model))
    p.wait_state("chat", "ready")
    rec = p.fleet.stack.store.read()[next(k for k, r in p.fleet.stack.store.read().items() if r.component == "chat")]
    proc = process_of(rec)
    assert proc is not None
    proc.kill()
    with pytest.raises(psutil.NoSuchProcess):
        proc.wait(10)
        proc.status()
    p.page.wait_for_selector('tr[data-instance="chat"] td.restarts[data-count="1"]', timeout=30000)
    p.wait_state("chat", "ready")
    assert p.errors == []


def test_the_playground_streams_an_answer_and_names_who_served_it(ui: Callable[..., Page], tiny_model: Path) -> None:
    p = ui(hot_and_warm(tiny_model))
    p.wait_state("chat", "ready")
    p.page.select_option("#pg-model", "chat")
    p.page.fill("#pg-max", "12")
    p.page.click("#pg-send")
    p.page.wait_for_selector('#pg-answer[data-done="true"]', timeout=30000)
    assert int(p.page.get_attribute("#pg-answer", "data-chunks") or 0) > 1  # it came in pieces
    meta = p.page.inner_text("#pg-meta")
    assert "served by chat" in meta and "tokens at" in meta and "from cache" in meta, meta
    p.shot("playground")
    assert p.errors == []


MUTATING = [
    ("POST", "/admin/start/spare"),
    ("POST", "/admin/stop/chat"),
    ("POST", "/admin/reload/chat"),
    ("POST", "/admin/drain/chat"),
    ("POST", "/admin/checkpoints"),
    ("POST", "/admin/checkpoints/some-id"),
    ("DELETE", "/admin/checkpoints/some-id"),
    ("GET", "/ui/api/logs/chat"),
]


def test_every_control_is_refused_without_the_admin_key(ui: Callable[..., Page], tiny_model: Path) -> None:
    p = ui(hot_and_warm(tiny_model), api_extra=", admin_key: s3cret", key="s3cret")
    p.wait_state("chat", "ready")
    assert p.page.inner_text("#mode") == "read-only"
    buttons = p.page.locator("button.admin")
    assert buttons.count() >= 9
    assert all(buttons.nth(i).is_disabled() for i in range(buttons.count()))
    # The server refuses them too, whatever the page does: the page's own fetch, without the key.
    codes = p.page.evaluate(
        """async (routes) => Promise.all(routes.map(async ([method, path]) =>
               (await fetch(path, {method, headers: {"Content-Type": "application/json"}, body:
                 method === "GET" ? undefined : "{}"})).status))""",
        MUTATING,
    )
    assert codes == [401] * len(MUTATING)
    wrong = p.page.evaluate(
        "async () => (await fetch('/admin/stop/chat',"
        " {method: 'POST', headers: {Authorization: 'Bearer nope'}})).status"
    )
    assert wrong == 401
    assert p.fleet.status()["chat"]["state"] == "ready"
    # With the key (asked once, kept for the session) the controls work.
    p.page.fill("#key", "s3cret")
    p.page.click("#keybtn")
    p.page.wait_for_selector("#mode:text('controls on')")
    p.button("spare", "start").click()
    p.wait_state("spare", "ready")
    p.page.reload()
    p.page.wait_for_selector("#mode:text('controls on')")  # kept in the session
    assert p.unexpected_errors() == []


def test_with_an_api_key_the_page_asks_for_it(ui: Callable[..., Page], tiny_model: Path) -> None:
    p = ui(hot_and_warm(tiny_model), api_extra=", api_key: k3y", key="k3y")
    p.page.wait_for_selector("#notice:text('needs its API key')")
    assert p.row("chat").count() == 0
    p.page.fill("#key", "k3y")
    p.page.click("#keybtn")
    p.wait_state("chat", "ready")
    p.page.wait_for_selector("#conn.up")


def test_a_backend_error_containing_html_is_shown_as_text(ui: Callable[..., Page], tiny_model: Path) -> None:
    p = ui(hot_and_warm(tiny_model))
    p.wait_state("chat", "ready")
    evil = "<img src=x id=injected><b>bold</b>"
    body = {"model": "chat", "messages": [{"role": "user", "content": "x"}], "response_format": {"type": evil}}
    resp = p.fleet.post("/v1/chat/completions", body)
    assert resp.status_code >= 400 and evil in resp.json()["error"]["message"], resp.text  # llama-server echoes it
    cell = p.row("chat").locator("td.error")
    p.page.wait_for_function(
        "() => document.querySelector('tr[data-instance=\"chat\"] td.error').textContent.includes('<img')",
        timeout=5000,
    )
    assert evil in cell.inner_text()
    assert p.page.locator("#injected").count() == 0 and cell.locator("b").count() == 0
    # The playground shows an error the same way.
    p.page.select_option("#pg-model", "chat")
    p.page.evaluate("() => { document.querySelector('#pg-model').add(new Option('<i>x</i>', '<i>x</i>')); }")
    p.page.select_option("#pg-model", "<i>x</i>")
    p.page.click("#pg-send")
    p.page.wait_for_selector('#pg-answer[data-done="true"]')
    assert "<i>x</i>" in p.page.inner_text("#pg-meta") and p.page.locator("#pg-meta i").count() == 0
    p.shot("error-as-text")
    assert p.unexpected_errors() == []


def test_the_log_tail_follows_and_searches(ui: Callable[..., Page], tiny_model: Path) -> None:
    p = ui(hot_and_warm(tiny_model))
    p.wait_state("chat", "ready")
    p.button("chat", "log").click()
    p.page.wait_for_function("() => document.querySelector('#log').textContent.includes('llama')", timeout=10000)
    p.page.fill("#log-search", "listening")
    p.page.wait_for_selector("#log mark")
    assert all("listening" in line.lower() for line in p.page.inner_text("#log").strip().splitlines())
    assert p.errors == []


def read_events(resp: httpx.Response) -> Iterator[tuple[str, dict[str, Any]]]:
    kind = ""
    for line in resp.iter_lines():
        if line.startswith("event: "):
            kind = line.removeprefix("event: ")
        elif line.startswith("data: "):
            yield kind, json.loads(line.removeprefix("data: "))


def test_scripts_can_follow_the_event_stream(ui: Callable[..., Page], tiny_model: Path) -> None:
    p = ui(hot_and_warm(tiny_model))
    p.wait_state("chat", "ready")
    seen: list[tuple[str, str]] = []
    with httpx.stream("GET", p.fleet.url + "/events", timeout=30) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        stream = read_events(resp)
        kind, hello = next(stream)
        assert kind == "hello" and {i["name"]: i["state"] for i in hello["instances"]}["chat"] == "ready"
        assert httpx.post(p.fleet.url + "/admin/start/spare", timeout=60).status_code == 200
        for kind, data in stream:
            if kind == "state" and data["instance"] == "spare":
                seen.append((data["old"], data["new"]))
            if kind == "counters" and seen and seen[-1][1] == "ready":
                assert data["instances"]["spare"]["uptime_s"] is not None
                assert {s["name"]: s["state"] for s in data["status"]}["spare"] == "ready"
                break
    assert seen == [("stopped", "starting"), ("starting", "ready")]


def test_a_cross_site_page_cannot_use_the_controls_and_the_own_page_drains(
    ui: Callable[..., Page], tiny_model: Path
) -> None:
    p = ui(hot_and_warm(tiny_model))
    p.wait_state("chat", "ready")
    resp = httpx.post(p.fleet.url + "/admin/stop/chat", headers={"Origin": "http://elsewhere.example"}, timeout=10)
    assert resp.status_code == 403 and "cross-site" in resp.json()["error"]["message"]
    assert p.fleet.status()["chat"]["state"] == "ready"
    own = p.page.evaluate("async () => (await fetch('/admin/start/spare', {method: 'POST'})).status")
    assert own == 200  # the page's own origin is fine
    p.wait_state("spare", "ready")
    p.button("spare", "drain").click()  # one instance: out of rotation, then stopped
    p.wait_state("spare", "stopped")
    assert p.fleet.status()["spare"]["state"] == "stopped"


def test_a_checkpoint_is_created_and_restored_from_the_page(ui: Callable[..., Page], tiny_model: Path) -> None:
    p = ui(hot_and_warm(tiny_model))
    p.wait_state("chat", "ready")
    p.page.fill("#cp-name", "before-spare")
    p.page.click("#cp-form button[type=submit]")
    p.page.wait_for_selector("#notice:text('checkpoint created')")
    row = p.page.locator("#checkpoints tr[data-checkpoint]")
    assert row.count() == 1 and "before-spare" in row.inner_text()
    p.button("spare", "start").click()
    p.wait_state("spare", "ready")
    row.locator("button").click()
    p.page.wait_for_selector("#notice:text('restored')", timeout=60000)
    p.wait_state("spare", "stopped")  # the checkpoint had it stopped
    assert p.unexpected_errors() == []
