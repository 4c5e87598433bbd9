"""Capacity: instances that start when requests need them, and stop to make room or when told.

* On-demand start: a request for a role nothing ready serves starts a stopped WARM (then
  COLD) server of it and waits in the queue for it.
* Expansion: when a pool's in-flight plus queued requests pass
  ``worker_pool.expansion_threshold``, a stopped WARM server of it starts in the background.
* Admission: before a WARM or COLD start, the memory it needs must be available; idle
  WARM instances are evicted (least recently used first) when that makes it fit.
* Drain and stop: out of rotation, in-flight requests end (bounded), then the process stops.

A start moves its instances to STARTING at once (admission included), so requests that
arrive together start a component once: only STOPPED instances are candidates.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from pathlib import Path

from modelfleet import memory, warmkv
from modelfleet.actions import Actions
from modelfleet.config import StackConfig, Tier
from modelfleet.errors import FleetError, NoBackend
from modelfleet.fleet import Fleet, Instance
from modelfleet.lifecycle import UP, State
from modelfleet.pool import Pool

log = logging.getLogger("modelfleet.capacity")


class Counters:
    """Event counts the metrics endpoint exposes, by instance name."""

    def __init__(self) -> None:
        self.warm_starts: dict[str, int] = {}
        self.idle_stops: dict[str, int] = {}
        self.restarts: dict[str, int] = {}
        self.evictions: dict[str, int] = {}
        # Prompt tokens by (role, instance), from each answer's timings; KV restores by (instance, result).
        self.prompt_evaluated: dict[tuple[str, str], int] = {}
        self.prompt_cached: dict[tuple[str, str], int] = {}
        self.kv_restores: dict[tuple[str, str], int] = {}

    @staticmethod
    def bump(d: dict[str, int], key: str) -> None:
        d[key] = d.get(key, 0) + 1

    @staticmethod
    def add(d: dict[tuple[str, str], int], key: tuple[str, str], n: int) -> None:
        d[key] = d.get(key, 0) + n


class Capacity:
    def __init__(
        self,
        cfg: StackConfig,
        fleet: Fleet,
        pools: Callable[[], dict[str, Pool]],
        actions: Actions,
        counters: Counters,
    ) -> None:
        self.cfg = cfg
        self.fleet = fleet
        self.pools = pools
        self.actions = actions
        self.counters = counters
        self.coming_back: set[str] = set()  # keys of instances being reloaded: requests wait for them
        self.on_kv_restored: Callable[[Instance], None] = lambda _: None  # the prefixes it knew are back

    # --- requests ----------------------------------------------------------------------

    def wait_for(self, pool: Pool) -> float:
        """Start what the pool needs for a request; how long the request may wait in line."""
        if not pool.ready and not pool.starting:
            if any(b.key in self.coming_back for b in pool.backends):  # a reload: it is on its way back
                return max(self.cfg.api.queue_wait_s, self.cfg.api.start_wait_s)
            self.start_for(pool, "on demand")
        self.maybe_expand(pool, incoming=1)
        wait_s = self.cfg.api.queue_wait_s
        if pool.starting:  # capacity is on its way: wait for it rather than give up early
            wait_s = max(wait_s, self.cfg.api.start_wait_s)
        return wait_s

    def candidates(self, pool: Pool) -> list[str]:
        """Components of the pool that could be started: WARM before COLD, config order."""
        order = {Tier.WARM: 0, Tier.COLD: 1, Tier.HOT: 2}
        comps: dict[str, Tier] = {}
        for b in pool.backends:
            if b.state is State.STOPPED:
                comps.setdefault(b.component, b.tier)
        return sorted(comps, key=lambda c: order[comps[c]])

    def start_for(self, pool: Pool, reason: str) -> None:
        """Start something that serves the pool, or raise why nothing can."""
        candidates = self.candidates(pool)
        if not candidates:
            failed = [
                f"{b.name} ({b.detail})" if b.detail else b.name for b in pool.backends if b.state is State.FAILED
            ]
            why = f"; failed: {', '.join(failed)}" if failed else ""
            raise NoBackend(f"no instance of '{pool.role}' is ready and none can be started{why}")
        self.start(candidates[0], reason)

    def maybe_expand(self, pool: Pool, incoming: int = 0) -> None:
        """Past the threshold, grow the pool with a stopped WARM server in the background."""
        load = pool.in_flight + len(pool.waiting) + incoming
        if load <= self.cfg.worker_pool.expansion_threshold or pool.starting:
            return
        warm = [c for c in self.candidates(pool) if self.cfg.components()[c].tier is Tier.WARM]
        if warm:
            self.start(warm[0], f"expansion: {load} requests on '{pool.role}'")

    # --- starting ------------------------------------------------------------------------

    def start(
        self, component: str, reason: str, include_failed: bool = False, replace: bool = False
    ) -> asyncio.Task[None] | None:
        """Start the stopped instances of a component in the background (None: nothing to start).
        With ``replace`` a process found running for one of them (started outside) is replaced."""
        wanted = {State.STOPPED, State.FAILED} if include_failed else {State.STOPPED}
        chosen = [i for i in self.fleet.of(component) if i.state in wanted]
        for inst in chosen:
            self.fleet.move(inst, State.STARTING, reason)
        return self.fleet.spawn(self._start(chosen, reason, replace)) if chosen else None

    async def _start(self, chosen: list[Instance], reason: str, replace: bool = False) -> None:
        name = chosen[0].component
        try:
            refusal = await self._admit(chosen[0]) if chosen[0].tier is not Tier.HOT else None
        except Exception as exc:  # nobody may be waiting (an expansion): report it here
            log.exception("admission of %s failed", name)
            refusal = f"admission failed: {exc}"
        if refusal is not None:
            log.warning("not starting %s (%s): %s", name, reason, refusal)
            self._give_up(chosen, f"cannot start {name}: {refusal}")
            return
        log.info("starting %s (%s)", name, reason)
        try:
            handles = await self.actions.start([i.key for i in chosen], replace)
        except FleetError as exc:
            log.warning("start of %s failed: %s", name, exc)
            self._give_up(chosen, f"starting {name} failed: {exc}")
            return
        for inst in chosen:
            inst.handle = handles.get(inst.key)
            await self.restore_kv(inst)
            if await self.came_up(inst) and inst.tier is not Tier.HOT:
                Counters.bump(self.counters.warm_starts, inst.name)
        self.dispatch_all()

    async def came_up(self, inst: Instance) -> bool:
        """Run the instance_up hooks of an instance that is up; READY if they pass, else stopped again."""
        blocking = await self.actions.instance_hooks(inst.key)
        if blocking is None:
            self.fleet.move(inst, State.READY, expect={State.STARTING})
            return True
        log.error("%s: %s; stopping it", inst.name, blocking)
        self.fleet.move(inst, State.STOPPING, blocking)
        await self.actions.stop([inst.key])
        inst.handle = None
        self.fleet.move(inst, State.STOPPED, blocking)
        self.fail_starved(blocking)
        return False

    def _give_up(self, chosen: list[Instance], why: str) -> None:
        for inst in chosen:
            if inst.state is State.STARTING:
                self.fleet.move(inst, State.STOPPED, why)
        self.fail_starved(why)

    def fail_starved(self, why: str) -> None:
        """Waiters of pools with nothing ready or coming are told now, not at their timeout."""
        for pool in self.pools().values():
            if pool.waiting and not pool.ready and not pool.starting:
                pool.fail_waiters(NoBackend(f"no instance of '{pool.role}' can serve: {why}"))

    def dispatch_all(self) -> None:
        for pool in self.pools().values():
            if pool.waiting:
                pool.dispatch()

    # --- admission and eviction ---------------------------------------------------------------

    async def _admit(self, inst: Instance) -> str | None:
        """None if the instance may start now (after evicting idle WARM instances if needed), else why not."""
        idle = [
            memory.IdleInstance(name=b.key, component=b.component, tier=b.tier, last_request_at=b.last_used)
            for b in self.fleet
            if b.tier is Tier.WARM and b.state is State.READY and b.in_flight == 0
        ]
        verdict = await self.actions.admit(inst.spec, idle)
        if not verdict.admitted:
            return verdict.reason
        if verdict.evict:
            log.info("admitting %s: %s", inst.name, verdict.reason)
            victims = [self.fleet.instances[k] for k in verdict.evict if k in self.fleet.instances]
            victims = [v for v in victims if v.state is State.READY and v.in_flight == 0]
            for v in victims:
                Counters.bump(self.counters.evictions, v.name)
            await asyncio.gather(*(self.drain_and_stop(v, f"evicted to make room for {inst.name}") for v in victims))
        return None

    # --- stopping -------------------------------------------------------------------------

    # --- KV caches across stops (warmkv.py) ----------------------------------------------------

    def keeps_kv(self, inst: Instance) -> bool:
        return inst.spec.slot_dir is not None and self.cfg.worker_pool.keep_kv

    async def save_kv(self, inst: Instance) -> None:
        """Save the slots of a drained instance before it stops; a failure only costs the cache."""
        try:
            out = await self.actions.save_kv(inst)
        except Exception:
            log.exception("%s: saving its KV cache failed", inst.name)
            return
        log.info("%s: saved %d slots (%d tokens)%s", inst.name, len(out.slots), out.tokens, _detail(out))

    async def restore_kv(self, inst: Instance) -> None:
        """Before a started instance takes traffic, put back the KV cache saved when it stopped."""
        if not self.keeps_kv(inst) or not warmkv.pending(Path(inst.spec.slot_dir or "")):
            return
        try:
            out = await self.actions.restore_kv(inst)
        except Exception:
            log.exception("%s: restoring its KV cache failed", inst.name)
            Counters.add(self.counters.kv_restores, (inst.name, "failed"), 1)
            return
        if not out.slots:
            log.info("%s: no KV cache restored%s", inst.name, _detail(out))
            return
        result = "verified" if out.verified else "unused"
        Counters.add(self.counters.kv_restores, (inst.name, result), 1)
        if out.verified:
            log.info("%s: restored %d slots (%d tokens), cache in use", inst.name, len(out.slots), out.tokens)
            self.on_kv_restored(inst)
        else:
            log.warning("%s: KV restore did not take%s", inst.name, _detail(out))

    async def drain_and_stop(self, inst: Instance, reason: str, keep_kv: bool = False) -> None:
        """Out of rotation, wait (bounded) for in-flight requests, then stop the process.

        With ``keep_kv`` (an idle stop, a reload) a server with ``slot_save`` saves its slots first."""
        if inst.state in UP:
            self.fleet.move(inst, State.DRAINING, reason)
        if inst.state is State.DRAINING:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(inst.wait_idle(), self.cfg.api.drain_timeout_s)
        if inst.state in (State.DRAINING, State.STARTING, State.BACKOFF):
            self.fleet.move(inst, State.STOPPING, reason)
        elif inst.state is not State.STOPPING:
            return  # already stopped or failed
        if keep_kv and self.keeps_kv(inst) and inst.in_flight == 0:
            await self.save_kv(inst)
        try:
            await self.actions.stop([inst.key])
        finally:
            inst.handle = None
            self.fleet.move(inst, State.STOPPED, reason)
        # Requests that were waiting for this instance go elsewhere or to a fresh start
        # (unless it is being reloaded: its own start follows).
        back = inst.key in self.coming_back
        for pool in self.pools().values():
            if inst in pool.backends and pool.waiting and not pool.ready and not pool.starting and not back:
                with contextlib.suppress(FleetError):
                    self.start_for(pool, "requests waiting after a stop")
        self.dispatch_all()


def _detail(out: warmkv.Outcome) -> str:
    return f" ({out.detail})" if out.detail else ""
