"""Cache-aware routing: prefix chains, bounded loads, sticky sessions (on a fleet without processes)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

import pytest

from fakes.fleet import make_router
from modelfleet.affinity import Affinity, RouteKey, SlotMap, route_key, with_slot
from modelfleet.config import load_config
from modelfleet.errors import ConfigError
from modelfleet.fleet import Lease
from modelfleet.lifecycle import State
from modelfleet.router import Router

SYSTEM = {"role": "system", "content": "You are a careful agent. " * 40}


def convo(session: int, turns: int) -> list[dict[str, str]]:
    msgs = [SYSTEM]
    for t in range(turns):
        msgs.append({"role": "user", "content": f"session {session} question {t}"})
        msgs.append({"role": "assistant", "content": f"answer {t}"})
    msgs.append({"role": "user", "content": f"session {session} question {turns}"})
    return msgs


def _ready(router: Router, *keys: str) -> None:
    for key in keys:
        inst = router.fleet.instances[key]
        router.fleet.move(inst, State.STARTING)
        router.fleet.move(inst, State.READY)


POOL = """
servers:
  r:
    model: m.gguf
    ports: [9101, 9102, 9103]
    roles: [chat]
    parallel: 4
  single:
    model: m.gguf
    port: 9104
    roles: [solo]
