"""The Router facade on a fleet without processes: names to pools, admin verbs, a new config in-process."""

from __future__ import annotations

import asyncio
import textwrap
from pathlib import Path

import pytest

from fakes.fleet import STACK, make_router, settle
from modelfleet.config import load_config
from modelfleet.errors import NoSuchRole, UsageError
from modelfleet.lifecycle import State


def test_names_resolve_to_pools_and_unknown_ones_list_what_exists(tmp_path: Path) -> None:
    router, _, _ = make_router(tmp_path, STACK + "aliases: {talk: chat}\ntask_types: {explore: rare}\n")
    assert router.resolve("talk") is router.pools["chat"] and router.resolve("explore") is router.pools["rare"]
    with pytest.raises(NoSuchRole, match="valid names: chat, explore, extra, other, rare, talk"):
        router.resolve("nope")


def test_apply_config_switches_routing_now_and_keeps_leases_and_queues(tmp_path: Path) -> None:
    async def main() -> None:
        router, actions, _ = make_router(tmp_path)
        await actions.start(["server_9001", "server_9002", "server_9003"])
        await router.adopt()
        held = await router.lease(router.resolve("extra"))  # warm's only slot
        waiting = asyncio.create_task(router.lease(router.resolve("extra")))
        await settle()
        text = textwrap.dedent(STACK).replace(
            "  cold:", "  newcomer:\n    model: m.gguf\n    port: 9006\n    tier: warm\n    roles: [fresh]\n  cold:"
        )
        text += "aliases: {more: extra}\n"
        path = tmp_path / "stack.yaml"
        path.write_text(text)
        changed = router.apply_config(load_config(text, str(path)))
        assert changed["added"] == ["server_9006"] and changed["removed"] == []
        assert router.resolve("more") is router.pools["extra"]  # the new alias routes at once
        assert router.fleet.instances["server_9006"].state is State.STOPPED
        assert held.instance.in_flight == 1 and not waiting.done()  # in flight and queued survive
        held.release()
        (await asyncio.wait_for(waiting, 2)).release()
        lease = await asyncio.wait_for(router.lease(router.resolve("fresh")), 2)  # the new server starts on demand
        assert lease.instance.name == "newcomer"
        lease.release()

    asyncio.run(main())


def test_admin_verbs_go_through_the_owner(tmp_path: Path) -> None:
    async def main() -> None:
        router, actions, _ = make_router(tmp_path)
        await router.start_component("cold", "admin start")
        assert router.fleet.instances["server_9005"].state is State.READY
        await router.reload_component("cold", "admin reload")
        assert actions.stops == [["server_9005"]] and actions.starts == [["server_9005"], ["server_9005"]]
        await router.stop_component("cold", "admin stop")
        assert router.fleet.instances["server_9005"].state is State.STOPPED
        with pytest.raises(UsageError, match="'nope' is not a server or service of this stack"):
            await router.stop_component("nope", "admin stop")

    asyncio.run(main())


def test_a_reload_replaces_a_process_a_cli_started_before_the_front_door_saw_it(tmp_path: Path) -> None:
    async def main() -> None:
        router, actions, _ = make_router(tmp_path)
        await router.start_component("cold", "admin start")
        inst = router.fleet.instances["server_9005"]
        # A CLI stopped it (the sync saw that) and started it again with another config; no sync since.
        await actions.stop(["server_9005"])
        await router.supervisor.sync()
        assert inst.state is State.STOPPED
        await actions.start(["server_9005"])
        outside = actions.running["server_9005"]
        await router.reload_component("cold", "admin reload")
        # The reload ends with a process of its own start, not the adopted outside one.
        assert actions.replaced == ["server_9005"]
        assert inst.state is State.READY and inst.handle is not None and inst.handle != outside

    asyncio.run(main())


def test_an_admin_start_clears_a_failed_instance_and_its_budget(tmp_path: Path) -> None:
    async def main() -> None:
        router, _, _ = make_router(tmp_path)
        inst = router.fleet.instances["server_9001"]
        router.fleet.move(inst, State.FAILED, "budget spent")
        inst.restarts.extend([1.0, 2.0, 3.0])
        await router.start_component("hot", "admin start")
        assert inst.state is State.READY and not inst.restarts

    asyncio.run(main())


def test_snapshot_shows_every_instance_with_its_state_and_reason(tmp_path: Path) -> None:
    router, _, _ = make_router(tmp_path)
    router.fleet.move(router.fleet.instances["server_9005"], State.FAILED, "why not")
    snap = router.snapshot()
    rows = {i["name"]: i for i in snap["instances"]}
    assert set(rows) == {"hot[0]", "hot[1]", "warm", "warm2", "cold"}
    assert (rows["cold"]["state"], rows["cold"]["detail"], rows["cold"]["node"]) == ("failed", "why not", "local")
    assert snap["pools"]["chat"] == {"ready": 0, "in_flight": 0, "queued": 0, "routing": "prefix"}  # 3 instances
