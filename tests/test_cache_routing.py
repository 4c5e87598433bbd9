"""Cache-aware routing and KV caches across WARM stops, on real llama-server instances."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import StackFactory, free_ports, stack_cli
from modelfleet import warmkv
from test_api import FAST_MONITOR, Fleet, srv

SYSTEM = "You are a careful agent. Follow the rules. " * 4


@pytest.fixture
def door(make_stack: StackFactory) -> Iterator[Callable[..., Fleet]]:
    def start(servers_yaml: str, extra: str = "", api_extra: str = "") -> Fleet:
        (api_port,) = free_ports(1)
        stack = make_stack(servers_yaml + extra + FAST_MONITOR + f"api: {{port: {api_port}{api_extra}}}\n")
        stack.start(stack.select())
        return Fleet(stack, api_port)

    yield start


def ask(f: Fleet, history: list[dict[str, str]], role: str = "chat", **headers: str) -> dict[str, Any]:
    body = {"model": role, "messages": history, "max_tokens": 3, "temperature": 0}
    resp = f.post("/v1/chat/completions", body, headers=headers)
    assert resp.status_code == 200, resp.text
    data: dict[str, Any] = resp.json()
    return data


def converse(f: Fleet, turns: int) -> list[dict[str, Any]]:
    """One conversation on SYSTEM, one question a turn, each answer kept: the timings of each turn."""
    history = [{"role": "system", "content": SYSTEM}]
    timings = []
    for turn in range(turns):
        history.append({"role": "user", "content": f"question {turn}"})
        answer = ask(f, history)
        timings.append(answer["timings"])
        history.append({"role": "assistant", "content": answer["choices"][0]["message"]["content"]})
    return timings


def metric(f: Fleet, name: str, **labels: str) -> float:
    text = httpx.get(f.url + "/metrics", timeout=10).text
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith((f"{name}{{", f"{name} ")) and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no {name}{{{want}}} in /metrics: {[x for x in text.splitlines() if name in x]}")


def test_a_conversation_stays_on_one_replica_and_is_served_from_its_cache(
    door: Callable[..., Fleet], tiny_model: Path
) -> None:
    a, b = free_ports(2)
    replicas = srv("r", tiny_model, a, "[chat]", parallel=2, ctx_size=2048).replace(f"port: {a}", f"ports: [{a}, {b}]")
    f = door("servers:\n" + replicas, extra="pools: [chat]\n")
    cached = [t["cache_n"] for t in converse(f, 4)]
    served = sorted(i["served"] for i in f.status().values() if i["component"] == "r")
    assert served == [0, 4]  # least busy alone would have alternated: [2, 2]
    assert cached[0] == 0 and all(n > 0 for n in cached[1:]), cached
    st = f.status()
    home = next(name for name, i in st.items() if i["component"] == "r" and i["served"] == 4)
    assert metric(f, "modelfleet_prompt_tokens_cached_total", role="chat", instance=home) == sum(cached)
    assert st[home]["prompt_cached"] == sum(cached) and st[home]["prompt_evaluated"] > 0
    pools = httpx.get(f.url + "/admin/status", timeout=10).json()["pools"]
    assert pools["chat"]["routing"] == "prefix"


def test_a_session_header_keeps_a_conversation_home(door: Callable[..., Fleet], tiny_model: Path) -> None:
    a, b = free_ports(2)
    f = door(
        "servers:\n" + srv("r", tiny_model, a, "[chat]").replace(f"port: {a}", f"ports: [{a}, {b}]"),
        extra="pools: [chat]\n",
    )
    for i in range(3):  # unrelated prompts, one session: one instance
        ask(f, [{"role": "user", "content": f"unrelated {i}"}], **{"X-Session-Id": "agent-1"})
    served = sorted(i["served"] for i in f.status().values() if i["component"] == "r")
    assert served == [0, 3]


def test_a_warm_instance_stopped_for_idleness_comes_back_with_its_cache(
    door: Callable[..., Fleet], tiny_model: Path
) -> None:
    hot, warm = free_ports(2)
    f = door(
        "servers:\n"
        + srv("main", tiny_model, hot, "[main]")
        + srv("lazy", tiny_model, warm, "[lazy]", tier="warm", slot_save="true"),
        extra="worker_pool: {warm_timeout_s: 1.0}\n",
    )
    history = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "hello"}]
    first = ask(f, history, role="lazy")  # starts it on demand
    assert first["timings"]["prompt_n"] > 20
    f.wait_for("the idle WARM instance to stop", lambda: f.status()["lazy"]["state"] == "stopped")
    slot_dir = f.stack.store.dir / "slots" / str(warm)
    assert (slot_dir / "warm-0.bin").is_file() and (slot_dir / warmkv.META).is_file()
    assert warmkv.saved_tokens(slot_dir / "warm-0.bin")  # the header names the tokens it holds
    again = ask(f, history, role="lazy")  # a new process, restored before it took this request
    assert again["timings"]["cache_n"] >= first["timings"]["prompt_n"] - 1, again["timings"]
    assert metric(f, "modelfleet_kv_restores_total", instance="lazy", result="verified") == 1.0
    assert not (slot_dir / "warm-0.bin").exists()  # consumed by the restore
    # Saved again at the next idle stop; `stop --all` removes it.
    f.wait_for("the second idle stop", lambda: f.status()["lazy"]["state"] == "stopped")
    deadline = time.monotonic() + 10
    while not (slot_dir / "warm-0.bin").is_file():
        assert time.monotonic() < deadline, "the second idle stop saved nothing"
        time.sleep(0.05)
    f.stack.stop()
    assert not (slot_dir / "warm-0.bin").exists() and not (slot_dir / warmkv.META).exists()


def test_cli_reload_goes_through_the_front_door_and_keeps_the_kv_cache(
    door: Callable[..., Fleet], tiny_model: Path
) -> None:
    (port,) = free_ports(1)
    f = door("servers:\n" + srv("m", tiny_model, port, "[chat]", slot_save="true"))
    history = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "hello"}]
    first = ask(f, history)
    before = f.status()["m"]["pid"]
    folder = f.stack.store.dir.parent
    res = stack_cli(folder, "reload", "m")
    assert res.returncode == 0, res.stderr
    assert "through the front door" in res.stdout and "m ready" in res.stdout, res.stdout
    assert f.status()["m"]["pid"] != before  # a new process...
    again = ask(f, history)  # ...that had its slots back before it took this request
    assert again["timings"]["cache_n"] >= first["timings"]["prompt_n"] - 1, again["timings"]
    assert metric(f, "modelfleet_kv_restores_total", instance="m", result="verified") == 1.0
    # A changed config is not the front door's to apply: the CLI restarts it itself, and says why.
    (folder / "stack.yaml").write_text((folder / "stack.yaml").read_text().replace("threads: 1", "threads: 2"))
    res = stack_cli(folder, "reload", "m")
    assert res.returncode == 0, res.stderr
    assert "config changed, so it restarts here" in res.stdout, res.stdout


# About 1,200 of the tiny model's tokens: within its 2,048-token context.
LONG_SYSTEM = "You are a coding agent in a large repository. " + " ".join(
    f"Rule {i}: check item {i} first." for i in range(24)
)
SHARE = ", share_prefix_min_chars: 500"


def test_a_long_system_prompt_is_evaluated_once_and_shared_with_every_replica(
    door: Callable[..., Fleet], tiny_model: Path
) -> None:
    a, b = free_ports(2)
    replicas = srv("r", tiny_model, a, "[chat]", parallel=2, ctx_size=8192, slot_save="true")
    f = door("servers:\n" + replicas.replace(f"port: {a}", f"ports: [{a}, {b}]"), "pools: [chat]\n", SHARE)

    def first_turn(k: int) -> dict[str, Any]:
        return ask(f, [{"role": "system", "content": LONG_SYSTEM}, {"role": "user", "content": f"agent {k} here"}])

    with ThreadPoolExecutor(4) as pool:  # a burst of four conversations on the same system prompt
        answers = list(pool.map(first_turn, range(4)))
    sharing = httpx.get(f.url + "/admin/status", timeout=10).json()["sharing"]
    # Evaluated once, on one slot; restored into the other three slots of the pool.
    assert sharing["seeds"] == 1 and sharing["slots"] == 3 and sharing["failed"] == 0, sharing
    assert sharing["tokens"] > len(LONG_SYSTEM) // 2  # the tiny model's byte-level tokens
    for answer in answers:  # every conversation found the prompt cached, wherever it went
        t = answer["timings"]
        assert t["cache_n"] > len(LONG_SYSTEM) // 2 and t["prompt_n"] < 60, t
    served = sorted(i["served"] for i in f.status().values() if i["component"] == "r")
    assert served[0] >= 1  # both replicas took conversations (the seed counts as served too)
    # Every replica holds it now: later conversations go straight on, with no second seed.
    again = first_turn(9)
    assert again["timings"]["cache_n"] > len(LONG_SYSTEM) // 2
    after = httpx.get(f.url + "/admin/status", timeout=10).json()["sharing"]
    assert after["seeds"] == 1
    assert metric(f, "modelfleet_prefix_shares_total") == 1.0
    # The prompt tokens the seed evaluated are counted like any request's.
    evaluated = sum(i["prompt_evaluated"] for i in f.status().values())
    assert evaluated == sharing["tokens"] + sum(x["timings"]["prompt_n"] for x in [*answers, again])
    # The slot file was only a carrier: none is left behind.
    assert not list((f.stack.store.dir / "slots").glob("*/share-*.bin"))

    # A replica that comes back empty gets it from one that holds it; the other's slots are left alone.
    assert f.post("/admin/drain/r[1]").status_code == 200
    assert f.post("/admin/start/r").status_code == 200
    third = first_turn(10)
    assert third["timings"]["cache_n"] > len(LONG_SYSTEM) // 2
    later = httpx.get(f.url + "/admin/status", timeout=10).json()["sharing"]
    assert later["seeds"] == 2 and later["slots"] == 3 + 2, later  # both slots of r[1], none of r[0]
    assert later["tokens"] - sharing["tokens"] < 60  # evaluated where it was cached already


def _agents_on_one_slot(f: Fleet) -> list[tuple[str, int, int]]:
    """Two conversations on one system prompt taking turns on a one-slot server: (name, cache_n, before)
    for each turn, ``before`` being the tokens that conversation's previous request held."""
    histories = {name: [{"role": "system", "content": LONG_SYSTEM}] for name in "AB"}
    held = {"A": 0, "B": 0}
    turns = []
    for turn, name in enumerate("ABABA"):
        history = histories[name]
        history.append({"role": "user", "content": f"agent {name}, step {turn}: the tool printed {turn * 7919}"})
        t = ask(f, history)["timings"]
        turns.append((name, t["cache_n"], held[name]))
        held[name] = t["prompt_n"] + t["cache_n"]
        history.append({"role": "assistant", "content": "ok"})
    return turns


