"""Pools and leases on a fleet without processes."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from fakes.fleet import make_router, settle
from modelfleet.errors import QueueFull, QueueTimeout
from modelfleet.fleet import Lease
from modelfleet.lifecycle import State


def _ready(router: object, *keys: str) -> None:
    for key in keys:
        inst = router.fleet.instances[key]  # type: ignore[attr-defined]
        router.fleet.move(inst, State.STARTING)  # type: ignore[attr-defined]
        router.fleet.move(inst, State.READY)  # type: ignore[attr-defined]


def test_least_busy_relative_to_slots_then_least_recently_used(tmp_path: Path) -> None:
    async def main() -> list[str]:
        router, _, clock = make_router(tmp_path)
        _ready(router, "server_9001", "server_9002", "server_9003")
        pool = router.resolve("chat")
        picked = []
        for _ in range(5):
            clock.advance(1)
            lease = await router.lease(pool)
            picked.append(lease.instance.name)
        return picked

    # 9001 and 9002 have 2 slots, warm (9003) 1: each gets a first request, then the 2-slot ones
    picked = asyncio.run(main())
    assert sorted(picked[:3]) == ["hot[0]", "hot[1]", "warm"]
    assert sorted(picked[3:]) == ["hot[0]", "hot[1]"]


def test_a_lease_is_released_once_however_often_it_is_released(tmp_path: Path) -> None:
    async def main() -> tuple[int, int]:
        router, _, _ = make_router(tmp_path)
        _ready(router, "server_9003")
        pool = router.resolve("extra")
        lease = await router.lease(pool)
        async with lease as inst:
            assert inst.in_flight == 1
        lease.release()
        lease.release()
        return inst.in_flight, inst.served

    assert asyncio.run(main()) == (0, 1)


def test_a_full_pool_queues_in_order_then_refuses(tmp_path: Path) -> None:
    async def main() -> None:
        router, _, _ = make_router(tmp_path)
        _ready(router, "server_9003")
        router.pools["extra"].queue_max = 2
        pool = router.resolve("extra")
        first = await router.lease(pool)
        waiters = [asyncio.create_task(router.lease(pool)) for _ in range(2)]
        await settle()
        with pytest.raises(QueueFull, match="2 requests are already waiting"):
            await router.lease(pool)
        first.release()  # the slot goes to the first in line
        second = await waiters[0]
        assert not waiters[1].done()
        second.release()
        third = await waiters[1]
        third.release()
        assert pool.backends[0].in_flight == 0 and pool.backends[0].served == 3

    asyncio.run(main())


def test_a_wait_runs_out_with_503_and_a_cancelled_waiter_gives_its_slot_back(tmp_path: Path) -> None:
    async def main() -> None:
        router, _, _ = make_router(tmp_path)
        _ready(router, "server_9003")
        pool = router.resolve("extra")
        held = await router.lease(pool)
        with pytest.raises(QueueTimeout):
            await pool.acquire(0.01)
        gone = asyncio.create_task(pool.acquire(5))
        await settle()
        held.release()  # handed to the waiter...
        gone.cancel()  # ...who left in the same turn: the slot comes back, or the lease reaches the caller
        (outcome,) = await asyncio.gather(gone, return_exceptions=True)
        if isinstance(outcome, Lease):
            outcome.release()
        assert pool.backends[0].in_flight == 0

    asyncio.run(main())
