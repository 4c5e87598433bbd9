"""Adoption, probes, crash restarts with backoff and a budget, idle reaping: no processes, a fake clock."""

from __future__ import annotations

import asyncio
from pathlib import Path

from fakes.fleet import make_router, settle
from modelfleet.health import Health
from modelfleet.lifecycle import State
from modelfleet.supervisor import backoff_delay


def test_backoff_doubles_from_the_initial_delay_up_to_the_cap() -> None:
    assert [backoff_delay(n, 1, 8) for n in range(6)] == [1, 2, 4, 8, 8, 8]
    assert backoff_delay(0, 0.5, 60) == 0.5


def test_running_instances_are_adopted_and_ready_after_a_good_probe(tmp_path: Path) -> None:
    async def main() -> None:
        router, actions, _ = make_router(tmp_path)
        await actions.start(["server_9001", "server_9002"])
        actions.health["server_9002"] = Health.LOADING
        await router.adopt()
        hot0, hot1 = router.fleet.instances["server_9001"], router.fleet.instances["server_9002"]
        assert hot0.state is State.READY and hot0.pid == actions.running["server_9001"].pid
        assert hot1.state is State.EJECTED  # up, still loading: out of rotation
        actions.health.pop("server_9002")
        await router.supervisor.tick()
        assert hot1.state is State.READY

    asyncio.run(main())


def test_failing_probes_eject_and_a_good_one_brings_it_back(tmp_path: Path) -> None:
    async def main() -> None:
        router, actions, _ = make_router(tmp_path)
        await actions.start(["server_9001"])
        await router.adopt()
        inst = router.fleet.instances["server_9001"]
        actions.health["server_9001"] = Health.UNHEALTHY
        await router.supervisor.probe_all()
        assert inst.state is State.READY  # one failure: still in rotation (failures_to_eject: 2)
        await router.supervisor.probe_all()
        assert inst.state is State.EJECTED and "2 failed health probes" in inst.detail
        actions.health.pop("server_9001")
        await router.supervisor.probe_all()
        assert inst.state is State.READY

    asyncio.run(main())


def test_a_crashed_hot_instance_is_restarted_after_its_backoff(tmp_path: Path) -> None:
    async def main() -> None:
        router, actions, _ = make_router(tmp_path)
        await actions.start(["server_9001"])
        await router.adopt()
        old_pid = router.fleet.instances["server_9001"].pid
        actions.kill("server_9001")
        await router.supervisor.sync()
        inst = router.fleet.instances["server_9001"]
        assert inst.state in (State.BACKOFF, State.STARTING, State.READY)
        await settle()
        assert inst.state is State.READY and inst.pid != old_pid
        assert router.delays == [1] and router.counters.restarts == {"hot[0]": 1}  # type: ignore[attr-defined]

    asyncio.run(main())


def test_a_restart_that_fails_while_loading_counts_and_backs_off_until_failed(tmp_path: Path) -> None:
    async def main() -> None:
        router, actions, _ = make_router(tmp_path)
        await actions.start(["server_9001", "server_9002"])
        await router.adopt()
        actions.fail_restarts = 99  # the model now crashes on every load
        actions.kill("server_9001")
        await router.supervisor.sync()
        await settle()
        inst = router.fleet.instances["server_9001"]
        assert inst.state is State.FAILED
        assert "exited with code 1 while loading" in inst.detail and "restart_budget 3" in inst.detail
        assert router.delays == [1, 2, 4]  # type: ignore[attr-defined]
        assert actions.restarts == ["server_9001"] * 3
        # the pool keeps serving from the other replica
        lease = await router.lease(router.resolve("chat"))
        assert lease.instance.name == "hot[1]"
        lease.release()

    asyncio.run(main())


def test_a_failed_restart_recovers_once_the_cause_is_gone(tmp_path: Path) -> None:
    async def main() -> None:
        router, actions, _ = make_router(tmp_path)
        await actions.start(["server_9001"])
        await router.adopt()
        actions.fail_restarts = 1  # one bad load (a port race, say), then fine
        actions.kill("server_9001")
        await router.supervisor.sync()
        await settle()
        assert router.fleet.instances["server_9001"].state is State.READY
        assert router.delays == [1, 2]  # type: ignore[attr-defined]

    asyncio.run(main())


def test_the_budget_counts_only_restarts_inside_the_window(tmp_path: Path) -> None:
    async def main() -> None:
        router, actions, clock = make_router(tmp_path)
        await actions.start(["server_9001"])
        await router.adopt()
        for _ in range(5):  # 5 crashes, each 601 s after the last: never more than one in the window
            actions.kill("server_9001")
            await router.supervisor.sync()
            await settle()
            clock.advance(601)
        assert router.fleet.instances["server_9001"].state is State.READY
        assert router.delays == [1, 1, 1, 1, 1]  # type: ignore[attr-defined]

    asyncio.run(main())


def test_a_stop_outside_the_front_door_is_not_a_crash(tmp_path: Path) -> None:
    async def main() -> None:
        router, actions, _ = make_router(tmp_path)
        await actions.start(["server_9001", "server_9003"])
        await router.adopt()
        await actions.stop(["server_9001", "server_9003"])  # `modelfleet stop` removes the records
        await router.supervisor.sync()
        for key in ("server_9001", "server_9003"):
            assert router.fleet.instances[key].state is State.STOPPED
        assert actions.restarts == []

    asyncio.run(main())


def test_idle_warm_instances_are_reaped_hot_never(tmp_path: Path) -> None:
    async def main() -> None:
        router, actions, clock = make_router(tmp_path)
        await actions.start(["server_9001", "server_9003"])
        await router.adopt()
        clock.advance(299)
        router.supervisor.reap_idle()
        await settle()
        assert actions.stops == []
        clock.advance(1)
        router.supervisor.reap_idle()
        await settle()
        assert actions.stops == [["server_9003"]] and router.counters.idle_stops == {"warm": 1}
        assert router.fleet.instances["server_9003"].state is State.STOPPED
        assert router.fleet.instances["server_9001"].state is State.READY

    asyncio.run(main())


def test_a_used_warm_instance_is_not_idle(tmp_path: Path) -> None:
    async def main() -> None:
        router, actions, clock = make_router(tmp_path)
        await actions.start(["server_9003"])
        await router.adopt()
        clock.advance(200)
        (await router.lease(router.resolve("extra"))).release()
        clock.advance(200)
        router.supervisor.reap_idle()
        await settle()
        assert actions.stops == []

    asyncio.run(main())
