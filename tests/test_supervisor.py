"""Adoption, probes, crash restarts with backoff and a budget, idle reaping: no processes, a fake clock."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from fakes.fleet import make_router, settle
from modelfleet import upstream
from modelfleet.actions import StackActions
from modelfleet.config import load_config
from modelfleet.errors import StartupError, gist
from modelfleet.health import Health
from modelfleet.instance import Handle
from modelfleet.lifecycle import State
from modelfleet.stack import Stack
from modelfleet.state import InstanceRecord
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


def test_a_dead_warm_instance_is_stopped_with_the_reason_and_one_stopped_outside_with_that(tmp_path: Path) -> None:
    async def main() -> None:
        router, actions, _ = make_router(tmp_path)
        await actions.start(["server_9003", "server_9004"])
        await router.adopt()
        died, stopped = router.fleet.instances["server_9003"], router.fleet.instances["server_9004"]
        actions.kill("server_9003")  # its record stays: it died (a crash, or its node was lost)
        await actions.stop(["server_9004"])  # a CLI stop: the record goes
        await router.supervisor.sync()
        assert died.state is State.STOPPED and "exited; it starts again when a request needs it" in died.detail
        assert stopped.state is State.STOPPED and stopped.detail == "stopped outside the front door"
        assert actions.restarts == []  # WARM: not restarted, started on demand

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


# --- liveness: asked in one step, off the event loop -------------------------------------


def test_each_sync_asks_the_liveness_of_all_records_in_one_step(tmp_path: Path) -> None:
    async def main() -> None:
        router, actions, _ = make_router(tmp_path)
        await actions.start(["server_9001", "server_9002", "server_9003"])
        await router.adopt()
        assert actions.liveness_asks == [["server_9001", "server_9002", "server_9003"]]
        await actions.stop(["server_9003"])
        await router.supervisor.tick()
        assert actions.liveness_asks[1:] == [["server_9001", "server_9002"]]
        assert router.fleet.instances["server_9003"].state is State.STOPPED

    asyncio.run(main())


def test_an_instance_that_changes_while_liveness_is_asked_is_left_to_the_next_tick(tmp_path: Path) -> None:
    async def main() -> None:
        router, actions, _ = make_router(tmp_path)
        await actions.start(["server_9001"])
        await router.adopt()
        actions.liveness_gate = asyncio.Event()
        sync = asyncio.create_task(router.supervisor.sync())
        await settle()
        assert len(actions.liveness_asks) == 2, "the sync is waiting for its answer"
        # Meanwhile the front door starts the WARM instance: the records the sync read predate it.
        warm = router.fleet.instances["server_9003"]
        handle = (await actions.start(["server_9003"]))["server_9003"]
        router.fleet.move(warm, State.STARTING, "on demand")
        warm.handle = handle
        router.fleet.move(warm, State.READY)
        actions.liveness_gate.set()
        await sync
        assert warm.state is State.READY and warm.handle == handle, warm.detail
        await router.supervisor.sync()  # the next tick reads the new record: still ours, still up
        assert warm.state is State.READY and warm.pid == handle.pid

    asyncio.run(main())


class SlowLauncher:
    """Answers liveness like a launcher whose nodes are far away: each question blocks its thread."""

    def __init__(self, batched: bool) -> None:
        self.asked: list[list[int]] = []
        self.threads: set[int] = set()
        if batched:
            self.alive_many = self._alive_many

    def alive(self, handle: Handle) -> bool:
        self.threads.add(threading.get_ident())
        self.asked.append([handle.pid])
        time.sleep(0.1)
        return handle.pid % 2 == 1

    def _alive_many(self, handles: Sequence[Handle]) -> list[bool]:
        self.threads.add(threading.get_ident())
        self.asked.append([h.pid for h in handles])
        time.sleep(0.3)
        return [h.pid % 2 == 1 for h in handles]


def test_stack_actions_ask_the_launcher_off_the_loop_and_in_one_call_when_it_can(tmp_path: Path) -> None:
    path = tmp_path / "stack.yaml"
    path.write_text("servers:\n  a: {model: m.gguf, ports: [9101, 9102, 9103]}\n")
    cfg = load_config(path.read_text(), str(path))
    specs = Stack(cfg, tmp_path / "state", None).specs(["a"])
    records = {
        s.key: InstanceRecord.extend(s, pid=pid, started_at="now", log_file="", create_time=1.0)
        for s, pid in zip(specs, (11, 12, 13), strict=True)
    }

    async def ask(launcher: SlowLauncher) -> tuple[dict[str, bool], int]:
        stack = Stack(cfg, tmp_path / "state", None, launcher=launcher)  # type: ignore[arg-type]
        actions = StackActions(stack, upstream.Client())
        ticks = 0
        answer = asyncio.create_task(actions.alive_all(records))
        while not answer.done():
            await asyncio.sleep(0.01)
            ticks += 1
        return await answer, ticks

    for batched, calls in ((True, [[11, 12, 13]]), (False, [[11], [12], [13]])):
        launcher = SlowLauncher(batched)
        alive, ticks = asyncio.run(ask(launcher))
        assert alive == {"server_9101": True, "server_9102": False, "server_9103": True}
        assert launcher.asked == calls
        assert threading.get_ident() not in launcher.threads, "asked on the event loop's thread"
        assert ticks >= 10, f"the event loop ran only {ticks} times while the launcher answered"


def test_a_failed_restart_is_told_by_its_reason_not_only_its_heading() -> None:
    heading = "the Ray cluster cannot hold these instances; nothing was started:"
    assert gist(StartupError(f"{heading}\n  servers.a.node: no node has the labels zone=a\nRay cluster: ...")) == (
        f"{heading} servers.a.node: no node has the labels zone=a"
    )
    assert gist(StartupError("a exited with code 1 while loading\nlog tail")) == "a exited with code 1 while loading"
