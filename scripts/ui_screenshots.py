"""Take the README's screenshots of the web page: a small stack of tiny models under load.

    .venv/bin/python scripts/ui_screenshots.py [OUT_DIR]   (default: docs/)

Starts four servers of a tiny generated model on free loopback ports (two HOT replicas,
a HOT embedder, a WARM spare) with the front door, sends chat traffic for a while,
starts the WARM spare from the page's admin route and kills a HOT replica so a restart
shows, then saves ``ui-overview.png`` from Debian's headless chromium. Stops everything.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import psutil
from playwright.sync_api import sync_playwright

from modelfleet.config import load_config_file
from modelfleet.launcher import free_ports
from modelfleet.spec import find_llama_server, probe_binary
from modelfleet.stack import Stack
from modelfleet.tinymodel import TinyShape, write_tiny_llama

LOAD_S = 40.0


def main(out: Path) -> int:
    work = Path(tempfile.mkdtemp(prefix="modelfleet-ui-"))
    model = write_tiny_llama(work / "tiny.gguf", TinyShape())
    a, a2, b, c, api = free_ports(5)
    (work / "stack.yaml").write_text(
        f"""servers:
  chat:
    model: {model}
    ports: [{a}, {a2}]
    roles: [chat]
    threads: 1
    ctx_size: 1024
  embedder:
    model: {model}
    port: {b}
    roles: [embed]
    threads: 1
    ctx_size: 512
  spare:
    model: {model}
    port: {c}
    roles: [chat, spare]
    tier: warm
    threads: 1
    ctx_size: 1024
pools: [chat]
aliases: {{assistant: chat}}
task_types: {{summarize: chat}}
monitor: {{interval_s: 0.5, backoff_initial_s: 0.5}}
api: {{port: {api}}}
"""
    )
    cfg = load_config_file(work / "stack.yaml")
    stack = Stack(cfg, work / "state", probe_binary(find_llama_server(cfg)), stop_grace_s=5.0)
    url = f"http://127.0.0.1:{api}"
    stop = threading.Event()

    def traffic(model_name: str, pause_s: float) -> None:
        with httpx.Client(timeout=30) as client:
            while not stop.is_set():
                body = {"model": model_name, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 8}
                client.post(url + "/v1/chat/completions", json=body)
                stop.wait(pause_s)

    try:
        stack.start(stack.select())
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=shutil.which("chromium") or "/usr/bin/chromium")
            page = browser.new_page(viewport={"width": 1500, "height": 1000})
            page.goto(url + "/ui")
            page.wait_for_selector('tr[data-instance="chat[0]"][data-state="ready"]', timeout=30000)
            workers = [threading.Thread(target=traffic, args=(m, p)) for m, p in (("chat", 0.05), ("assistant", 0.2))]
            for w in workers:
                w.start()
            t0 = time.monotonic()
            killed = started = False
            while time.monotonic() - t0 < LOAD_S:
                if not started and time.monotonic() - t0 > 10:
                    httpx.post(url + "/admin/start/spare", timeout=60)
                    started = True
                if not killed and time.monotonic() - t0 > 20:
                    rec = next(r for r in stack.store.read().values() if r.name == "chat[1]")
                    psutil.Process(rec.pid).kill()
                    killed = True
                page.wait_for_timeout(500)
            page.wait_for_selector('tr[data-instance="chat[1]"][data-state="ready"]', timeout=30000)
            page.fill("#pg-message", "Tell me about fleets.")
            page.click("#pg-send")
            page.wait_for_selector('#pg-answer[data-done="true"]', timeout=30000)
            page.screenshot(path=str(out / "ui-overview.png"), full_page=True)
            stop.set()
            for w in workers:
                w.join()
            browser.close()
    finally:
        stop.set()
        stack.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(f"wrote {out / 'ui-overview.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent.parent / "docs"))
