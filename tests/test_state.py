"""Tests for the JSON state file: the seed's schema, atomic writes, locking across
processes and recognising our own processes by pid and start time."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from conftest import make_record, process_of
from modelfleet.errors import StateError
from modelfleet.fileutil import now_iso
from modelfleet.state import LOCK_FILE, STATE_FILE, InstanceRecord, StateStore

SEED_KEYS = {"role", "pid", "port", "started_at", "model_path", "log_file"}


def record(port: int, **kwargs: object) -> InstanceRecord:
    fields: dict[str, object] = {
        "role": "frontdoor",
        "pid": 4242,
        "port": port,
        "started_at": "2026-01-02T03:04:05",
        "model_path": f"/models/m{port}.gguf",
        "log_file": f"/logs/llama-server-{port}.log",
    }
    fields.update(kwargs)
    return make_record(**fields)  # type: ignore[arg-type]


@pytest.fixture
def store(tmp_path: Path) -> StateStore:
    return StateStore(tmp_path / "state")


def leftover_temp_files(store: StateStore) -> list[Path]:
    return [p for p in store.dir.iterdir() if p.name.endswith(".tmp")]


# --------------------------------------------------------------------------- round trip


def test_round_trip_keeps_the_seed_schema(store: StateStore) -> None:
    rec = record(
        8080, role="frontdoor", component="frontdoor", pid=1234, create_time=1700000000.25, roles=("frontdoor",)
    )
    store.write({"server_8080": rec})

    raw = json.loads(store.path.read_text())
    assert list(raw) == ["server_8080"]
    entry = raw["server_8080"]
    assert set(entry) >= SEED_KEYS
    assert entry["role"] == "frontdoor"
    assert entry["pid"] == 1234
    assert entry["port"] == 8080
    assert entry["started_at"] == "2026-01-02T03:04:05"
    assert entry["model_path"] == "/models/m8080.gguf"
    assert entry["log_file"] == "/logs/llama-server-8080.log"

    back = store.read()
    assert back == {"server_8080": rec}


def test_state_file_name_is_the_seeds(store: StateStore) -> None:
    store.write({"server_8080": record(8080)})
    assert store.path.name == STATE_FILE == "orchestrator_state.json"


def test_reads_a_seed_state_file(store: StateStore) -> None:
    store.dir.mkdir(parents=True)
    seed = {
        "server_8080": {
            "role": "frontdoor",
            "pid": 99,
            "port": 8080,
            "started_at": "2025-06-01T10:00:00",
            "model_path": "/mnt/raid0/llm/models/Qwen3-Coder-30B-A3B-Q4_K_M.gguf",
            "log_file": "/mnt/raid0/llm/epyc-orchestrator/logs/llama-server-8080.log",
        },
        "server_8088": {
            "role": "retrieval_code",
            "pid": 100,
            "port": 8088,
            "started_at": "2025-06-01T10:00:01",
            "model_path": None,
            "log_file": "/logs/nextplaid-8088.log",
            "some_future_key": 1,
        },
    }
    store.path.write_text(json.dumps(seed))
    recs = store.read()
    assert set(recs) == {"server_8080", "server_8088"}
    fd = recs["server_8080"]
    assert (fd.role, fd.pid, fd.port) == ("frontdoor", 99, 8080)
    assert fd.component == "frontdoor"  # the seed has no component: the role names it
    assert fd.name == "frontdoor"
    assert recs["server_8088"].model_path is None


def test_written_file_is_valid_json_after_each_write(store: StateStore) -> None:
    records: dict[str, InstanceRecord] = {}
    for port in (8082, 8080, 8090, 8081):
        records[f"server_{port}"] = record(port, started_at=now_iso())
        store.write(records)
        raw = json.loads(store.path.read_text())
        assert set(raw) == set(records)
        assert leftover_temp_files(store) == []
    # Sorted by port, as the seed wrote it.
    assert list(json.loads(store.path.read_text())) == ["server_8080", "server_8081", "server_8082", "server_8090"]


def test_put_and_remove(store: StateStore) -> None:
    with store.lock():
        store.put(record(8080))
        store.put(record(8081, role="coder"))
        store.put(record(8080, pid=7))  # replaces
    assert set(store.read()) == {"server_8080", "server_8081"}
    assert store.read()["server_8080"].pid == 7
    with store.lock():
        store.remove(["server_8080", "server_9999"])
    assert set(store.read()) == {"server_8081"}
    assert leftover_temp_files(store) == []


def test_instance_name_and_url() -> None:
    rec = record(8091, component="embedder", index=1, replicas=6, host="0.0.0.0")
    assert rec.name == "embedder[1]"
    assert rec.base_url == "http://127.0.0.1:8091"
    assert record(8080, component="frontdoor").name == "frontdoor"


# --------------------------------------------------------------------------- bad files


def test_missing_file_reads_as_empty(store: StateStore) -> None:
    assert store.read() == {}
    assert not store.path.exists()


def test_corrupt_file_names_the_file(store: StateStore) -> None:
    store.dir.mkdir(parents=True)
    store.path.write_text('{"server_8080": {"role": "front')
    with pytest.raises(StateError) as info:
        store.read()
    assert str(store.path) in str(info.value)


def test_non_object_file_names_the_file(store: StateStore) -> None:
    store.dir.mkdir(parents=True)
    store.path.write_text("[1, 2, 3]\n")
    with pytest.raises(StateError) as info:
        store.read()
    assert str(store.path) in str(info.value)


def test_malformed_entry_names_the_key(store: StateStore) -> None:
    store.dir.mkdir(parents=True)
    store.path.write_text(json.dumps({"server_8080": {"role": "frontdoor", "port": 8080}}))
    with pytest.raises(StateError) as info:
        store.read()
    assert "server_8080" in str(info.value)


def test_unwritable_state_dir(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    store = StateStore(blocker / "state")
    with pytest.raises(StateError) as info:
        store.write({})
    assert str(blocker / "state") in str(info.value)


# --------------------------------------------------------------------------- locking


def test_lock_times_out_with_a_clear_message(store: StateStore) -> None:
    # flock locks belong to open files, so a second open in this process conflicts too.
    with store.lock():
        start = time.monotonic()
        with pytest.raises(StateError) as info, store.lock(timeout_s=0.3):
            pass  # pragma: no cover - never reached
        assert time.monotonic() - start < 5
    assert str(store.dir / LOCK_FILE) in str(info.value)
    with store.lock(timeout_s=1):  # released again
        pass


WORKER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from modelfleet.config import Tier
    from modelfleet.instance import Kind
    from modelfleet.state import InstanceRecord, StateStore

    state_dir, worker, count = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    store = StateStore(state_dir)
    for i in range(count):
        port = 20000 + worker * 100 + i
        rec = InstanceRecord(
            component=f"w{worker}", index=0, replicas=1, port=port, host="127.0.0.1", kind=Kind.LLAMA_SERVER,
            tier=Tier.HOT, roles=(f"w{worker}",), pid=worker + 1, started_at="now", log_file=f"/logs/{port}.log",
        )
        with store.lock(timeout_s=120):
            store.put(rec)
    """
)


