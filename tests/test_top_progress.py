"""`modelfleet top` (its rendering, and the live view in a pseudo-terminal quitting on `q`), and the
progress of a loading model: the stage read from a real llama-server log, `start`'s lines, and
what `/v1/models` shows a client while an instance starts."""

from __future__ import annotations

import contextlib
import os
import pty
import select
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client import CollectorRegistry, Counter, generate_latest
from rich.console import Console

from conftest import MODELFLEET, free_ports, process_of
from modelfleet import cli as cli_module
from modelfleet import health, loading, memory, top
from modelfleet.state import StateStore


def _instance(name: str, port: int, served: int, **more: Any) -> dict[str, Any]:
    base = {"key": f"server_{port}", "name": name, "port": port, "tier": "hot", "state": "ready"}
    return base | {"slots": 2, "in_flight": 1, "queued": 0, "served": served} | more


def _text(renderable: Any) -> str:
    console = Console(width=200, record=True, file=open(os.devnull, "w"))  # noqa: SIM115
    console.print(renderable)
    return console.export_text()


def test_render_shows_rates_between_two_samples() -> None:
    before = top.Sample(10.0, [_instance("coder", 8080, 10)], {}, {"coder": 100.0})
    now = top.Sample(
        12.0,
        [_instance("coder", 8080, 14), _instance("embedder[1]", 8091, 0, state="starting", in_flight=0)],
        {"coder": {"queued": 3}},
        {"coder": 300.0},
        {8080: 512 * 1024 * 1024},
    )
    text = _text(top.render(now, before))
    assert "1/2 ready, 1 in flight, 3 queued, 2.0 req/s, 100.0 tokens/s" in text
    coder = next(line for line in text.splitlines() if line.startswith("coder"))
    mem = memory.fmt_bytes(512 * 1024 * 1024).split()
    assert coder.split() == ["coder", "8080", "hot", "ready", "1/2", "0", "2.0", "100.0", "14", *mem]
    starting = next(line for line in text.splitlines() if line.startswith("embedder[1]"))
    assert "starting" in starting and starting.split()[6:8] == ["-", "-"]  # no rate without a previous reading
    first = _text(top.render(now, None))
    assert "0.0 req/s" in first  # the first frame has no rates yet
    down = _text(top.render(top.Sample(13.0, [], {}, error="the front door does not answer"), now))
    assert "the front door does not answer" in down


def test_parse_tokens_sums_an_instance_over_roles() -> None:
    registry = CollectorRegistry()
    tokens = Counter("modelfleet_tokens_generated", "t", ("role", "instance"), registry=registry)
    tokens.labels("a", "x").inc(5)
    tokens.labels("b", "x").inc(7)
    tokens.labels("a", "y").inc(1)
    assert top.parse_tokens(generate_latest(registry).decode()) == {"x": 12.0, "y": 1.0}


def test_loading_stage_from_a_real_log(make_stack: Any, tiny_model: Path) -> None:
    (port,) = free_ports(1)
    stack = make_stack(f"servers:\n  one: {{model: {tiny_model}, port: {port}, ctx_size: 256, threads: 1}}\n")
    stack.start(["one"])
    rec = next(iter(stack.store.read().values()))
    text = stack.launcher.read_log(rec.handle, 1 << 20)
    assert loading.stage(text) == "listening"
    # Cut the same log at each stage's first line: the stage read is that one.
    lines = text.splitlines()
    for needle, name in loading.STAGES:
        at = next(i for i, line in enumerate(lines) if needle in line)
        assert loading.stage("\n".join(lines[: at + 1])) == name, needle
    # Only the current run counts: a new start line resets it.
    assert loading.stage(text + f"\n{loading.RUN_MARKER}one: llama-server ...\n") is None


def test_start_progress_prints_a_line_per_loading_instance(capsys: pytest.CaptureFixture[str]) -> None:
    def waiter(label: str, stage: str | None) -> health.Waiter:
        return health.Waiter(label, "http://127.0.0.1:1/health", 60.0, lambda: None, stage=lambda: stage)

    progress = cli_module._Progress(every_s=0.0)
    a, b = waiter("big (pid 1, :8080)", "loading tensors"), waiter("svc (pid 2, :9000)", None)
    a.last = health.Health.LOADING
    progress([a, b], None)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("  big (pid 1, :8080): loading for ") and lines[0].endswith(" s, loading tensors")
    assert lines[1].startswith("  svc (pid 2, :9000): down for ") and lines[1].endswith(" s")


