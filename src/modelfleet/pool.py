"""The instances that serve one role, and the requests waiting for a slot among them.

A :class:`Pool` picks the ready instance with the fewest in-flight requests relative to
its slots and hands out a :class:`~modelfleet.fleet.Lease` on it; when every slot is busy
it parks the request in a bounded FIFO queue with a bounded wait. Slots are counted by
the :class:`~modelfleet.fleet.Fleet` (its clock, its leases); everything here runs on
one event loop.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from modelfleet.affinity import Affinity, RouteKey
from modelfleet.errors import FleetError, QueueFull, QueueTimeout
from modelfleet.fleet import Fleet, Instance, Lease
from modelfleet.lifecycle import State


@dataclass(eq=False)
class Waiter:
    future: asyncio.Future[Lease]
    exclude: frozenset[str]
    route: RouteKey | None = None
    overtaken: int = 0  # times a later request with a cached prefix went first


LOOKAHEAD = 8
MAX_OVERTAKEN = 4


class Pool:
    """All instances serving one role, and the requests waiting for a slot among them."""

    def __init__(self, role: str, fleet: Fleet, instances: Iterable[Instance], queue_max: int) -> None:
        self.role = role
        self.fleet = fleet
        self.backends = list(instances)
        self.queue_max = queue_max
        self.waiting: deque[Waiter] = deque()
        self.affinity: Affinity | None = None  # set when the pool routes by prefix (affinity.py)

    @property
    def in_flight(self) -> int:
        return sum(b.in_flight for b in self.backends)

    @property
    def ready(self) -> list[Instance]:
        return [b for b in self.backends if b.routable]

    @property
    def starting(self) -> bool:
        return any(b.state is State.STARTING for b in self.backends)

    def pick(self, exclude: frozenset[str] = frozenset(), route: RouteKey | None = None) -> Instance | None:
        """The ready instance with the most free capacity, or None if every slot is busy.

        With prefix routing and a routing key, the instance that affinity prefers wins
        (within its load bound)."""
        if route and self.affinity is not None:
            free = [
                b for b in self.backends if b.state is State.READY and b.in_flight < b.slots and b.key not in exclude
            ]
            chosen = self.affinity.choose(free, route)
            if chosen is not None:
                return chosen  # type: ignore[return-value]
        best: Instance | None = None
        best_key: tuple[float, float] = (2.0, 0.0)
        for b in self.backends:
            if b.state is not State.READY or b.in_flight >= b.slots or b.key in exclude:
                continue
            key = (b.in_flight / b.slots, b.last_used)  # least loaded, then least recently used
            if key < best_key:
                best, best_key = b, key
        return best

    def _take(self, inst: Instance, route: RouteKey | None) -> Lease:
        if route and self.affinity is not None:
            self.affinity.remember(inst.key, route)
        return self.fleet.take(inst, route)

    @property
    def keyed(self) -> bool:
        """Whether its requests need a routing key: it routes by prefix, or some instance pins slots."""
        return self.affinity is not None or any(b.slot_map is not None for b in self.backends)

    async def acquire(
        self, wait_s: float, exclude: frozenset[str] = frozenset(), route: RouteKey | None = None
    ) -> Lease:
        """A lease on an instance with a free slot, now or after a bounded wait in line."""
        found = self.pick(exclude, route) if not self.waiting else None
        if found is not None:
            return self._take(found, route)
        if len(self.waiting) >= self.queue_max:
            raise QueueFull(
                f"all {sum(b.slots for b in self.ready)} slots of '{self.role}' are busy and "
                f"{len(self.waiting)} requests are already waiting; retry later"
            )
        waiter = Waiter(asyncio.get_running_loop().create_future(), exclude, route)
        self.waiting.append(waiter)
        try:
            return await asyncio.wait_for(asyncio.shield(waiter.future), wait_s)
        except asyncio.CancelledError:
            # The client went away; if a slot was handed over meanwhile, give it back.
            if waiter.future.done() and not waiter.future.cancelled() and waiter.future.exception() is None:
                waiter.future.result().release()
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
        """Hand free slots to waiting requests, first come first served.

        With prefix routing a request a little further back (``LOOKAHEAD``) whose prefix
        the free instance holds may go before one whose prefix it does not, at most
        ``MAX_OVERTAKEN`` times for the same first request."""
        while self.waiting:
            waiter = self.waiting[0]
            if waiter.future.done():
                self.waiting.popleft()
                continue
            if self.affinity is not None:
                waiter = self._cache_first(waiter)
            backend = self.pick(waiter.exclude, waiter.route)
            if backend is None:
                return
            self.waiting.remove(waiter)
            waiter.future.set_result(self._take(backend, waiter.route))

    def _cache_first(self, head: Waiter) -> Waiter:
        assert self.affinity is not None
        ready = [b for b in self.backends if b.state is State.READY]
        aff = self.affinity

        def cached(w: Waiter) -> bool:
            """Whether the instance holding most of the request's prefix has a free slot."""
            if w.route is None or not w.route.chain:
                return False
            best, best_len = None, 0
            for b in ready:
                n = aff.match(b.key, w.route) if b.key not in w.exclude else 0
                if n > best_len:
                    best, best_len = b, n
            return best is not None and best.in_flight < best.slots

        if head.overtaken >= MAX_OVERTAKEN or cached(head):
            return head
        for i, w in enumerate(self.waiting):
            if i >= LOOKAHEAD:
                break
            if w is not head and not w.future.done() and cached(w):
                head.overtaken += 1
                return w
        return head

    def fail_waiters(self, exc: FleetError) -> None:
        """Tell every waiting request that nothing will serve it."""
        while self.waiting:
            waiter = self.waiting.popleft()
            if not waiter.future.done():
                waiter.future.set_exception(exc)
