"""``modelfleet top``: a live view of the fleet, fed by the front door once a second.

:func:`sample` reads ``/admin/status`` (instances, states, slots, queues, requests
served) and ``/metrics`` (tokens generated); :func:`render` turns two samples into a
table and is a pure function of them, so it is tested without a terminal. :func:`run`
draws it with rich's Live until ``q`` (or Ctrl-C).
"""

from __future__ import annotations

import contextlib
import os
import select
import sys
import termios
import time
import tty
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TextIO

import httpx
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console, Group
from rich.live import Live
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from modelfleet import memory

STATE_COLORS = {"ready": "green", "starting": "yellow", "draining": "yellow", "stopped": "dim"}


@dataclass
class Sample:
    """One reading of the front door."""

    at: float
    instances: list[dict[str, Any]]
    pools: dict[str, dict[str, Any]]
    tokens: dict[str, float] = field(default_factory=dict)  # instance name -> tokens generated so far
    memory: dict[int, int] = field(default_factory=dict)  # port -> measured bytes (from the state file)
    error: str | None = None


def sample(client: httpx.Client, base: str, headers: dict[str, str], memory_of: Callable[[], dict[int, int]]) -> Sample:
    """Read the front door now; a front door that does not answer gives a sample with ``error``."""
    now = time.monotonic()
    try:
        status = client.get(base + "/admin/status", headers=headers)
        if status.status_code != 200:
            return Sample(now, [], {}, error=f"/admin/status answered {status.status_code}: {status.text[:200]}")
        body = status.json()
        metrics = client.get(base + "/metrics", headers=headers)
        tokens = parse_tokens(metrics.text) if metrics.status_code == 200 else {}
    except (httpx.HTTPError, ValueError) as exc:
        return Sample(now, [], {}, error=f"the front door at {base} does not answer: {exc}")
    return Sample(now, list(body.get("instances", [])), dict(body.get("pools", {})), tokens, memory_of())


def parse_tokens(text: str) -> dict[str, float]:
    """Tokens generated per instance, summed over roles, from the front door's Prometheus text."""
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        if fam.name != "modelfleet_tokens_generated":
            continue
        for s in fam.samples:
            if s.name.endswith("_total"):
                inst = s.labels.get("instance", "")
                out[inst] = out.get(inst, 0.0) + s.value
    return out


def render(now: Sample, before: Sample | None) -> Group:
    """The table for one refresh: per instance its state, in-flight/slots, queue, req/s, tokens/s, memory."""
    if now.error:
        return Group(Text(now.error, style="red"), Text("q quits", style="dim"))
    dt = (now.at - before.at) if before is not None else 0.0
    served_before = {i["key"]: i.get("served", 0) for i in before.instances} if before else {}
    table = Table(box=None, header_style="bold", pad_edge=False, expand=False)
    for col in ("INSTANCE", "PORT", "TIER", "STATE", "INFLIGHT", "QUEUED", "REQ/S", "TOK/S", "SERVED", "MEMORY"):
        table.add_column(col, no_wrap=True, justify="left" if col in ("INSTANCE", "TIER", "STATE") else "right")
    total_rps = total_tps = 0.0
    for inst in now.instances:
        rps = _rate(inst.get("served", 0), served_before.get(inst["key"]), dt)
        tps = _rate(now.tokens.get(inst["name"], 0.0), before.tokens.get(inst["name"]) if before else None, dt)
        total_rps += rps or 0.0
        total_tps += tps or 0.0
        state = str(inst.get("state", "?"))
        color = STATE_COLORS.get(state, "red")
        mem = now.memory.get(int(inst.get("port", 0)))
        table.add_row(
            escape(str(inst.get("name"))),
            str(inst.get("port")),
            str(inst.get("tier")),
            f"[{color}]{escape(state)}[/]",
            f"{inst.get('in_flight', 0)}/{inst.get('slots', '?')}",
            str(inst.get("queued", 0)),
            _num(rps),
            _num(tps),
            str(inst.get("served", 0)),
            "-" if mem is None else memory.fmt_bytes(mem),
        )
    queued = sum(int(p.get("queued", 0)) for p in now.pools.values())
    in_flight = sum(int(i.get("in_flight", 0)) for i in now.instances)
    ready = sum(1 for i in now.instances if i.get("state") == "ready")
    summary = (
        f"{ready}/{len(now.instances)} ready, {in_flight} in flight, {queued} queued, "
        f"{total_rps:.1f} req/s, {total_tps:.1f} tokens/s"
    )
    return Group(Text(summary, style="bold"), table, Text("q quits", style="dim"))


def _rate(value: float, previous: float | None, dt: float) -> float | None:
    if previous is None or dt <= 0:
        return None
    return max(0.0, (value - previous) / dt)


def _num(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


@contextlib.contextmanager
def _keys(stream: TextIO) -> Iterator[Callable[[], str | None]]:
    """Single keys from a terminal without Enter (cbreak mode); nothing from a pipe."""
    if not stream.isatty():
        yield lambda: None
        return
    fd = stream.fileno()
    old = termios.tcgetattr(fd)
    tty.setcbreak(fd)

    def read() -> str | None:
        ready, _, _ = select.select([fd], [], [], 0)
        return os.read(fd, 1).decode(errors="replace") if ready else None

    try:
        yield read
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, old)


def run(
    base: str,
    headers: dict[str, str],
    memory_of: Callable[[], dict[int, int]],
    console: Console,
    interval_s: float = 1.0,
    iterations: int | None = None,
) -> None:
    """Refresh every ``interval_s`` until ``q`` (or ``iterations`` refreshes, for scripts)."""
    before: Sample | None = None
    with httpx.Client(timeout=5.0) as client, _keys(sys.stdin) as key:
        now = sample(client, base, headers, memory_of)
        with Live(render(now, before), console=console, auto_refresh=False, transient=False) as live:
            count = 1
            while iterations is None or count < iterations:
                deadline = time.monotonic() + interval_s
                while time.monotonic() < deadline:
                    if key() in ("q", "Q"):
                        return
                    time.sleep(0.05)
                before, now = now, sample(client, base, headers, memory_of)
                live.update(render(now, before), refresh=True)
                count += 1