pools: [chat]
api: {queue_max: 8, queue_wait_s: 5, prefix_load_factor: 0.25}
"""


# --- the routing key -------------------------------------------------------------------------


def test_a_growing_conversation_extends_its_own_chain() -> None:
    first, later = route_key({"messages": convo(1, 0)}), route_key({"messages": convo(1, 2)})
    assert later.chain[: len(first.chain)] == first.chain  # same leading messages, same links
    other = route_key({"messages": convo(2, 0)})
    assert other.chain[0] == first.chain[0]  # the shared system prompt
    assert other.chain[1] != first.chain[1]
    assert [n for _, n in later.chain] == sorted(n for _, n in later.chain)


def test_a_plain_prompt_is_chained_by_blocks_and_sessions_come_from_header_or_user() -> None:
    a = route_key({"prompt": "x" * 2000 + "tail one"})
    b = route_key({"prompt": "x" * 2000 + "tail two"})
    assert a.chain[:3] == b.chain[:3] and a.chain[-1] != b.chain[-1]
    assert route_key({"messages": [SYSTEM], "user": "u1"}).session == "u1"
    assert route_key({"messages": [SYSTEM], "user": "u1"}, "hdr").session == "hdr"
    assert not route_key({"input": "embed me"})  # nothing to route on: least busy


# --- choosing ---------------------------------------------------------------------------------


@dataclass
class Cand:
    key: str
    in_flight: int = 0
    slots: int = 4


def test_the_instance_holding_the_longest_prefix_wins_within_the_load_bound() -> None:
    aff = Affinity(load_factor=0.25)
    a, b = Cand("a"), Cand("b")
    aff.remember("a", route_key({"messages": convo(1, 0)}))
    aff.remember("b", route_key({"messages": convo(1, 1)}))
    assert aff.choose([a, b], route_key({"messages": convo(1, 2)})) is b  # b holds more of it
    assert aff.choose([a, b], route_key({"messages": convo(1, 0)})) in (a, b)
    # b is over (1 + e) times its share of the pool's load: the request goes where there is room.
    b.in_flight = 3
    assert aff.choose([a, b], route_key({"messages": convo(1, 2)})) is a


def test_a_new_prefix_goes_to_the_same_instance_every_time() -> None:
    aff = Affinity()
    cands = [Cand("a"), Cand("b"), Cand("c")]
    route = route_key({"messages": [{"role": "system", "content": "brand new"}]})
    chosen = {aff.choose(cands, route).key for _ in range(5)}  # type: ignore[union-attr]
    assert len(chosen) == 1


def test_memory_per_instance_is_bounded_and_parked_on_stop() -> None:
    aff = Affinity(per_instance=10, max_sessions=3)
    for s in range(20):
        aff.remember("a", route_key({"messages": convo(s, 1)}, f"s{s}"))
    assert len(aff.known["a"]) == 10 and len(aff.sessions) == 3
    aff.park("a")
    assert aff.match("a", route_key({"messages": convo(19, 1)})) == 0
    aff.reinstate("a")  # its KV cache came back
    assert aff.match("a", route_key({"messages": convo(19, 1)})) > 0
    aff.park("a")
    aff.ready("a")  # up again without its cache: forgotten
    aff.reinstate("a")
    assert aff.match("a", route_key({"messages": convo(19, 1)})) == 0


# --- in a pool ---------------------------------------------------------------------------------


def test_each_conversation_stays_on_the_instance_that_served_it(tmp_path: Path) -> None:
    async def main() -> dict[int, set[str]]:
        router, _, _ = make_router(tmp_path, POOL)
        _ready(router, "server_9101", "server_9102", "server_9103")
        pool = router.resolve("chat")
        where: dict[int, set[str]] = {s: set() for s in range(6)}
        for turn in range(4):
            for s in range(6):
                lease = await router.lease(pool, route=route_key({"messages": convo(s, turn)}))
                where[s].add(lease.instance.key)
                lease.release()
        return where

    where = asyncio.run(main())
    assert all(len(keys) == 1 for keys in where.values()), where


def test_a_hot_session_spills_over_instead_of_overloading_one_instance(tmp_path: Path) -> None:
    async def main() -> list[int]:
        router, _, _ = make_router(tmp_path, POOL)
        _ready(router, "server_9101", "server_9102", "server_9103")
        pool = router.resolve("chat")
        held: list[Lease] = []
        for _ in range(9):  # nine at once of one conversation, none finished
            held.append(await router.lease(pool, route=route_key({"messages": convo(0, 3)}, "hot")))
        return sorted(b.in_flight for b in pool.backends)

    # mean 3 per instance, (1 + 0.25) * 3 rounds up to 4: nobody holds more than 4 of the 9
    loads = asyncio.run(main())
    assert sum(loads) == 9 and max(loads) <= 4, loads


def test_a_session_sticks_while_its_instance_is_ready(tmp_path: Path) -> None:
    async def main() -> tuple[str, str, str]:
        router, _, _ = make_router(tmp_path, POOL)
        _ready(router, "server_9101", "server_9102", "server_9103")
        pool = router.resolve("chat")
        homes = []
        for i in range(2):  # different prompts, one session
            lease = await router.lease(pool, route=RouteKey(route_key({"prompt": f"p{i}"}).chain, "agent-7"))
            homes.append(lease.instance.key)
            lease.release()
        home = router.fleet.instances[homes[0]]
        router.fleet.move(home, State.EJECTED, "probe failed")
        lease = await router.lease(pool, route=RouteKey((), "agent-7"))
        return homes[0], homes[1], lease.instance.key

    first, second, after = asyncio.run(main())
    assert first == second and after != first


def test_least_busy_pools_and_single_instances_ignore_prefixes(tmp_path: Path) -> None:
    router, _, _ = make_router(tmp_path, POOL + "routing: {chat: least_busy}\n")
    assert router.pools["chat"].affinity is None and router.pools["solo"].affinity is None
    router2, _, _ = make_router(tmp_path, POOL)
    assert router2.pools["chat"].affinity is router2.affinity  # prefix by default for a pool of three


def test_routing_names_only_roles_and_known_policies() -> None:
    with pytest.raises(ConfigError, match=r"routing\.chat: Input should be 'least_busy' or 'prefix'"):
        load_config(POOL + "routing: {chat: nearest}\n")
    with pytest.raises(ConfigError, match=r"routing\.ghost: 'ghost' is not a role; known roles: chat, solo"):
        load_config(POOL + "routing: {ghost: prefix}\n")
    with pytest.raises(ConfigError, match=r"api\.session_header"):
        load_config(POOL.replace("queue_max: 8", "session_header: 'X Session', queue_max: 8"))


def test_a_freed_slot_goes_to_a_waiting_request_whose_prefix_it_holds(tmp_path: Path) -> None:
    text = POOL.replace("parallel: 4", "parallel: 1")

    async def main() -> tuple[str, str]:
        router, _, _ = make_router(tmp_path, text)
        _ready(router, "server_9101", "server_9102")
        pool = router.resolve("chat")
        a_route, b_route = route_key({"messages": convo(1, 1)}), route_key({"messages": convo(2, 1)})
        held_a = await router.lease(pool, route=a_route)
        held_b = await router.lease(pool, route=b_route)
        # Every slot busy; the first in line continues a's conversation, the second b's.
        first = asyncio.create_task(router.lease(pool, route=route_key({"messages": convo(1, 2)})))
        second = asyncio.create_task(router.lease(pool, route=route_key({"messages": convo(2, 2)})))
        await asyncio.sleep(0)
        held_b.release()  # b's instance is free: the second request, whose history it holds, goes first
        second_lease = await second
        assert not first.done()
        held_a.release()
        first_lease = await first
        assert held_a.instance is not held_b.instance
        return (
            "same" if second_lease.instance is held_b.instance else "other",
            "same" if first_lease.instance is held_a.instance else "other",
        )

    assert asyncio.run(main()) == ("same", "same")


# --- KV caches across WARM stops, as capacity drives them ----------------------------------------

WARM_KV = """
servers:
  w:
    model: m.gguf
    ports: [9201, 9202]
    tier: warm
    slot_save: true
    roles: [chat]
