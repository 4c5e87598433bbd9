"""`modelfleet apply`: the plan and its reasons, only changed components restart, a bad file changes
nothing, and the front door takes the new config in-process (POST /admin/apply, SIGHUP) while a
request in flight on a component being reloaded finishes first."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from conftest import MODELFLEET, free_ports, process_of
from modelfleet import apply as apply_module
from modelfleet.apply import argv_change
from modelfleet.state import StateStore


class Cli:
    def __init__(self, folder: Path) -> None:
        self.cfg, self.state = folder / "stack.yaml", folder / "state"
        self.env = {k: v for k, v in os.environ.items() if k not in ("MODELFLEET_CONFIG", "MODELFLEET_STATE_DIR")}

    def __call__(self, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
        cmd = [MODELFLEET, *args, "--config", str(self.cfg), "--state-dir", str(self.state)]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=self.env)

    def write(self, data: dict[str, Any]) -> None:
        self.cfg.write_text(yaml.safe_dump(data))

    def pids(self) -> dict[str, int]:
        return {r.name: r.pid for r in StateStore(self.state).read().values() if process_of(r) is not None}


@pytest.fixture
def cli(tmp_path: Path) -> Iterator[Cli]:
    c = Cli(tmp_path)
    yield c
    c("stop", "--all", "--grace", "3")
    for rec in StateStore(c.state).read_salvage().records.values():
        proc = process_of(rec)
        if proc is not None:
            proc.kill()


def server(model: Path, port: int, **more: Any) -> dict[str, Any]:
    return {"model": str(model), "port": port, "ctx_size": 256, "threads": 1, **more}


def test_argv_change_names_the_flag_and_both_values() -> None:
    old = ["llama-server", "--ctx-size", "256", "--parallel", "1"]
    new = ["llama-server", "--ctx-size", "512", "--parallel", "1"]
    assert argv_change(old, new) == "--ctx-size 256 -> --ctx-size 512"
    assert argv_change(old, [*old, "--metrics"]) == "added --metrics"
    assert argv_change(old, old[:3]) == "removed --parallel 1"


def test_apply_restarts_only_what_changed(cli: Cli, tiny_model: Path) -> None:
    keep, change, gone, new, warm = free_ports(5)
    base = {
        "keep": server(tiny_model, keep, roles=["a"]),
        "change": server(tiny_model, change, roles=["b"]),
        "gone": server(tiny_model, gone, roles=["c"]),
    }
    cli.write({"servers": base, "api": {"enabled": False}})
    assert cli("start").returncode == 0
    before = cli.pids()

    edited = {
        "keep": base["keep"],
        "change": {**base["change"], "ctx_size": 512, "env": {"LLAMA_ARG_THREADS_HTTP": "2"}},
        "new": server(tiny_model, new, roles=["d"]),
        "later": server(tiny_model, warm, roles=["e"], tier="warm"),
    }
    cli.write({"servers": edited, "api": {"enabled": False}})
    dry = cli("apply", "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    steps = {s["component"]: s for s in json.loads(dry.stdout)["steps"]}
    assert {c: s["action"] for c, s in steps.items()} == {
        "keep": "keep",
        "change": "reload",
        "new": "start",
        "later": "keep",
        "gone": "stop",
    }
    assert steps["change"]["reasons"] == [
        "argv --ctx-size 256 -> --ctx-size 512",
        "env added LLAMA_ARG_THREADS_HTTP",
    ]
    assert steps["later"]["reasons"] == ["warm, not running (starts on demand)"]
    assert steps["gone"]["reasons"] == ["no longer in the stack file"]
    assert cli.pids() == before  # a dry run changes nothing

    res = cli("apply")
    assert res.returncode == 0, res.stderr
    assert "reload change" in res.stdout and "argv --ctx-size 256 -> --ctx-size 512" in res.stdout
    after = cli.pids()
    assert after["keep"] == before["keep"]  # untouched
    assert after["change"] != before["change"]
    assert "gone" not in after and "new" in after and "later" not in after
    again = cli("apply", "--dry-run", "--json")
    assert {s["action"] for s in json.loads(again.stdout)["steps"]} == {"keep"}  # nothing left to do


def test_a_file_that_does_not_validate_changes_nothing(cli: Cli, tiny_model: Path) -> None:
    (port,) = free_ports(1)
    cli.write({"servers": {"one": server(tiny_model, port)}, "api": {"enabled": False}})
    assert cli("start").returncode == 0
    before = cli.pids()
    cli.write({"servers": {"one": {**server(tiny_model, port), "ctx_size": "lots"}}, "api": {"enabled": False}})
    res = cli("apply")
    assert res.returncode == 2
    assert "servers.one.ctx_size" in res.stderr and "nothing was changed" in res.stderr
    assert "Traceback" not in res.stderr
    assert cli.pids() == before


def _stream(url: str, body: dict[str, Any], out: dict[str, Any], started: threading.Event) -> None:
    with httpx.stream("POST", url, json=body, timeout=120) as resp:
        out["status"] = resp.status_code
        text = ""
        for chunk in resp.iter_text():
            text += chunk
            started.set()
        out["body"], out["ended"] = text, time.time()


def _wait(what: str, cond: Callable[[], bool], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_the_front_door_applies_in_process_and_drains_what_it_reloads(
    cli: Cli, tiny_model: Path, long_model: Path
) -> None:
    api, one, two = free_ports(3)
    servers = {
        "one": server(tiny_model, one, roles=["coder"]),
        "two": server(long_model, two, roles=["writer"], ctx_size=8192),
    }
    monitor = {"interval_s": 0.2}
    cli.write({"servers": servers, "api": {"port": api}, "monitor": monitor})
    assert cli("start").returncode == 0, "start failed"
    door = f"http://127.0.0.1:{api}"
    before = cli.pids()
    assert httpx.get(door + "/v1/models/scribe").status_code == 404

    # A long generation on `two` is in flight while `two` is reloaded: it finishes first.
    out: dict[str, Any] = {}
    started = threading.Event()
    body = {"model": "writer", "messages": [{"role": "user", "content": "go"}], "max_tokens": 3000, "stream": True}
    t = threading.Thread(target=_stream, args=(door + "/v1/chat/completions", body, out, started))
    t.start()
    assert started.wait(30), "the stream did not start"

    edited = {**servers, "two": {**servers["two"], "ctx_size": 4096}}
    cli.write({"servers": edited, "api": {"port": api}, "monitor": monitor, "aliases": {"scribe": "writer"}})
    assert t.is_alive()
    res = cli("apply")
    applied_done = time.time()
    t.join(60)
    assert res.returncode == 0, res.stderr
    assert "through the front door" in res.stdout
    assert out["status"] == 200 and "[DONE]" in out["body"]  # not cut off by the reload
    after = cli.pids()
    assert after["one"] == before["one"] and after["orchestrator"] == before["orchestrator"]
    assert after["two"] != before["two"]
    # The stream was running when the apply began, the apply waited for it (the old `two` was drained,
    # not stopped under it) and it ran to its full length (a stop would have cut it off).
    assert out["ended"] <= applied_done
    assert '"finish_reason":"length"' in out["body"].replace(" ", "")
    scribe = httpx.get(door + "/v1/models/scribe")
    assert scribe.status_code == 200 and scribe.json()["role"] == "writer"  # no front door restart
    chat = httpx.post(
        door + "/v1/chat/completions",
        json={"model": "scribe", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
        timeout=30,
    )
    assert chat.status_code == 200

    # POST /admin/apply with a dry run only plans; SIGHUP applies.
    cli.write(
        {
            "servers": edited,
            "api": {"port": api},
            "monitor": monitor,
            "aliases": {"scribe": "writer"},
            "task_types": {"poem": "writer"},
        }
    )
    dry = httpx.post(door + "/admin/apply", json={"dry_run": True}, timeout=30)
    assert dry.status_code == 200 and dry.json()["applied"] is False
    assert httpx.get(door + "/v1/models/poem").status_code == 404
    os.kill(after["orchestrator"], signal.SIGHUP)
    _wait("SIGHUP to apply the task type", lambda: httpx.get(door + "/v1/models/poem").status_code == 200)
    assert cli.pids() == after

    # A broken file is refused by the front door too, and the routing stays.
    cli.cfg.write_text("servers: [\n")
    bad = httpx.post(door + "/admin/apply", json={}, timeout=30)
    assert bad.status_code == 400 and "not valid YAML" in bad.json()["error"]["message"]
    assert httpx.get(door + "/v1/models/poem").status_code == 200


def test_models_retrieve_answers_one_model(cli: Cli, tiny_model: Path) -> None:
    api, one = free_ports(2)
    cli.write({"servers": {"one": server(tiny_model, one, roles=["coder"])}, "api": {"port": api}})
    assert cli("start").returncode == 0
    door = f"http://127.0.0.1:{api}"
    got = httpx.get(door + "/v1/models/coder")
    assert got.status_code == 200
    assert got.json() | {"created": 0} == next(
        m | {"created": 0} for m in httpx.get(door + "/v1/models").json()["data"] if m["id"] == "coder"
    )
    assert {"id", "object", "created", "owned_by"} <= got.json().keys()  # what the OpenAI SDK reads
    missing = httpx.get(door + "/v1/models/nope")
    assert missing.status_code == 404
    assert "no model 'nope' here; known: coder" in missing.json()["error"]["message"]


def test_requests_for_a_component_being_reloaded_wait_for_it(cli: Cli, tiny_model: Path) -> None:
    """The only server of a role is reloaded by apply: requests meanwhile queue, none gets a 503."""
    api, one = free_ports(2)
    servers = {"one": server(tiny_model, one, roles=["coder"])}
    cli.write({"servers": servers, "api": {"port": api}})
    assert cli("start").returncode == 0
    door = f"http://127.0.0.1:{api}/v1/chat/completions"
    results: list[int] = []
    stop = threading.Event()

    def client() -> None:
        body = {"model": "coder", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
        with httpx.Client(timeout=60) as c:
            while not stop.is_set():
                results.append(c.post(door, json=body).status_code)

    threads = [threading.Thread(target=client) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        _wait("requests to flow", lambda: len(results) > 5)
        before = cli.pids()["one"]
        cli.write({"servers": {"one": {**servers["one"], "ctx_size": 512}}, "api": {"port": api}})
        res = cli("apply")
        assert res.returncode == 0, res.stderr
        assert cli.pids()["one"] != before
        served = len(results)
        _wait("requests to flow again", lambda: len(results) > served + 5)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert set(results) == {200}, {code: results.count(code) for code in set(results)}


def test_one_program_under_two_names_is_no_change(tmp_path: Path) -> None:
    (tmp_path / "python3").write_text("")
    (tmp_path / "python").symlink_to(tmp_path / "python3")
    assert apply_module._canonical([str(tmp_path / "python"), "-m", "x"]) == (str(tmp_path / "python3"), "-m", "x")
    assert apply_module._canonical(["llama-server", "-m", "x"]) == ("llama-server", "-m", "x")


def test_a_new_front_door_port_restarts_the_front_door_last_and_nothing_else(cli: Cli, tiny_model: Path) -> None:
    old_api, new_api, one = free_ports(3)
    servers = {"one": server(tiny_model, one, roles=["coder"])}
    cli.write({"servers": servers, "api": {"port": old_api}})
    assert cli("start").returncode == 0
    before = cli.pids()
    cli.write({"servers": servers, "api": {"port": new_api}})
    res = cli("apply")
    assert res.returncode == 0, res.stderr
    assert f"reload orchestrator  ports {old_api} -> {new_api}" in res.stdout
    after = cli.pids()
    assert after["one"] == before["one"] and after["orchestrator"] != before["orchestrator"]
    assert httpx.get(f"http://127.0.0.1:{new_api}/v1/models/coder", timeout=10).status_code == 200
