"""What the front door's collaborators ask of the world outside the event loop.

:class:`Actions` is every blocking or remote thing the owner of instance state needs:
start and stop processes, read the state file, probe an instance, run its hooks, ask
whether a WARM start fits in memory. :class:`StackActions` does it with a
:class:`~modelfleet.stack.Stack` (in worker threads) and the front door's HTTP client;
the unit tests of :mod:`~modelfleet.capacity` and :mod:`~modelfleet.supervisor` give a
fake that starts nothing.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Protocol

from modelfleet import health, hooks, memory, upstream, warmkv
from modelfleet.errors import UpstreamError
from modelfleet.fleet import Instance
from modelfleet.instance import Handle
from modelfleet.launcher import alive_many
from modelfleet.spec import InstanceSpec
from modelfleet.stack import Stack
from modelfleet.state import InstanceRecord


class Actions(Protocol):
    async def start(self, keys: Sequence[str], replace: bool = False) -> dict[str, Handle]:
        """Start these instances and wait until they are healthy; raise FleetError if one can't.
        With ``replace``, a process already running for a key is stopped first instead of adopted."""
        ...

    async def stop(self, keys: Sequence[str]) -> None: ...

    async def restart(self, key: str) -> Handle | None:
        """Start a crashed instance again; None if it was stopped on purpose meanwhile. Raises FleetError."""
        ...

    async def records(self) -> dict[str, InstanceRecord]:
        """What the state file says runs (crashed processes included; ``alive_all`` tells)."""
        ...

    async def alive_all(self, records: Mapping[str, InstanceRecord]) -> dict[str, bool]:
        """Whether each record's process runs, by key: all asked in one step, off the event loop
        (a launcher's answer may come from another machine)."""
        ...

    async def probe(self, inst: Instance, timeout_s: float) -> health.Health: ...

    async def instance_hooks(self, key: str) -> str | None:
        """Run the instance_up hooks of an instance that came up; the reason it must not serve, or None."""
        ...

    async def admit(self, spec: InstanceSpec, idle: Sequence[memory.IdleInstance]) -> memory.Admission: ...

    async def housekeeping(self, records: dict[str, InstanceRecord]) -> None:
        """Periodic chores on what runs (log rotation)."""
        ...

    async def save_kv(self, inst: Instance) -> warmkv.Outcome:
        """Save the slots of an idle instance that is about to stop (warmkv.py)."""
        ...

    async def restore_kv(self, inst: Instance) -> warmkv.Outcome:
        """Restore what :meth:`save_kv` saved into the new process, and check the cache is used."""
        ...


class StackActions:
    """Actions carried out by a Stack (its launcher, its state file) and the front door's HTTP client."""

    def __init__(self, stack: Stack, client: upstream.Client) -> None:
        self.stack = stack
        self.client = client

    async def start(self, keys: Sequence[str], replace: bool = False) -> dict[str, Handle]:
        await asyncio.to_thread(self.stack.start_instances, keys, replace)
        records = await self.records()
        return {k: records[k].handle for k in keys if k in records}

    async def stop(self, keys: Sequence[str]) -> None:
        await asyncio.to_thread(self.stack.stop_instances, keys)

    async def restart(self, key: str) -> Handle | None:
        if not await asyncio.to_thread(self.stack.restart_crashed, key):
            return None
        rec = (await self.records()).get(key)
        return rec.handle if rec else None

    async def records(self) -> dict[str, InstanceRecord]:
        await asyncio.to_thread(self.stack.reap)
        return await asyncio.to_thread(self.stack.store.read)

    async def alive_all(self, records: Mapping[str, InstanceRecord]) -> dict[str, bool]:
        keys = list(records)
        handles = [records[k].handle for k in keys]
        answers = await asyncio.to_thread(alive_many, self.stack.launcher, handles)
        return dict(zip(keys, answers, strict=True))

    async def probe(self, inst: Instance, timeout_s: float) -> health.Health:
        try:
            async with asyncio.timeout(timeout_s):
                resp = await self.client.request("GET", inst.reach_host, inst.port, inst.spec.health_path, {})
                try:
                    async for _ in resp.chunks():
                        pass
                finally:
                    resp.release()
                return health.classify(resp.status)
        except (UpstreamError, TimeoutError) as exc:
            return health.classify(None, connected=not isinstance(exc, upstream.ConnectFailed))

    async def instance_hooks(self, key: str) -> str | None:
        rec = (await self.records()).get(key)
        if rec is None:
            return None
        results = await asyncio.to_thread(hooks.run_instance_hooks, self.stack, rec)
        blocking = [r for r in results if r.blocking]
        return f"required hook {blocking[0].name} failed: {blocking[0].error}" if blocking else None

    async def admit(self, spec: InstanceSpec, idle: Sequence[memory.IdleInstance]) -> memory.Admission:
        stack = self.stack
        # A launcher that places on several nodes counts only those the instance may run on.
        available_for = getattr(stack.launcher, "available_for", None)
        if available_for is not None:
            available = await asyncio.to_thread(available_for, stack.cfg, spec)
        else:
            available = await asyncio.to_thread(stack.launcher.available_bytes)
        return await asyncio.to_thread(memory.admit, stack.cfg, stack.store.dir, spec, idle, available)

    async def housekeeping(self, records: dict[str, InstanceRecord]) -> None:
        paths = [rec.log_file for rec in records.values()]
        await asyncio.to_thread(self.stack.launcher.rotate_logs, paths, self.stack.cfg.logs)

    async def save_kv(self, inst: Instance) -> warmkv.Outcome:
        cap = int(self.stack.cfg.worker_pool.kv_keep_mb * 1024 * 1024)
        return await warmkv.save(self.client, inst.kv_target(), cap)

    async def restore_kv(self, inst: Instance) -> warmkv.Outcome:
        return await warmkv.restore(self.client, inst.kv_target())
