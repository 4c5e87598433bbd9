"""The front door's live feed: state changes as they happen, counters once a second, bounded history.

The :class:`EventHub` listens to the :class:`~modelfleet.fleet.Fleet` (the one owner of
instance state) and to the proxy's per-request records, and keeps everything in
bounded ring buffers, so a day of history for fifty components stays a few megabytes:

* per instance, the requests of the last minute (requests/s, p50 latency, tokens/s,
  prompt-cache hit ratio);
* per role, one sample a second for 15 minutes and one a minute for a day (rate,
  p50 latency, queue), and the marks on that axis (WARM starts, idle stops, evictions,
  restarts), taken from the capacity counters as they move.

Subscribers (the web page at ``/ui``, or any script reading ``/events``) each get a
bounded queue; one that falls behind is dropped rather than let it hold memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import statistics
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from modelfleet.fleet import Instance
from modelfleet.instance import Handle
from modelfleet.lifecycle import State
from modelfleet.router import Router
from modelfleet.usage import Usage

WINDOW_S = 60.0  # per-instance counters are over the last minute
PER_SECOND = 15 * 60  # per-role samples kept at one a second: 15 minutes
PER_MINUTE = 24 * 60  # per-role samples kept at one a minute: a day
MARKS = 2000  # capacity events kept per role
REQUESTS_KEPT = 4096  # per instance, at most this many requests of the last minute
SUBSCRIBER_QUEUE = 512  # events a subscriber may fall behind before it is dropped
MEMORY_EVERY = 5  # ticks between RSS samples
log = logging.getLogger("modelfleet.events")

MARK_KINDS = {"warm_starts": "warm start", "idle_stops": "idle stop", "evictions": "eviction", "restarts": "restart"}

Event = dict[str, Any]


@dataclass(frozen=True, slots=True)
class Done:
    """One answered request, as the proxy recorded it."""

    t: float
    latency_s: float
    tokens: int
    cache_n: int  # prompt tokens taken from the cache (llama-server's timings.cache_n)
    prompt_n: int  # prompt tokens evaluated
    ok: bool


class Subscriber:
    """One reader of the feed: a bounded queue; ``dropped`` once it fell too far behind."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[Event] = asyncio.Queue(SUBSCRIBER_QUEUE)
        self.dropped = False


