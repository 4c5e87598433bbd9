"""Faults survived, on real processes: a start killed by SIGTERM, a damaged state file, a HOT
instance whose restart crashes while loading. Each ends with nothing left running."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from conftest import MODELFLEET, StackFactory, free_ports, stack_cli
from modelfleet.state import StateStore

HTTP_SERVICE = f"[{sys.executable}, -m, http.server, '{{port}}', --bind, 127.0.0.1]"


def _wait(what: str, cond: Callable[[], bool], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(")")[-1].split()[0] == "Z"


def test_sigterm_to_start_rolls_back_what_it_started(cli_stack: Path) -> None:
    (port,) = free_ports(1)
    # A service that never turns healthy: start waits for it until it is told to stop.
    (cli_stack / "stack.yaml").write_text(
        f"services:\n  slow:\n    command: [{sys.executable}, -c, 'import time; time.sleep(120)']\n"
        f"    port: {port}\n    health_timeout_s: 120\napi: {{enabled: false}}\n"
    )
    cmd = [MODELFLEET, "start", "--config", str(cli_stack / "stack.yaml"), "--state-dir", str(cli_stack / "state")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    store = StateStore(cli_stack / "state")
    _wait("the service to be recorded", lambda: store.path.exists() and bool(store.read()))
    (rec,) = store.read().values()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert "stopping the instances this command started" in err
    assert _gone(rec.pid) and store.read() == {}


def test_a_damaged_state_file_is_a_clear_error_and_stop_all_still_stops_everything(cli_stack: Path) -> None:
    a, b = free_ports(2)
    (cli_stack / "stack.yaml").write_text(
        "services:\n"
        f"  web:\n    command: {HTTP_SERVICE}\n    ports: [{a}, {b}]\n    health_path: /\n"
        "api: {enabled: false}\n"
    )
    res = stack_cli(cli_stack, "start")
    assert res.returncode == 0, res.stderr
    store = StateStore(cli_stack / "state")
    pids = {k: r.pid for k, r in store.read().items()}
    raw = json.loads(store.path.read_text())
    raw[f"server_{a}"]["pid"] = "abc"  # unreadable pid: only its port and argv are left to find it by
    raw[f"server_{b}"]["port"] = str(b)  # a string port: still recognisable
    raw["server_1"] = ["not", "an", "object"]
    store.path.write_text(json.dumps(raw))

    status = stack_cli(cli_stack, "status")
    assert status.returncode == 5 and "Traceback" not in status.stderr
    assert f"state entry server_{a} is malformed: pid: must be an integer (got 'abc')" in status.stderr
    assert "server_1 is not an object" in status.stderr and "modelfleet stop --all" in status.stderr

    stopped = stack_cli(cli_stack, "stop", "--all")
    assert stopped.returncode == 0, stopped.stderr
    assert f"found listening on :{a} with the recorded argv" in stopped.stderr
    assert all(_gone(pid) for pid in pids.values())
    assert json.loads(store.path.read_text()) == {}


def test_a_hot_restart_that_crashes_on_load_backs_off_to_failed_then_comes_back(
    cli_stack: Path, tiny_model: Path
) -> None:
    srv, api = free_ports(2)
    model = cli_stack / "model.gguf"
    shutil.copyfile(tiny_model, model)
    (cli_stack / "stack.yaml").write_text(
        f"servers:\n  m:\n    model: {model}\n    port: {srv}\n    roles: [m]\n    threads: 1\n    ctx_size: 512\n"
        "monitor: {interval_s: 0.2, backoff_initial_s: 0.1, backoff_max_s: 0.2, restart_budget: 3}\n"
        f"api: {{port: {api}}}\n"
    )
    res = stack_cli(cli_stack, "start")
    assert res.returncode == 0, res.stderr
    url = f"http://127.0.0.1:{api}"

    def state() -> dict[str, object]:
        view = httpx.get(url + "/admin/status", timeout=10).json()
        return {i["name"]: i for i in view["instances"]}["m"]  # type: ignore[no-any-return]

    _wait("m ready", lambda: state()["state"] == "ready")
    model.write_bytes(b"GGUF but not really a model")  # every load from now on crashes
    os.kill(StateStore(cli_stack / "state").read()[f"server_{srv}"].pid, signal.SIGKILL)
    _wait("m FAILED after its budget", lambda: state()["state"] == "failed")
    detail = str(state()["detail"])
    assert "while loading" in detail and "restart_budget 3" in detail
    assert httpx.post(url + "/v1/chat/completions", json={"model": "m", "messages": []}, timeout=10).status_code == 503

    shutil.copyfile(tiny_model, model)  # the cause is fixed: an admin start brings it back
    started = httpx.post(url + "/admin/start/m", timeout=60)
    assert started.status_code == 200 and started.json()["instances"] == {"m": "ready"}
    chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    assert httpx.post(url + "/v1/chat/completions", json=chat, timeout=30).status_code == 200


@pytest.mark.parametrize("garbage", ["{not json", "[]"])
def test_an_unreadable_state_file_names_itself_and_the_way_out(cli_stack: Path, garbage: str) -> None:
    (cli_stack / "stack.yaml").write_text("services: {}\napi: {enabled: false}\n")
    (cli_stack / "state").mkdir()
    (cli_stack / "state" / "orchestrator_state.json").write_text(garbage)
    res = stack_cli(cli_stack, "status")
    assert res.returncode == 5 and "Traceback" not in res.stderr
    assert "orchestrator_state.json" in res.stderr and "move it aside" in res.stderr
    (cli_stack / "state" / "orchestrator_state.json").unlink()  # moved aside, as the message says


def test_reload_of_the_front_door_under_load_refuses_nothing_and_loses_nothing(
    make_stack: StackFactory, tiny_model: Path
) -> None:
    srv, api = free_ports(2)
    stack = make_stack(
        f"servers:\n  m:\n    model: {tiny_model}\n    port: {srv}\n    roles: [m]\n    parallel: 4\n"
        f"    threads: 1\n    ctx_size: 1024\napi: {{port: {api}, drain_timeout_s: 10}}\n"
    )
    stack.start(stack.select())
    url = f"http://127.0.0.1:{api}/v1/completions"
    body = {"model": "m", "prompt": "hi", "max_tokens": 2}
    before = {r.component: r.pid for r in stack.store.read().values()}
    outcomes: list[str] = []
    reloaded = threading.Event()

    async def client() -> None:
        # A fresh connection per request: every one of them goes through the listening socket.
        limits = httpx.Limits(max_keepalive_connections=0)
        async with httpx.AsyncClient(timeout=30, limits=limits) as http:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and not (reloaded.is_set() and len(outcomes) > 400):
                try:
                    resp = await http.post(url, json=body)
                    outcomes.append(str(resp.status_code))
                except httpx.HTTPError as exc:
                    outcomes.append(type(exc).__name__)

    async def load() -> None:
        await asyncio.gather(*(client() for _ in range(16)))

    runner = threading.Thread(target=asyncio.run, args=(load(),))
    runner.start()
    try:
        _wait("requests flowing", lambda: len(outcomes) > 50)
        first = stack.reload("orchestrator")
        middle = stack.store.read()[f"server_{api}"].pid
        n = len(outcomes)
        _wait("requests flowing through the new front door", lambda: len(outcomes) > n + 50)
        report = stack.reload("orchestrator")  # the successor hands over in turn
        reloaded.set()
    finally:
        runner.join(90)
    after = {r.component: r.pid for r in stack.store.read().values()}
    assert first.started == report.started == ["orchestrator"]
    assert len({before["orchestrator"], middle, after["orchestrator"]}) == 3
    assert after["m"] == before["m"]  # no model was reloaded
    assert _gone(before["orchestrator"]) and _gone(middle)
    failed = [o for o in outcomes if o != "200"]
    assert not failed, f"{len(failed)} of {len(outcomes)} requests failed across the reload: {sorted(set(failed))}"


def test_stop_under_streaming_load_answers_every_client_at_once(make_stack: StackFactory, long_model: Path) -> None:
    srv, api = free_ports(2)
    stack = make_stack(
        f"servers:\n  m:\n    model: {long_model}\n    port: {srv}\n    roles: [m]\n    parallel: 2\n"
        f"    threads: 1\n    ctx_size: 4096\napi: {{port: {api}, queue_wait_s: 60}}\n",
    )
    stack.stop_grace_s = 10.0  # what a user gets: clients must not wait for it
    stack.start(stack.select())
    url = f"http://127.0.0.1:{api}/v1/chat/completions"
    body = {"model": "m", "messages": [{"role": "user", "content": "go"}], "max_tokens": 4000, "stream": True}
    body["ignore_eos"] = True
    results: dict[int, tuple[int, str]] = {}

    def client(i: int) -> None:
        try:
            with httpx.stream("POST", url, json=body, timeout=60) as resp:
                text = "".join(resp.iter_text())
                results[i] = (resp.status_code, text + resp.headers.get("retry-after", ""))
        except httpx.HTTPError as exc:
            results[i] = (0, type(exc).__name__)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(5)]  # 2 streaming, 3 queued
    for t in threads:
        t.start()

    def queued() -> bool:
        view = httpx.get(f"http://127.0.0.1:{api}/admin/status", timeout=10).json()
        return bool(view["pools"]["m"]["queued"] == 3 and view["pools"]["m"]["in_flight"] == 2)

    _wait("2 streams and 3 queued", queued)
    pids = [r.pid for r in stack.store.read().values()]
    t0 = time.monotonic()
    stack.stop()
    took = time.monotonic() - t0
    for t in threads:
        t.join(30)
    assert took < 8, f"stop took {took:.1f} s: clients were left to the grace period"
    streamed = [text for code, text in results.values() if code == 200]
    refused = [(code, text) for code, text in results.values() if code == 503]
    assert len(streamed) == 2 and len(refused) == 3, results
    for text in streamed:  # every stream ends with an error event saying why, then the proper end
        assert "data: " in text and '"code": 503' in text and "shutting down" in text and '"frontdoor"' in text
    for _, text in refused:  # queued: 503 with Retry-After at once
        assert "shutting down" in text and text.endswith("5")
    assert all(_gone(pid) for pid in pids)
