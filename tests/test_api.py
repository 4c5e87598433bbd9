"""The front door on real llama-server pools (tiny generated models), run as a component."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from conftest import StackFactory, free_ports, process_of
from modelfleet import memory
from modelfleet.actions import StackActions
from modelfleet.logs import rotated
from modelfleet.router import Router
from modelfleet.spec import InstanceSpec
from modelfleet.stack import Stack

FAKES = Path(__file__).parent / "fakes"
FAST_MONITOR = "monitor: {interval_s: 0.2, failures_to_eject: 2, backoff_initial_s: 0.2}\n"


class Fleet:
    """A started stack with its front door, and helpers to talk to it."""

    def __init__(self, stack: Stack, port: int, key: str | None = None) -> None:
        self.stack, self.url = stack, f"http://127.0.0.1:{port}"
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}

    def post(self, path: str, body: Any = None, **kw: Any) -> httpx.Response:
        kw.setdefault("headers", self.headers)
        return httpx.post(self.url + path, json=body, timeout=60, **kw)

    def chat(self, model: str | None = None, max_tokens: int = 4, **extra: Any) -> httpx.Response:
        body: dict[str, Any] = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens, **extra}
        if model is not None:
            body["model"] = model
        return self.post("/v1/chat/completions", body)

    def status(self) -> dict[str, dict[str, Any]]:
        resp = httpx.get(self.url + "/admin/status", headers=self.headers, timeout=10)
        assert resp.status_code == 200, resp.text
        return {i["name"]: i for i in resp.json()["instances"]}

    def wait_for(self, what: str, cond: Callable[[], bool], timeout_s: float = 20.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not cond():
            assert time.monotonic() < deadline, f"timed out waiting for {what}: {self.status()}"
            time.sleep(0.05)


@pytest.fixture
def fleet(make_stack: StackFactory) -> Iterator[Callable[..., Fleet]]:
    def start(
        servers_yaml: str, extra: str = "", api_extra: str = "", key: str | None = None, monitor: str = FAST_MONITOR
    ) -> Fleet:
        (api_port,) = free_ports(1)
        text = servers_yaml + extra + monitor + f"api: {{port: {api_port}{api_extra}}}\n"
        stack = make_stack(text)
        stack.start(stack.select())
        return Fleet(stack, api_port, key)

    yield start


def srv(name: str, model: Path, port: int, roles: str, **fields: object) -> str:
    lines = [f"  {name}:", f"    model: {model}", f"    port: {port}", f"    roles: {roles}", "    threads: 1"]
    fields.setdefault("ctx_size", 1024)
    lines += [f"    {k}: {v}" for k, v in fields.items()]
    return "\n".join(lines) + "\n"


def test_routes_by_role_alias_task_type_header_and_default(fleet: Callable[..., Fleet], tiny_model: Path) -> None:
    a, b = free_ports(2)
    f = fleet(
        "servers:\n"
        + srv("coder", tiny_model, a, "[worker_coder]")
        + srv("explorer", tiny_model, b, "[worker_explore]"),
        extra="aliases: {worker_code: worker_coder}\n"
        "task_types: {explore: worker_explore, code_impl: worker_coder}\n"
        "default_role: worker_explore\n",
    )
    assert f.chat("worker_coder").json()["model"] == "coder"
    assert f.chat("worker_code").json()["model"] == "coder"  # alias
    assert f.chat("explore").json()["model"] == "explorer"  # task type
    assert f.chat().json()["model"] == "explorer"  # default role
    resp = f.post(
        "/v1/chat/completions",
        {"model": "worker_explore", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2},
        headers={"X-Task-Type": "code_impl"},
    )
    assert resp.json()["model"] == "coder"  # the header chooses instead of the body

    # The native llama-server routes go through the same resolution.
    tok = f.post("/tokenize", {"model": "code_impl", "content": "hello"})
    assert tok.status_code == 200 and len(tok.json()["tokens"]) == 5

    unknown = f.chat("gpt-4o")
    assert unknown.status_code == 404
    err = unknown.json()["error"]
    assert err["type"] == "not_found_error" and err["source"] == "frontdoor"
    assert "valid names: code_impl, explore, worker_code, worker_coder, worker_explore" in err["message"]

    models = {m["id"]: m for m in httpx.get(f.url + "/v1/models", timeout=10).json()["data"]}
    assert set(models) == {"worker_coder", "worker_explore", "worker_code", "explore", "code_impl"}
    assert models["worker_code"]["kind"] == "alias" and models["worker_code"]["role"] == "worker_coder"
    assert models["explore"]["state"] == "ready"
    assert models["code_impl"]["instances"] == [{"name": "coder", "tier": "hot", "state": "ready", "port": a}]
    ready = httpx.get(f.url + "/ready", timeout=10)
    assert ready.status_code == 200 and ready.json()["roles"] == {"worker_coder": "ready", "worker_explore": "ready"}


def test_streaming_arrives_chunk_by_chunk(fleet: Callable[..., Fleet], tiny_model: Path) -> None:
    (a,) = free_ports(1)
    f = fleet("servers:\n" + srv("gen", tiny_model, a, "[gen]", ctx_size=4096))
    body = {"model": "gen", "stream": True, "max_tokens": 1500, "messages": [{"role": "user", "content": "go"}]}
    arrivals: list[float] = []
    t0 = time.perf_counter()
    with httpx.stream("POST", f.url + "/v1/chat/completions", json=body, timeout=60) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        text = b""
        for chunk in resp.iter_raw():
            arrivals.append(time.perf_counter() - t0)
            text += chunk
    total = arrivals[-1]
    assert text.count(b"data: ") > 1000 and text.rstrip().endswith(b"data: [DONE]")
    assert len(arrivals) > 20, "the stream was buffered into a few big pieces"
    assert arrivals[0] < total / 3, f"first bytes at {arrivals[0]:.3f} s of {total:.3f} s: buffered"


def test_balancing_spreads_concurrent_requests_over_the_pool(fleet: Callable[..., Fleet], tiny_model: Path) -> None:
    a, b = free_ports(2)
    f = fleet(
        "servers:\n"
        + srv("left", tiny_model, a, "[pool]", parallel=1)
        + srv("right", tiny_model, b, "[pool]", parallel=1),
        extra="pools: [pool]\n",
    )

    async def burst() -> list[str]:
        async with httpx.AsyncClient(timeout=60) as client:
            # Every answer runs to max_tokens, so no backend is freed early by a short random answer.
            messages = [{"role": "user", "content": "x"}]
            body = {"model": "pool", "max_tokens": 200, "ignore_eos": True, "messages": messages}
            rs = await asyncio.gather(*(client.post(f.url + "/v1/chat/completions", json=body) for _ in range(6)))
        assert all(r.status_code == 200 for r in rs), [r.text for r in rs]
        return [r.json()["model"] for r in rs]

    served = asyncio.run(burst())
    assert served.count("left") >= 2 and served.count("right") >= 2, served


def test_queue_full_gets_429_and_a_long_wait_503(fleet: Callable[..., Fleet], long_model: Path) -> None:
    (a,) = free_ports(1)
    f = fleet(
        "servers:\n" + srv("solo", long_model, a, "[solo]", parallel=1, ctx_size=32768),
        api_extra=", queue_max: 1, queue_wait_s: 0.5",
    )
    body = {"model": "solo", "stream": True, "max_tokens": 30000, "messages": [{"role": "user", "content": "x"}]}
    with httpx.Client(timeout=60) as client, client.stream("POST", f.url + "/v1/chat/completions", json=body) as busy:
        assert busy.status_code == 200
        held = busy.iter_raw()  # keep a reference: a collected iterator closes the stream
        next(held)  # the only slot is taken; we stop reading, so it stays busy

        async def two_more() -> tuple[httpx.Response, httpx.Response]:
            async with httpx.AsyncClient(timeout=30) as ac:
                waiting = asyncio.create_task(ac.post(f.url + "/v1/chat/completions", json={**body, "stream": False}))
                await asyncio.sleep(0.2)  # let the first one take the only place in line
                rejected = await ac.post(f.url + "/v1/chat/completions", json={**body, "stream": False})
                return rejected, await waiting

        rejected, timed_out = asyncio.run(two_more())
    assert rejected.status_code == 429 and rejected.headers["retry-after"] == "1", (rejected.text, timed_out.text)
    assert rejected.json()["error"]["type"] == "rate_limit_error"
    assert timed_out.status_code == 503 and "retry-after" in timed_out.headers
    assert "within 0.5 s" in timed_out.json()["error"]["message"]
    f.wait_for("the slot to be freed", lambda: f.status()["solo"]["in_flight"] == 0)


def test_warm_expansion_and_idle_shutdown(fleet: Callable[..., Fleet], long_model: Path) -> None:
    a, b = free_ports(2)
    f = fleet(
        "servers:\n"
        + srv("base", long_model, a, "[worker]", parallel=1, ctx_size=32768)
        + srv("extra", long_model, b, "[worker]", parallel=1, ctx_size=32768, tier="warm"),
        extra="pools: [worker]\nworker_pool: {expansion_threshold: 1, warm_timeout_s: 1.0}\n",
    )
    assert f.status()["extra"]["state"] == "stopped"
    body = {"model": "worker", "stream": True, "max_tokens": 30000, "messages": [{"role": "user", "content": "x"}]}
    with httpx.Client(timeout=60) as c1, httpx.Client(timeout=60) as c2:  # noqa: SIM117 - the second starts later
        with c1.stream("POST", f.url + "/v1/chat/completions", json=body) as first:
            held_first = first.iter_raw()
            next(held_first)
            # Load 2 > threshold 1: a WARM instance starts and takes the waiting request.
            with c2.stream("POST", f.url + "/v1/chat/completions", json=body) as second:
                assert second.status_code == 200
                held_second = second.iter_raw()
                next(held_second)
                st = f.status()
                assert st["extra"]["state"] == "ready" and st["extra"]["in_flight"] == 1
                assert st["base"]["in_flight"] == 1
    metrics = httpx.get(f.url + "/metrics", timeout=10).text
    assert 'modelfleet_warm_starts_total{instance="extra"} 1.0' in metrics
    # Idle for warm_timeout_s: drained and stopped; HOT stays.
    f.wait_for("the idle WARM instance to stop", lambda: f.status()["extra"]["state"] == "stopped")
    assert f.status()["base"]["state"] == "ready"
    assert f"server_{b}" not in f.stack.store.read()
    assert 'modelfleet_idle_stops_total{instance="extra"} 1.0' in httpx.get(f.url + "/metrics", timeout=10).text


def test_request_for_a_stopped_warm_role_starts_it_and_waits(fleet: Callable[..., Fleet], tiny_model: Path) -> None:
    a, b = free_ports(2)
    f = fleet("servers:\n" + srv("hot", tiny_model, a, "[main]") + srv("lazy", tiny_model, b, "[lazy]", tier="cold"))
    assert f.status()["lazy"]["state"] == "stopped"
    resp = f.chat("lazy")
    assert resp.status_code == 200 and resp.json()["model"] == "lazy"
    assert f.status()["lazy"]["state"] == "ready"


def test_kill_9_of_a_hot_instance_under_load_is_healed(fleet: Callable[..., Fleet], tiny_model: Path) -> None:
    a, b = free_ports(2)
    f = fleet(
        "servers:\n"
        + srv("rep0", tiny_model, a, "[pool]", parallel=2)
        + srv("rep1", tiny_model, b, "[pool]", parallel=2),
        extra="pools: [pool]\n",
    )
    victim = f.stack.store.read()[f"server_{a}"].pid

    async def load(seconds: float) -> list[int]:
        codes: list[int] = []
        deadline = time.monotonic() + seconds
        async with httpx.AsyncClient(timeout=30) as client:
            body = {"model": "pool", "max_tokens": 16, "messages": [{"role": "user", "content": "x"}]}

            async def worker() -> None:
                while time.monotonic() < deadline:
                    codes.append((await client.post(f.url + "/v1/chat/completions", json=body)).status_code)

            async def killer() -> None:
                await asyncio.sleep(seconds / 3)
                os.kill(victim, signal.SIGKILL)

            await asyncio.gather(worker(), worker(), killer())
        return codes

    codes = asyncio.run(load(3.0))
    assert len(codes) > 20 and codes.count(200) == len(codes), sorted(set(codes))
    f.wait_for("the restart", lambda: f.status()["rep0"]["restarts"] == 1 and f.status()["rep0"]["state"] == "ready")
    new = f.stack.store.read()[f"server_{a}"]
    assert new.pid != victim and process_of(new) is not None
    assert f.chat("pool").status_code == 200


def test_restart_budget_spent_marks_failed_and_the_pool_keeps_serving(
    fleet: Callable[..., Fleet], tiny_model: Path
) -> None:
    a, b = free_ports(2)
    f = fleet(
        "servers:\n" + srv("flaky", tiny_model, a, "[pool]") + srv("steady", tiny_model, b, "[pool]"),
        extra="pools: [pool]\n",
        monitor="monitor: {interval_s: 0.2, backoff_initial_s: 0.1, restart_budget: 1, restart_window_s: 600}\n",
    )
    os.kill(f.stack.store.read()[f"server_{a}"].pid, signal.SIGKILL)
    f.wait_for(
        "the first restart", lambda: f.status()["flaky"]["restarts"] == 1 and f.status()["flaky"]["state"] == "ready"
    )
    os.kill(f.stack.store.read()[f"server_{a}"].pid, signal.SIGKILL)
    f.wait_for("FAILED", lambda: f.status()["flaky"]["state"] == "failed")
    assert "not restarting" in f.status()["flaky"]["detail"]
    for _ in range(5):
        resp = f.chat("pool")
        assert resp.status_code == 200 and resp.json()["model"] == "steady"
    models = {m["id"]: m for m in httpx.get(f.url + "/v1/models", timeout=10).json()["data"]}
    assert {i["name"]: i["state"] for i in models["pool"]["instances"]} == {"flaky": "failed", "steady": "ready"}


def test_reload_orchestrator_keeps_every_model_pid(fleet: Callable[..., Fleet], tiny_model: Path) -> None:
    a, b = free_ports(2)
    f = fleet("servers:\n" + srv("one", tiny_model, a, "[one]") + srv("two", tiny_model, b, "[two]"))
    before = {k: r.pid for k, r in f.stack.store.read().items()}
    f.stack.reload("orchestrator")
    after = {k: r.pid for k, r in f.stack.store.read().items()}
    api_key = next(k for k, r in f.stack.store.read().items() if r.component == "orchestrator")
    assert after[api_key] != before[api_key]
    assert {k: p for k, p in after.items() if k != api_key} == {k: p for k, p in before.items() if k != api_key}
    assert f.chat("one").status_code == 200 and f.chat("two").status_code == 200
    assert f.status()["one"]["state"] == "ready"  # adopted, not reloaded


def test_backend_hanging_mid_stream_is_cut_off_and_its_slot_freed(fleet: Callable[..., Fleet]) -> None:
    (a,) = free_ports(1)
    f = fleet(
        f"""services:
  hang:
    command: ["{sys.executable}", "{FAKES / "hang_midstream.py"}", "{{port}}"]
    port: {a}
    roles: [hang]