def test_pinned_slots_keep_each_agents_history_when_agents_take_turns(
    door: Callable[..., Fleet], tiny_model: Path
) -> None:
    (port,) = free_ports(1)
    f = door("servers:\n" + srv("m", tiny_model, port, "[chat]", ctx_size=8192, pin_slots="true"))
    assert "--slot-prompt-similarity" in f.stack.specs(["m"])[0].argv
    turns = _agents_on_one_slot(f)
    for _name, cached, before in turns[2:]:  # each comes back whole: only its new message is evaluated
        assert cached >= before - 1, turns
    pins = httpx.get(f.url + "/admin/status", timeout=10).json()["instances"][0]["pinned_slots"]
    assert pins == {"hits": 4, "moves": 0}, pins  # every later turn found the system prompt in slot 0


def test_without_pinned_slots_agents_sharing_a_system_prompt_lose_their_histories(
    door: Callable[..., Fleet], tiny_model: Path
) -> None:
    """Why pinning exists: llama-server's own slot reuse overwrites a conversation that shares half its
    content with the next prompt, without keeping it, so every turn pays the agent's whole history."""
    (port,) = free_ports(1)
    f = door("servers:\n" + srv("m", tiny_model, port, "[chat]", ctx_size=8192, pin_slots="false"))
    turns = _agents_on_one_slot(f)
    for _name, cached, before in turns[2:]:
        assert cached < before - 50, turns  # the cache held the system prompt, not the agent's last turn


