"""The event hub behind /events and /ui: fed by the fleet's owner, bounded everywhere (no processes)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
from pathlib import Path
from types import SimpleNamespace

from fakes.fleet import Clock, make_router, settle
from modelfleet import events, webui
from modelfleet.events import EventHub, sse
from modelfleet.instance import Handle
from modelfleet.lifecycle import State
from modelfleet.usage import Usage, usage_of

STREAM_TAIL = (
    b'data: {"choices":[{"delta":{"content":"hi"}}]}\n\n'
    b'data: {"choices":[],"usage":{"completion_tokens":7,"prompt_tokens":20},'
    b'"timings":{"cache_n":15,"prompt_n":5,"predicted_n":7}}\n\ndata: [DONE]\n\n'
)


def hub_on(tmp_path: Path) -> tuple[EventHub, Clock, object]:
    router, actions, _ = make_router(tmp_path)
    wall = Clock(5000.0)
    return EventHub(router, clock=wall), wall, actions


def test_every_state_change_of_the_owner_reaches_subscribers_in_order(tmp_path: Path) -> None:
    async def main() -> None:
        hub, _, _ = hub_on(tmp_path)
        sub = hub.subscribe()
        inst = hub.router.fleet.instances["server_9003"]
        hub.router.fleet.move(inst, State.STARTING, "admin start")
        hub.router.fleet.move(inst, State.READY)
        got = [sub.queue.get_nowait() for _ in range(2)]
        assert [(e["instance"], e["old"], e["new"]) for e in got] == [
            ("warm", "stopped", "starting"),
            ("warm", "starting", "ready"),
        ]
        assert got[0]["detail"] == "admin start"
        hub.unsubscribe(sub)
        hub.router.fleet.move(inst, State.DRAINING)
        assert sub.queue.empty()

    asyncio.run(main())


def test_a_subscriber_that_falls_behind_is_dropped_not_buffered(tmp_path: Path) -> None:
    async def main() -> None:
        hub, _, _ = hub_on(tmp_path)
        slow, fast = hub.subscribe(), hub.subscribe()
        for _ in range(events.SUBSCRIBER_QUEUE + 5):
            hub.publish({"type": "counters"})
            while not fast.queue.empty():
                fast.queue.get_nowait()
        assert slow.dropped and slow not in hub.subscribers
        assert slow.queue.qsize() == events.SUBSCRIBER_QUEUE
        assert not fast.dropped and fast in hub.subscribers

    asyncio.run(main())


def test_counters_cover_the_last_minute_per_instance(tmp_path: Path) -> None:
    async def main() -> None:
        hub, wall, _ = hub_on(tmp_path)
        for latency in (0.1, 0.2, 0.3):
            hub.record("chat", "hot[0]", latency, STREAM_TAIL, 200, usage_of(STREAM_TAIL))
        hub.record("chat", "hot[0]", 0.05, b'{"error":{"message":"bad <b>thing</b>"}}', 400, Usage())
        c = hub.tick()["instances"]["hot[0]"]
        assert c["rps"] == round(4 / 60, 3)
        assert c["p50_ms"] == 150.0
        assert c["tokens_s"] == round(21 / 60, 2)
        assert c["cache_ratio"] == 0.75  # 45 of 60 prompt tokens came from the cache
        assert c["last_error"] == "HTTP 400 on 'chat': bad <b>thing</b>"  # the text, as it came
        wall.advance(61)
        c = hub.tick()["instances"]["hot[0]"]
        assert c["rps"] == 0 and c["p50_ms"] is None and c["cache_ratio"] is None

    asyncio.run(main())


def test_role_history_is_bounded_to_a_day_and_marks_follow_the_capacity_counters(tmp_path: Path) -> None:
    async def main() -> None:
        hub, wall, _ = hub_on(tmp_path)
        hub.router.counters.bump(hub.router.counters.warm_starts, "warm")
        for i in range(events.PER_SECOND * 2 + 120):
            if i % 7 == 0:
                hub.record("chat", "hot[0]", 0.01, b"", 200, Usage())
            hub.tick()
            wall.advance(1)
        hist = hub.history()
        assert len(hist["chat"]["seconds"]["t"]) == events.PER_SECOND
        assert len(hist["chat"]["minutes"]["rps"]) == (events.PER_SECOND * 2 + 120) // 60
        assert hist["chat"]["seconds"]["rps"][-7:].count(1) == 1  # one request in every 7 s
        assert "minutes" not in hub.history(day=False)["chat"]
        assert [m["kind"] for m in hist["chat"]["marks"]] == ["warm start"]  # once, on both of warm's roles
        assert [m["kind"] for m in hist["extra"]["marks"]] == ["warm start"]
        assert hist["other"]["marks"] == []
        assert len(json.dumps(hist)) < 2_000_000

    asyncio.run(main())


def test_a_day_of_history_for_fifty_roles_stays_bounded(tmp_path: Path) -> None:
    async def main() -> None:
        hub, _, _ = hub_on(tmp_path)
        sample = {"t": 0.0, "rps": 1, "p50_ms": 12.5, "queued": 0, "in_flight": 1}
        for role in [f"r{i}" for i in range(50)]:
            for _ in range(events.PER_SECOND + 10):
                hub.seconds.setdefault(role, events.deque(maxlen=events.PER_SECOND)).append(sample)
            for _ in range(events.PER_MINUTE + 10):
                hub.minutes.setdefault(role, events.deque(maxlen=events.PER_MINUTE)).append(sample)
        assert all(len(d) == events.PER_SECOND for d in hub.seconds.values())
        assert all(len(d) == events.PER_MINUTE for d in hub.minutes.values())

    asyncio.run(main())


def test_sse_frames_name_the_event_and_carry_json() -> None:
    frame = sse({"type": "state", "instance": "a</script>"}).decode()
    head, data = frame.rstrip("\n").split("\n")
    assert head == "event: state" and json.loads(data.removeprefix("data: "))["instance"] == "a</script>"
    assert frame.endswith("\n\n")


def test_the_hub_counts_a_restart_of_the_supervisor_as_a_mark(tmp_path: Path) -> None:
    async def main() -> None:
        hub, _, _ = hub_on(tmp_path)
        router = hub.router
        for key in ("server_9001", "server_9002"):
            inst = router.fleet.instances[key]
            router.fleet.move(inst, State.STARTING)
            router.fleet.move(inst, State.READY)
        router.counters.bump(router.counters.restarts, "hot[0]")
        await settle()
        tick = hub.tick()
        assert [(m["role"], m["kind"], m["instance"]) for m in tick["marks"]] == [("chat", "restart", "hot[0]")]
        assert [m["instance"] for m in hub.history()["chat"]["marks"]] == ["hot[0]"]
        assert hub.tick()["marks"] == []  # each mark is sent once

    asyncio.run(main())


def test_the_sampler_measures_memory_through_the_launcher_and_survives_a_failed_sample(tmp_path: Path) -> None:
    class Launcher:
        def rss(self, handle: Handle) -> int:
            return 4096 if handle.pid == 11 else 0

    async def main() -> None:
        hub, _, _ = hub_on(tmp_path)
        hub.router.stack.launcher = Launcher()  # type: ignore[assignment]
        inst = hub.router.fleet.instances["server_9001"]
        hub.router.fleet.move(inst, State.STARTING)
        hub.router.fleet.move(inst, State.READY)
        inst.handle = Handle("local", 11, 0.0)
        real_tick, calls = hub.tick, []

        def flaky() -> events.Event:
            calls.append(1)
            if len(calls) == 1:
                raise RuntimeError("one bad sample")
            return real_tick()

        hub.tick = flaky  # type: ignore[method-assign]
        sub = hub.subscribe()
        task = asyncio.create_task(hub.run(interval_s=0.001))
        try:
            event = await asyncio.wait_for(sub.queue.get(), 5)
        finally:
            task.cancel()
        assert event["type"] == "counters" and len(calls) >= 2
        assert hub.rss == {inst.name: 4096} and event["instances"][inst.name]["rss"] == 4096

    asyncio.run(main())


def test_load_progress_of_a_starting_instance_reads_its_log_through_the_launcher(tmp_path: Path) -> None:
    async def main() -> None:
        hub, _, _ = hub_on(tmp_path)
        router = hub.router
        inst = router.fleet.instances["server_9003"]
        log_file = tmp_path / "warm.log"
        log_file.write_text("load_tensors: loading model\nllama_model_load: 40% done <b>\n\n")
        inst.spec = dataclasses.replace(inst.spec, log_file=str(log_file))
        router.fleet.move(inst, State.STARTING, "admin start")
        door = SimpleNamespace(router=router, stack=router.stack, events=hub)
        progress = await webui._starting(door)  # type: ignore[arg-type]
        assert list(progress) == ["warm"]
        assert progress["warm"]["log"] == "llama_model_load: 40% done <b>" and progress["warm"]["elapsed_s"] >= 0
        router.fleet.move(inst, State.READY)
        assert await webui._starting(door) == {}  # type: ignore[arg-type]

    asyncio.run(main())


def test_the_page_finds_the_newest_sweep_report_and_its_plot(tmp_path: Path) -> None:
    assert webui.newest_sweep(tmp_path) is None
    old, new = tmp_path / "sweep-a-20260101-000000.md", tmp_path / "sweep-a-20260102-000000.md"
    old.write_text("old")
    new.write_text("| c | tok/s |\n| 1 | <b>9</b> |")
    os.utime(old, (1, 1))
    found = webui.newest_sweep(tmp_path)
    assert found == {"file": new.name, "text": "| c | tok/s |\n| 1 | <b>9</b> |", "plot": False}
    new.with_suffix(".png").write_bytes(b"\x89PNG")
    assert webui.newest_sweep(tmp_path)["plot"] is True  # type: ignore[index]