class EventHub:
    def __init__(self, router: Router, clock: Callable[[], float] = time.time) -> None:
        self.router = router
        self.clock = clock
        self.subscribers: set[Subscriber] = set()
        self.requests: dict[str, deque[Done]] = {}  # by instance name
        self.seconds: dict[str, deque[dict[str, Any]]] = {}  # by role
        self.minutes: dict[str, deque[dict[str, Any]]] = {}
        self.marks: dict[str, deque[dict[str, Any]]] = {}
        self.last_error: dict[str, str] = {}
        self.rss: dict[str, int] = {}
        self._counts: dict[str, dict[str, int]] = {}
        self._role_done: dict[str, list[Done]] = {}  # this second's requests per role
        self._minute: dict[str, list[dict[str, Any]]] = {}
        self._ticks = 0
        self.attach()

    def attach(self) -> None:
        """Listen to the owner of instance state (again, after the Router rebuilt nothing: idempotent)."""
        if self._on_move not in self.router.fleet.listeners:
            self.router.fleet.listeners.append(self._on_move)

    # --- inputs ----------------------------------------------------------------------------

    def _on_move(self, inst: Instance, old: State, new: State) -> None:
        failed = new in (State.FAILED, State.BACKOFF) or (new is State.EJECTED and old is State.READY)
        if failed and inst.detail:
            self.last_error[inst.name] = inst.detail
        self.publish(
            {
                "type": "state",
                "t": self.clock(),
                "instance": inst.name,
                "component": inst.component,
                "old": old.value,
                "new": new.value,
                "detail": inst.detail,
                "pid": inst.pid,
            }
        )

    def record(self, role: str, instance: str, latency_s: float, body_tail: bytes, status: int, usage: Usage) -> None:
        """One answered request (called by the proxy once the answer has left); absent figures count 0."""
        done = Done(
            self.clock(), latency_s, usage.generated or 0, usage.cached or 0, usage.evaluated or 0, status < 400
        )
        self.requests.setdefault(instance, deque(maxlen=REQUESTS_KEPT)).append(done)
        self._role_done.setdefault(role, []).append(done)
        if status >= 400:
            said = error_text(body_tail)
            self.last_error[instance] = f"HTTP {status} on '{role}'" + (f": {said}" if said else "")

    # --- output ----------------------------------------------------------------------------

    def subscribe(self) -> Subscriber:
        sub = Subscriber()
        self.subscribers.add(sub)
        return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        self.subscribers.discard(sub)

    def publish(self, event: Event) -> None:
        for sub in list(self.subscribers):
            try:
                sub.queue.put_nowait(event)
            except asyncio.QueueFull:
                sub.dropped = True  # its reader ends the stream; the page reconnects and reloads
                self.subscribers.discard(sub)

    # --- the once-a-second sample -------------------------------------------------------------

    async def run(self, interval_s: float = 1.0) -> None:
        """Sample once a second until cancelled; a failed sample is logged and the next one taken."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                if self._ticks % MEMORY_EVERY == 0:
                    self.rss = await asyncio.to_thread(self._sample_memory, self._running())
                self.publish(self.tick())
            except Exception:
                log.exception("sampling the fleet's counters failed")

    def _running(self) -> list[tuple[str, Handle]]:
        """Read on the loop (the fleet is the loop's); measured in a thread."""
        return [
            (i.name, i.handle)
            for i in self.router.fleet
            if i.handle is not None and i.state not in (State.STOPPED, State.FAILED)
        ]

    def _sample_memory(self, running: list[tuple[str, Handle]]) -> dict[str, int]:
        launcher = self.router.stack.launcher
        out = {}
        for name, handle in running:
            with contextlib.suppress(Exception):  # gone between the check and the read
                out[name] = launcher.rss(handle)
        return out

    def tick(self) -> Event:
        """Take this second's sample: per-role history, capacity marks, per-instance counters."""
        now = self.clock()
        self._ticks += 1
        marks = self._take_marks(now)
        for role, pool in self.router.pools.items():
            done = self._role_done.pop(role, [])
            sample = {
                "t": round(now, 1),
                "rps": len(done),
                "p50_ms": _p50_ms(done),
                "queued": len(pool.waiting),
                "in_flight": pool.in_flight,
            }
            self.seconds.setdefault(role, deque(maxlen=PER_SECOND)).append(sample)
            minute = self._minute.setdefault(role, [])
            minute.append(sample)
            if len(minute) >= 60:
                self.minutes.setdefault(role, deque(maxlen=PER_MINUTE)).append(_merge(minute))
                minute.clear()
        snap = self.router.snapshot()
        return {
            "type": "counters",
            "t": now,
            "status": snap["instances"],
            "pools": snap["pools"],
            "instances": self.instance_counters(now),
            "roles": self.role_now(),
            "marks": marks,
        }

    def _take_marks(self, now: float) -> list[dict[str, Any]]:
        """New marks since the last tick (from the capacity counters), kept per role; returned with their role."""
        new: list[dict[str, Any]] = []
        counters = self.router.counters
        for attr, label in MARK_KINDS.items():
            counts: dict[str, int] = getattr(counters, attr)
            seen = self._counts.setdefault(attr, {})
            for name, n in counts.items():
                if n > seen.get(name, 0):
                    inst = next((i for i in self.router.fleet if i.name == name), None)
                    for role in inst.roles if inst else ():
                        mark = {"t": round(now, 1), "kind": label, "instance": name}
                        self.marks.setdefault(role, deque(maxlen=MARKS)).append(mark)
                        new.append({**mark, "role": role})
                seen[name] = n
        return new

    def instance_counters(self, now: float) -> dict[str, dict[str, Any]]:
        out = {}
        for inst in self.router.fleet:
            recent = self.requests.get(inst.name)
            while recent and recent[0].t < now - WINDOW_S:
                recent.popleft()
            done = list(recent or ())
            prompt = sum(d.prompt_n + d.cache_n for d in done)
            out[inst.name] = {
                "rps": round(len(done) / WINDOW_S, 3),
                "p50_ms": _p50_ms(done),
                "tokens_s": round(sum(d.tokens for d in done) / WINDOW_S, 2),
                "cache_ratio": round(sum(d.cache_n for d in done) / prompt, 3) if prompt else None,
                "rss": self.rss.get(inst.name),
                "last_error": self.last_error.get(inst.name, ""),
                "uptime_s": round(self.router.fleet.clock() - inst.since, 1) if inst.state is State.READY else None,
            }
        return out

    def role_now(self) -> dict[str, dict[str, Any]]:
        return {role: dict(samples[-1]) for role, samples in self.seconds.items() if samples}

    def history(self, day: bool = True) -> dict[str, Any]:
        """Per role: 15 minutes at one a second and the marks, and (``day``) a day at one a minute.

        Samples go as columns (``{"t": [...], "rps": [...], ...}``): a quarter of the bytes of objects."""
        return {
            role: {
                "seconds": _columns(self.seconds.get(role, ())),
                **({"minutes": _columns(self.minutes.get(role, ()))} if day else {}),
                "marks": list(self.marks.get(role, ())),
            }
            for role in self.router.pools
        }


SAMPLE_FIELDS = ("t", "rps", "p50_ms", "queued", "in_flight")


def _columns(samples: Iterable[dict[str, Any]]) -> dict[str, list[Any]]:
    rows = list(samples)
    return {k: [r[k] for r in rows] for k in SAMPLE_FIELDS}


def _p50_ms(done: list[Done]) -> float | None:
    return round(statistics.median(d.latency_s for d in done) * 1000, 1) if done else None


def _merge(samples: list[dict[str, Any]]) -> dict[str, Any]:
    p50s = [s["p50_ms"] for s in samples if s["p50_ms"] is not None]
    return {
        "t": samples[-1]["t"],
        "rps": round(sum(s["rps"] for s in samples) / len(samples), 3),
        "p50_ms": round(statistics.median(p50s), 1) if p50s else None,
        "queued": max(s["queued"] for s in samples),
        "in_flight": max(s["in_flight"] for s in samples),
    }


def error_text(tail: bytes) -> str:
    """The backend's own error message in an answer (OpenAI's ``error.message``), as plain text."""
    try:
        obj = json.loads(tail)
    except ValueError:
        return tail.decode("utf-8", "replace").strip()[:300]
    err = obj.get("error") if isinstance(obj, dict) else None
    msg = err.get("message") if isinstance(err, dict) else err
    return str(msg)[:300] if msg else ""


def sse(event: Event) -> bytes:
    """One server-sent event: ``event: <type>`` and its JSON as the data line."""
    return f"event: {event['type']}\ndata: {json.dumps(event, separators=(',', ':'))}\n\n".encode()
