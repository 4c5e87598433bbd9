"""Instances as the front door sees them, and the pools that hand them out.

A :class:`Backend` is one instance (a process of a server) with its slots and the
requests it is serving now. A :class:`Pool` is every backend that serves a role: it
picks the ready backend with the fewest in-flight requests relative to its slots,
and when every slot is busy it parks the request in a bounded FIFO queue with a
bounded wait. Everything here runs on one event loop: no locks, one owner.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import StrEnum

from modelfleet.config import Tier
from modelfleet.errors import FleetError
from modelfleet.state import local_host, local_url


class BackendState(StrEnum):
    """Lifecycle of one instance, as the front door tracks it."""

    STOPPED = "stopped"
    STARTING = "starting"
    READY = "ready"
    UNHEALTHY = "unhealthy"  # probes failing: out of rotation until it answers again
    DRAINING = "draining"  # out of rotation, waiting for in-flight requests to end
    STOPPING = "stopping"
    FAILED = "failed"  # restart budget spent


class QueueFull(FleetError):
    """Every slot is busy and the waiting line is full."""

    http_status = 429


class QueueTimeout(FleetError):
    """A request waited its whole allowance without getting a slot."""

    http_status = 503


class NoBackend(FleetError):
    """Nothing can serve the role now (all failed or stopped, and nothing can start)."""

    http_status = 503


@dataclass(eq=False)
class Backend:
    """One instance; the Router owns its state, the Pool only counts slots."""

    key: str  # state file key, server_<port>
    name: str  # frontdoor, embedder[2]
    component: str
    port: int
    host: str
    roles: tuple[str, ...]
    tier: Tier
    slots: int
    state: BackendState = BackendState.STOPPED
    in_flight: int = 0
    served: int = 0
    last_used: float = field(default_factory=time.monotonic)
    probe_failures: int = 0
    restarts: deque[float] = field(default_factory=deque)
    pid: int | None = None
    detail: str = ""

    @property
    def url(self) -> str:
        return local_url(self.host, self.port)

    @property
    def reach_host(self) -> str:
        return local_host(self.host)

    @property
    def free_slots(self) -> int:
        return self.slots - self.in_flight

    @property
    def routable(self) -> bool:
        return self.state is BackendState.READY


@dataclass(eq=False)
class Waiter:
    future: asyncio.Future[Backend]
    exclude: frozenset[str]
    since: float


class Pool:
    """All backends serving one role, and the requests waiting for a slot among them."""

    def __init__(
        self, role: str, backends: Iterable[Backend], queue_max: int, release: Callable[[Backend], None]
    ) -> None:
        self.role = role
        self.backends = list(backends)
        self.queue_max = queue_max
        self.waiting: deque[Waiter] = deque()
        self._release = release  # the Router's: frees the slot and re-dispatches every pool

    @property
    def in_flight(self) -> int:
        return sum(b.in_flight for b in self.backends)

    @property
    def ready(self) -> list[Backend]:
        return [b for b in self.backends if b.routable]

    def pick(self, exclude: frozenset[str] = frozenset()) -> Backend | None:
        """The ready backend with the most free capacity, or None if every slot is busy."""
        best: Backend | None = None
        best_key: tuple[float, float] = (2.0, 0.0)
        for b in self.backends:
            if not b.routable or b.free_slots <= 0 or b.key in exclude:
                continue
            key = (b.in_flight / b.slots, b.last_used)  # least loaded, then least recently used
            if key < best_key:
                best, best_key = b, key
        return best

    def take(self, backend: Backend) -> Backend:
        backend.in_flight += 1
        backend.served += 1
        backend.last_used = time.monotonic()
        return backend

    async def acquire(self, wait_s: float, exclude: frozenset[str] = frozenset()) -> Backend:
        """A backend with a free slot, now or after a bounded wait in line."""
        found = self.pick(exclude) if not self.waiting else None
        if found is not None:
            return self.take(found)
        if len(self.waiting) >= self.queue_max:
            raise QueueFull(
                f"all {sum(b.slots for b in self.ready)} slots of '{self.role}' are busy and "
                f"{len(self.waiting)} requests are already waiting; retry later"
            )
        waiter = Waiter(asyncio.get_running_loop().create_future(), exclude, time.monotonic())
        self.waiting.append(waiter)
        try:
            return await asyncio.wait_for(asyncio.shield(waiter.future), wait_s)
        except asyncio.CancelledError:
            # The client went away; if a slot was handed over meanwhile, give it back.
            if waiter.future.done() and not waiter.future.cancelled() and waiter.future.exception() is None:
                self._release(waiter.future.result())
            raise
        except TimeoutError:
            if waiter.future.done() and not waiter.future.cancelled():
                return waiter.future.result()  # handed a slot just as the wait ran out
            raise QueueTimeout(f"no slot of '{self.role}' became free within {wait_s:g} s; retry later") from None
        finally:
            if waiter in self.waiting:
                self.waiting.remove(waiter)
            if not waiter.future.done():
                waiter.future.cancel()

    def dispatch(self) -> None:
        """Hand free slots to waiting requests, first come first served."""
        while self.waiting:
            waiter = self.waiting[0]
            if waiter.future.done():
                self.waiting.popleft()
                continue
            backend = self.pick(waiter.exclude)
            if backend is None:
                return
            self.waiting.popleft()
            waiter.future.set_result(self.take(backend))

    def fail_waiters(self, exc: FleetError) -> None:
        """Tell every waiting request that nothing will serve it."""
        while self.waiting:
            waiter = self.waiting.popleft()
            if not waiter.future.done():
                waiter.future.set_exception(exc)
