"""The web page at ``/ui`` and the routes that feed it: static files, the view, logs, ``/events``.

The page is plain files shipped in the package (``modelfleet/ui/``): no CDN, no build
step. It is served with a strict Content-Security-Policy (scripts and styles from this
origin only, no inline code, no frames) and never inserts backend text as HTML.

Read-only routes take the API key (when set); logs and every control take the admin
key, through the API's guard.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from importlib import resources
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse

from modelfleet import hooks, memory
from modelfleet.config import StackConfig
from modelfleet.errors import ApiError, FleetError
from modelfleet.events import EventHub, sse
from modelfleet.fleet import Instance
from modelfleet.instance import Handle
from modelfleet.lifecycle import State
from modelfleet.router import Router
from modelfleet.stack import Stack

STATIC = {"index.html": "text/html", "app.js": "text/javascript", "app.css": "text/css"}
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
LOG_BYTES = 64 * 1024
KEEPALIVE_S = 15.0


class Door(Protocol):
    """What the page's routes need of the front door."""

    cfg: StackConfig
    stack: Stack
    router: Router
    events: EventHub
    started: float


def check_same_origin(method: str, headers: Mapping[str, str]) -> None:
    """Refuse a state-changing request another web site's page sent through the browser.

    Browsers name the page's origin on such requests; scripts and the CLI send no ``Origin``. Without
    this, a page on any site could POST to a front door on localhost that has no admin key set.
    """
    origin = headers.get("origin")
    if method in ("GET", "HEAD", "OPTIONS") or origin is None:
        return
    host = headers.get("host", "")
    if urlsplit(origin).netloc != host:
        raise ApiError(
            403,
            f"cross-site request from {origin} refused; admin actions come from this front door's own page "
            "or from a client without an Origin header",
            "permission_error",
        )


def static_dir() -> Path:
    return Path(str(resources.files("modelfleet") / "ui"))


async def page(request: Request) -> Response:
    name = request.path_params.get("file", "index.html")
    if name not in STATIC:
        raise ApiError(404, f"no file '{name}' in the page; it has {', '.join(STATIC)}", "not_found_error")
    return FileResponse(static_dir() / name, media_type=STATIC[name], headers=SECURITY_HEADERS)


def _estimates(cfg: StackConfig) -> dict[str, int | None]:
    out: dict[str, int | None] = {}
    for name in cfg.components():
        try:
            out[name] = memory.estimate_bytes(cfg, name)
        except FleetError:
            out[name] = None
    return out


def _plan(cfg: StackConfig, state_dir: Path) -> dict[str, Any]:
    try:
        plan = memory.build_plan(cfg, store=memory.MeasurementStore.in_dir(state_dir))
    except FleetError as exc:
        return {"tree": f"no plan: {exc}", "fits": None}
    return {"tree": memory.render_tree(plan), "fits": plan.fits, "total_bytes": plan.total_bytes}


def _hooks(state_dir: Path) -> list[dict[str, Any]]:
    try:
        return [r.to_json() for r in hooks.read_results(state_dir)]
    except FleetError as exc:
        return [{"name": "(hook results)", "status": "unreadable", "detail": str(exc)}]


def newest_sweep(state_dir: Path) -> dict[str, Any] | None:
    """The last ``sweep`` report under the state dir: its text, and whether a plot sits beside it."""
    found = sorted(state_dir.glob("sweep-*.md")) or sorted(state_dir.glob("sweep-*.csv"))
    if not found:
        return None
    newest = max(found, key=lambda p: p.stat().st_mtime)
    plot = newest.with_suffix(".png")
    return {"file": newest.name, "text": newest.read_text(errors="replace")[:20000], "plot": plot.is_file()}


