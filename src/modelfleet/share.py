"""A long shared prefix evaluated once per pool, not once per slot.

Agents of one kind open every conversation with the same long system prompt. Each
llama-server slot that serves one of them pays that prompt in full the first time,
so a pool of R replicas with S slots each evaluates it R x S times, and the first
requests of a burst all pay it at once, side by side, on the same cores. llama-server
shares a prefix between its slots only through its RAM prompt cache (written when a
slot is reused), and never between replicas.

Here the front door does it. When a request reaches a prefix-routed pool
(:mod:`~modelfleet.affinity`) and its first message is a system prompt of at least
``api.share_prefix_min_chars`` characters that some ready replica does not hold yet:

1. one replica evaluates it once, alone, in one idle slot (the chat template's
   rendering of that message, a one-token completion pinned with ``id_slot``);
2. that slot is saved (llama-server's slot save: the servers need ``slot_save: true``)
   and the file is restored into the idle slots of the other replicas of the same
   server on this machine and into the seed's other idle slots (a restore of a
   thousand-token prefix takes milliseconds);
3. the replicas are remembered as holding the prefix, so the prefix router spreads the
   conversations over all of them by load: every one of them finds the prefix cached.

Requests with that prefix that arrive meanwhile wait for it (they would have paid for
it anyway, more slowly, side by side), at most ``api.queue_wait_s``. The seed's
evaluated tokens are counted like any request's. A failure at any step only costs the
sharing: the requests go on as they would have without it, and a request with that
prefix tries again a minute later.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modelfleet import affinity, upstream, warmkv
from modelfleet.affinity import RouteKey
from modelfleet.errors import UpstreamError
from modelfleet.fleet import Fleet, Instance
from modelfleet.instance import LOCAL_NODE
from modelfleet.lifecycle import State
from modelfleet.pool import Pool

log = logging.getLogger("modelfleet.share")

FILE_PREFIX = warmkv.SHARE_PREFIX
CALL_TIMEOUT_S = 30.0  # one slot save, restore or /slots read
RETRY_AFTER_S = 60.0  # a prefix whose seed failed is not seeded again sooner
NO_ROOM_RETRY_S = 5.0  # nor one that found no free slot to be evaluated in
MAX_FAILED = 1024
Failure = (UpstreamError, TimeoutError, ValueError, OSError, TypeError, KeyError, AttributeError)


@dataclass
class Stats:
    """What sharing did, for the status and the metrics."""

    seeds: int = 0  # prefixes evaluated once and shared
    failed: int = 0  # seeds given up (the requests went on without)
    tokens: int = 0  # prompt tokens the seeds evaluated
    slots: int = 0  # slots the shared prefixes were restored into

    def to_json(self) -> dict[str, int]:
        return {"seeds": self.seeds, "failed": self.failed, "tokens": self.tokens, "slots": self.slots}


@dataclass
class _Seed:
    link: bytes
    done: asyncio.Event = field(default_factory=asyncio.Event)


def eligible(inst: Instance) -> bool:
    """A ready replica on this machine that can save and restore slots."""
    handle = inst.handle
    local = handle is None or (handle.node == LOCAL_NODE and not handle.ref)  # its slot folder is ours to reach
    return inst.state is State.READY and inst.spec.slot_dir is not None and local


class Sharing:
    """Seeds shared prefixes for the pools that route by prefix; one seed per prefix at a time."""

    def __init__(
        self,
        fleet: Fleet,
        client: upstream.Client,
        min_chars: Callable[[], int],
        count_tokens: Callable[[str, str, int], None],
        wait_s: Callable[[], float] = lambda: 30.0,
    ) -> None:
        self.fleet = fleet
        self.client = client
        self.min_chars = min_chars
        self.wait_s = wait_s  # the longest a request waits for a seed before it goes on without
        self.count_tokens = count_tokens  # (role, instance name, prompt tokens evaluated)
        self.stats = Stats()
        self._seeding: dict[bytes, _Seed] = {}
        self._retry_at: dict[bytes, float] = {}  # prefixes not to seed again before then
        self._tasks: set[asyncio.Task[None]] = set()

    def wants(self, pool: Pool, link: bytes, head: Mapping[str, Any] | None) -> list[Instance]:
        """The replicas a request's shared prefix should be spread over now (empty: nothing to do)."""
        if pool.affinity is None or head is None:
            return []
        text = head.get("content")
        limit = self.min_chars()
        if limit <= 0 or not isinstance(text, str) or len(text) < limit:
            return []
        ready = [b for b in pool.backends if eligible(b)]
        lacking = [b for b in ready if not pool.affinity.holds(b.key, link)]
        if not lacking:
            return []  # every replica holds it already (the fast path of every later request)
        # A slot file fits the replicas of one server only: spread it within the component of one that lacks it.
        return [b for b in ready if b.spec.component == lacking[0].spec.component]

    async def before(self, pool: Pool, link: bytes, head: Mapping[str, Any] | None) -> None:
        """Called before a request is routed: wait for its shared prefix to be spread, seeding it if needed."""
        seed = self._seeding.get(link)
        if seed is None:
            retry_at = self._retry_at.get(link)
            if retry_at is not None and time.monotonic() < retry_at:
                return  # it failed (or had no room) a moment ago: not again for every request
            ready = self.wants(pool, link, head)
            if not ready or sum(b.slots for b in ready) < 2:
                return
            assert head is not None
            seed = self._seeding[link] = _Seed(link)
            task = asyncio.get_running_loop().create_task(self._seed(pool, seed, dict(head), ready))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        with contextlib.suppress(TimeoutError):  # a seed slower than a queue wait: go on without it
            await asyncio.wait_for(seed.done.wait(), self.wait_s())

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # --- the seed -------------------------------------------------------------------------

    async def _seed(self, pool: Pool, seed: _Seed, head: dict[str, Any], ready: list[Instance]) -> None:
        retry_in = None
        try:
            if not await self._spread(pool, seed.link, head, ready):
                retry_in = NO_ROOM_RETRY_S  # no free slot to seed in, or some replica had none to take it
        except asyncio.CancelledError:
            raise
        except Failure as exc:
            log.warning("sharing a prefix on '%s' failed: %s", pool.role, exc)
            self.stats.failed += 1
            retry_in = RETRY_AFTER_S
        except Exception:  # sharing is an optimisation: never let it fail a request
            log.exception("sharing a prefix on '%s' failed", pool.role)
            self.stats.failed += 1
            retry_in = RETRY_AFTER_S
        finally:
            del self._seeding[seed.link]
            seed.done.set()
        if retry_in is not None:
            self._retry_at[seed.link] = time.monotonic() + retry_in
            while len(self._retry_at) > MAX_FAILED:
                self._retry_at.pop(next(iter(self._retry_at)))

    async def _spread(self, pool: Pool, link: bytes, head: dict[str, Any], ready: list[Instance]) -> bool:
        """Evaluate the prefix on one replica, restore it into the idle slots of those that lack it.
        False: no replica had a free slot to evaluate it in, or one that lacks it took it in no slot."""
        aff = pool.affinity
        assert aff is not None
        lacking = {b.key for b in ready if not aff.holds(b.key, link)}
        # The seed runs where the prefix most likely is already (cheap), else on the least busy replica.
        free = [b for b in ready if b.in_flight < b.slots]
        if not free:
            return False
        src = max(free, key=lambda b: (aff.holds(b.key, link), -b.in_flight))
        first = affinity.route_key({"messages": [head]}, pin=True)  # the prefix alone, as its first link
        lease = self.fleet.take(src, first)
        try:
            if lease.slot is not None:
                slot = lease.slot  # a slot-pinning instance: the slot map chose (and now marks) it
            else:
                idle = await self._idle_slots(src)
                if not idle:
                    return False
                slot = idle[0]
            rendered = await self._call(src, "/apply-template", {"messages": [head]})
            prompt = rendered.get("prompt") if isinstance(rendered, dict) else None
            if not isinstance(prompt, str) or not prompt:
                raise ValueError(f"{src.name}: /apply-template gave no prompt")
            body = {"prompt": prompt, "n_predict": 1, "id_slot": slot, "cache_prompt": True, "temperature": 0}
            answer = await self._call(src, "/completion", body, timeout_s=None)
            evaluated = int(answer.get("timings", {}).get("prompt_n", 0))
            self.stats.tokens += evaluated
            self.count_tokens(pool.role, src.name, evaluated)
            filename = f"{FILE_PREFIX}{link.hex()}.bin"
            src_dir = Path(src.spec.slot_dir or "")
            await self._call(src, f"/slots/{slot}?action=save", {"filename": filename})
        finally:
            lease.release()
        restored = 0
        try:
            # Only replicas that lack it: the idle slots of the others hold conversations worth keeping.
            targets = [
                b
                for b in ready
                if b.key in lacking and b.state is State.READY and b.spec.component == src.spec.component
            ]
            results = await asyncio.gather(
                *(self._restore(b, src_dir / filename, filename, first, slot if b is src else None) for b in targets)
            )
            aff.remember(src.key, first)
            for b, n in zip(targets, results, strict=True):
                restored += n
                if n:
                    aff.remember(b.key, first)
        finally:
            for b in ready:
                if b.spec.slot_dir:
                    (Path(b.spec.slot_dir) / filename).unlink(missing_ok=True)
        self.stats.seeds += 1
        self.stats.slots += restored
        log.info(
            "shared a %d-token prefix of '%s': evaluated on %s, restored into %d slot(s)",
            evaluated,
            pool.role,
            src.name,
            restored,
        )
        return all(n or b is src for b, n in zip(targets, results, strict=True))

    async def _restore(self, inst: Instance, source: Path, filename: str, first: RouteKey, skip: int | None) -> int:
        """Restore the saved prefix into the instance's idle slots; how many took it.

        A restore overwrites what an idle slot held; llama-server keeps a copy of every idle slot in
        its RAM prompt cache from the next request on (``--cache-idle-slots``, on by default), where
        a pinned request finds it again. On an instance that pins slots, a slot the map has given to
        a request is left alone, and the map learns which slots hold the prefix now."""
        try:
            target = Path(inst.spec.slot_dir or "") / filename
            if target != source:
                _link(source, target)
            done = 0
            slots = inst.slot_map
            for slot in await self._idle_slots(inst):
                if slot == skip or (slots is not None and slots.busy[slot]):
                    continue
                used = slots.used[slot] if slots is not None else 0
                await self._call(inst, f"/slots/{slot}?action=restore", {"filename": filename})
                if slots is None or slots.given(slot, first, used):
                    done += 1
            return done
        except Failure as exc:
            log.warning("%s: the shared prefix was not restored: %s", inst.name, exc)
            return 0

    async def _idle_slots(self, inst: Instance) -> list[int]:
        """Slot ids the instance is not using now (GET /slots)."""
        slots = await self._call(inst, "/slots", None)
        if not isinstance(slots, list):
            raise ValueError("/slots did not answer a list")
        return [int(s["id"]) for s in slots if isinstance(s, dict) and not s.get("is_processing")]

    async def _call(
        self, inst: Instance, path: str, body: dict[str, Any] | None, timeout_s: float | None = CALL_TIMEOUT_S
    ) -> Any:
        return await warmkv.call(self.client, inst.kv_target(), path, body, timeout_s)


def _link(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    target.unlink(missing_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)
