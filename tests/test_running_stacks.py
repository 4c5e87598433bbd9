"""Running stacks found without flags: the registry, `ps`, `status`/`stop`/`logs` with no --config,
`logs -f`, shell completion, and a stop's SIGTERM reaching what `start` spawned."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from conftest import MODELFLEET, free_ports, make_record, process_of
from modelfleet.stacks import Registry
from modelfleet.state import StateStore


class Machine:
    """The CLI as a person types it: a private state root, a folder without a stack file, no env config."""

    def __init__(self, root: Path, cwd: Path) -> None:
        self.root, self.cwd = root, cwd
        self.env = {k: v for k, v in os.environ.items() if k not in ("MODELFLEET_CONFIG", "MODELFLEET_STATE_DIR")}
        self.env["MODELFLEET_STATE_ROOT"] = str(root)
        self.state_dirs: list[Path] = []

    def run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [MODELFLEET, *args], capture_output=True, text=True, timeout=timeout, env=self.env, cwd=self.cwd
        )

    def popen(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [MODELFLEET, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=self.env, cwd=self.cwd
        )

    def start(self, config: Path, name: str) -> Path:
        state = config.parent / f"state-{name}"
        self.state_dirs.append(state)
        res = self.run("start", "--config", str(config), "--state-dir", str(state))
        assert res.returncode == 0, res.stderr
        return state


def two_servers(folder: Path, name: str, model: Path, ports: list[int]) -> Path:
    path = folder / f"{name}.yaml"
    servers = {
        f"s{i}": {"model": str(model), "port": p, "ctx_size": 256, "threads": 1, "roles": [f"r{i}"]}
        for i, p in enumerate(ports)
    }
    path.write_text(yaml.safe_dump({"servers": servers, "api": {"enabled": False}}))
    return path


@pytest.fixture
def machine(tmp_path: Path) -> Iterator[Machine]:
    work = tmp_path / "elsewhere"
    work.mkdir()
    m = Machine(tmp_path / "root", work)
    yield m
    for state in m.state_dirs:
        for rec in StateStore(state).read_salvage().records.values():
            proc = process_of(rec)
            if proc is not None:
                proc.kill()


def test_start_then_status_logs_and_stop_without_flags(machine: Machine, tmp_path: Path, tiny_model: Path) -> None:
    cfg = two_servers(tmp_path, "alpha", tiny_model, free_ports(2))
    state = machine.start(cfg, "alpha")

    status = machine.run("status", "--json")
    assert status.returncode == 0, status.stderr
    rows = json.loads(status.stdout)["instances"]
    assert {r["name"]: r["status"] for r in rows} == {"s0": "healthy", "s1": "healthy"}

    ps = machine.run("ps", "--json")
    (entry,) = json.loads(ps.stdout)["stacks"]
    assert entry["name"] == "alpha" and entry["state_dir"] == str(state.resolve())
    assert sorted(i["component"] for i in entry["instances"]) == ["s0", "s1"]
    assert "alpha" in machine.run("ps").stdout

    logs = machine.run("logs", "s0", "-n", "5")
    assert logs.returncode == 0, logs.stderr
    assert "listening on" in logs.stdout or "slots are idle" in logs.stdout
    assert len(logs.stdout.splitlines()) <= 5
    bad = machine.run("logs", "nope")
    assert bad.returncode == 2 and "'nope' is not a server or service" in bad.stderr and "Traceback" not in bad.stderr

    listed = machine.run("checkpoint", "list")
    assert listed.returncode == 0 and "no checkpoints" in listed.stdout, listed.stderr
    before = {r.component: r.pid for r in StateStore(state).read().values()}
    reloaded = machine.run("reload", "s1")
    assert reloaded.returncode == 0, reloaded.stderr
    after = {r.component: r.pid for r in StateStore(state).read().values()}
    assert after["s0"] == before["s0"] and after["s1"] != before["s1"]

    t0 = time.monotonic()
    stop = machine.run("stop", "--all")
    assert stop.returncode == 0, stop.stderr
    assert "stopped 2 instance(s)" in stop.stdout
    # SIGTERM ends llama-server at once: what `start` spawned does not inherit its blocked signals.
    assert "ignored SIGTERM" not in stop.stderr and time.monotonic() - t0 < 8
    assert StateStore(state).read() == {}
    assert machine.run("ps").stdout.strip() == "no stack is running"
    nothing = machine.run("status")
    assert nothing.returncode == 2 and "no running stack" in nothing.stderr


def test_several_running_stacks_ask_for_one_by_name(machine: Machine, tmp_path: Path, tiny_model: Path) -> None:
    a, b = free_ports(2)
    machine.start(two_servers(tmp_path, "alpha", tiny_model, [a]), "alpha")
    machine.start(two_servers(tmp_path, "beta", tiny_model, [b]), "beta")

    unsure = machine.run("status")
    assert unsure.returncode == 2
    assert "2 stacks are running; say which with --stack NAME" in unsure.stderr
    assert "alpha" in unsure.stderr and "beta" in unsure.stderr

    beta = machine.run("status", "--stack", "beta", "--json")
    assert beta.returncode == 0, beta.stderr
    assert [r["port"] for r in json.loads(beta.stdout)["instances"]] == [b]
    wrong = machine.run("status", "--stack", "gamma")
    assert wrong.returncode == 2 and "no running stack is named 'gamma'" in wrong.stderr
    both = machine.run("status", "--stack", "beta", "--config", str(tmp_path / "beta.yaml"))
    assert both.returncode == 2 and "not both" in both.stderr

    assert machine.run("stop", "--all", "--stack", "alpha").returncode == 0
    # One stack left: found without --stack.
    left = machine.run("status", "--json")
    assert [r["port"] for r in json.loads(left.stdout)["instances"]] == [b]
    assert machine.run("stop", "--all").returncode == 0


def test_stale_entries_are_dropped_not_trusted(tmp_path: Path) -> None:
    state = tmp_path / "gone"
    store = StateStore(state)
    with store.lock():
        store.put(make_record(pid=2**22 + 1234, port=free_ports(1)[0]))  # no such process
    registry = Registry(tmp_path / "root")
    registry.register("gone", state, str(tmp_path / "gone.yaml"), dev=False)
    registry.register("never-started", tmp_path / "empty", None, dev=False)
    assert len(json.loads(registry.path.read_text())["stacks"]) == 2
    assert registry.running() == []
    assert json.loads(registry.path.read_text())["stacks"] == []
    assert registry.choose(None) is None


def test_a_damaged_registry_is_replaced_not_fatal(tmp_path: Path) -> None:
    registry = Registry(tmp_path / "root")
    registry.root.mkdir()
    registry.path.write_text("{not json")
    assert registry.running() == []
    registry.register("x", tmp_path / "x", None, dev=False)
    assert [e["name"] for e in json.loads(registry.path.read_text())["stacks"]] == ["x"]


def test_logs_follow_prints_what_is_appended(machine: Machine, tmp_path: Path, tiny_model: Path) -> None:
    (port,) = free_ports(1)
    machine.start(two_servers(tmp_path, "alpha", tiny_model, [port]), "alpha")
    log_file = next(iter(StateStore(tmp_path / "state-alpha").read().values())).log_file
    follower = machine.popen("logs", "s0", "-f", "-n", "0")
    lines: queue.Queue[str] = queue.Queue()
    assert follower.stdout is not None
    threading.Thread(target=lambda: [lines.put(line) for line in follower.stdout or ()], daemon=True).start()
    try:
        deadline = time.monotonic() + 30
        marker = "marker-line-from-the-test"
        seen: list[str] = []
        while marker + "\n" not in seen:
            assert time.monotonic() < deadline, f"logs -f did not show the appended line; got {seen!r}"
            with open(log_file, "a") as f:  # as the process would append
                f.write(marker + "\n")
            with contextlib.suppress(queue.Empty):
                seen.append(lines.get(timeout=0.5))
    finally:
        follower.terminate()
        follower.wait(10)
    assert machine.run("stop", "--all").returncode == 0


def test_shell_completion_of_commands_components_and_checkpoints(
    machine: Machine, tmp_path: Path, tiny_model: Path
) -> None:
    cfg = two_servers(tmp_path, "alpha", tiny_model, free_ports(2))
    (tmp_path / "state-alpha" / "checkpoints" / "before_20260101_000000").mkdir(parents=True)

    def complete(words: str) -> list[str]:
        env = machine.env | {"_MODELFLEET_COMPLETE": "bash_complete", "COMP_WORDS": words}
        env["COMP_CWORD"] = str(len(words.split()) - (0 if words.endswith(" ") else 1))
        res = subprocess.run([MODELFLEET], capture_output=True, text=True, env=env, cwd=machine.cwd, timeout=30)
        return [line.split(",", 1)[1] for line in res.stdout.splitlines() if "," in line]

    assert {"apply", "logs", "ps", "top", "status"} <= set(complete("modelfleet "))
    assert complete(f"modelfleet reload --config {cfg} s") == ["s0", "s1"]
    assert complete(f"modelfleet logs --config {cfg} s1") == ["s1"]
    state = f"--state-dir {tmp_path / 'state-alpha'}"
    assert complete(f"modelfleet checkpoint restore --config {cfg} {state} b") == ["before_20260101_000000"]
    assert complete("modelfleet status --stack ") == []  # nothing runs