def test_concurrent_read_modify_write_loses_nothing(store: StateStore) -> None:
    workers, per_worker = 4, 25
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for w in range(workers):
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-c", WORKER, str(store.dir), str(w), str(per_worker)],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                )
            )
        # Unlocked readers never see half a file while the workers write.
        deadline = time.monotonic() + 120
        seen = 0
        while any(p.poll() is None for p in procs):
            assert time.monotonic() < deadline, "workers did not finish"
            recs = store.read()
            assert len(recs) >= seen
            seen = len(recs)
            time.sleep(0.005)
        for p in procs:
            _, err = p.communicate(timeout=30)
            assert p.returncode == 0, err.decode()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()

    raw = json.loads(store.path.read_text())
    expected = {f"server_{20000 + w * 100 + i}" for w in range(workers) for i in range(per_worker)}
    assert set(raw) == expected
    recs = store.read()
    assert len(recs) == workers * per_worker
    assert all(recs[f"server_{20000 + w * 100}"].role == f"w{w}" for w in range(workers))
    assert leftover_temp_files(store) == []


# --------------------------------------------------------------------------- recognising our processes


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)


def test_process_of_a_live_record(sleeper: subprocess.Popen[bytes], store: StateStore) -> None:
    created = psutil.Process(sleeper.pid).create_time()
    rec = record(8080, pid=sleeper.pid, create_time=created)
    proc = process_of(rec)
    assert proc is not None
    assert proc.pid == sleeper.pid
    # The start time survives the JSON round trip.
    store.write({"server_8080": rec})
    back = process_of(store.read()["server_8080"])
    assert back is not None
    assert back.pid == sleeper.pid


@pytest.mark.parametrize("offset", [-10.0, 1.0, 3600.0])
def test_reused_pid_is_not_ours(sleeper: subprocess.Popen[bytes], offset: float) -> None:
    created = psutil.Process(sleeper.pid).create_time()
    assert process_of(record(8080, pid=sleeper.pid, create_time=created + offset)) is None


def test_exited_process_is_gone(sleeper: subprocess.Popen[bytes]) -> None:
    created = psutil.Process(sleeper.pid).create_time()
    rec = record(8080, pid=sleeper.pid, create_time=created)
    sleeper.kill()
    sleeper.wait(timeout=10)
    assert process_of(rec) is None


def test_zombie_is_not_alive(sleeper: subprocess.Popen[bytes]) -> None:
    created = psutil.Process(sleeper.pid).create_time()
    rec = record(8080, pid=sleeper.pid, create_time=created)
    os.kill(sleeper.pid, signal.SIGKILL)  # not reaped yet: a zombie
    deadline = time.monotonic() + 10
    while psutil.Process(sleeper.pid).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert process_of(rec) is None


def test_pid_that_never_existed() -> None:
    pid = 2**22 + 12345  # above the usual pid_max
    while psutil.pid_exists(pid):  # pragma: no cover
        pid += 1
    assert process_of(record(8080, pid=pid, create_time=1.0)) is None
