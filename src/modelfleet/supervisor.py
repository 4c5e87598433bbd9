"""Supervision: every instance probed, crashed HOT instances restarted, idle WARM ones stopped.

Each tick of :meth:`Supervisor.monitor` (every ``monitor.interval_s``):

1. **sync** with the state file: a process a CLI started is adopted (EJECTED until its
   first good probe), one stopped outside the front door is STOPPED, a HOT one that died
   goes to BACKOFF and is restarted after ``backoff_initial_s * 2**n`` (capped at
   ``backoff_max_s``) where ``n`` counts its restarts in the last ``restart_window_s``;
   past ``restart_budget`` of them it is FAILED. A restart that fails (the model crashes
   while loading, a port race) counts against the same budget and backs off again, as
   Kubernetes' CrashLoopBackOff does: it is never abandoned.
2. **probe** every instance that is up: ``monitor.failures_to_eject`` failures in a row
   take it out of rotation (EJECTED) until a probe answers again.
3. **reap** WARM instances idle for ``worker_pool.warm_timeout_s``: drained, then stopped.
4. **housekeeping**: log rotation.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from modelfleet.actions import Actions
from modelfleet.capacity import Capacity, Counters
from modelfleet.config import StackConfig, Tier
from modelfleet.errors import FleetError, gist
from modelfleet.fleet import Fleet, Instance
from modelfleet.health import Health
from modelfleet.lifecycle import BUSY, UP, State
from modelfleet.state import InstanceRecord

log = logging.getLogger("modelfleet.supervisor")

Sleep = Callable[[float], Awaitable[None]]


def backoff_delay(recent_restarts: int, initial_s: float, max_s: float) -> float:
    """Seconds to wait before the next restart, given the restarts already in the window."""
    return float(min(initial_s * 2**recent_restarts, max_s))


class Supervisor:
    def __init__(
        self,
        cfg: StackConfig,
        fleet: Fleet,
        capacity: Capacity,
        actions: Actions,
        counters: Counters,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self.cfg = cfg
        self.fleet = fleet
        self.capacity = capacity
        self.actions = actions
        self.counters = counters
        self.sleep = sleep

    async def adopt(self) -> None:
        """Take over what the state file says is running (on start: no model is reloaded)."""
        await self.sync()
        await self.probe_all()

    # --- the state file -----------------------------------------------------------------

    async def sync(self) -> dict[str, InstanceRecord]:
        """Align instances with the state file: CLI starts and stops, crashes. Returns what it read.

        The records and their liveness are read off the event loop (a launcher may ask another
        machine); an instance whose state or process changed meanwhile is left to the next tick."""
        seen = {inst.key: (inst.state, inst.handle) for inst in self.fleet}
        records = await self.actions.records()
        ours = {
            key: rec
            for key, rec in records.items()
            if (inst := self.fleet.instances.get(key)) is not None and rec.component == inst.component
        }
        live = await self.actions.alive_all(ours) if ours else {}
        for inst in self.fleet:
            if inst.state in BUSY:
                continue  # an operation of ours owns it
            if (inst.state, inst.handle) != seen.get(inst.key):
                continue  # changed while the records were read: what they say may be older
            rec = ours.get(inst.key)
            if rec is not None and live.get(inst.key, False):
                if inst.state is State.FAILED:
                    self.fleet.move(inst, State.STOPPED, "started again outside the front door")
                if inst.state is State.STOPPED:
                    self.fleet.adopt(inst, rec.handle, "adopted; waiting for a health probe")
                else:
                    inst.handle = rec.handle  # a CLI reload may have replaced the process
            elif rec is not None and not rec.stopping and inst.tier is Tier.HOT:
                if inst.state is not State.FAILED:
                    self.crashed(inst, f"pid {rec.pid} exited")
            elif inst.state in UP:
                inst.handle = None
                if rec is not None and not rec.stopping:  # died (or its node was lost): not a stop
                    why = f"pid {rec.pid} exited; it starts again when a request needs it"
                else:
                    why = "stopped outside the front door"
                self.fleet.move(inst, State.STOPPED, why)
        self.capacity.dispatch_all()
        return records

    # --- crashes --------------------------------------------------------------------------

    def crashed(self, inst: Instance, why: str) -> None:
        """A HOT instance died (or a restart of it failed): back off and restart it, or give up past the budget."""
        mon = self.cfg.monitor
        now = self.fleet.clock()
        while inst.restarts and now - inst.restarts[0] > mon.restart_window_s:
            inst.restarts.popleft()
        inst.handle = None
        if len(inst.restarts) >= mon.restart_budget:
            detail = (
                f"{why}; {len(inst.restarts)} restarts within {mon.restart_window_s:g} s spent the budget "
                f"(monitor.restart_budget {mon.restart_budget}); not restarting: fix the cause, then "
                f"`modelfleet reload {inst.component}` or POST /admin/start/{inst.component}"
            )
            self.fleet.move(inst, State.FAILED, detail)
            log.error("%s FAILED: %s", inst.name, detail)
            self.capacity.fail_starved(f"{inst.name} failed")
            return
        delay = backoff_delay(len(inst.restarts), mon.backoff_initial_s, mon.backoff_max_s)
        inst.restarts.append(now)
        self.fleet.move(inst, State.BACKOFF, f"{why}; restarting in {delay:g} s")
        self.fleet.spawn(self._restart(inst, delay))

    async def _restart(self, inst: Instance, delay_s: float) -> None:
        log.warning("%s: restarting in %.1f s", inst.name, delay_s)
        await self.sleep(delay_s)
        if inst.state is not State.BACKOFF:
            return  # stopped or started by someone else meanwhile
        self.fleet.move(inst, State.STARTING, "restarting after a crash")
        try:
            handle = await self.actions.restart(inst.key)
        except FleetError as exc:
            log.warning("restart of %s failed: %s", inst.name, exc)
            self.crashed(inst, f"restart failed: {gist(exc)}")
            return
        if handle is None:
            self.fleet.move(inst, State.STOPPED, "stopped on purpose while it was down")
        else:
            inst.handle = handle
            Counters.bump(self.counters.restarts, inst.name)
            await self.capacity.came_up(inst)
        self.capacity.dispatch_all()

    # --- probes ---------------------------------------------------------------------------

    async def probe_all(self) -> None:
        """One health probe of every instance that is up, concurrently."""
        live = [i for i in self.fleet if i.state in UP]
        timeout_s = self.cfg.monitor.probe_timeout_s
        results = await asyncio.gather(*(self.actions.probe(i, timeout_s) for i in live))
        for inst, h in zip(live, results, strict=True):
            if inst.state in UP:  # unchanged meanwhile
                self.probe_result(inst, h is Health.HEALTHY)
        self.capacity.dispatch_all()

    def probe_result(self, inst: Instance, ok: bool) -> None:
        if ok:
            inst.probe_failures = 0
            if inst.state is State.EJECTED:
                self.fleet.move(inst, State.READY)
            return
        inst.probe_failures += 1
        if inst.probe_failures >= self.cfg.monitor.failures_to_eject and inst.state is State.READY:
            self.fleet.move(inst, State.EJECTED, f"{inst.probe_failures} failed health probes")

    # --- idle WARM instances ----------------------------------------------------------------

    def reap_idle(self) -> None:
        """Stop WARM instances that served nothing for ``warm_timeout_s``; HOT never."""
        idle_s = self.cfg.worker_pool.warm_timeout_s
        now = self.fleet.clock()
        for inst in self.fleet:
            if (
                inst.tier is Tier.WARM
                and inst.state is State.READY
                and inst.in_flight == 0
                and now - inst.last_used >= idle_s
            ):
                Counters.bump(self.counters.idle_stops, inst.name)
                self.fleet.move(inst, State.DRAINING, f"idle for {now - inst.last_used:.0f} s")
                why = f"idle for {now - inst.last_used:.0f} s"
                self.fleet.spawn(self.capacity.drain_and_stop(inst, why, keep_kv=True))

    # --- the loop ----------------------------------------------------------------------------

    async def tick(self) -> None:
        records = await self.sync()
        await self.probe_all()
        self.reap_idle()
        await self.actions.housekeeping(records)

    async def monitor(self) -> None:
        """Forever: one tick, then ``monitor.interval_s`` of sleep."""
        while True:
            try:
                await self.tick()
            except Exception:  # the monitor must outlive any one bad tick
                log.exception("monitor tick failed")
            await asyncio.sleep(self.cfg.monitor.interval_s)
