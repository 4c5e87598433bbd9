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
* **Slots.** Within an instance that pins slots (``pin_slots``), :class:`SlotMap` gives each
  completion request the idle slot that last held most of its prefix (else the least
  recently used one), sent as ``id_slot``. The server runs with
  ``--slot-prompt-similarity 1``, so each request saves its slot's content to the RAM
  prompt cache and loads the best cached prompt for itself: a conversation whose slot
  another took comes back whole, and one that keeps its slot pays only its new tokens.
  (By default llama-server reuses a slot sharing half its content with the new prompt
  without saving it, so agents with one long system prompt overwrite each other's
  histories; and with similarity off but slots left to the server, a lone conversation
  alternates between slots, paying every turn twice.)
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
    pin: bool = field(default=False, compare=False)  # a completion the front door may pin to a slot

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


def route_key(payload: Mapping[str, Any], session: str | None = None, pin: bool = False) -> RouteKey:
    """The routing key of a request body: its prefix chain, and the session (a header, else ``user``).

    ``pin``: the request is a completion that may be pinned to a slot, unless it names one itself."""
    if session is None and isinstance(payload.get("user"), str) and payload["user"]:
        session = payload["user"]
    pin = pin and "id_slot" not in payload
    messages = payload.get("messages")
    if isinstance(messages, list) and messages:
        first = messages[0]
        head = first if isinstance(first, dict) and first.get("role") == "system" else None
        return RouteKey(_chain(_canon(m) for m in messages), session, head, pin)
    prompt = payload.get("prompt", payload.get("content"))
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str) and prompt:
        return RouteKey(_chain(_blocks(prompt.encode("utf-8", "surrogatepass"))), session, pin=pin)
    return RouteKey((), session)  # nothing to chain (nor to pin: a batch of prompts takes several slots)


def with_slot(body: bytes, slot: int) -> bytes | None:
    """The JSON object ``body`` with ``"id_slot": slot`` first; None if it does not start as an object."""
    start = body.lstrip(b" \t\r\n")
    if start.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte order mark, which the JSON parse allowed
        start = start[3:].lstrip(b" \t\r\n")
    if not start.startswith(b"{"):
        return None
    rest = start[1:].lstrip(b" \t\r\n")
    return b'{"id_slot":%d%s' % (slot, b"" if rest.startswith(b"}") else b",") + rest


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


class SlotMap:
    """The slots of one instance as the front door pinned them: which are in use, and which
    prefix each was last given. Runs on the event loop, changed only through the Fleet."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.held: list[dict[bytes, int]] = [{} for _ in range(size)]  # per slot: link -> characters covered
        self.busy = [False] * size
        self.used = [0] * size  # when each was last given out, by a counter: 0 never
        self._tick = 0
        self.hits = 0  # requests given a slot that held part of their prefix
        self.moves = 0  # requests given a slot that held none of it (its content went to the RAM cache)

    def match(self, slot: int, route: RouteKey) -> int:
        """Characters of the request's prefix the slot was last given (0: none)."""
        held = self.held[slot]
        if held:
            for link, covered in reversed(route.chain):
                if link in held:
                    return covered
        return 0

    def take(self, route: RouteKey) -> int | None:
        """An idle slot for the request, now marked busy and holding its prefix; None if all are busy.
        The one holding most of the prefix wins; among equals the one holding least besides (the least
        to move out to the RAM cache), then the least recently used."""
        best, best_key = None, (-1, 0, 0)
        for slot in range(self.size):
            if not self.busy[slot]:
                held = self.held[slot]
                key = (self.match(slot, route), -max(held.values(), default=0), -self.used[slot])
                if key > best_key:
                    best, best_key = slot, key
        if best is None:
            return None
        if best_key[0]:
            self.hits += 1
        elif self.held[best]:
            self.moves += 1
        self.busy[best] = True
        self._tick += 1
        self.used[best] = self._tick
        self.held[best] = dict(route.chain)
        return best

    def release(self, slot: int) -> None:
        self.busy[slot] = False

    def given(self, slot: int, route: RouteKey, used: int) -> bool:
        """A shared prefix was restored into an idle slot: it holds that now. False if a request took
        the slot since ``used`` (its stamp when the restore began): then that request's content is there."""
        if self.busy[slot] or self.used[slot] != used:
            return False
        self.held[slot] = dict(route.chain)
        return True

    def stats(self) -> dict[str, int]:
        return {"hits": self.hits, "moves": self.moves}


def _lighter(a: Candidate, b: Candidate) -> bool:
    return a.in_flight / a.slots < b.in_flight / b.slots