pools: [chat]
worker_pool: {warm_timeout_s: 10}
api: {queue_max: 8, queue_wait_s: 5, start_wait_s: 5, drain_timeout_s: 1}
"""


@pytest.mark.parametrize("verified", [True, False])
def test_an_idle_stop_saves_and_the_next_start_restores_before_traffic(tmp_path: Path, verified: bool) -> None:
    async def main() -> tuple[list[str], list[str], str, int]:
        router, actions, clock = make_router(tmp_path, WARM_KV)
        actions.kv_verified = verified
        pool = router.resolve("chat")
        route = route_key({"messages": convo(1, 1)})
        lease = await router.lease(pool, route=route)  # starts both replicas on demand
        home = lease.instance
        lease.release()
        clock.advance(11)
        router.supervisor.reap_idle()
        for _ in range(20):
            await asyncio.sleep(0)
        assert home.state is State.STOPPED and home.key in actions.kv_saves  # saved while still up
        assert router.affinity.match(home.key, route) == 0  # its process is gone
        slot_dir = Path(home.spec.slot_dir or "")
        slot_dir.mkdir(parents=True, exist_ok=True)
        (slot_dir / "warm.json").write_text("{}")  # what a real save leaves behind
        await router.start_component("w", "test")
        assert home.state is State.READY
        return actions.kv_saves, actions.kv_restores, home.key, router.affinity.match(home.key, route)

    saves, restores, home, matched = asyncio.run(main())
    assert home in saves and home in restores
    assert (matched > 0) is verified  # only a restore that was checked brings its prefixes back


# --- slots within an instance ------------------------------------------------------------------


def test_a_slot_map_gives_each_conversation_the_slot_holding_most_of_it() -> None:
    slots = SlotMap(2)
    a, b, c = (route_key({"messages": convo(s, 0)}, pin=True) for s in range(3))
    assert slots.take(a) == 0 and slots.take(b) == 1  # the first two fill the empty slots
    slots.release(0), slots.release(1)
    a2 = route_key({"messages": convo(0, 1)}, pin=True)
    assert slots.take(a2) == 0  # its own slot, though slot 0 was used less recently
    slots.release(0)
    # A third conversation shares only the system prompt with both: the least recently used one moves out.
    assert slots.take(c) == 1
    assert slots.stats() == {"hits": 2, "moves": 0}  # every choice found at least the system prompt
    assert slots.take(b) == 0  # slot 1 is busy: b goes where a was (both evict to the RAM cache)
    assert slots.take(a) is None  # every slot busy: the server chooses


def test_among_equal_matches_the_slot_holding_least_besides_wins() -> None:
    slots = SlotMap(3)
    long_convo = route_key({"messages": convo(0, 5)}, pin=True)
    assert slots.take(long_convo) == 0
    slots.release(0)
    head = route_key({"messages": [SYSTEM]}, pin=True)
    assert slots.given(1, head, used=0)  # a shared prefix restored into slot 1
    fresh = route_key({"messages": convo(1, 0)}, pin=True)
    assert slots.take(fresh) == 1  # slot 1 holds the system prompt and nothing else to move out
    slots.release(1)
    unrelated = route_key({"messages": [{"role": "user", "content": "hi"}]}, pin=True)
    assert slots.take(unrelated) == 2  # nothing matches: the empty slot, not a conversation
    assert slots.stats()["moves"] == 0


def test_a_restore_does_not_claim_a_slot_a_request_took_meanwhile() -> None:
    slots = SlotMap(1)
    head = route_key({"messages": [SYSTEM]}, pin=True)
    stamp = slots.used[0]
    assert slots.take(route_key({"messages": convo(3, 2)}, pin=True)) == 0
    slots.release(0)
    assert not slots.given(0, head, stamp)  # the request's content is in the slot now


def test_only_single_completions_that_name_no_slot_are_pinned() -> None:
    assert route_key({"messages": convo(0, 0)}, pin=True).pin
    assert not route_key({"messages": convo(0, 0)}).pin
    assert not route_key({"messages": convo(0, 0), "id_slot": 1}, pin=True).pin  # the client chose
    assert route_key({"prompt": ["one prompt"]}, pin=True).pin
    assert not route_key({"prompt": ["a", "batch"]}, pin=True).pin  # a batch takes several slots


@pytest.mark.parametrize(
    ("body", "pinned"),
    [
        (b'{"model": "m"}', b'{"id_slot":3,"model": "m"}'),
        (b'  \n{ "a": 1 }', b'{"id_slot":3,"a": 1 }'),
        (b"{}", b'{"id_slot":3}'),
        (b"{ }", b'{"id_slot":3}'),
        (b'\xef\xbb\xbf{"a":1}', b'{"id_slot":3,"a":1}'),
        (b"[1]", None),
    ],
)
def test_a_slot_goes_first_into_the_request_body(body: bytes, pinned: bytes | None) -> None:
    import json

    out = with_slot(body, 3)
    assert out == pinned
    if out is not None:
        assert json.loads(out)["id_slot"] == 3


def test_a_pinning_instance_gets_id_slot_through_its_lease_and_frees_it(tmp_path: Path) -> None:
    async def main() -> tuple[list[int | None], list[bool], list[int | None]]:
        router, _, _ = make_router(tmp_path, POOL)
        _ready(router, "server_9101", "server_9102", "server_9103", "server_9104")
        pool, solo = router.resolve("chat"), router.resolve("solo")
        route = route_key({"messages": convo(0, 0)}, pin=True)
        leases = [await router.lease(pool, route=route)]
        inst = leases[0].instance
        leases.append(router.fleet.take(inst, route))  # a twin on the same instance, at once
        slots = [lease.slot for lease in leases]
        assert inst.slot_map is not None
        for lease in leases:
            lease.release()
            lease.release()  # once only
        unpinned = await router.lease(pool, route=route_key({"messages": convo(0, 0)}))  # e.g. an embedding
        single = await router.lease(solo, route=route_key({"messages": convo(0, 0)}, pin=True))
        busy = list(inst.slot_map.busy)
        # A restart (on a new spec) starts a new map; a lease from before frees its slot in the old one.
        old_map, held = inst.slot_map, router.fleet.take(inst, route)
        router.fleet.move(inst, State.STOPPED)
        router.fleet.move(inst, State.STARTING)
        assert inst.slot_map is not old_map and inst.slot_map is not None and inst.slot_map.held[0] == {}
        held.release()
        assert old_map.busy == [False] * 4
        return slots, busy, [unpinned.slot, single.slot]

    slots, busy, others = asyncio.run(main())
    assert slots == [0, 1] and busy == [False] * 4
    assert others == [None, None]  # not a completion; a least_busy single instance does not pin
