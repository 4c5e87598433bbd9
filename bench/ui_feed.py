"""Does the page stay fast with 50 components and a day of history? Measured without processes.

    .venv/bin/python bench/ui_feed.py [--components 50] [--out bench/results]

Server side: a Router over ``--components`` servers (one role each, all READY, nothing
started), its EventHub's ring buffers filled to a day of history, then per tick (once a
second in the front door) the cost of sampling with 20 requests recorded in that second,
the size of one ``counters`` event and of the page's first view, and the hub's memory.

Browser side: Debian's headless chromium loads the real page, its ``/ui/api/view`` and
``/events`` answered with those payloads (playwright routes, no server): the time until
all rows show, and the time the page spends on one ``counters`` event.
Results go to ``bench/results/ui_feed.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
import tracemalloc
from collections import deque
from pathlib import Path
from typing import Any

from playwright.sync_api import Route, sync_playwright

from modelfleet import events
from modelfleet.config import load_config
from modelfleet.events import EventHub, sse
from modelfleet.lifecycle import State
from modelfleet.router import Router
from modelfleet.stack import Stack
from modelfleet.usage import usage_of
from modelfleet.webui import CSP, STATIC, static_dir

TAIL = b'{"usage":{"completion_tokens":16},"timings":{"cache_n":40,"prompt_n":8,"predicted_n":16}}'


def build(n: int, work: Path) -> tuple[Router, EventHub]:
    lines = ["servers:"]
    for i in range(n):
        lines += [f"  s{i}:", f"    model: m{i}.gguf", f"    port: {20000 + i}", f"    roles: [r{i}]"]
    text = "\n".join(lines) + "\n"
    cfg = load_config(text, str(work / "stack.yaml"))
    router = Router(cfg, Stack(cfg, work / "state", None))
    for inst in router.fleet:
        router.fleet.move(inst, State.STARTING)
        router.fleet.move(inst, State.READY)
    hub = EventHub(router)
    now = time.time()
    for role in router.pools:
        sec = hub.seconds[role] = deque(maxlen=events.PER_SECOND)
        for k in range(events.PER_SECOND):
            sec.append({"t": now - events.PER_SECOND + k, "rps": 3, "p50_ms": 41.5, "queued": 0, "in_flight": 1})
        mins = hub.minutes[role] = deque(maxlen=events.PER_MINUTE)
        for k in range(events.PER_MINUTE):
            mins.append({"t": now - 86400 + 60 * k, "rps": 2.5, "p50_ms": 40.0, "queued": 1, "in_flight": 1})
        marks = hub.marks[role] = deque(maxlen=events.MARKS)
        for k in range(40):
            marks.append({"t": now - 900 + 20 * k, "kind": "warm start", "instance": f"s{role[1:]}"})
    return router, hub


def server_side(router: Router, hub: EventHub) -> dict[str, Any]:
    names = [i.name for i in router.fleet]
    costs = []
    for _ in range(200):
        for k in range(20):
            hub.record(f"r{k}", names[k % len(names)], 0.04, TAIL, 200, usage_of(TAIL))
        t0 = time.perf_counter()
        event = hub.tick()
        costs.append(time.perf_counter() - t0)
    view = {**router.snapshot(), "counters": hub.instance_counters(time.time()), "history": hub.history(day=False)}
    return {
        "tick_ms_p50": round(statistics.median(costs) * 1000, 3),
        "tick_ms_max": round(max(costs) * 1000, 3),
        "counters_event_bytes": len(sse(event)),
        "view_bytes": len(json.dumps(view)),
        "event": event,
        "view": view,
    }


def browser_side(router: Router, result: dict[str, Any]) -> dict[str, Any]:
    cfg = router.cfg
    view = {
        **result["view"],
        "estimates": {c: None for c in cfg.components()},
        "plan": {"tree": "(plan)", "fits": True},
        "hooks": [],
        "sweep": None,
        "names": {"roles": list(cfg.roles()), "aliases": [], "task_types": []},
        "keys": {"api": False, "admin": False},
        "front_door": {"started": time.time()},
    }
    counters = sse(result["event"])
    base = "http://fleet.invalid"

    def serve(route: Route) -> None:
        path = route.request.url.removeprefix(base)
        if path in ("/ui", "/ui/"):
            path = "/ui/index.html"
        name = path.removeprefix("/ui/")
        if name in STATIC:
            body = (static_dir() / name).read_bytes()
            route.fulfill(body=body, content_type=STATIC[name], headers={"Content-Security-Policy": CSP})
        elif path == "/ui/api/view":
            route.fulfill(body=json.dumps(view), content_type="application/json")
        elif path == "/events":
            hello = sse({"type": "hello", "t": time.time(), **router.snapshot()})
            route.fulfill(body=hello + counters, content_type="text/event-stream")
        elif path.startswith("/admin/checkpoints"):
            route.fulfill(body='{"checkpoints": []}', content_type="application/json")
        else:
            route.fulfill(status=404, body="{}", content_type="application/json")

    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium)
        page = browser.new_page(viewport={"width": 1500, "height": 1000})
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.route(f"{base}/**", serve)
        t0 = time.perf_counter()
        page.goto(base + "/ui")
        n = len(list(router.fleet))
        page.wait_for_function(f"() => document.querySelectorAll('#instances tbody tr').length === {n}")
        first_rows_ms = (time.perf_counter() - t0) * 1000
        # The worst screen: the role sparklines in view (only those on screen are drawn).
        page.evaluate("() => document.querySelector('#roles-section').scrollIntoView()")
        page.wait_for_function("() => document.querySelectorAll('#roles .role').length > 0")
        page.wait_for_timeout(300)  # the visibility observer reports on the next frames
        drawn = page.evaluate("() => visibleRoles.size")
        # One counters event, handled as the stream handler does, timed inside the page.
        per_event = page.evaluate(
            """(data) => { const runs = []; for (let i = 0; i < 20; i++) {
                 const t = performance.now(); onEvent("counters", JSON.parse(data)); runs.push(performance.now() - t); }
               runs.sort((a, b) => a - b); return runs[10]; }""",
            json.dumps(result["event"]),
        )
        parts = page.evaluate(
            """(data) => { const d = JSON.parse(data); const out = {};
                 let t = performance.now(); takeStatus(d.status); out.status = performance.now() - t;
                 t = performance.now(); takeRoleSamples(d.roles); renderRoles(); out.roles = performance.now() - t;
                 t = performance.now(); renderFill(); out.fill = performance.now() - t; return out; }""",
            json.dumps(result["event"]),
        )
        browser.close()
    return {
        "first_rows_ms": round(first_rows_ms, 1),
        "counters_event_ms_p50": round(per_event, 2),
        "counters_event_parts_ms": {k: round(v, 2) for k, v in parts.items()},
        "roles_drawn": drawn,
        "errors": errors,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--components", type=int, default=50)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tracemalloc.start()
        router, hub = build(args.components, Path(tmp))
        held = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        result = server_side(router, hub)
        page = browser_side(router, result)
    out = {
        "components": args.components,
        "history_per_role": {"seconds": events.PER_SECOND, "minutes": events.PER_MINUTE, "marks_max": events.MARKS},
        "hub_and_router_bytes": held,
        **{k: v for k, v in result.items() if k not in ("event", "view")},
        **page,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    parts = out["counters_event_parts_ms"]
    (args.out / "ui_feed.json").write_text(json.dumps(out, indent=2) + "\n")
    md = [
        f"# The page's feed with {args.components} components and a day of history",
        "",
        "`.venv/bin/python bench/ui_feed.py` (no processes; the page in headless chromium on recorded payloads)",
        "",
        "| what | value |",
        "|---|---|",
        f"| router + hub memory, a day of history | {held / 1e6:.1f} MB |",
        f"| one tick (once a second), p50 / max | {out['tick_ms_p50']} / {out['tick_ms_max']} ms |",
        f"| one `counters` event | {out['counters_event_bytes'] / 1e3:.1f} kB |",
        f"| the page's first view (`/ui/api/view`) | {out['view_bytes'] / 1e6:.2f} MB |",
        f"| page load until every row shows (payloads through playwright's router) | {out['first_rows_ms']} ms |",
        f"| page time on one `counters` event, p50 ({out['roles_drawn']} roles on screen) "
        f"| {out['counters_event_ms_p50']} ms |",
        f"| of which: table / sparklines / memory fill | {' / '.join(map(str, parts.values()))} ms |",
        f"| page errors | {len(page['errors'])} |",
        "",
    ]
    (args.out / "ui_feed.md").write_text("\n".join(md))
    print("\n".join(md))
    return 1 if page["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
