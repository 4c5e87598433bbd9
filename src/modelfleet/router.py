"""The owner of every instance's state inside the front door.

The Router maps roles to pools, hands out backends, grows WARM capacity when a pool
passes its expansion threshold, starts a stopped WARM or COLD server when only it can
answer, stops idle WARM instances after draining them, probes every instance and
restarts HOT instances that die (exponential backoff, a restart budget). Every state
change happens here, on the event loop; the blocking lifecycle verbs of
:class:`~modelfleet.stack.Stack` run in worker threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

from modelfleet import hooks, logs, memory, registry, upstream
from modelfleet.config import ServerConfig, StackConfig, Tier
from modelfleet.errors import FleetError
from modelfleet.launcher import InstanceSpec
from modelfleet.pool import Backend, BackendState, NoBackend, Pool
from modelfleet.stack import Stack
from modelfleet.state import InstanceRecord

log = logging.getLogger("modelfleet.router")

SERVICE_SLOTS = 64  # auxiliary services declare no slots; let them take many requests

#: Called before a WARM/COLD start; returns None to go ahead or a reason to refuse.
Admission = Callable[[InstanceSpec], Coroutine[Any, Any, str | None]]


class Counters:
    """Event counts the metrics endpoint exposes (kept here so tests can read them)."""

    def __init__(self) -> None:
        self.warm_starts: dict[str, int] = {}
        self.idle_stops: dict[str, int] = {}
        self.restarts: dict[str, int] = {}
        self.evictions: dict[str, int] = {}

    @staticmethod
    def bump(d: dict[str, int], key: str) -> None:
        d[key] = d.get(key, 0) + 1


class Router:
    """Pools, expansion, idle shutdown, health monitoring and self-healing."""

    def __init__(
        self,
        cfg: StackConfig,
        stack: Stack,
        clock: Callable[[], float] = time.monotonic,
        admission: Admission | None = None,
    ) -> None:
        self.cfg = cfg
        self.stack = stack
        # The one HTTP client of the front door: proxied requests and health probes.
        self.client = upstream.Client(connect_timeout=5.0, sock_read=cfg.api.request_timeout_s)
        self.clock = clock
        self.admission = admission
        self.counters = Counters()
        self.specs: dict[str, InstanceSpec] = {s.key: s for s in stack.specs(cfg.components())}
        self.backends: dict[str, Backend] = {k: self._backend(s) for k, s in self.specs.items()}
        self.pools: dict[str, Pool] = {
            role: Pool(role, [b for b in self.backends.values() if role in b.roles], cfg.api.queue_max, self.release)
            for role in cfg.roles()
        }
        self._resolved: dict[str | None, Pool] = {}  # name -> pool; the config is fixed for our lifetime
        self._busy: set[str] = set()  # keys under a start/stop of ours: state sync leaves them alone
        self._starts: dict[str, asyncio.Task[None]] = {}  # component -> its start task
        self._admitting: dict[str, asyncio.Task[str | None]] = {}  # component -> its admission, then start
        self._tasks: set[asyncio.Task[Any]] = set()
        self._drained: dict[str, asyncio.Event] = {}

    def _backend(self, spec: InstanceSpec) -> Backend:
        comp = self.cfg.components()[spec.component]
        slots = comp.parallel if isinstance(comp, ServerConfig) else SERVICE_SLOTS
        return Backend(
            key=spec.key,
            name=spec.name,
            component=spec.component,
            port=spec.port,
            host=spec.host,
            roles=spec.roles,
            tier=spec.tier,
            slots=slots,
            last_used=self.clock(),
        )

    # --- requests ------------------------------------------------------------

    def resolve(self, name: str | None) -> Pool:
        """The pool for a role, alias or task type (None: the default role)."""
        pool = self._resolved.get(name)
        if pool is None:
            pool = self._resolved[name] = self.pools[registry.resolve(self.cfg, name)]
        return pool

    async def acquire(self, pool: Pool, exclude: frozenset[str] = frozenset()) -> Backend:
        """A backend of the pool with a free slot; may start a WARM/COLD server and wait for it."""
        if not pool.ready and not self._starting(pool):
            await self._start_for(pool, reason="on demand")
        self._maybe_expand(pool, incoming=1)
        wait_s = self.cfg.api.queue_wait_s
        if self._starting(pool):  # capacity is on its way: wait for it rather than give up early
            wait_s = max(wait_s, self.cfg.api.start_wait_s)
        return await pool.acquire(wait_s, exclude)

    def release(self, backend: Backend) -> None:
        """A request on ``backend`` ended: free its slot and hand it on."""
        backend.in_flight -= 1
        backend.last_used = self.clock()
        if backend.in_flight == 0 and backend.key in self._drained:
            self._drained[backend.key].set()
        self.dispatch(backend)

    def dispatch(self, backend: Backend | None = None) -> None:
        for pool in self.pools.values():
            if pool.waiting and (backend is None or backend in pool.backends):
                pool.dispatch()

    def report_failure(self, backend: Backend) -> None:
        """A request could not reach the backend: count it like a failed probe."""
        self._probe_result(backend, ok=False)

    # --- starting ------------------------------------------------------------

    def _starting(self, pool: Pool) -> bool:
        return any(b.state is BackendState.STARTING for b in pool.backends)

    def _candidates(self, pool: Pool) -> list[str]:
        """Components of the pool that could be started: WARM before COLD, config order."""
        order = {Tier.WARM: 0, Tier.COLD: 1, Tier.HOT: 2}
        comps: dict[str, Tier] = {}
        for b in pool.backends:
            if b.state is BackendState.STOPPED and b.key not in self._busy:
                comps.setdefault(b.component, b.tier)
        return sorted(comps, key=lambda c: order[comps[c]])

    async def _start_for(self, pool: Pool, reason: str) -> None:
        """Start something that serves the pool, or fail its waiters with why not."""
        candidates = self._candidates(pool)
        if not candidates:
            failed = [b.name for b in pool.backends if b.state is BackendState.FAILED]
            why = f"; failed: {', '.join(failed)}" if failed else ""
            raise NoBackend(f"no instance of '{pool.role}' is ready and none can be started{why}")
        # shield: a request that gives up does not call off a start others are waiting for
        refusal = await asyncio.shield(self._admit_and_start(candidates[0], reason))
        if refusal is not None:
            raise NoBackend(f"cannot start {candidates[0]} for '{pool.role}': {refusal}")

    def _admit_and_start(self, component: str, reason: str) -> asyncio.Task[str | None]:
        """Admission, then the start, of a component: once, however many requests ask at the same moment
        (two admissions could each evict for the same start). The task's result is the refusal, or None."""
        task = self._admitting.get(component)
        if task is None:
            task = self._spawn(self._admit_then_start(component, reason))
            self._admitting[component] = task
            task.add_done_callback(lambda _: self._admitting.pop(component, None))
        return task

    async def _admit_then_start(self, component: str, reason: str) -> str | None:
        try:
            refusal = await self._admit(component)
        except Exception as exc:  # nobody may be waiting (an expansion): report it here
            log.exception("admission of %s failed", component)
            refusal = f"admission failed: {exc}"
        if refusal is None:
            self.ensure_started(component, reason)
        else:
            log.warning("not starting %s (%s): %s", component, reason, refusal)
        return refusal

    async def _admit(self, component: str) -> str | None:
        """None if the component may start now (after evicting idle WARM instances if needed), else why not."""
        spec = next((s for s in self.specs.values() if s.component == component), None)
        if spec is None:
            return None
        if self.admission is not None:
            return await self.admission(spec)
        return await self._admit_by_memory(spec)

    async def _admit_by_memory(self, spec: InstanceSpec) -> str | None:
        idle = [
            memory.IdleInstance(name=b.key, component=b.component, tier=b.tier, last_request_at=b.last_used)
            for b in self.backends.values()
            if b.tier is Tier.WARM and b.state is BackendState.READY and b.in_flight == 0 and b.key not in self._busy
        ]
        verdict = await asyncio.to_thread(memory.admit, self.stack, spec, idle)
        if not verdict.admitted:
            log.warning("admission refused %s: %s", spec.name, verdict.reason)
            return verdict.reason
        if verdict.evict:
            log.info("admitting %s: %s", spec.name, verdict.reason)
            victims = [self.backends[k] for k in verdict.evict if k in self.backends]
            for b in victims:
                Counters.bump(self.counters.evictions, b.name)
            await asyncio.gather(*(self.drain_and_stop(b, f"evicted to make room for {spec.name}") for b in victims))
        return None

    def ensure_started(self, component: str, reason: str) -> asyncio.Task[None]:
        """Start the stopped instances of a component in the background (once)."""
        task = self._starts.get(component)
        if task is None or task.done():
            keys = [
                b.key for b in self.backends.values() if b.component == component and b.state is BackendState.STOPPED
            ]
            task = self._spawn(self._start(component, keys, reason))
            self._starts[component] = task
        return task

    async def _start(self, component: str, keys: list[str], reason: str) -> None:
        backends = [self.backends[k] for k in keys]
        for b in backends:
            b.state, b.detail = BackendState.STARTING, reason
        self._busy.update(keys)
        log.info("starting %s (%s)", component, reason)
        try:
            await asyncio.to_thread(self.stack.start_instances, keys)
        except FleetError as exc:
            log.warning("start of %s failed: %s", component, exc)
            for b in backends:
                b.state, b.detail = BackendState.STOPPED, f"start failed: {exc}"
            self._fail_starved(f"starting {component} failed: {exc}")
            return
        finally:
            self._busy.difference_update(keys)
        records = await asyncio.to_thread(self.stack.store.read)
        for b in backends:
            if await self._instance_hooks_pass(b, records.get(b.key)):
                self._mark_ready(b, records.get(b.key))
                if b.tier is not Tier.HOT:
                    Counters.bump(self.counters.warm_starts, b.name)
        self.dispatch()

    async def _instance_hooks_pass(self, b: Backend, rec: InstanceRecord | None) -> bool:
        """Run the hooks for an instance that came up; a failed required hook keeps it out."""
        if rec is None:
            return True
        results = await asyncio.to_thread(hooks.run_instance_hooks, self.stack, rec)
        blocking = [r for r in results if r.blocking]
        if not blocking:
            return True
        b.detail = f"required hook {blocking[0].name} failed: {blocking[0].error}"
        log.error("%s: %s; stopping it", b.name, b.detail)
        await asyncio.to_thread(self.stack.stop_instances, [b.key])
        b.state = BackendState.STOPPED
        self._fail_starved(b.detail)
        return False

    def _mark_ready(self, b: Backend, rec: InstanceRecord | None) -> None:
        b.state, b.detail, b.probe_failures = BackendState.READY, "", 0
        b.pid = rec.pid if rec else None
        b.last_used = self.clock()

    def _fail_starved(self, why: str) -> None:
        """Waiters of pools with nothing ready or coming are told now, not at their timeout."""
        for pool in self.pools.values():
            if pool.waiting and not pool.ready and not self._starting(pool):
                pool.fail_waiters(NoBackend(f"no instance of '{pool.role}' can serve: {why}"))

    def _maybe_expand(self, pool: Pool, incoming: int = 0) -> None:
        """Past the threshold, grow the pool with a stopped WARM server in the background."""
        load = pool.in_flight + len(pool.waiting) + incoming
        if load <= self.cfg.worker_pool.expansion_threshold or self._starting(pool):
            return
        warm = [c for c in self._candidates(pool) if self.cfg.components()[c].tier is Tier.WARM]
        if warm:
            self._admit_and_start(warm[0], f"expansion: {load} requests on '{pool.role}'")

    # --- stopping ------------------------------------------------------------

    async def drain_and_stop(self, backend: Backend, reason: str) -> None:
        """Out of rotation, wait (bounded) for in-flight requests, then stop the process."""
        backend.state, backend.detail = BackendState.DRAINING, reason
        self._busy.add(backend.key)
        try:
            if backend.in_flight:
                event = self._drained.setdefault(backend.key, asyncio.Event())
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(event.wait(), self.cfg.api.drain_timeout_s)
            backend.state = BackendState.STOPPING
            await asyncio.to_thread(self.stack.stop_instances, [backend.key])
        finally:
            self._drained.pop(backend.key, None)
            self._busy.discard(backend.key)
        backend.state, backend.pid = BackendState.STOPPED, None
        log.info("%s stopped (%s)", backend.name, reason)
        # Requests that were waiting for this instance go elsewhere or to a fresh start.
        for pool in self.pools.values():
            if backend in pool.backends and pool.waiting and not pool.ready and not self._starting(pool):
                with contextlib.suppress(FleetError):
                    await self._start_for(pool, reason="requests waiting after a stop")
        self.dispatch()

    def reap_idle(self) -> None:
        """Stop WARM instances that served nothing for ``warm_timeout_s``; HOT never."""
        idle_s = self.cfg.worker_pool.warm_timeout_s
        now = self.clock()
        for b in self.backends.values():
            if (
                b.tier is Tier.WARM
                and b.state is BackendState.READY
                and b.in_flight == 0
                and now - b.last_used >= idle_s
                and b.key not in self._busy
            ):
                Counters.bump(self.counters.idle_stops, b.name)
                self._spawn(self.drain_and_stop(b, f"idle for {now - b.last_used:.0f} s"))

    # --- monitoring ------------------------------------------------------------

    async def adopt(self) -> None:
        """Take over what the state file says is running (on start: no model is reloaded)."""
        await self.sync()
        await self.probe_all()

    async def sync(self) -> dict[str, InstanceRecord]:
        """Align backend states with the state file: CLI starts and stops, crashes. Returns what it read."""
        await asyncio.to_thread(self.stack.reap)
        records = await asyncio.to_thread(self.stack.store.read)
        for key, b in self.backends.items():
            if key in self._busy:
                continue
            rec = records.get(key)
            alive = rec is not None and rec.component == b.component and rec.process() is not None
            if alive and rec is not None:
                if b.state in (BackendState.STOPPED, BackendState.FAILED):
                    b.state, b.pid, b.probe_failures = BackendState.UNHEALTHY, rec.pid, 0
                    b.detail = "adopted; waiting for a health probe"
            elif rec is not None and not rec.stopping and b.tier is Tier.HOT and b.state is not BackendState.FAILED:
                self._on_crash(b)
            elif b.state in (BackendState.READY, BackendState.UNHEALTHY):
                b.state, b.pid, b.detail = BackendState.STOPPED, None, "stopped outside the front door"
        self.dispatch()
        return records

    def _on_crash(self, b: Backend) -> None:
        mon = self.cfg.monitor
        now = self.clock()
        while b.restarts and now - b.restarts[0] > mon.restart_window_s:
            b.restarts.popleft()
        if len(b.restarts) >= mon.restart_budget:
            b.state = BackendState.FAILED
            b.detail = f"died {len(b.restarts) + 1} times within {mon.restart_window_s:g} s; not restarting"
            log.error("%s FAILED: %s", b.name, b.detail)
            self._fail_starved(f"{b.name} failed")
            return
        delay = min(mon.backoff_initial_s * 2 ** len(b.restarts), mon.backoff_max_s)
        b.restarts.append(now)
        b.state, b.detail = BackendState.STARTING, f"restarting in {delay:g} s after a crash"
        self._busy.add(b.key)
        self._spawn(self._restart(b, delay))

    async def _restart(self, b: Backend, delay_s: float) -> None:
        log.warning("%s died; restarting in %.1f s", b.name, delay_s)
        await asyncio.sleep(delay_s)
        try:
            restarted = await asyncio.to_thread(self.stack.restart_crashed, b.key)
        except FleetError as exc:
            log.warning("restart of %s failed: %s", b.name, exc)
            restarted = False
            b.detail = f"restart failed: {exc}"
        finally:
            self._busy.discard(b.key)
        if restarted:
            Counters.bump(self.counters.restarts, b.name)
            records = await asyncio.to_thread(self.stack.store.read)
            if await self._instance_hooks_pass(b, records.get(b.key)):
                self._mark_ready(b, records.get(b.key))
        else:
            b.state = BackendState.STOPPED  # the next sync decides: crashed again, or stopped on purpose
        self.dispatch()

    async def probe_all(self) -> None:
        """One health probe of every running backend, concurrently."""
        live = [b for b in self.backends.values() if b.state in (BackendState.READY, BackendState.UNHEALTHY)]
        results = await asyncio.gather(*(self._probe(b) for b in live))
        for b, ok in zip(live, results, strict=True):
            if b.state in (BackendState.READY, BackendState.UNHEALTHY):  # unchanged meanwhile
                self._probe_result(b, ok)
        self.dispatch()

    async def _probe(self, b: Backend) -> bool:
        spec = self.specs[b.key]
        try:
            async with asyncio.timeout(self.cfg.monitor.probe_timeout_s):
                resp = await self.client.request("GET", b.reach_host, b.port, spec.health_path, {})
                try:
                    async for _ in resp.chunks():
                        pass
                finally:
                    resp.release()
                return resp.status == 200
        except (upstream.UpstreamError, upstream.BrokenOff, TimeoutError):
            return False

    def _probe_result(self, b: Backend, ok: bool) -> None:
        if ok:
            b.probe_failures = 0
            if b.state is BackendState.UNHEALTHY:
                b.state, b.detail = BackendState.READY, ""
            return
        b.probe_failures += 1
        if b.probe_failures >= self.cfg.monitor.failures_to_eject and b.state is BackendState.READY:
            b.state, b.detail = BackendState.UNHEALTHY, f"{b.probe_failures} failed health probes"
            log.warning("%s out of rotation: %s", b.name, b.detail)

    async def monitor(self) -> None:
        """Forever: sync with the state file, probe, reap idle WARM instances, rotate logs."""
        while True:
            try:
                records = await self.sync()
                await self.probe_all()
                self.reap_idle()
                paths = [rec.log_file for rec in records.values()]
                for path in await asyncio.to_thread(logs.rotate_all, paths, self.cfg.logs):
                    log.info("rotated %s (past logs.max_mb)", path)
            except Exception:  # the monitor must outlive any one bad tick
                log.exception("monitor tick failed")
            await asyncio.sleep(self.cfg.monitor.interval_s)

    # --- housekeeping ----------------------------------------------------------

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.client.close()

    def snapshot(self) -> dict[str, Any]:
        """Live view for /admin/status, /v1/models and `modelfleet status`."""
        return {
            "instances": [
                {
                    "key": b.key,
                    "name": b.name,
                    "component": b.component,
                    "port": b.port,
                    "pid": b.pid,
                    "tier": b.tier.value,
                    "roles": list(b.roles),
                    "state": b.state.value,
                    "slots": b.slots,
                    "in_flight": b.in_flight,
                    "served": b.served,
                    "queued": sum(len(p.waiting) for p in self.pools.values() if b in p.backends),
                    "idle_s": round(self.clock() - b.last_used, 1),
                    "restarts": self.counters.restarts.get(b.name, 0),
                    "detail": b.detail,
                }
                for b in self.backends.values()
            ],
            "pools": {
                role: {"ready": len(p.ready), "in_flight": p.in_flight, "queued": len(p.waiting)}
                for role, p in self.pools.items()
            },
        }
