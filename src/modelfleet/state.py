"""The JSON state file: which instances this stack started, and how to recognise them.

The schema is the seed's (``server_8080: {role, pid, port, started_at, model_path,
log_file}``) plus what it takes to never mistake a reused pid for ours: the process
start time as the kernel reports it (``create_time``). Writes are atomic (tmp file,
fsync, replace) so a reader never sees half a file, and every read-modify-write
holds an exclusive lock on ``state.lock`` so concurrent CLI invocations can't lose
each other's changes.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime
from pathlib import Path
from typing import Any

import psutil

from modelfleet.errors import StateError

STATE_FILE = "orchestrator_state.json"
LOCK_FILE = "state.lock"
# psutil's create_time is rounded; the same process always gives the same value, but
# allow a little slack for the float round trip through JSON.
_CREATE_TIME_SLACK_S = 0.05


@dataclass
class InstanceRecord:
    """One running instance, as stored in the state file."""

    role: str
    pid: int
    port: int
    started_at: str
    model_path: str | None
    log_file: str
    component: str = ""
    index: int = 0
    replicas: int = 1
    kind: str = "llama-server"
    host: str = "127.0.0.1"
    roles: list[str] = field(default_factory=list)
    tier: str = "hot"
    create_time: float = 0.0
    argv: list[str] = field(default_factory=list)
    health_path: str = "/health"
    stopping: bool = False  # set before a stop signals it: its exit is not a crash
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.component}[{self.index}]" if self.replicas > 1 else self.component

    @property
    def key(self) -> str:
        return instance_key(self.port)

    @property
    def base_url(self) -> str:
        return local_url(self.host, self.port)

    @classmethod
    def from_json(cls, key: str, data: dict[str, Any]) -> InstanceRecord:
        known = {f.name for f in fields(cls)}
        try:
            rec = cls(**{k: v for k, v in data.items() if k in known})
        except TypeError as exc:
            raise StateError(
                f"state entry {key} is malformed ({exc}); remove it or run `modelfleet stop --all`"
            ) from exc
        if not rec.component:
            rec.component = rec.role
        return rec

    def process(self) -> psutil.Process | None:
        """The live process this record describes, or None if it is gone or the pid was reused."""
        try:
            proc = psutil.Process(self.pid)
            if abs(proc.create_time() - self.create_time) > _CREATE_TIME_SLACK_S:
                return None  # same pid, another process: not ours
            if proc.status() == psutil.STATUS_ZOMBIE:
                return None
            return proc
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            return None


def write_atomic(path: Path, text: str) -> None:
    """Replace ``path`` so that a reader sees the old file or the new one, never half of one.

    Written to a temp file beside it (unique per process and thread), fsynced, renamed over
    it, and the folder fsynced so the rename survives a crash.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


@contextlib.contextmanager
def file_lock(path: Path, timeout_s: float) -> Iterator[None]:
    """An exclusive lock on ``path`` across processes (and threads: each call opens its own fd).

    Closing the fd releases it, so a crashed holder never leaves it locked.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise StateError(f"another modelfleet command holds {path}; wait for it to finish") from None
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)


def instance_key(port: int) -> str:
    """The state file key of the instance on ``port``, as in the seed: ``server_8080``."""
    return f"server_{port}"


def local_host(host: str) -> str:
    """How this machine reaches a service bound to ``host``: a wildcard bind is reached on loopback."""
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host


def local_url(host: str, port: int) -> str:
    return f"http://{local_host(host)}:{port}"


def now_iso() -> str:
    return datetime.now().isoformat(timespec="seconds")


class StateStore:
    """Owns one state directory: the state file, its lock and the logs folder."""

    def __init__(self, state_dir: Path) -> None:
        self.dir = state_dir
        self.path = state_dir / STATE_FILE
        self.logs = state_dir / "logs"

    def ensure(self) -> None:
        try:
            self.logs.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StateError(f"cannot create state directory {self.dir}: {exc.strerror or exc}") from exc

    def read(self) -> dict[str, InstanceRecord]:
        """Every record, by key. A missing file is an empty stack."""
        try:
            raw = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise StateError(
                f"state file {self.path} is unreadable ({exc}); move it aside and stop strays by pid"
            ) from exc
        if not isinstance(raw, dict):
            raise StateError(f"state file {self.path} does not hold a JSON object")
        return {k: InstanceRecord.from_json(k, v) for k, v in raw.items() if isinstance(v, dict)}

    def write(self, records: dict[str, InstanceRecord]) -> None:
        """Replace the file atomically."""
        self.ensure()
        data = {k: asdict(r) for k, r in sorted(records.items(), key=lambda kv: kv[1].port)}
        write_atomic(self.path, json.dumps(data, indent=2) + "\n")

    @contextlib.contextmanager
    def lock(self, timeout_s: float = 900.0) -> Iterator[None]:
        """Exclusive lock for a read-modify-write, across processes."""
        self.ensure()
        with file_lock(self.dir / LOCK_FILE, timeout_s):
            yield

    def put(self, rec: InstanceRecord) -> None:
        """Add or replace one record (call under :meth:`lock`)."""
        records = self.read()
        records[rec.key] = rec
        self.write(records)

    def remove(self, keys: list[str]) -> None:
        """Drop records (call under :meth:`lock`)."""
        records = self.read()
        for k in keys:
            records.pop(k, None)
        self.write(records)
