"""A fleet without processes: a fake clock, fake actions, and a Router built on them.

The front door's collaborators (pools, capacity, supervision) are tested here without
starting anything: :class:`FakeActions` keeps "running" instances in a dict, and the
tests turn its knobs (a start that fails, a restart that crashes, a probe that fails,
memory that does not fit).
"""

from __future__ import annotations

import asyncio
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path

from modelfleet import memory, warmkv
from modelfleet.config import load_config
from modelfleet.errors import StartupError
from modelfleet.fleet import Instance
from modelfleet.health import Health
from modelfleet.instance import Handle
from modelfleet.router import Router
from modelfleet.spec import InstanceSpec
from modelfleet.stack import Stack
from modelfleet.state import InstanceRecord


class Clock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, s: float) -> None:
        self.t += s


class FakeActions:
    def __init__(self, specs: dict[str, InstanceSpec]) -> None:
        self.specs = specs
        self.running: dict[str, Handle] = {}
        self.stopping: set[str] = set()  # records flagged as being stopped (not crashes)
        self.crashed: set[str] = set()  # recorded but dead
        self.starts: list[list[str]] = []
        self.stops: list[list[str]] = []
        self.restarts: list[str] = []
        self.fail_start: dict[str, str] = {}
        self.fail_restarts = 0  # how many restarts in a row crash while loading
        self.health: dict[str, Health] = {}
        self.hook_block: dict[str, str] = {}
        self.available = 10 * memory.GB
        self.admissions: list[str] = []
        self.gate: asyncio.Event | None = None  # when set, starts wait for it
        self.liveness_gate: asyncio.Event | None = None  # when set, liveness answers wait for it
        self.liveness_asks: list[list[str]] = []  # the keys of each alive_all, in order
        self._pid = 100
        self.kv_saves: list[str] = []
        self.kv_restores: list[str] = []
        self.kv_verified = True
        self.replaced: list[str] = []  # keys whose outside-started process a start replaced

    def _handle(self, key: str) -> Handle:
        self._pid += 1
        return Handle("local", self._pid, float(self._pid), "", key)

    async def start(self, keys: Sequence[str], replace: bool = False) -> dict[str, Handle]:
        self.starts.append(list(keys))
        if replace:
            self.replaced.extend(k for k in keys if k in self.running)
        if self.gate is not None:
            await self.gate.wait()
        for k in keys:
            if k in self.fail_start:
                raise StartupError(self.fail_start[k])
        for k in keys:
            if k not in self.running or replace:  # like Stack: a live process is adopted unless replaced
                self.running[k] = self._handle(k)
            self.crashed.discard(k)
        return {k: self.running[k] for k in keys}

    async def stop(self, keys: Sequence[str]) -> None:
        self.stops.append(list(keys))
        for k in keys:
            self.running.pop(k, None)
            self.crashed.discard(k)

    async def restart(self, key: str) -> Handle | None:
        self.restarts.append(key)
        if key not in self.crashed:
            return None  # stopped on purpose meanwhile
        if self.fail_restarts:
            self.fail_restarts -= 1
            raise StartupError(f"{key} exited with code 1 while loading")
        self.crashed.discard(key)
        self.running[key] = self._handle(key)
        return self.running[key]

    def kill(self, key: str) -> None:
        """The process dies; its record stays (a crash)."""
        self.running.pop(key)
        self.crashed.add(key)

    async def records(self) -> dict[str, InstanceRecord]:
        out = {}
        for key in {*self.running, *self.crashed}:
            handle = self.running.get(key) or Handle("local", 1, 1.0)
            spec = self.specs[key]
            out[key] = InstanceRecord.extend(
                spec,
                pid=handle.pid,
                started_at="now",
                log_file="",
                create_time=handle.create_time,
                stopping=key in self.stopping,
            )
        return out

    def alive(self, handle: Handle) -> bool:
        return any((h.pid, h.create_time) == (handle.pid, handle.create_time) for h in self.running.values())

    async def alive_all(self, records: Mapping[str, InstanceRecord]) -> dict[str, bool]:
        self.liveness_asks.append(sorted(records))
        if self.liveness_gate is not None:
            await self.liveness_gate.wait()
        return {key: self.alive(rec.handle) for key, rec in records.items()}

    async def probe(self, inst: Instance, timeout_s: float) -> Health:
        return self.health.get(inst.key, Health.HEALTHY)

    async def instance_hooks(self, key: str) -> str | None:
        return self.hook_block.get(key)

    async def admit(self, spec: InstanceSpec, idle: Sequence[memory.IdleInstance]) -> memory.Admission:
        self.admissions.append(spec.key)
        need = memory.GB
        base = memory.Admission(memory.Verdict.FITS, spec.name, need, self.available, 0, memory.Source.DECLARED)
        if self.available >= need:
            return base
        freed, evict = 0, []
        for i in sorted(idle, key=lambda i: i.last_request_at):
            evict.append(i.name)
            freed += memory.GB
            if self.available + freed >= need:
                return memory.Admission(
                    memory.Verdict.FITS_AFTER_EVICTION,
                    spec.name,
                    need,
                    self.available,
                    0,
                    memory.Source.DECLARED,
                    evict=tuple(evict),
                    reason="evicting",
                )
        return memory.Admission(
            memory.Verdict.REFUSED, spec.name, need, self.available, 0, memory.Source.DECLARED, reason="no room"
        )

    async def housekeeping(self, records: dict[str, InstanceRecord]) -> None:
        pass

    async def save_kv(self, inst: Instance) -> warmkv.Outcome:
        self.kv_saves.append(inst.key)
        return warmkv.Outcome(slots=[0], tokens=10)

    async def restore_kv(self, inst: Instance) -> warmkv.Outcome:
        self.kv_restores.append(inst.key)
        return warmkv.Outcome(slots=[0], tokens=10, verified=self.kv_verified)


STACK = """
servers:
  hot:
    model: m.gguf
    ports: [9001, 9002]
    roles: [chat]
    parallel: 2
  warm:
    model: m.gguf
    port: 9003
    tier: warm
    roles: [chat, extra]
    parallel: 1
  warm2:
    model: m.gguf
    port: 9004
    tier: warm
    roles: [other]
  cold:
    model: m.gguf
    port: 9005
    tier: cold
    roles: [rare]
pools: [chat]
worker_pool: {expansion_threshold: 4, warm_timeout_s: 300}
api: {queue_max: 8, queue_wait_s: 5, start_wait_s: 5, drain_timeout_s: 1}
monitor: {restart_budget: 3, restart_window_s: 600, backoff_initial_s: 1, backoff_max_s: 8, failures_to_eject: 2}
"""


def make_router(tmp_path: Path, text: str = STACK) -> tuple[Router, FakeActions, Clock]:
    path = tmp_path / "stack.yaml"
    path.write_text(textwrap.dedent(text))
    cfg = load_config(path.read_text(), str(path))
    stack = Stack(cfg, tmp_path / "state", None)
    specs = {s.key: s for s in stack.specs(cfg.components())}
    actions = FakeActions(specs)
    clock = Clock()
    router = Router(cfg, stack, clock=clock, actions=actions)
    delays: list[float] = []

    async def no_sleep(s: float) -> None:
        delays.append(s)
        await asyncio.sleep(0)

    router.supervisor.sleep = no_sleep
    router.delays = delays  # type: ignore[attr-defined]
    return router, actions, clock


async def settle() -> None:
    """Let background tasks of the fleet run to their next real wait (no wall-clock sleep)."""
    for _ in range(50):
        await asyncio.sleep(0)
