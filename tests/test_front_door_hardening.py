"""The front door against client mistakes and failing backends: never a 500 of its own, never
a slot left taken. Real llama-server pools (tiny models) and, for faults a real one cannot
show on demand, tests/fakes/scripted.py."""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from conftest import StackFactory, config_from, free_ports
from modelfleet import api
from modelfleet.stack import Stack
from test_api import FAKES, FAST_MONITOR, Fleet, _raw_request, srv


@pytest.fixture
def fleet(make_stack: StackFactory) -> Iterator[Callable[..., Fleet]]:
    def start(
        servers_yaml: str, extra: str = "", api_extra: str = "", key: str | None = None, monitor: str = FAST_MONITOR
    ) -> Fleet:
        (api_port,) = free_ports(1)
        stack = make_stack(servers_yaml + extra + monitor + f"api: {{port: {api_port}{api_extra}}}\n")
        stack.start(stack.select())
        return Fleet(stack, api_port, key)

    yield start


def scripted(name: str, port: int, roles: str, marker: Path) -> str:
    return (
        f"  {name}:\n"
        f'    command: ["{sys.executable}", "{FAKES / "scripted.py"}", "{{port}}", "{marker}"]\n'
        f"    port: {port}\n    roles: {roles}\n"
    )


def port_of(f: Fleet) -> int:
    return int(f.url.rsplit(":", 1)[1])


def in_flight(f: Fleet) -> dict[str, int]:
    return {name: i["in_flight"] + i["queued"] for name, i in f.status().items()}


def backend_error(resp: httpx.Response) -> dict[str, Any]:
    error: dict[str, Any] = resp.json()["error"]
    assert error["source"] == "backend", resp.text
    return error


def frontdoor_error(resp: httpx.Response, status: int) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    error: dict[str, Any] = resp.json()["error"]
    assert error["source"] == "frontdoor" and error["code"] == status
    return error


# --- client mistakes ------------------------------------------------------------------------


def test_a_non_latin_1_upstream_path_is_forwarded_encoded_and_frees_its_slot(
    fleet: Callable[..., Fleet], tiny_model: Path
) -> None:
    (a,) = free_ports(1)
    f = fleet("servers:\n" + srv("m", tiny_model, a, "[m]", parallel=2), api_extra=", queue_wait_s: 2")
    for _ in range(3):  # more than the role's two slots: a leaked slot shows as a 503
        resp = httpx.get(f.url + "/upstream/m/%E2%82%AC", timeout=10)
        assert resp.status_code == 404, resp.text
    f.wait_for("every slot to be free", lambda: in_flight(f) == {"m": 0}, timeout_s=5)
    assert f.chat("m").status_code == 200


def test_upstream_paths_are_percent_encoded_and_control_bytes_refused(
    fleet: Callable[..., Fleet], tmp_path: Path
) -> None:
    (a,) = free_ports(1)
    f = fleet("services:\n" + scripted("echo", a, "[echo]", tmp_path / "marker"))

    def line(path: str) -> str:
        resp = httpx.get(f.url + path, timeout=10)
        assert resp.status_code == 200, resp.text
        return str(resp.json()["request_line"])

    assert (
        line("/upstream/echo/echo/caf%C3%A9/%E2%82%AC?x=1&y=%20") == "GET /echo/caf%C3%A9/%E2%82%AC?x=1&y=%20 HTTP/1.1"
    )
    assert line("/upstream/echo/echo/a%3Fb%23c%25d") == "GET /echo/a%3Fb%23c%25d HTTP/1.1"  # never a query or fragment
    for bad in ("%0D%0AX-Injected:%201", "%0A", "%00", "%09", "%20", "%7F", "a%20b"):
        resp = httpx.get(f.url + "/upstream/echo/echo/" + bad, timeout=10)
        assert "control character" in frontdoor_error(resp, 400)["message"]
    assert in_flight(f) == {"echo": 0}


def test_deeply_nested_json_is_a_400_on_model_and_admin_routes(fleet: Callable[..., Fleet], tiny_model: Path) -> None:
    (a,) = free_ports(1)
    f = fleet("servers:\n" + srv("m", tiny_model, a, "[m]"))
    for depth in (1_000, 100_000):
        deep = ('{"a":' * depth + "1" + "}" * depth).encode()
        for path in ("/v1/chat/completions", "/tokenize", "/admin/checkpoints"):
            resp = httpx.post(f.url + path, content=deep, timeout=10)
            assert "nested too deeply" in frontdoor_error(resp, 400)["message"]
    assert f.status()["m"]["served"] == 0


