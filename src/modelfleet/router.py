"""The front door's view of the fleet: names to pools, requests to leases, and the collaborators.

The :class:`Router` builds the :class:`~modelfleet.fleet.Fleet` (the one owner of
instance state) and its pools from the config, and wires the jobs around it:
:class:`~modelfleet.capacity.Capacity` (on-demand start, WARM expansion, admission and
eviction, drain-then-stop) and :class:`~modelfleet.supervisor.Supervisor` (state-file
sync, probes, restarts with backoff and a budget, idle reaping). The API asks it for a
lease on an instance of a pool, and for the admin verbs, which all go through the owner.

:meth:`Router.apply_config` takes a changed config in-process (new roles, aliases, task
types, pools and components) without dropping a request in flight.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from modelfleet import registry, upstream
from modelfleet.actions import Actions, StackActions
from modelfleet.affinity import Affinity, RouteKey
from modelfleet.capacity import Capacity, Counters
from modelfleet.config import StackConfig
from modelfleet.errors import UsageError
from modelfleet.fleet import Fleet, Instance, Lease
from modelfleet.lifecycle import State
from modelfleet.pool import Pool
from modelfleet.share import Sharing
from modelfleet.spec import InstanceSpec, plan_instances
from modelfleet.stack import Stack
from modelfleet.supervisor import Supervisor

log = logging.getLogger("modelfleet.router")


class Router:
    """Pools over one Fleet, and the collaborators that keep it serving."""

    def __init__(
        self,
        cfg: StackConfig,
        stack: Stack,
        clock: Callable[[], float] = time.monotonic,
        actions: Actions | None = None,
    ) -> None:
        self.cfg = cfg
        self.stack = stack
        # The one HTTP client of the front door: proxied requests and health probes.
        self.client = upstream.Client(connect_timeout=5.0, sock_read=cfg.api.request_timeout_s)
        self.actions: Actions = actions or StackActions(stack, self.client)
        self.counters = Counters()
        self.fleet = Fleet(self._specs(cfg), clock)
        self.fleet.on_release = self._released
        # Prefix and session memory, shared by the pools that route by prefix (affinity.py).
        self.affinity = Affinity(cfg.api.prefix_load_factor)
        self.fleet.listeners.append(self._affinity_moved)
        self.pools: dict[str, Pool] = {}
        self._resolved: dict[str | None, Pool] = {}
        self._build_pools()
        self.capacity = Capacity(cfg, self.fleet, lambda: self.pools, self.actions, self.counters)
        self.supervisor = Supervisor(cfg, self.fleet, self.capacity, self.actions, self.counters)
        self.capacity.on_kv_restored = lambda inst: self.affinity.reinstate(inst.key)
        # A long system prompt evaluated once per pool and restored into the other replicas (share.py).
        self.sharing = Sharing(
            self.fleet,
            self.client,
            lambda: self.cfg.api.share_prefix_min_chars,
            lambda role, name, n: Counters.add(self.counters.prompt_evaluated, (role, name), n),
            lambda: self.cfg.api.queue_wait_s,
        )

    def _specs(self, cfg: StackConfig) -> list[InstanceSpec]:
        return plan_instances(cfg, cfg.components(), self.stack.store.dir, self.stack.binary)

    def _build_pools(self) -> None:
        by_role: dict[str, list[Instance]] = {}
        for inst in self.fleet:
            for role in inst.roles:
                by_role.setdefault(role, []).append(inst)
        old = self.pools
        self.pools = {}
        for role in self.cfg.roles():
            pool = Pool(role, self.fleet, by_role.get(role, []), self.cfg.api.queue_max)
            if role in old:
                pool.waiting = old[role].waiting  # queued requests stay in line
            if self.cfg.pool_routing(role, len(pool.backends)) == "prefix":
                pool.affinity = self.affinity
            self.pools[role] = pool
        self._resolved = {}

    @property
    def backends(self) -> dict[str, Instance]:
        return self.fleet.instances

    # --- requests ---------------------------------------------------------------------

    def resolve(self, name: str | None) -> Pool:
        """The pool for a role, alias or task type (None: the default role)."""
        pool = self._resolved.get(name)
        if pool is None:
            pool = self._resolved[name] = self.pools[registry.resolve(self.cfg, name)]
        return pool

    async def lease(self, pool: Pool, exclude: frozenset[str] = frozenset(), route: RouteKey | None = None) -> Lease:
        """A lease on an instance of the pool with a free slot; may start a WARM/COLD server and wait for it."""
        if route is not None and route.head is not None and pool.affinity is not None:
            await self.sharing.before(pool, route.chain[0][0], route.head)
        wait_s = self.capacity.wait_for(pool)
        return await pool.acquire(wait_s, exclude, route)

    def _affinity_moved(self, inst: Instance, old: State, new: State) -> None:
        if new in (State.STOPPED, State.BACKOFF, State.FAILED):
            self.affinity.park(inst.key)  # its process is gone: back only if its KV cache is restored
        elif new is State.READY:
            self.affinity.ready(inst.key)

    def _released(self, inst: Instance) -> None:
        for pool in self.pools.values():
            if pool.waiting and inst in pool.backends:
                pool.dispatch()

    def report_failure(self, inst: Instance) -> None:
        """A request could not reach the instance: count it like a failed probe."""
        self.supervisor.probe_result(inst, ok=False)

    # --- admin verbs, all through the owner ---------------------------------------------------

    def _component(self, name: str) -> list[Instance]:
        found = self.fleet.of(name)
        if not found:
            known = ", ".join(self.cfg.components())
            raise UsageError(f"'{name}' is not a server or service of this stack; known: {known}")
        return found

    async def stop_component(self, name: str, reason: str, keep_kv: bool = False) -> list[Instance]:
        found = self._component(name)
        for inst in found:
            if inst.state is State.FAILED:
                self.fleet.move(inst, State.STOPPED, reason)
        await asyncio.gather(*(self.capacity.drain_and_stop(i, reason, keep_kv) for i in found))
        return found

    async def start_component(self, name: str, reason: str, replace: bool = False) -> list[Instance]:
        """Start every stopped (or FAILED: an admin start resets the budget) instance and wait for it.
        With ``replace``, a process a CLI started for one of them and not yet adopted is replaced."""
        found = self._component(name)
        for inst in found:
            if inst.state is State.FAILED:
                inst.restarts.clear()
        task = self.capacity.start(name, reason, include_failed=True, replace=replace)
        if task is not None:
            await asyncio.shield(task)  # a caller that gives up does not call off the start
        return found

    async def drain_instance(self, name: str, reason: str) -> list[Instance]:
        """Drain one instance (by its name, ``embedder[2]``, or its component's when single), then stop it."""
        found = [i for i in self.fleet if i.name == name]
        if not found:
            known = ", ".join(i.name for i in self.fleet)
            raise UsageError(f"'{name}' is not an instance of this stack; known: {known}")
        await self.capacity.drain_and_stop(found[0], reason)
        return found

    async def reload_component(self, name: str, reason: str) -> list[Instance]:
        """Drain, stop and start again; requests for it meanwhile wait in line instead of failing.
        A server with slot_save keeps its KV cache across the restart."""
        keys = {i.key for i in self._component(name)}
        self.capacity.coming_back |= keys
        try:
            await self.stop_component(name, reason, keep_kv=True)
            # What we drained is gone; a process started outside since our last sync is not ours to keep.
            return await self.start_component(name, reason, replace=True)
        finally:
            self.capacity.coming_back -= keys

    # --- config --------------------------------------------------------------------------------

    def apply_config(self, cfg: StackConfig) -> dict[str, list[str]]:
        """Take a new config: new components join STOPPED (adopted at the next sync), removed ones leave
        once they stop, routing (roles, aliases, task types, pools) switches now. Requests in flight keep
        their leases; queued ones stay in line. Returns what changed."""
        specs = {s.key: s for s in self._specs(cfg)}
        added = [k for k in specs if k not in self.fleet.instances]
        removed = [k for k in self.fleet.instances if k not in specs]
        changed = [k for k, s in specs.items() if k in self.fleet.instances and self.fleet.instances[k].spec != s]
        for key in removed:
            inst = self.fleet.instances[key]
            if inst.state is State.STOPPED or inst.state is State.FAILED:
                del self.fleet.instances[key]
            else:
                log.warning("%s is no longer configured but still runs; stop it to remove it", inst.name)
        for key in added:
            self.fleet.instances[key] = Instance(specs[key], since=self.fleet.clock(), last_used=self.fleet.clock())
        for key in changed:
            inst = self.fleet.instances[key]
            if inst.spec.identity() == specs[key].identity():
                inst.spec = specs[key]  # same instance, new launch details: used at its next start
                inst.slots = specs[key].slots
            elif _retagged_only(inst.spec, specs[key]):  # same process, new tier or roles: taken in place
                inst.spec, inst.tier, inst.roles = specs[key], specs[key].tier, specs[key].roles
        self.cfg = cfg
        self.capacity.cfg = self.supervisor.cfg = cfg
        self.affinity.load_factor = cfg.api.prefix_load_factor
        self._build_pools()
        self.capacity.dispatch_all()
        return {"added": added, "removed": removed, "changed": changed}

    # --- monitoring ----------------------------------------------------------------------------

    async def adopt(self) -> None:
        await self.supervisor.adopt()

    async def monitor(self) -> None:
        await self.supervisor.monitor()

    async def close(self) -> None:
        await self.sharing.close()
        await self.fleet.close()
        await self.client.close()

    def snapshot(self) -> dict[str, Any]:
        """Live view for /admin/status, /v1/models and `modelfleet status`."""
        now = self.fleet.clock()
        queued = {id(b): sum(len(p.waiting) for p in self.pools.values() if b in p.backends) for b in self.fleet}
        return {
            "instances": [
                {
                    "key": b.key,
                    "name": b.name,
                    "component": b.component,
                    "port": b.port,
                    "address": f"{b.reach_host}:{b.port}",  # where the front door reaches it
                    "node": b.spec.node,
                    "pid": b.pid,
                    "tier": b.tier.value,
                    "roles": list(b.roles),
                    "state": b.state.value,
                    "slots": b.slots,
                    "in_flight": b.in_flight,
                    "served": b.served,
                    "queued": queued[id(b)],
                    "idle_s": round(now - b.last_used, 1),
                    "restarts": self.counters.restarts.get(b.name, 0),
                    "prompt_evaluated": sum(n for (_, i), n in self.counters.prompt_evaluated.items() if i == b.name),
                    "prompt_cached": sum(n for (_, i), n in self.counters.prompt_cached.items() if i == b.name),
                    "detail": b.detail,
                    # Slot pinning (affinity.SlotMap): requests given a slot holding their prefix, or moved.
                    "pinned_slots": b.slot_map.stats() if b.slot_map is not None else None,
                }
                for b in self.fleet
            ],
            "pools": {
                role: {
                    "ready": len(p.ready),
                    "in_flight": p.in_flight,
                    "queued": len(p.waiting),
                    "routing": "prefix" if p.affinity is not None else "least_busy",
                }
                for role, p in self.pools.items()
            },
            "affinity": self.affinity.stats(),
            "sharing": self.sharing.stats.to_json(),
        }


def _retagged_only(old: InstanceSpec, new: InstanceSpec) -> bool:
    """Only the tier or the roles differ: nothing about the process changes."""
    same = ("component", "index", "replicas", "host", "node", "kind", "argv", "env")
    return all(getattr(old, f) == getattr(new, f) for f in same)
