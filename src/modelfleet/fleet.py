"""The one owner of instance state inside the front door.

:class:`Fleet` holds one :class:`Instance` per configured instance (built on its spec),
and is the only place that changes an instance's lifecycle state (:meth:`Fleet.move`,
checked against :mod:`modelfleet.lifecycle`) or its slots (:meth:`Fleet.take` and
:class:`Lease`). Everything runs on one event loop: no locks. Collaborators (the pools,
:mod:`~modelfleet.capacity`, :mod:`~modelfleet.supervisor`) read instances freely and
change them only through here; listeners hear every move (the events stream, metrics).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modelfleet import warmkv
from modelfleet.affinity import RouteKey, SlotMap
from modelfleet.config import Tier
from modelfleet.errors import IllegalTransition
from modelfleet.instance import Handle, reach_host
from modelfleet.lifecycle import State, allowed
from modelfleet.spec import InstanceSpec

log = logging.getLogger("modelfleet.fleet")

Clock = Callable[[], float]
Listener = Callable[["Instance", State, State], None]


@dataclass(eq=False)
class Instance:
    """One instance as the front door sees it: its spec, lifecycle state, slots and counters."""

    spec: InstanceSpec
    state: State = State.STOPPED
    detail: str = ""
    since: float = 0.0  # when it entered its state
    in_flight: int = 0
    served: int = 0
    last_used: float = 0.0
    probe_failures: int = 0
    restarts: deque[float] = field(default_factory=deque)  # when each restart of the window began
    _handle: Handle | None = None
    _idle: asyncio.Event | None = None

    def __post_init__(self) -> None:
        self.slots = self.spec.slots
        self.new_process()
        # Read on every request: plain attributes, not properties over the spec.
        self.key, self.name, self.component = self.spec.key, self.spec.name, self.spec.component
        self.port, self.reach_host, self.tier, self.roles = (
            self.spec.port,
            self.spec.reach_host,
            self.spec.tier,
            self.spec.roles,
        )

    def new_process(self) -> None:
        """A new process, on the spec as it is now: its slots hold nothing a slot map knew."""
        # Which slot each completion request gets, when the front door pins them (affinity.SlotMap).
        self.slot_map = SlotMap(self.spec.slots) if self.spec.pin_slots else None

    @property
    def handle(self) -> Handle | None:
        """Its process, wherever it runs; None while it has none."""
        return self._handle

    @handle.setter
    def handle(self, handle: Handle | None) -> None:
        self._handle = handle
        # Read on every request: a wildcard bind on another node is reached at that node's address.
        self.reach_host = reach_host(self.spec.host, handle.address if handle is not None else "")

    def kv_target(self) -> warmkv.Target:
        """Where its slot KV caches are saved and restored (a server with ``slot_save``)."""
        spec = self.spec
        assert spec.slot_dir is not None
        return warmkv.Target(self.name, self.reach_host, self.port, self.slots, Path(spec.slot_dir), spec.argv)

    @property
    def pid(self) -> int | None:
        return self.handle.pid if self.handle else None

    @property
    def free_slots(self) -> int:
        return self.slots - self.in_flight

    @property
    def routable(self) -> bool:
        return self.state is State.READY

    async def wait_idle(self) -> None:
        """Until no request is in flight."""
        if self.in_flight:
            self._idle = self._idle or asyncio.Event()
            await self._idle.wait()


class Fleet:
    """Every instance of the stack, and every change of their state."""

    def __init__(self, specs: Iterable[InstanceSpec], clock: Clock) -> None:
        self.clock = clock
        now = clock()
        self.instances: dict[str, Instance] = {s.key: Instance(s, since=now, last_used=now) for s in specs}
        self.listeners: list[Listener] = []
        self.on_release: Callable[[Instance], None] = lambda _: None
        self._tasks: set[asyncio.Task[Any]] = set()

    def __iter__(self) -> Any:
        return iter(self.instances.values())

    def of(self, component: str) -> list[Instance]:
        return [i for i in self.instances.values() if i.component == component]

    def move(self, inst: Instance, new: State, detail: str = "", expect: Iterable[State] | None = None) -> None:
        """Change an instance's state, checked against the table (and ``expect``, the states it may be in now)."""
        old = inst.state
        if expect is not None and old not in set(expect):
            raise IllegalTransition(f"{inst.name}: expected {'/'.join(sorted(expect))} to move to {new}, found {old}")
        if old is not new and not allowed(old, new):
            raise IllegalTransition(f"{inst.name}: {old} -> {new} is not a lifecycle transition")
        inst.state, inst.detail, inst.since = new, detail, self.clock()
        if new is State.STARTING:
            inst.new_process()
        if new is State.READY:
            inst.probe_failures = 0
            inst.last_used = self.clock()
        if old is not new:
            log.info("%s: %s -> %s%s", inst.name, old, new, f" ({detail})" if detail else "")
            for listener in self.listeners:
                listener(inst, old, new)

    def adopt(self, inst: Instance, handle: Handle, detail: str) -> None:
        """A process of this instance runs (found in the state file): take it, out of rotation until probed."""
        inst.handle = handle
        self.move(inst, State.EJECTED, detail)

    # --- slots ------------------------------------------------------------------------

    def take(self, inst: Instance, route: RouteKey | None = None) -> Lease:
        """One of the instance's slots for a request; a numbered one if the instance pins slots and
        ``route`` is a completion that may be pinned (the slot to send as ``id_slot``)."""
        inst.in_flight += 1
        inst.served += 1
        inst.last_used = self.clock()
        slots = inst.slot_map
        if slots is None or route is None or not route.pin:
            return Lease(self, inst)
        slot = slots.take(route)
        return Lease(self, inst, slot, slots if slot is not None else None)

    def _release(self, inst: Instance, slot: int | None, slots: SlotMap | None) -> None:
        if slot is not None and slots is not None:
            slots.release(slot)  # the map it was taken from, though a restart has replaced it since
        inst.in_flight -= 1
        inst.last_used = self.clock()
        if inst.in_flight == 0 and inst._idle is not None:
            inst._idle.set()
            inst._idle = None
        self.on_release(inst)

    # --- background work -----------------------------------------------------------------

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Run ``coro`` in the background; it is cancelled by :meth:`close`."""
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def hot(self) -> list[Instance]:
        return [i for i in self.instances.values() if i.tier is Tier.HOT]


class Lease:
    """One request's slot on an instance. Released once, however many times :meth:`release` is called,
    and on leaving an ``async with`` block, so no path can keep a slot."""

    __slots__ = ("_fleet", "_released", "_slots", "instance", "slot")

    def __init__(self, fleet: Fleet, instance: Instance, slot: int | None = None, slots: SlotMap | None = None) -> None:
        self._fleet, self.instance, self._released = fleet, instance, False
        self.slot = slot  # the llama-server slot the request is pinned to (None: the server chooses)
        self._slots = slots

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._fleet._release(self.instance, self.slot, self._slots)

    @property
    def released(self) -> bool:
        return self._released

    async def __aenter__(self) -> Instance:
        return self.instance

    async def __aexit__(self, *exc: object) -> None:
        self.release()