async def view(door: Door, request: Request) -> Response:
    """Everything the page shows on load; ``/events`` keeps it current."""
    cfg, state_dir = door.cfg, door.stack.store.dir

    def slow() -> dict[str, Any]:
        return {
            "estimates": _estimates(cfg),
            "plan": _plan(cfg, state_dir),
            "hooks": _hooks(state_dir),
            "sweep": newest_sweep(state_dir),
        }

    extra = await asyncio.to_thread(slow)
    hub = door.events
    return JSONResponse(
        {
            **door.router.snapshot(),
            **extra,
            "counters": hub.instance_counters(hub.clock()),
            "history": hub.history(day=False),  # the page draws 15 minutes; /ui/api/history has the day
            "names": _names(cfg),
            "keys": {"api": cfg.api.api_key is not None, "admin": (cfg.api.admin_key or cfg.api.api_key) is not None},
            "front_door": {"started": door.started},
        },
        headers={"Cache-Control": "no-store"},
    )


def _names(cfg: StackConfig) -> dict[str, list[str]]:
    return {"roles": list(cfg.roles()), "aliases": list(cfg.aliases), "task_types": list(cfg.task_types)}


async def history(door: Door, request: Request) -> Response:
    """Per role: 15 minutes at one sample a second, a day at one a minute, and the capacity marks."""
    return JSONResponse(door.events.history(day=True), headers={"Cache-Control": "no-store"})


async def sweep_plot(door: Door, request: Request) -> Response:
    found = newest_sweep(door.stack.store.dir)
    if not found or not found["plot"]:
        raise ApiError(404, "no sweep plot under the state dir; run `modelfleet sweep` with --plot", "not_found_error")
    path = door.stack.store.dir / found["file"]
    return FileResponse(path.with_suffix(".png"), media_type="image/png", headers=SECURITY_HEADERS)


async def logs(door: Door, request: Request) -> Response:
    """The tail of one instance's log, read through the launcher (plain text)."""
    name = request.path_params["name"]
    inst = next((i for i in door.router.fleet if i.name == name), None)
    if inst is None:
        known = ", ".join(i.name for i in door.router.fleet)
        raise ApiError(404, f"no instance '{name}'; known: {known}", "not_found_error")
    text = await asyncio.to_thread(door.stack.launcher.read_log, _log_handle(inst), LOG_BYTES)
    return Response(text, media_type="text/plain; charset=utf-8", headers={"Cache-Control": "no-store"})


async def events(door: Door, request: Request) -> Response:
    """Server-sent events: ``hello`` (the instances now), then ``state`` changes and ``counters`` each second."""
    hub = door.events
    sub = hub.subscribe()

    async def stream() -> AsyncIterator[bytes]:
        try:
            hello = {"type": "hello", "t": hub.clock(), **door.router.snapshot()}
            yield sse(hello)
            while not sub.dropped:
                try:
                    event = await asyncio.wait_for(sub.queue.get(), KEEPALIVE_S)
                except TimeoutError:
                    yield b": keep-alive\n\n"
                    continue
                if event["type"] == "counters":
                    event = {**event, "starting": await _starting(door)}
                yield sse(event)
            yield sse({"type": "dropped", "t": hub.clock(), "detail": "this reader fell behind; reconnect"})
        finally:
            hub.unsubscribe(sub)

    headers = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}
    return StreamingResponse(stream(), media_type="text/event-stream", headers=headers)


def _log_handle(inst: Instance) -> Handle:
    """The instance's process, or (stopped, or starting before its process is recorded) just its log file."""
    return inst.handle or Handle(inst.spec.node, 0, 0.0, inst.spec.log_file)


async def _starting(door: Door) -> dict[str, dict[str, Any]]:
    """Load progress of the instances starting now: seconds in, memory held so far, the log's last line."""
    now = door.router.fleet.clock()
    starting = [i for i in door.router.fleet if i.state is State.STARTING]
    if not starting:
        return {}
    handles = [_log_handle(i) for i in starting]
    tails = await asyncio.to_thread(lambda: [_last_line(door.stack.launcher.read_log(h, 2048)) for h in handles])
    return {
        i.name: {"elapsed_s": round(now - i.since, 1), "rss": door.events.rss.get(i.name), "log": tail}
        for i, tail in zip(starting, tails, strict=True)
    }


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:200] if lines else ""