def test_a_trailing_slash_is_not_redirected_to_the_host_header(fleet: Callable[..., Fleet], tiny_model: Path) -> None:
    (a,) = free_ports(1)
    f = fleet("servers:\n" + srv("m", tiny_model, a, "[m]"))
    for method, path in (("GET", "/v1/models/"), ("POST", "/v1/chat/completions/"), ("GET", "/health/")):
        resp = httpx.request(method, f.url + path, headers={"Host": "evil.example"}, timeout=10)
        assert "location" not in resp.headers
        frontdoor_error(resp, 404)


def test_keys_are_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    cfg = config_from("services: {}\napi: {api_key: sekrit}\n", tmp_path)
    door = api.FrontDoor(cfg, Stack(cfg, tmp_path / "state", None), monitor=False)
    compared: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    door._check_key({"authorization": "Bearer sekrit"}, admin=False)
    for presented in ("Bearer wrong", "Bearer s\xe9krit", "s\u20ackrit"):  # non-ASCII: no TypeError, a 401
        with pytest.raises(api.ApiError) as caught:
            door._check_key({"authorization": presented}, admin=False)
        assert caught.value.status == 401
    assert len(compared) == 4 and compared[0] == (b"sekrit", b"sekrit")


# --- the limits of the front door's HTTP server, on the real thing ---------------------------


