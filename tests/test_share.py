"""Prefix sharing (share.py) without processes: who is asked to share, one seed per prefix, failures.

What a seed does on real llama-server instances is tested in test_cache_routing.py.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from fakes.fleet import make_router
from modelfleet.affinity import route_key
from modelfleet.launcher import free_ports
from modelfleet.router import Router

LONG = "You are an agent. " + "Check every fact twice. " * 100


def _router(tmp_path: Path, slot_save: bool = True, min_chars: int = 2000, single_role: str = "solo") -> Router:
    """Two replicas of ``replica`` in the pool ``chat``, and a server ``single`` (of another model)
    answering ``single_role``."""
    a, b, c = free_ports(3)  # nothing listens there: a seed can only fail
    tmp_path.mkdir(parents=True, exist_ok=True)
    text = f"""
servers:
  replica:
    model: m.gguf
    ports: [{a}, {b}]
    roles: [chat]
    parallel: 2
    slot_save: {str(slot_save).lower()}
  single:
    model: other.gguf
    port: {c}
    roles: [{single_role}]
    parallel: 2
    slot_save: true
pools: [chat]
api: {{share_prefix_min_chars: {min_chars}}}
"""
    return make_router(tmp_path, text)[0]


def _ready(router: Router) -> None:
    async def main() -> None:
        await router.actions.start(list(router.fleet.instances))
        await router.adopt()

    asyncio.run(main())


def chat(system: str | None, user: str = "hi") -> dict[str, object]:
    msgs = [{"role": "system", "content": system}] if system is not None else []
    return {"messages": [*msgs, {"role": "user", "content": user}]}


def test_only_a_long_system_prompt_of_a_prefix_pool_with_slot_files_is_shared(tmp_path: Path) -> None:
    router = _router(tmp_path)
    _ready(router)
    pool = router.pools["chat"]
    key = route_key(chat(LONG))
    assert key.head is not None and key.head["content"] == LONG
    assert len(router.sharing.wants(pool, key.chain[0][0], key.head)) == 2
    short = route_key(chat("Be brief."))
    assert router.sharing.wants(pool, short.chain[0][0], short.head) == []
    assert route_key(chat(None)).head is None  # no system prompt: nothing to share
    assert route_key({"messages": [{"role": "user", "content": LONG}]}).head is None
    solo = router.pools["solo"]  # one instance: routed least busy, no affinity
    assert solo.affinity is None and router.sharing.wants(solo, key.chain[0][0], key.head) == []
    # Once every replica holds it, nothing is left to do (the path of every later request).
    assert pool.affinity is not None
    for inst in pool.backends:
        pool.affinity.remember(inst.key, key)
    assert router.sharing.wants(pool, key.chain[0][0], key.head) == []


def test_replicas_without_slot_files_or_a_zero_limit_share_nothing(tmp_path: Path) -> None:
    for router in (_router(tmp_path / "a", slot_save=False), _router(tmp_path / "b", min_chars=0)):
        _ready(router)
        key = route_key(chat(LONG))
        assert router.sharing.wants(router.pools["chat"], key.chain[0][0], key.head) == []


def test_a_failed_seed_lets_the_requests_go_on_and_is_tried_once_for_all_of_them(tmp_path: Path) -> None:
    router = _router(tmp_path)
    _ready(router)
    pool = router.pools["chat"]
    key = route_key(chat(LONG))

    async def main() -> None:
        # Three requests with the same prompt at once: one seed, which fails (nothing listens).
        await asyncio.wait_for(
            asyncio.gather(*(router.sharing.before(pool, key.chain[0][0], key.head) for _ in range(3))), 30
        )

        # The next request does not try again at once.
        await asyncio.wait_for(router.sharing.before(pool, key.chain[0][0], key.head), 1)
        await router.close()

    asyncio.run(main())
    stats = router.sharing.stats
    assert (stats.seeds, stats.failed, stats.slots) == (0, 1, 0)
    assert all(i.in_flight == 0 for i in pool.backends)  # the seed's slot was given back


def test_a_pool_of_two_servers_shares_within_one_server_at_a_time(tmp_path: Path) -> None:
    router = _router(tmp_path, single_role="chat")
    _ready(router)
    pool = router.pools["chat"]
    key = route_key(chat(LONG))
    link = key.chain[0][0]
    first = router.sharing.wants(pool, link, key.head)
    assert {i.spec.component for i in first} == {"replica"} and len(first) == 2  # a slot file fits one model
    assert pool.affinity is not None
    for inst in first:
        pool.affinity.remember(inst.key, key)
    assert [i.spec.component for i in router.sharing.wants(pool, link, key.head)] == ["single"]


def test_a_request_waits_for_a_slow_seed_no_longer_than_a_queue_wait(tmp_path: Path) -> None:
    router = _router(tmp_path)
    _ready(router)
    pool = router.pools["chat"]
    key = route_key(chat(LONG))
    router.sharing.wait_s = lambda: 0.2

    async def main() -> None:
        gate = asyncio.Event()

        async def slow_spread(*_: object) -> bool:
            await gate.wait()  # a seed that takes longer than anyone may wait
            return True

        router.sharing._spread = slow_spread  # type: ignore[method-assign]
        t0 = asyncio.get_running_loop().time()
        await router.sharing.before(pool, key.chain[0][0], key.head)
        assert asyncio.get_running_loop().time() - t0 < 2  # went on without it
        gate.set()
        await router.close()

    asyncio.run(main())


def test_stop_all_removes_shared_prefixes_a_stopped_front_door_left(tmp_path: Path) -> None:
    from modelfleet import warmkv

    slots = tmp_path / "slots" / "8080"
    slots.mkdir(parents=True)
    left = [slots / "share-00ff.bin", slots / "warm-0.bin", slots / warmkv.META]
    for p in left:
        p.write_bytes(b"x")
    (slots / "mine.bin").write_bytes(b"kept")  # a checkpoint's or the user's file is not ours to remove
    assert warmkv.clean([slots]) == 3
    assert not any(p.exists() for p in left) and (slots / "mine.bin").exists()