GATE_HOOK = '''
import os, time
from pathlib import Path


def wait(view):
    """Holds the instance in STARTING until the test opens the gate."""
    gate = Path(os.environ["GATE_FILE"])
    deadline = time.monotonic() + view.timeout_s
    while not gate.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
'''


def test_a_client_sees_a_starting_instance_progress_in_models(tmp_path: Path, tiny_model: Path) -> None:
    api, base, late = free_ports(3)
    (tmp_path / "gatehook.py").write_text(GATE_HOOK)
    cfg = tmp_path / "stack.yaml"
    servers = {
        "base": {"model": str(tiny_model), "port": base, "ctx_size": 256, "threads": 1, "roles": ["chat"]},
        "late": {"model": str(tiny_model), "port": late, "ctx_size": 256, "threads": 1, "roles": ["slow"]},
    }
    servers["late"]["tier"] = "warm"
    hooks = [{"name": "gate", "call": "gatehook:wait", "on": ["instance_up"], "applies_to": ["late"], "timeout_s": 60}]
    cfg.write_text(yaml.safe_dump({"servers": servers, "hooks": hooks, "api": {"port": api}}))
    env = os.environ | {"PYTHONPATH": str(tmp_path), "GATE_FILE": str(tmp_path / "gate")}
    args = ["--config", str(cfg), "--state-dir", str(tmp_path / "state")]
    try:
        started = subprocess.run([MODELFLEET, "start", *args], capture_output=True, text=True, env=env, timeout=120)
        assert started.returncode == 0, started.stderr
        door = f"http://127.0.0.1:{api}"
        admin = threading.Thread(target=lambda: httpx.post(door + "/admin/start/late", timeout=120))
        admin.start()
        deadline = time.monotonic() + 30
        seen: dict[str, Any] = {}
        stages: list[str] = []
        while seen.get("stage") != "listening":  # loaded, its hook still running (earlier stages may show first)
            assert time.monotonic() < deadline, f"never saw late's progress reach listening: {seen} after {stages}"
            model = httpx.get(door + "/v1/models/slow", timeout=10).json()
            seen = model["instances"][0]
            if seen.get("stage") and seen["stage"] not in stages:
                stages.append(seen["stage"])
            time.sleep(0.05)
        assert model["state"] == "starting" and seen["state"] == "starting" and seen["starting_for_s"] >= 0
        (tmp_path / "gate").touch()
        admin.join(60)
        after = httpx.get(door + "/v1/models/slow", timeout=10).json()
        assert after["state"] == "ready" and "stage" not in after["instances"][0]
    finally:
        subprocess.run([MODELFLEET, "stop", "--all", "--grace", "3", *args], capture_output=True, env=env, timeout=120)
        for rec in StateStore(tmp_path / "state").read_salvage().records.values():
            proc = process_of(rec)
            if proc is not None:
                proc.kill()


def test_top_draws_in_a_terminal_and_q_quits(tmp_path: Path, tiny_model: Path) -> None:
    api, one = free_ports(2)
    cfg = tmp_path / "stack.yaml"
    server = {"model": str(tiny_model), "port": one, "ctx_size": 256, "threads": 1, "roles": ["chat"]}
    cfg.write_text(yaml.safe_dump({"servers": {"one": server}, "api": {"port": api}}))
    args = ["--config", str(cfg), "--state-dir", str(tmp_path / "state")]
    try:
        assert subprocess.run([MODELFLEET, "start", *args], capture_output=True, timeout=120).returncode == 0
        pid, fd = pty.fork()
        if pid == 0:  # the child: `modelfleet top` on the pseudo-terminal
            os.execv(MODELFLEET, [MODELFLEET, "top", "--interval", "0.2", *args])
        screen = ""
        deadline = time.monotonic() + 30
        while "1/1 ready" not in screen or "one" not in screen:
            assert time.monotonic() < deadline, f"top never drew the fleet: {screen[-2000:]!r}"
            if select.select([fd], [], [], 0.2)[0]:
                screen += os.read(fd, 65536).decode(errors="replace")
        os.write(fd, b"q")
        deadline = time.monotonic() + 15
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            assert time.monotonic() < deadline, "top did not quit on q"
            if select.select([fd], [], [], 0.1)[0]:
                with contextlib.suppress(OSError):
                    os.read(fd, 65536)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        subprocess.run([MODELFLEET, "stop", "--all", "--grace", "3", *args], capture_output=True, timeout=120)
