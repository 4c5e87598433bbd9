"""LocalLauncher: every process-level fact about an instance, on real processes."""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from modelfleet.config import Tier
from modelfleet.errors import StartupError
from modelfleet.instance import Handle, Kind
from modelfleet.launcher import LocalLauncher
from modelfleet.spec import InstanceSpec


def _spec(tmp_path: Path, *argv: str) -> InstanceSpec:
    return InstanceSpec(
        component="svc",
        index=0,
        replicas=1,
        port=1,
        host="127.0.0.1",
        kind=Kind.SERVICE,
        tier=Tier.HOT,
        roles=("svc",),
        argv=argv,
        log_file=str(tmp_path / "svc.log"),
    )


SLEEPER = (sys.executable, "-c", "import sys, time; print('re' + 'ady', flush=True); time.sleep(60)")
STUBBORN = (
    sys.executable,
    "-c",
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
    "print('re' + 'ady', flush=True); time.sleep(60)",
)


def _wait_for_log(launcher: LocalLauncher, handle: Handle, text: str) -> None:
    deadline = time.monotonic() + 10
    while text not in launcher.read_log(handle):
        assert time.monotonic() < deadline, launcher.read_log(handle)
        time.sleep(0.02)


def test_spawn_alive_log_rss_stop(tmp_path: Path) -> None:
    launcher = LocalLauncher()
    handle = launcher.spawn(_spec(tmp_path, *SLEEPER))
    try:
        assert launcher.alive(handle) and launcher.exit_code(handle) is None
        assert os.getpgid(handle.pid) == handle.pid  # its own process group
        _wait_for_log(launcher, handle, "ready")
        assert "--- modelfleet: starting svc" in launcher.read_log(handle)
        assert launcher.rss(handle) > 1_000_000
    finally:
        launcher.stop([handle], 5.0, lambda _: None)
    assert not launcher.alive(handle)
    assert launcher.describe_gone(handle) == "dead"


def test_a_reused_pid_is_not_ours(tmp_path: Path) -> None:
    launcher = LocalLauncher()
    handle = launcher.spawn(_spec(tmp_path, *SLEEPER))
    try:
        other = dataclasses.replace(handle, create_time=handle.create_time - 100)
        assert not launcher.alive(other)
        assert launcher.describe_gone(other) == "stale"
        launcher.stop([other], 1.0, lambda _: None)  # never signals a process that is not ours
        assert launcher.alive(handle)
    finally:
        launcher.stop([handle], 5.0, lambda _: None)


def test_stop_kills_what_ignores_sigterm_after_the_grace(tmp_path: Path) -> None:
    launcher = LocalLauncher()
    handle = launcher.spawn(_spec(tmp_path, *STUBBORN))
    _wait_for_log(launcher, handle, "ready")
    said: list[str] = []
    t0 = time.monotonic()
    launcher.stop([handle], 0.3, said.append)
    assert not launcher.alive(handle) and time.monotonic() - t0 < 5
    assert said and "ignored SIGTERM for 0.3 s; killing it" in said[0]


def test_an_early_exit_gives_its_exit_code(tmp_path: Path) -> None:
    launcher = LocalLauncher()
    handle = launcher.spawn(_spec(tmp_path, sys.executable, "-c", "raise SystemExit(3)"))
    deadline = time.monotonic() + 10
    while (code := launcher.exit_code(handle)) is None:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert code == 3


def test_a_program_that_cannot_run_is_a_startup_error(tmp_path: Path) -> None:
    with pytest.raises(StartupError, match="cannot run /nonexistent/prog"):
        LocalLauncher().spawn(_spec(tmp_path, "/nonexistent/prog"))


def test_port_conflict_names_the_holder() -> None:
    launcher = LocalLauncher()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        problem = launcher.port_conflict("127.0.0.1", port)
        assert problem is not None and f"127.0.0.1:{port} is in use by pid {os.getpid()}" in problem
    assert launcher.port_conflict("127.0.0.1", port) is None


def test_node_memory_and_programs() -> None:
    launcher = LocalLauncher()
    assert 0 < launcher.available_bytes() <= launcher.total_bytes()
    assert launcher.program_exists("sh", None) and not launcher.program_exists("no-such-program-x", None)


def test_children_are_reaped_not_left_as_zombies(tmp_path: Path) -> None:
    launcher = LocalLauncher()
    handle = launcher.spawn(_spec(tmp_path, sys.executable, "-c", "pass"))
    deadline = time.monotonic() + 10
    while launcher.alive(handle):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    out = subprocess.run(["ps", "-o", "stat=", "-p", str(handle.pid)], capture_output=True, text=True).stdout
    assert "Z" not in out


def test_a_process_spawned_while_a_start_holds_signals_off_still_takes_sigterm(tmp_path: Path) -> None:
    from modelfleet.stack import _signals_deferred

    launcher = LocalLauncher()
    with _signals_deferred():
        handle = launcher.spawn(_spec(tmp_path, *SLEEPER))
    try:
        status = Path(f"/proc/{handle.pid}/status").read_text()
        blocked = int(status.split("SigBlk:")[1].split()[0], 16)
        assert blocked & (1 << (signal.SIGTERM - 1)) == 0, "the child would ignore the SIGTERM that stops it"
        t0 = time.monotonic()
        launcher.stop([handle], 10.0, lambda _: None)
        assert time.monotonic() - t0 < 5
    finally:
        launcher.stop([handle], 0.1, lambda _: None)