def test_a_lone_conversation_keeps_its_slot_on_a_pinning_server_with_several(
    door: Callable[..., Fleet], tiny_model: Path
) -> None:
    (port,) = free_ports(1)
    f = door("servers:\n" + srv("m", tiny_model, port, "[chat]", parallel=2, ctx_size=8192, pin_slots="true"))
    evaluated = [t["prompt_n"] for t in converse(f, 4)]
    # Left to the server with similarity off, turn 2 would go to the other slot and pay everything again.
    assert all(n < evaluated[0] // 3 for n in evaluated[1:]), evaluated


def test_short_or_unshareable_prompts_are_not_seeded(door: Callable[..., Fleet], tiny_model: Path) -> None:
    a, b = free_ports(2)
    # No slot_save: nothing can be restored, so nothing is seeded; a short prompt never is.
    replicas = srv("r", tiny_model, a, "[chat]", parallel=2, ctx_size=8192)
    f = door("servers:\n" + replicas.replace(f"port: {a}", f"ports: [{a}, {b}]"), "pools: [chat]\n", SHARE)
    ask(f, [{"role": "system", "content": LONG_SYSTEM}, {"role": "user", "content": "hi"}])
    ask(f, [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "hi"}])
    assert httpx.get(f.url + "/admin/status", timeout=10).json()["sharing"]["seeds"] == 0


def test_a_restore_saved_under_another_command_line_is_not_used(tmp_path: Path) -> None:
    import asyncio

    from modelfleet import upstream

    slot_dir = tmp_path / "slots"
    slot_dir.mkdir()
    (slot_dir / "warm-0.bin").write_bytes(b"x")
    (slot_dir / warmkv.META).write_text('{"argv": ["llama-server", "-c", "512"], "slots": [0]}')
    target = warmkv.Target("x", "127.0.0.1", 1, 1, slot_dir, ("llama-server", "-c", "1024"))
    out = asyncio.run(warmkv.restore(upstream.Client(), target))
    assert not out.slots and "another command line" in out.detail
    assert not (slot_dir / "warm-0.bin").exists()  # stale files are dropped, not kept around


def test_saved_slots_stay_within_the_cap_oldest_dropped(tmp_path: Path) -> None:
    import os

    for i in range(3):
        p = tmp_path / f"warm-{i}.bin"
        p.write_bytes(b"x" * 1000)
        os.utime(p, (1000 + i, 1000 + i))
    assert warmkv.prune(tmp_path, 2500) == ["warm-0.bin"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["warm-1.bin", "warm-2.bin"]
