"""On-demand starts, expansion, admission and eviction, drain-then-stop: no processes, a fake clock."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from fakes.fleet import make_router, settle
from modelfleet.errors import NoBackend
from modelfleet.lifecycle import State


def test_a_request_for_a_stopped_warm_role_starts_it_once_for_all_who_ask(tmp_path: Path) -> None:
    async def main() -> None:
        router, actions, _ = make_router(tmp_path)
        actions.gate = asyncio.Event()
        pool = router.resolve("extra")
        asks = [asyncio.create_task(router.lease(pool)) for _ in range(3)]
        await settle()
        warm = router.fleet.instances["server_9003"]
        assert warm.state is State.STARTING and actions.starts == [["server_9003"]]
        actions.gate.set()
        leases = [await asyncio.wait_for(a, 2) for a in asks[:1]]
        assert warm.state is State.READY and actions.admissions == ["server_9003"]
        leases[0].release()
        for a in asks[1:]:
            (await asyncio.wait_for(a, 2)).release()
        assert actions.starts == [["server_9003"]] and router.counters.warm_starts == {"warm": 1}

    asyncio.run(main())


def test_past_the_threshold_a_warm_server_joins_the_pool_in_the_background(tmp_path: Path) -> None:
    async def main() -> None:
        router, actions, _ = make_router(tmp_path)
        for key in ("server_9001", "server_9002"):
            inst = router.fleet.instances[key]
            router.fleet.move(inst, State.STARTING)
            router.fleet.move(inst, State.READY)
        pool = router.resolve("chat")
        leases = [await router.lease(pool) for _ in range(4)]  # 4 slots: at the threshold, no expansion
        await settle()
        assert actions.starts == []
        fifth = asyncio.create_task(router.lease(pool))  # 5 > 4: expand
        await settle()
        assert actions.starts == [["server_9003"]]
        got = await asyncio.wait_for(fifth, 2)
        assert got.instance.name == "warm"  # the new capacity served the waiting request
        for lease in [*leases, got]:
            lease.release()

    asyncio.run(main())


def test_a_start_that_does_not_fit_fails_its_waiters_at_once_with_the_reason(tmp_path: Path) -> None:
    async def main() -> None:
        router, actions, _ = make_router(tmp_path)
        actions.available = 0
        with pytest.raises(NoBackend, match="cannot start warm2: no room"):
            await asyncio.wait_for(router.lease(router.resolve("other")), 2)
        assert actions.starts == [] and router.fleet.instances["server_9004"].state is State.STOPPED

    asyncio.run(main())


def test_admission_evicts_the_least_recently_used_idle_warm_instance(tmp_path: Path) -> None:
    async def main() -> None:
        router, actions, clock = make_router(tmp_path)
        (await router.lease(router.resolve("extra"))).release()  # warm up, used at t
        clock.advance(10)
        actions.available = 0  # the next WARM start needs one idle WARM instance gone
        lease = await asyncio.wait_for(router.lease(router.resolve("other")), 2)
        assert lease.instance.name == "warm2"
        assert actions.stops == [["server_9003"]] and router.fleet.instances["server_9003"].state is State.STOPPED
        assert router.counters.evictions == {"warm": 1}
        lease.release()

    asyncio.run(main())


def test_a_failed_start_tells_waiters_why_and_leaves_the_instance_stopped(tmp_path: Path) -> None:
    async def main() -> None:
        router, actions, _ = make_router(tmp_path)
        actions.fail_start["server_9005"] = "cold (:9005) exited with code 1 while loading"
        with pytest.raises(NoBackend, match=r"starting cold failed: .*exited with code 1"):
            await asyncio.wait_for(router.lease(router.resolve("rare")), 2)
        cold = router.fleet.instances["server_9005"]
        assert cold.state is State.STOPPED and "exited with code 1" in cold.detail

    asyncio.run(main())


def test_a_required_hook_that_fails_keeps_the_instance_out(tmp_path: Path) -> None:
    async def main() -> None:
        router, actions, _ = make_router(tmp_path)
        actions.hook_block["server_9005"] = "required hook seed failed: boom"
        with pytest.raises(NoBackend, match="required hook seed failed"):
            await asyncio.wait_for(router.lease(router.resolve("rare")), 2)
        assert router.fleet.instances["server_9005"].state is State.STOPPED
        assert actions.stops == [["server_9005"]]

    asyncio.run(main())


def test_drain_waits_for_requests_in_flight_then_stops(tmp_path: Path) -> None:
    async def main() -> None:
        router, actions, _ = make_router(tmp_path)
        lease = await router.lease(router.resolve("extra"))
        warm = lease.instance
        stopping = asyncio.create_task(router.stop_component("warm", "admin stop"))
        await settle()
        assert warm.state is State.DRAINING and actions.stops == []
        lease.release()
        await asyncio.wait_for(stopping, 2)
        assert warm.state is State.STOPPED and actions.stops == [["server_9003"]]

    asyncio.run(main())