def test_four_endless_headers_do_not_grow_the_front_door(fleet: Callable[..., Fleet], tiny_model: Path) -> None:
    (a,) = free_ports(1)
    f = fleet("servers:\n" + srv("m", tiny_model, a, "[m]"))
    front = next(r for r in f.stack.store.read().values() if r.component == "orchestrator")
    proc = psutil.Process(front.pid)
    before = proc.memory_info().rss
    answers: list[bytes] = []
    sent = threading.Barrier(5)
    measured = threading.Event()

    def endless() -> None:
        with socket.create_connection(("127.0.0.1", port_of(f)), timeout=10) as sock:
            try:
                sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nX-Endless: ")
                piece = b"x" * 65536
                for _ in range(512):  # 32 MiB
                    sock.sendall(piece)
            except OSError:
                pass
            sent.wait(60)
            measured.wait(60)  # the connection stays open while the front door is measured
            try:
                answers.append(sock.recv(100))
            except OSError:
                answers.append(b"")

    threads = [threading.Thread(target=endless) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        sent.wait(60)
        grown = proc.memory_info().rss - before
    finally:
        measured.set()
        for t in threads:
            t.join(60)
    assert grown < 32 * 1024 * 1024, f"the front door grew by {grown / 1e6:.0f} MB"
    assert any(answer.startswith(b"HTTP/1.1 431") for answer in answers), answers
    assert f.chat("m").status_code == 200


def test_a_client_leaving_a_queued_upstream_request_drops_it(fleet: Callable[..., Fleet], long_model: Path) -> None:
    (a,) = free_ports(1)
    f = fleet("servers:\n" + srv("m", long_model, a, "[m]", parallel=1, ctx_size=32768), api_extra=", queue_wait_s: 30")
    long = {"model": "m", "stream": True, "max_tokens": 30000, "messages": [{"role": "user", "content": "x"}]}
    with httpx.stream("POST", f.url + "/v1/chat/completions", json=long, timeout=30) as busy:
        held = busy.iter_raw()
        next(held)  # the only slot is taken
        queued = socket.create_connection(("127.0.0.1", port_of(f)), timeout=10)
        queued.sendall(_raw_request("/upstream/m/completion", json.dumps({"prompt": "x", "n_predict": 4}).encode()))
        f.wait_for("the upstream request to queue", lambda: f.status()["m"]["queued"] == 1)
        queued.close()
        f.wait_for("the queued request to leave the line", lambda: f.status()["m"]["queued"] == 0, timeout_s=5)
    f.wait_for("the slot to be freed", lambda: f.status()["m"]["in_flight"] == 0)
    assert f.status()["m"]["served"] == 1  # the queued request never reached llama-server


# --- failing backends ------------------------------------------------------------------------


def test_a_service_answering_bytes_that_are_not_http_is_a_502_and_frees_its_slot(
    fleet: Callable[..., Fleet], tmp_path: Path
) -> None:
    (a,) = free_ports(1)
    f = fleet("services:\n" + scripted("junk", a, "[junk]", tmp_path / "marker"))
    for method in ("GET", "POST"):
        resp = httpx.request(method, f.url + "/upstream/junk/garbage", timeout=10)
        assert resp.status_code == 502 and "did not answer HTTP" in backend_error(resp)["message"]
    assert in_flight(f) == {"junk": 0}


def test_a_backend_error_body_says_it_came_from_the_backend(fleet: Callable[..., Fleet], tiny_model: Path) -> None:
    (a,) = free_ports(1)
    f = fleet("servers:\n" + srv("m", tiny_model, a, "[m]"))
    resp = f.post("/v1/embeddings", {"model": "m", "input": "hi"})  # not an embedding server: its own 501
    assert resp.status_code == 501 and "embeddings" in backend_error(resp)["message"]
    resp = f.post("/v1/chat/completions", {"model": "m", "messages": "not a list"})
    assert 400 <= resp.status_code < 600 and backend_error(resp)["message"]


def test_a_backend_that_dies_after_its_headers_is_retried_on_another_instance(
    fleet: Callable[..., Fleet], tmp_path: Path
) -> None:
    a, b = free_ports(2)
    marker = tmp_path / "marker"
    f = fleet(
        "services:\n" + scripted("one", a, "[pool]", marker) + scripted("two", b, "[pool]", marker),
        extra="pools: [pool]\n",
    )
    resp = f.post("/v1/chat/completions", {"model": "pool", "stream": True, "messages": []})
    assert resp.status_code == 200 and resp.text.rstrip().endswith("data: [DONE]")
    cut = int(marker.read_text())  # the instance that sent its headers and then hung up
    served = json.loads(resp.text.split("\n\n")[0].removeprefix("data: "))["port"]
    assert {cut, served} == {a, b}
    assert in_flight(f) == {"one": 0, "two": 0}


def test_a_backend_killed_mid_stream(fleet: Callable[..., Fleet], long_model: Path) -> None:
    """kill -9 of one instance of a pool while streams are open on it: a stream that had bytes ends
    with an error event (and counts as an error); one that had none is served by the other instance."""
    a, b = free_ports(2)
    f = fleet(
        "servers:\n"
        + srv("rep0", long_model, a, "[pool]", parallel=4, ctx_size=32768)
        + srv("rep1", long_model, b, "[pool]", parallel=4, ctx_size=32768),
        extra="pools: [pool]\n",
        monitor="monitor: {interval_s: 0.2, probe_timeout_s: 30, failures_to_eject: 2, backoff_initial_s: 0.2}\n",
    )
    url = f.url + "/v1/chat/completions"
    pids = {name: f.stack.store.read()[f"server_{port}"].pid for name, port in (("rep0", a), ("rep1", b))}
    messages = [{"role": "user", "content": "x"}]

    async def scenario() -> tuple[bytes, str, list[httpx.Response]]:
        async with httpx.AsyncClient(timeout=60) as client:
            long = {"model": "pool", "stream": True, "max_tokens": 30000, "messages": messages}
            streams, firsts = [], []
            for _ in range(2):  # one on each instance
                cm = client.stream("POST", url, json=long)
                resp = await cm.__aenter__()
                it = resp.aiter_raw()
                streams.append((cm, it))
                firsts.append(await it.__anext__())
            victim = "rep0" if b'"model":"rep0"' in firsts[0] else "rep1"
            os.kill(pids[victim], signal.SIGSTOP)  # what it is sent now gets no byte back
            try:
                short = {"model": "pool", "stream": True, "max_tokens": 20, "messages": messages}
                late = [asyncio.create_task(client.post(url, json=short)) for _ in range(2)]
                deadline = time.monotonic() + 10
                while True:  # one of the two is now waiting on the stopped instance
                    view = (await client.get(f.url + "/admin/status")).json()
                    if {i["name"]: i["in_flight"] for i in view["instances"]}[victim] == 2:
                        break
                    assert time.monotonic() < deadline, view
                    await asyncio.sleep(0.05)
            finally:
                os.kill(pids[victim], signal.SIGKILL)
            cut = firsts[0] + b"".join([chunk async for chunk in streams[0][1]])  # ends cleanly
            answers = await asyncio.gather(*late)
            for cm, _ in streams:
                await cm.__aexit__(None, None, None)
            return cut, victim, answers

    cut, victim, answers = asyncio.run(asyncio.wait_for(scenario(), 60))
    survivor = "rep1" if victim == "rep0" else "rep0"
    last = json.loads(cut.rstrip().rsplit(b"\n\n", 1)[-1].removeprefix(b"data: "))
    assert last["error"]["type"] == "upstream_error" and last["error"]["code"] == 502
    assert last["error"]["source"] == "backend" and victim in last["error"]["message"]
    for resp in answers:
        assert resp.status_code == 200 and resp.text.rstrip().endswith("data: [DONE]"), resp.text[-300:]
        assert f'"model":"{survivor}"' in resp.text and '"error"' not in resp.text
    metrics = httpx.get(f.url + "/metrics", timeout=10).text
    assert f'modelfleet_requests_total{{code="502",instance="{victim}",role="pool"}} 1.0' in metrics
    assert 'modelfleet_errors_total{role="pool",source="backend"} 1.0' in metrics
    f.wait_for("every slot to be free", lambda: f.status()[survivor]["in_flight"] == 0)
