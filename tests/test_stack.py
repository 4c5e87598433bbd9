"""Lifecycle on real llama-server processes with tiny generated models."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import httpx
import psutil
import pytest

from conftest import StackFactory, free_ports, make_record, process_of
from modelfleet.config import LogsConfig
from modelfleet.errors import StartupError, UsageError
from modelfleet.logs import rotate, rotated
from modelfleet.stack import Stack, Status
from modelfleet.state import InstanceRecord, StateStore


def server_yaml(model: Path, name: str, port: int, extra: str = "", **fields: object) -> str:
    lines = [f"  {name}:", f"    model: {model}", f"    port: {port}", "    ctx_size: 512", "    threads: 1"]
    lines += [f"    {k}: {v}" for k, v in fields.items()]
    return "\n".join(lines) + ("\n" + extra if extra else "") + "\n"


def live_llama_pids(stack: Stack) -> set[int]:
    return {r.pid for r in stack.store.read().values() if process_of(r) is not None}


def chat(port: int) -> dict[str, object]:
    resp = httpx.post(
        f"http://127.0.0.1:{port}/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
        timeout=30,
    )
    assert resp.status_code == 200, resp.text
    data: dict[str, object] = resp.json()
    return data


def test_start_status_stop_two_servers(make_stack: StackFactory, tiny_model: Path) -> None:
    a, b = free_ports(2)
    stack = make_stack(
        "servers:\n"
        + server_yaml(tiny_model, "alpha", a, roles="[frontdoor]", parallel=2)
        + server_yaml(tiny_model, "beta", b, roles="[worker]")
    )
    report = stack.start(stack.select())
    assert sorted(report.started) == ["alpha", "beta"]

    rows = {r.name: r for r in stack.status()}
    assert rows["alpha"].status is Status.HEALTHY and rows["beta"].status is Status.HEALTHY
    assert rows["alpha"].model == "tiny"
    chat(a)
    chat(b)

    # The state file has the seed's schema, keyed by port, plus the process start time.
    raw = stack.store.read()
    rec = raw[f"server_{a}"]
    assert (rec.role, rec.port, rec.model_path) == ("frontdoor", a, str(tiny_model))
    assert rec.log_file.endswith(f"llama-server-{a}.log") and Path(rec.log_file).is_file()
    assert rec.create_time > 0 and rec.started_at

    pids = live_llama_pids(stack)
    assert sorted(stack.stop()) == ["alpha", "beta"]
    assert stack.store.read() == {}
    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids)
    assert {r.status for r in stack.status()} == {Status.STOPPED}


def test_start_is_idempotent_and_keeps_healthy_instances(make_stack: StackFactory, tiny_model: Path) -> None:
    (p,) = free_ports(1)
    stack = make_stack("servers:\n" + server_yaml(tiny_model, "alpha", p))
    stack.start(["alpha"])
    before = live_llama_pids(stack)
    report = stack.start(["alpha"])
    assert report.kept == ["alpha"] and report.started == []
    assert live_llama_pids(stack) == before


def test_replica_pool_gets_consecutive_ports(make_stack: StackFactory, tiny_model: Path) -> None:
    base = free_ports(1)[0]
    # Three consecutive free ports are likely but not certain; retry a few bases.
    for _ in range(20):
        if all(_bindable(base + i) for i in range(3)):
            break
        base = free_ports(1)[0]
    stack = make_stack("servers:\n" + server_yaml(tiny_model, "embed", base, replicas=3, roles="[embedder]"))
    report = stack.start(["embed"])
    assert sorted(report.started) == ["embed[0]", "embed[1]", "embed[2]"]
    rows = [r for r in stack.status() if r.status is Status.HEALTHY]
    assert sorted(r.port for r in rows) == [base, base + 1, base + 2]
    for port in (base, base + 1, base + 2):
        chat(port)
    assert len(live_llama_pids(stack)) == 3


def test_broken_model_fails_fast_with_log_tail(make_stack: StackFactory, tmp_path: Path, tiny_model: Path) -> None:
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\x00" * 64)
    good, bad = free_ports(2)
    stack = make_stack(
        "servers:\n" + server_yaml(tiny_model, "good", good) + server_yaml(broken, "bad", bad, health_timeout_s=60)
    )
    with pytest.raises(StartupError) as exc:
        stack.start(["good", "bad"])
    msg = str(exc.value)
    assert "bad" in msg and "exited with code 1" in msg
    assert "last lines of" in msg and "llama-server-" in msg
    # Nothing this start launched survives it, and the state file forgets it all.
    assert stack.store.read() == {}
    assert not _listening(good) and not _listening(bad)


def test_port_taken_by_foreign_process_is_refused(make_stack: StackFactory, tiny_model: Path) -> None:
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import socket,time; s=socket.socket(); s.bind(('127.0.0.1',0)); s.listen();"
            "print(s.getsockname()[1], flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        port = int(holder.stdout.readline())
        (other,) = free_ports(1)
        stack = make_stack("servers:\n" + server_yaml(tiny_model, "a", other) + server_yaml(tiny_model, "b", port))
        with pytest.raises(StartupError) as exc:
            stack.start(["a", "b"])
        msg = str(exc.value)
        assert f":{port} is in use by pid {holder.pid}" in msg and "nothing was started" in msg
        assert stack.store.read() == {}
        assert not _listening(other)
    finally:
        holder.kill()
        holder.wait()


def test_missing_model_files_are_all_listed_before_anything_starts(
    make_stack: StackFactory, tiny_model: Path, tmp_path: Path
) -> None:
    a, b, c = free_ports(3)
    stack = make_stack(
        "servers:\n"
        + server_yaml(tiny_model, "ok", a)
        + server_yaml(tmp_path / "nope1.gguf", "x", b)
        + server_yaml(tmp_path / "nope2.gguf", "y", c, mmproj=str(tmp_path / "proj.gguf"))
    )
    with pytest.raises(StartupError) as exc:
        stack.start(["ok", "x", "y"])
    msg = str(exc.value)
    assert "3 required file(s) are missing" in msg
    for frag in ("servers.x.model", "nope1.gguf", "servers.y.model", "servers.y.mmproj", "proj.gguf"):
        assert frag in msg
    assert not _listening(a)


def test_stale_entries_dead_and_reused_pids(make_stack: StackFactory, tiny_model: Path) -> None:
    a, b, c = free_ports(3)
    stack = make_stack(
        "servers:\n"
        + server_yaml(tiny_model, "dead", a)
        + server_yaml(tiny_model, "reused", b)
        + server_yaml(tiny_model, "fresh", c)
    )
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        store = StateStore(stack.store.dir)
        store.ensure()
        with store.lock():
            store.put(_fake_record("dead", a, gone.pid, 123.0))
            # A live process whose start time is not the recorded one: a reused pid.
            store.put(_fake_record("reused", b, bystander.pid, 123.0))
        rows = {r.name: r.status for r in stack.status()}
        assert rows["dead"] is Status.DEAD
        assert rows["reused"] is Status.STALE

        # stop never signals a pid that isn't ours; it only forgets the entries.
        stack.stop(["dead", "reused"])
        assert bystander.poll() is None
        assert stack.store.read() == {}

        # And start replaces stale entries with real instances.
        with store.lock():
            store.put(_fake_record("reused", b, bystander.pid, 123.0))
        stack.start(["reused"])
        rec = stack.store.read()[f"server_{b}"]
        assert rec.pid != bystander.pid and process_of(rec) is not None
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()


def test_reload_restarts_one_component_with_new_config(
    make_stack: StackFactory, tiny_model: Path, tmp_path: Path
) -> None:
    a, b = free_ports(2)
    text = "servers:\n" + server_yaml(tiny_model, "alpha", a) + server_yaml(tiny_model, "beta", b, parallel=1)
    stack = make_stack(text)
    stack.start(["alpha", "beta"])
    pids = {r.component: r.pid for r in stack.store.read().values()}

    stack2 = make_stack(text.replace("parallel: 1", "parallel: 3"), state_dir=stack.store.dir)
    report = stack2.start(["alpha", "beta"])
    assert report.changed == ["beta"], "a running instance with an older config is reported, not restarted"
    stack2.reload("beta")
    after = {r.component: r.pid for r in stack2.store.read().values()}
    assert after["alpha"] == pids["alpha"]
    assert after["beta"] != pids["beta"]
    props = httpx.get(f"http://127.0.0.1:{b}/props", timeout=10).json()
    assert props["total_slots"] == 3


def test_select_tiers_and_unknown_names(make_stack: StackFactory, tiny_model: Path) -> None:
    a, b, c = free_ports(3)
    stack = make_stack(
        "servers:\n"
        + server_yaml(tiny_model, "hot1", a)
        + server_yaml(tiny_model, "warm1", b, tier="warm")
        + server_yaml(tiny_model, "cold1", c, tier="cold")
    )
    assert stack.select() == ["hot1"]
    assert stack.select(hot_only=True) == ["hot1"]
    assert stack.select(include=["cold1"]) == ["hot1", "cold1"]
    assert stack.select(["warm1"]) == ["warm1"]
    with pytest.raises(UsageError, match="'nope' is not a server or service of this stack; known: hot1, warm1, cold1"):
        stack.select(["nope"])


def test_stop_kills_a_process_that_ignores_sigterm(make_stack: StackFactory, tmp_path: Path) -> None:
    (port,) = free_ports(1)
    script = Path(__file__).parent / "fakes" / "stubborn.py"
    stack = make_stack(
        f"""
        services:
          stubborn:
            command: ["{sys.executable}", "{script}", "{{port}}"]
            port: {port}
            health_path: /health
        """
    )
    stack.stop_grace_s = 0.5
    stack.start(["stubborn"])
    (rec,) = stack.store.read().values()
    assert process_of(rec) is not None
    stack.stop(["stubborn"])
    assert not psutil.pid_exists(rec.pid) or psutil.Process(rec.pid).status() == psutil.STATUS_ZOMBIE
    assert not _listening(port)


def test_service_that_exits_early_reports_its_output(make_stack: StackFactory) -> None:
    (port,) = free_ports(1)
    stack = make_stack(
        f"""
        services:
          crashy:
            command: ["{sys.executable}", "-c", "import sys; print('boom: no config'); sys.exit(3)"]
            port: {port}
        """
    )
    with pytest.raises(StartupError, match=r"(?s)crashy .* exited with code 3.*boom: no config"):
        stack.start(["crashy"])


def _fake_record(component: str, port: int, pid: int, create_time: float) -> InstanceRecord:
    return make_record(
        role=component,
        pid=pid,
        port=port,
        started_at="2026-01-28T10:30:00",
        model_path=None,
        log_file="/dev/null",
        create_time=create_time,
    )


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_reload_right_after_serving_a_stream_rebinds_its_port(make_stack: StackFactory, tiny_model: Path) -> None:
    """Regression: the port check refused a port held only by TIME-WAIT connections of the old server."""
    (p,) = free_ports(1)
    stack = make_stack("servers:\n" + server_yaml(tiny_model, "alpha", p))
    stack.start(["alpha"])
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": True}
    with httpx.stream("POST", f"http://127.0.0.1:{p}/v1/chat/completions", json=body, timeout=30) as resp:
        resp.read()  # llama-server closes the connection after a stream: its side lingers in TIME-WAIT
    assert stack.reload("alpha").started == ["alpha"]
    chat(p)


def test_log_rotation_keeps_copies_and_empties_in_place(tmp_path: Path) -> None:
    cfg = LogsConfig(max_mb=1 / 1024, keep=2)  # 1 kB
    log = tmp_path / "x.log"
    assert not rotate(log, cfg)  # no file yet
    with log.open("ab") as writer:  # as a spawned process holds it: append mode, open throughout
        for run in range(3):
            writer.write(f"run {run}\n".encode() + b"." * 2000 + b"\n")
            writer.flush()
            assert rotate(log, cfg)
            assert log.stat().st_size == 0
        writer.write(b"after\n")
        writer.flush()
    assert log.read_bytes() == b"after\n"  # the writer's next line lands at the start: no hole
    assert rotated(log, 1).read_bytes().startswith(b"run 2")
    assert rotated(log, 2).read_bytes().startswith(b"run 1")
    assert not rotated(log, 3).exists()  # run 0 was the oldest beyond `keep`
    assert not rotate(log, cfg)  # under the limit
    log.write_bytes(b"." * 5000)
    assert not rotate(log, LogsConfig(max_mb=None))