""",
        api_extra=", request_timeout_s: 1.0",
    )
    t0 = time.monotonic()
    body = {"model": "hang", "stream": True, "messages": []}
    data = b""
    with httpx.stream("POST", f.url + "/v1/chat/completions", json=body, timeout=30) as resp:
        assert resp.status_code == 200
        for chunk in resp.iter_raw():
            data += chunk
    # The client got what the backend sent, then an error event (not [DONE]) and the stream's proper end.
    assert b"first" in data and b"[DONE]" not in data
    last = json.loads(data.rstrip().rsplit(b"\n\n", 1)[-1].removeprefix(b"data: "))
    assert last["error"]["type"] == "timeout_error" and last["error"]["source"] == "backend"
    assert time.monotonic() - t0 < 10
    f.wait_for("the slot to be released", lambda: f.status()["hang"]["in_flight"] == 0)


def test_admin_stop_drains_then_kills_a_backend_that_ignores_sigterm(fleet: Callable[..., Fleet]) -> None:
    (a,) = free_ports(1)
    f = fleet(
        f"""services:
  stubborn:
    command: ["{sys.executable}", "{FAKES / "stubborn.py"}", "{{port}}"]
    port: {a}
    roles: [stub]
""",
        api_extra=", stop_grace_s: 0.5",
    )
    pid = f.stack.store.read()[f"server_{a}"].pid
    resp = f.post("/admin/stop/stubborn")
    assert resp.status_code == 200 and resp.json()["instances"] == {"stubborn": "stopped"}
    assert f"server_{a}" not in f.stack.store.read()
    f.stack.reap()  # this test process started it, so it is ours to reap
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_api_and_admin_keys(fleet: Callable[..., Fleet], tiny_model: Path) -> None:
    (a,) = free_ports(1)
    f = fleet("servers:\n" + srv("m", tiny_model, a, "[m]"), api_extra=", api_key: sekrit, admin_key: boss")
    f.headers = {}
    denied = f.chat("m")
    assert denied.status_code == 401 and denied.json()["error"]["type"] == "authentication_error"
    assert (
        f.post(
            "/v1/chat/completions",
            {"model": "m", "messages": [], "max_tokens": 1},
            headers={"Authorization": "Bearer sekrit"},
        ).status_code
        == 200
    )
    assert httpx.get(f.url + "/health", timeout=5).status_code == 200  # liveness needs no key
    assert httpx.get(f.url + "/admin/status", headers={"Authorization": "Bearer sekrit"}, timeout=5).status_code == 401
    assert httpx.get(f.url + "/admin/status", headers={"Authorization": "Bearer boss"}, timeout=5).status_code == 200


def test_bad_requests_get_4xx_without_touching_a_backend(fleet: Callable[..., Fleet], tiny_model: Path) -> None:
    (a,) = free_ports(1)
    f = fleet("servers:\n" + srv("m", tiny_model, a, "[m]"), api_extra=", max_body_bytes: 2048")
    url = f.url + "/v1/chat/completions"
    cases = [
        (httpx.post(url, content=b"{not json", timeout=10), 400, "not valid JSON"),
        (httpx.post(url, content=b"[1, 2]", timeout=10), 400, "must be a JSON object"),
        (httpx.post(url, json={"model": 7}, timeout=10), 400, "'model' must be a string"),
        (httpx.post(url, json={"model": "m", "pad": "x" * 4096}, timeout=10), 413, "max_body_bytes"),
        (httpx.get(url, timeout=10), 405, "Method Not Allowed"),
        (httpx.post(f.url + "/v1/nope", json={}, timeout=10), 404, "Not Found"),
    ]
    for resp, code, fragment in cases:
        assert resp.status_code == code, resp.text
        assert fragment in resp.json()["error"]["message"]
        assert resp.json()["error"]["source"] == "frontdoor"
    assert f.status()["m"]["served"] == 0


def test_client_disconnect_cancels_the_upstream_and_frees_the_slot(
    fleet: Callable[..., Fleet], long_model: Path
) -> None:
    (a,) = free_ports(1)
    f = fleet("servers:\n" + srv("m", long_model, a, "[m]", parallel=1, ctx_size=32768))
    body = {"model": "m", "stream": True, "max_tokens": 30000, "messages": [{"role": "user", "content": "x"}]}
    with httpx.stream("POST", f.url + "/v1/chat/completions", json=body, timeout=30) as resp:
        next(resp.iter_raw())

    # llama-server itself reports the slot idle again, long before 8000 tokens could be generated.
    def idle() -> bool:
        slots = httpx.get(f"http://127.0.0.1:{a}/slots", timeout=5).json()
        return not any(s["is_processing"] for s in slots)

    f.wait_for("llama-server to free the slot", idle, timeout_s=10)
    f.wait_for("the front door to free the slot", lambda: f.status()["m"]["in_flight"] == 0)
    assert f.chat("m").status_code == 200


def test_a_client_gone_before_its_answer_began_is_not_worked_on(fleet: Callable[..., Fleet], long_model: Path) -> None:
    (a,) = free_ports(1)
    f = fleet("servers:\n" + srv("m", long_model, a, "[m]", parallel=1, ctx_size=32768))
    port = int(f.url.rsplit(":", 1)[1])
    long = json.dumps({"model": "m", "max_tokens": 30000, "messages": [{"role": "user", "content": "x"}]})

    def busy() -> bool:
        return any(s["is_processing"] for s in httpx.get(f"http://127.0.0.1:{a}/slots", timeout=5).json())

    # One client waits for a whole (non-streamed) long answer, a second queues behind it; both leave.
    working = socket.create_connection(("127.0.0.1", port), timeout=30)
    working.sendall(_raw_request("/v1/chat/completions", long.encode()))
    f.wait_for("the first request to reach llama-server", busy)
    queued = socket.create_connection(("127.0.0.1", port), timeout=30)
    queued.sendall(_raw_request("/v1/chat/completions", long.encode()))
    f.wait_for("the second request to queue", lambda: f.status()["m"]["queued"] == 1)
    queued.close()
    f.wait_for("the queued request to leave the line", lambda: f.status()["m"]["queued"] == 0)
    working.close()
    f.wait_for("the front door to free the slot", lambda: f.status()["m"]["in_flight"] == 0)
    # llama-server notices a dropped non-streamed request when a second passes with no result for
    # any task (every /slots call is one), so look seldom; it stops long before 30000 tokens.
    for _ in range(8):
        time.sleep(1.5)
        if not busy():
            break
    else:
        raise AssertionError("llama-server kept generating for a client that had left")
    assert f.status()["m"]["served"] == 1  # the queued request never reached it
    assert f.chat("m").status_code == 200


def test_metrics_per_role_and_instance(fleet: Callable[..., Fleet], tiny_model: Path) -> None:
    (a,) = free_ports(1)
    f = fleet("servers:\n" + srv("m", tiny_model, a, "[m]"))
    assert f.chat("m", max_tokens=5).status_code == 200
    text = httpx.get(f.url + "/metrics", timeout=10).text
    assert 'modelfleet_requests_total{code="200",instance="m",role="m"} 1.0' in text
    assert 'modelfleet_tokens_generated_total{instance="m",role="m"} 5.0' in text
    assert 'modelfleet_time_to_first_token_seconds_count{instance="m",role="m"} 1.0' in text
    assert 'modelfleet_instance_up{instance="m",state="ready"} 1.0' in text
    assert 'modelfleet_in_flight{instance="m",role="m"} 0.0' in text


def test_checkpoint_routes_create_list_and_restore_a_config_change(
    fleet: Callable[..., Fleet], tiny_model: Path, make_stack: StackFactory
) -> None:
    (a,) = free_ports(1)
    f = fleet("servers:\n" + srv("m", tiny_model, a, "[m]", parallel=1))
    cfg_file = Path(f.stack.cfg.source or "")
    original = cfg_file.read_text()

    # A checkpoint of a changed config: 2 slots and an alias the running front door does not know.
    cfg_file.write_text(original.replace("parallel: 1", "parallel: 2") + "aliases: {mm: m}\n")
    make_stack(cfg_file.read_text(), state_dir=f.stack.store.dir).reload("m")
    created = f.post("/admin/checkpoints", {"name": "with_alias"})
    assert created.status_code == 201, created.text
    cp_id = created.json()["id"]
    listed = httpx.get(f.url + "/admin/checkpoints", timeout=10).json()["checkpoints"]
    assert [c["id"] for c in listed] == [cp_id] and listed[0]["problems"] == []

    # Back to the original on disk, then restore the checkpoint through the front door.
    cfg_file.write_text(original)
    make_stack(original, state_dir=f.stack.store.dir).reload("m")
    assert f.chat("mm").status_code == 404
    door = httpx.get(f.url + "/admin/status", timeout=10).json()["front_door"]
    restored = f.post(f"/admin/checkpoints/{cp_id}")
    assert restored.status_code == 200, restored.text
    body = restored.json()
    assert body["reloaded"] == ["m"] and body["config_written"] is True
    assert "parallel: 2" in cfg_file.read_text()
    assert httpx.get(f"http://127.0.0.1:{a}/props", timeout=10).json()["total_slots"] == 2

    # Applied in-process: the same front door (no re-exec), the alias routes at once, 2 slots counted.
    assert httpx.get(f.url + "/admin/status", timeout=10).json()["front_door"] == door
    assert f.status()["m"]["state"] == "ready" and f.status()["m"]["slots"] == 2
    resp = f.chat("mm")
    assert resp.status_code == 200 and resp.json()["model"] == "m"
    assert f.post("/admin/checkpoints/../etc").status_code == 404
    bad = f.post("/admin/checkpoints/nope_20260101_000000")
    assert bad.status_code == 404 and "nope_20260101_000000" in bad.json()["error"]["message"]


def test_warm_start_that_does_not_fit_in_memory_is_refused_with_the_reason(
    fleet: Callable[..., Fleet], tiny_model: Path
) -> None:
    a, b = free_ports(2)
    f = fleet(
        "servers:\n" + srv("hot", tiny_model, a, "[main]") + srv("big", tiny_model, b, "[big]", tier="warm"),
        extra="memory: {min_free_gb: 100000}\n",  # nothing can fit beside 100 TB kept free
    )
    resp = f.chat("big")
    assert resp.status_code == 503 and "retry-after" in resp.headers
    msg = resp.json()["error"]["message"]
    assert "cannot start big: not enough memory" in msg and "available" in msg
    assert f.status()["big"]["state"] == "stopped" and f"server_{b}" not in f.stack.store.read()
    assert f.chat("main").status_code == 200  # nothing else disturbed


def test_requests_arriving_together_for_a_stopped_warm_role_admit_and_start_it_once(
    make_stack: StackFactory, tiny_model: Path
) -> None:
    (a,) = free_ports(1)
    stack = make_stack("servers:\n" + srv("w", tiny_model, a, "[w]", tier="warm", parallel=4))
    admitted: list[str] = []

    class SlowAdmission(StackActions):
        async def admit(self, spec: InstanceSpec, idle: Sequence[memory.IdleInstance]) -> memory.Admission:
            admitted.append(spec.name)
            await asyncio.sleep(0.3)  # the requests below all arrive while this one is being decided
            return await super().admit(spec, idle)

    async def main() -> None:
        router = Router(stack.cfg, stack)
        router.actions = router.capacity.actions = router.supervisor.actions = SlowAdmission(stack, router.client)
        pool = router.resolve("w")
        leases = await asyncio.gather(*(router.lease(pool) for _ in range(3)))
        assert [lease.instance.name for lease in leases] == ["w"] * 3
        for lease in leases:
            lease.release()
        await router.close()

    asyncio.run(main())
    assert admitted == ["w"]


def test_the_monitor_rotates_a_running_instance_log(fleet: Callable[..., Fleet], tiny_model: Path) -> None:
    (a,) = free_ports(1)
    f = fleet("servers:\n" + srv("m", tiny_model, a, "[m]"), extra="logs: {max_mb: 0.05, keep: 2}\n")
    log = Path(f.stack.store.read()[f"server_{a}"].log_file)
    for _ in range(300):
        if rotated(log, 1).exists():
            break
        assert f.chat("m").status_code == 200  # each request logs a few kB at verbosity 4
    else:
        raise AssertionError(f"{log} was never rotated")
    copies = [rotated(log, n).read_bytes() for n in (1, 2) if rotated(log, n).exists()]
    assert copies[-1].startswith(b"--- modelfleet: starting m")
    assert not rotated(log, 3).exists()
    assert f.chat("m").status_code == 200
    f.wait_for("llama-server to log into the emptied file", lambda: b"srv" in log.read_bytes())
    assert log.stat().st_size < 1024 * 1024 and b"\0" not in log.read_bytes()


# --- the front door's own HTTP/1.1 path (wire.FrontDoorProtocol) -----------------------------


def _raw_request(path: str, body: bytes, extra: str = "", method: str = "POST", version: str = "1.1") -> bytes:
    head = f"{method} {path} HTTP/{version}\r\nHost: x\r\nContent-Type: application/json\r\n{extra}"
    if "Transfer-Encoding" not in extra:
        head += f"Content-Length: {len(body)}\r\n"
    return head.encode() + b"\r\n" + body


def _read_response(sock: socket.socket, buf: bytearray) -> tuple[bytes, dict[str, str], bytes]:
    """One response off the socket (Content-Length or chunked); ``buf`` keeps what follows it."""

    def more() -> None:
        data = sock.recv(65536)
        assert data, f"connection closed early; had {bytes(buf)!r}"
        buf.extend(data)

    while b"\r\n\r\n" not in buf:
        more()
    head, _, rest = bytes(buf).partition(b"\r\n\r\n")
    buf[:] = rest
    status, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines)}
    if "content-length" in headers:
        while len(buf) < int(headers["content-length"]):
            more()
        n = int(headers["content-length"])
        body = bytes(buf[:n])
        del buf[:n]
        return status.encode(), headers, body
    assert headers.get("transfer-encoding") == "chunked", headers
    body = b""
    while True:
        while b"\r\n" not in buf:
            more()
        size_line, _, _ = bytes(buf).partition(b"\r\n")
        size = int(size_line, 16)
        while len(buf) < len(size_line) + 2 + size + 2:
            more()
        body += bytes(buf[len(size_line) + 2 : len(size_line) + 2 + size])
        del buf[: len(size_line) + 2 + size + 2]
        if size == 0:
            return status.encode(), headers, body


def _tokenize(content: str) -> bytes:
    return json.dumps({"model": "m", "content": content}).encode()


def test_one_connection_mixes_model_routes_other_routes_and_pipelined_requests(
    fleet: Callable[..., Fleet], tiny_model: Path
) -> None:
    (a,) = free_ports(1)
    f = fleet("servers:\n" + srv("m", tiny_model, a, "[m]"))
    port = int(f.url.rsplit(":", 1)[1])
    direct = [httpx.post(f"http://127.0.0.1:{a}/tokenize", json={"content": c}).json() for c in ("one", "two two")]
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        buf = bytearray()
        # Keep-alive across a model route, another route and a model route again.
        sock.sendall(_raw_request("/tokenize", _tokenize("one")))
        status, _, body = _read_response(sock, buf)
        assert status.startswith(b"HTTP/1.1 200") and json.loads(body) == direct[0]
        sock.sendall(_raw_request("/health", b"", method="GET"))
        status, _, body = _read_response(sock, buf)
        assert status.startswith(b"HTTP/1.1 200") and json.loads(body)["status"] == "ok"
        # Two requests sent together are answered in order.
        sock.sendall(_raw_request("/tokenize", _tokenize("one")) + _raw_request("/tokenize", _tokenize("two two")))
        answers = [_read_response(sock, buf) for _ in range(2)]
        assert [json.loads(body) for _, _, body in answers] == direct
        # A chunked request body is read whole; a stream goes back chunked.
        chat = json.dumps({"model": "m", "stream": True, "max_tokens": 4, "messages": []}).encode()
        framed = b"%x\r\n%b\r\n0\r\n\r\n" % (len(chat), chat)
        sock.sendall(_raw_request("/v1/chat/completions", framed, "Transfer-Encoding: chunked\r\n"))
        status, headers, body = _read_response(sock, buf)
        assert status.startswith(b"HTTP/1.1 200") and headers["transfer-encoding"] == "chunked"
        assert body.rstrip().endswith(b"data: [DONE]")
        # Expect: 100-continue is answered, then the request.
        body = _tokenize("three")
        sock.sendall(_raw_request("/tokenize", body, "Expect: 100-continue\r\n")[: -len(body)])
        while b"\r\n\r\n" not in buf:
            buf.extend(sock.recv(65536))
        assert bytes(buf).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        del buf[:25]
        sock.sendall(body)
        status, _, got = _read_response(sock, buf)
        assert status.startswith(b"HTTP/1.1 200") and json.loads(got)["tokens"]
    assert f.status()["m"]["served"] == 5


def test_a_large_body_in_small_pieces_is_read_whole(fleet: Callable[..., Fleet], tiny_model: Path) -> None:
    (a,) = free_ports(1)
    f = fleet("servers:\n" + srv("m", tiny_model, a, "[m]", ctx_size=8192))
    port = int(f.url.rsplit(":", 1)[1])
    body = json.dumps({"model": "m", "tokens": [42] * 40_000}).encode()  # 160 kB: past uvicorn's 64 kB read pause
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        request = _raw_request("/detokenize", body)
        for i in range(0, len(request), 8192):
            sock.sendall(request[i : i + 8192])
        status, _, got = _read_response(sock, bytearray())
    assert status.startswith(b"HTTP/1.1 200"), got
    direct = httpx.post(f"http://127.0.0.1:{a}/detokenize", content=body, timeout=30).json()
    assert json.loads(got) == direct and len(direct["content"]) >= 40_000


def test_http_1_0_and_oversized_chunked_bodies_close_the_connection(
    fleet: Callable[..., Fleet], tiny_model: Path
) -> None:
    (a,) = free_ports(1)
    f = fleet("servers:\n" + srv("m", tiny_model, a, "[m]"), api_extra=", max_body_bytes: 4096")
    port = int(f.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(_raw_request("/tokenize", _tokenize("one"), version="1.0"))
        status, headers, _ = _read_response(sock, bytearray())
        assert status.startswith(b"HTTP/1.1 200") and headers["connection"] == "close"
        assert sock.recv(100) == b""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        chunk = b"x" * 3000
        sock.sendall(_raw_request("/tokenize", b"", "Transfer-Encoding: chunked\r\n"))
        for _ in range(3):
            sock.sendall(b"%x\r\n%b\r\n" % (len(chunk), chunk))
        status, headers, body = _read_response(sock, bytearray())
        assert status.startswith(b"HTTP/1.1 413") and "max_body_bytes" in json.loads(body)["error"]["message"]
        assert headers["connection"] == "close"
    assert f.status()["m"]["served"] == 1
