"""Cache-aware choice of an instance within a pool: prefix affinity, sticky sessions, bounded loads.

llama-server keeps each slot's KV cache (and a prompt cache across its slots), so a
request whose prompt starts like one an instance served recently costs a fraction of a
cold one there. This module picks that instance, but never at any price:

* **Routing key.** :func:`route_key` reads a request body once: a hash chain over its
  leading messages (chat) or over the leading blocks of its prompt (completions), each
  link with the number of characters it covers, plus an optional session key.
* **Memory.** :class:`Affinity` remembers, per instance, the links it was sent, in a
  bounded LRU (``PER_INSTANCE`` links); sessions are remembered in a bounded LRU too.
  What a stopped instance knew is parked, and comes back only if its KV cache was
  restored (:meth:`Affinity.reinstate`); otherwise it is dropped when it is ready again.
* **Bounded loads.** An instance is eligible only while its in-flight requests (counting
  the new one) stay within ``(1 + e)`` times its share of the pool's load (consistent
  hashing with bounded loads; one request is always allowed on an idle instance); a
  sticky or cached instance over that bound loses the request to one with room. With no
  match, the least loaded instance wins, ties broken by rendezvous hashing of the first
  link, so new prefixes spread and simultaneous twins meet.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

PER_INSTANCE = 4096  # links remembered per instance
MAX_SESSIONS = 10_000
BLOCK_CHARS = 512  # a plain prompt is chained in blocks of this many characters
MAX_LINKS = 64  # links per request: the leading messages or blocks


class Candidate(Protocol):
    key: str
    in_flight: int
    slots: int


@dataclass(frozen=True, slots=True)
class RouteKey:
    """What affinity routing knows of one request."""

    chain: tuple[tuple[bytes, int], ...] = ()  # (link hash, characters covered so far), shortest first
    session: str | None = None
    # The first message when it is a system prompt: what prefix sharing (share.py) evaluates once.
    head: Mapping[str, Any] | None = field(default=None, compare=False, hash=False)

    def __bool__(self) -> bool:
        return bool(self.chain) or self.session is not None


def _canon(value: Any) -> bytes:
    if isinstance(value, str):
        return value.encode("utf-8", "surrogatepass")
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8", "replace")


def _chain(parts: Iterable[bytes]) -> tuple[tuple[bytes, int], ...]:
    h = hashlib.blake2b(digest_size=12)
    out: list[tuple[bytes, int]] = []
    covered = 0
    for part in parts:
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
        covered += len(part)
        out.append((h.copy().digest(), covered))
        if len(out) >= MAX_LINKS:
            break
    return tuple(out)


def route_key(payload: Mapping[str, Any], session: str | None = None) -> RouteKey:
    """The routing key of a request body: its prefix chain, and the session (a header, else ``user``)."""
    if session is None and isinstance(payload.get("user"), str) and payload["user"]:
        session = payload["user"]
    messages = payload.get("messages")
    if isinstance(messages, list) and messages:
        first = messages[0]
        head = first if isinstance(first, dict) and first.get("role") == "system" else None
        return RouteKey(_chain(_canon(m) for m in messages), session, head)
    prompt = payload.get("prompt", payload.get("content"))
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str) and prompt:
        return RouteKey(_chain(_blocks(prompt.encode("utf-8", "surrogatepass"))), session)
    return RouteKey((), session)


def _blocks(data: bytes) -> Iterable[bytes]:
    for i in range(0, len(data), BLOCK_CHARS):
        yield data[i : i + BLOCK_CHARS]


def _rendezvous(link: bytes, key: str) -> bytes:
    return hashlib.blake2b(link + key.encode(), digest_size=8).digest()


class Affinity:
    """Which instance most likely holds a request's prefix, within a load bound."""

    def __init__(self, load_factor: float = 0.25, per_instance: int = PER_INSTANCE, max_sessions: int = MAX_SESSIONS):
        self.load_factor = load_factor
        self.per_instance = per_instance
        self.max_sessions = max_sessions
        self.known: dict[str, OrderedDict[bytes, None]] = {}
        self.sessions: OrderedDict[str, str] = OrderedDict()
        self.parked: dict[str, OrderedDict[bytes, None]] = {}
        self.hits = 0  # choices made by a cached prefix or a session
        self.misses = 0  # choices with no usable match

    # --- choosing ----------------------------------------------------------------------

    def within_bound(self, c: Candidate, candidates: Sequence[Candidate]) -> bool:
        """Whether one more request keeps ``c`` within (1 + e) times its share of the pool's load."""
        total = sum(b.in_flight for b in candidates) + 1
        slots = sum(b.slots for b in candidates)
        return c.in_flight + 1 <= max(1.0, (1 + self.load_factor) * total * c.slots / slots)

    def match(self, inst_key: str, route: RouteKey) -> int:
        """Characters of the request's prefix the instance was last sent (0: none)."""
        known = self.known.get(inst_key)
        if not known:
            return 0
        for link, covered in reversed(route.chain):
            if link in known:
                return covered
        return 0

    def choose(self, candidates: Sequence[Candidate], route: RouteKey) -> Candidate | None:
        """The instance for the request among ``candidates`` (all with a free slot); None: no preference."""
        if not candidates or not route:
            return None
        eligible = [c for c in candidates if self.within_bound(c, candidates)]
        if not eligible:
            return None
        if route.session is not None:
            home = self.sessions.get(route.session)
            for c in eligible:
                if c.key == home:
                    self.hits += 1
                    return c
        if not route.chain:
            return None
        best, best_len = None, 0
        for c in eligible:
            n = self.match(c.key, route)
            if n > best_len or (n == best_len and best is not None and n and _lighter(c, best)):
                best, best_len = c, n
        if best is not None:
            self.hits += 1
            return best
        self.misses += 1
        # Nothing cached: the least loaded; among equals, one fixed by the first link (twins meet).
        least = min(c.in_flight / c.slots for c in eligible)
        first = route.chain[0][0]
        return max((c for c in eligible if c.in_flight / c.slots == least), key=lambda c: _rendezvous(first, c.key))

    # --- remembering -------------------------------------------------------------------

    def remember(self, inst_key: str, route: RouteKey) -> None:
        """The request was sent to the instance: its prefix (and session) live there now."""
        if route.chain:
            known = self.known.get(inst_key)
            if known is None:
                known = self.known[inst_key] = OrderedDict()
            for link, _ in route.chain:
                known[link] = None
                known.move_to_end(link)
            while len(known) > self.per_instance:
                known.popitem(last=False)
        if route.session is not None:
            self.sessions[route.session] = inst_key
            self.sessions.move_to_end(route.session)
            while len(self.sessions) > self.max_sessions:
                self.sessions.popitem(last=False)

    def holds(self, inst_key: str, link: bytes) -> bool:
        """Whether the instance was sent (or given, by prefix sharing) this link."""
        known = self.known.get(inst_key)
        return known is not None and link in known

    def park(self, inst_key: str) -> None:
        """The instance stopped: what it knew is gone unless its KV cache comes back."""
        known = self.known.pop(inst_key, None)
        if known:
            self.parked[inst_key] = known

    def reinstate(self, inst_key: str) -> None:
        """The instance's saved KV cache was restored (and verified): it knows its prefixes again."""
        known = self.parked.pop(inst_key, None)
        if known:
            self.known[inst_key] = known

    def ready(self, inst_key: str) -> None:
        """The instance takes traffic again: whatever was not reinstated is forgotten."""
        self.parked.pop(inst_key, None)

    def stats(self) -> dict[str, int]:
        return {
            "hits": self.hits,
            "misses": self.misses,
            "sessions": len(self.sessions),
            "links": sum(len(k) for k in self.known.values()),
        }


def _lighter(a: Candidate, b: Candidate) -> bool:
    return a.in_flight / a.slots < b.in_flight / b.slots
