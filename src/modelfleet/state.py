"""The JSON state file: which instances this stack started, and how to recognise them.

The schema is the seed's (``server_8080: {role, pid, port, started_at, model_path,
log_file}``) plus the instance's identity (component, index, kind, tier, roles, node)
and what it takes to re-adopt its process from another command or launcher: the
process start time as the node's kernel reports it (``create_time``), so a reused pid is
never mistaken for ours. Writes are atomic (:func:`~modelfleet.fileutil.write_atomic`)
and every read-modify-write holds an exclusive lock on ``state.lock``.

Every entry is checked field by field when read. A malformed entry is never dropped in
silence (its process would be forgotten): reading fails naming the entry and the field,
and :meth:`StateStore.read_salvage` (what ``stop --all`` uses) keeps what can still be
recognised and reports the rest.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from modelfleet.config import Tier
from modelfleet.errors import StateError
from modelfleet.fileutil import file_lock, write_atomic
from modelfleet.instance import IDENTITY_FIELDS, LOCAL_NODE, Handle, Identity, Kind, reach_host, url_of

STATE_FILE = "orchestrator_state.json"
LOCK_FILE = "state.lock"
MAX_ENTRY_PROBLEMS = 20


@dataclass(frozen=True, kw_only=True)
class InstanceRecord(Identity):
    """One running instance, as stored in the state file: its identity and its process."""

    pid: int
    started_at: str
    log_file: str
    model_path: str | None = None
    create_time: float = 0.0  # the kernel's process start time: a reused pid is not ours
    argv: tuple[str, ...] = ()
    health_path: str = "/health"
    stopping: bool = False  # set before a stop signals it: its exit is not a crash
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def handle(self) -> Handle:
        where = self.node_address
        ref = self.key if self.node != LOCAL_NODE else ""  # a remote launcher names the process by its key
        return Handle(self.node, self.pid, self.create_time, self.log_file, self.label, ref, where)

    @property
    def node_address(self) -> str:
        address = self.extra.get("node_address")
        return address if isinstance(address, str) else ""

    @property
    def reach_host(self) -> str:
        """Where it is reached: on another node, a wildcard bind is reached at that node's address."""
        return reach_host(self.host, self.node_address)

    @property
    def base_url(self) -> str:
        return url_of(self.reach_host, self.port)

    @property
    def role(self) -> str:
        """The seed's single role field: the first role served (or the component)."""
        return self.roles[0] if self.roles else self.component

    def to_json(self) -> dict[str, Any]:
        head = {"role": self.role, "pid": self.pid, "port": self.port, "started_at": self.started_at}
        head |= {"model_path": self.model_path, "log_file": self.log_file}
        rest = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in head}
        rest |= {"kind": self.kind.value, "tier": self.tier.value, "roles": list(self.roles), "argv": list(self.argv)}
        return head | rest

    @classmethod
    def from_json(cls, key: str, data: object, lax: bool = False) -> InstanceRecord:
        """Check every field; raise StateError naming the entry and each field at fault.

        ``lax`` accepts numbers written as strings (``"8080"``), for salvaging.
        """
        if not isinstance(data, dict):
            raise StateError(f"state entry {key} is not an object (it is {type(data).__name__})")
        problems: list[str] = []
        values = _fields_of(data, problems, lax)
        if not problems and "component" not in values:
            values["component"] = data.get("role") if isinstance(data.get("role"), str) else None
            if values["component"] is None:
                problems.append("component: missing (and no role to take it from)")
        if not problems and key != f"server_{values['port']}":
            problems.append(f"port: {values['port']} does not match the entry's key {key}")
        if problems:
            listed = "; ".join(problems[:MAX_ENTRY_PROBLEMS])
            raise StateError(f"state entry {key} is malformed: {listed}")
        return cls(**values)


def _fields_of(data: dict[str, Any], problems: list[str], lax: bool) -> dict[str, Any]:
    """The record's fields from JSON, each checked against its type."""
    out: dict[str, Any] = {}

    def take(name: str, check: Any, required: bool = True) -> None:
        if name not in data:
            if required:
                problems.append(f"{name}: missing")
            return
        try:
            out[name] = check(data[name])
        except (TypeError, ValueError) as exc:
            problems.append(f"{name}: {exc} (got {_short(data[name])})")

    take("pid", lambda v: _int(v, lax, lo=1))
    take("port", lambda v: _int(v, lax, lo=1, hi=65535))
    take("started_at", _str)
    take("log_file", _str)
    take("model_path", lambda v: None if v is None else _str(v), required=False)
    take("create_time", lambda v: _float(v, lax), required=False)
    take("component", _str, required=False)
    take("index", lambda v: _int(v, lax, lo=0), required=False)
    take("replicas", lambda v: _int(v, lax, lo=1), required=False)
    take("host", _str, required=False)
    take("node", _str, required=False)
    take("kind", Kind, required=False)
    take("tier", Tier, required=False)
    take("roles", lambda v: tuple(_str(x) for x in _list(v)), required=False)
    take("argv", lambda v: tuple(_str(x) for x in _list(v)), required=False)
    take("health_path", _str, required=False)
    take("stopping", _bool, required=False)
    take("extra", _dict, required=False)
    out.setdefault("index", 0)
    out.setdefault("replicas", 1)
    out.setdefault("host", "127.0.0.1")
    out.setdefault("kind", Kind.LLAMA_SERVER)
    out.setdefault("tier", Tier.HOT)
    out.setdefault("roles", ())
    return {k: v for k, v in out.items() if k in IDENTITY_FIELDS or k in _RECORD_FIELDS}


_RECORD_FIELDS = frozenset(f.name for f in fields(InstanceRecord))


def _short(v: object) -> str:
    text = repr(v)
    return text if len(text) <= 80 else text[:77] + "..."


def _int(v: object, lax: bool, lo: int, hi: int | None = None) -> int:
    if isinstance(v, str) and lax and v.strip().isascii() and v.strip().isdigit():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError("must be an integer")
    if v < lo or (hi is not None and v > hi):
        raise ValueError(f"must be between {lo} and {hi}" if hi is not None else f"must be at least {lo}")
    return v


def _float(v: object, lax: bool) -> float:
    if isinstance(v, str) and lax:
        v = float(v)
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v < 0:
        raise TypeError("must be a non-negative number")
    return float(v)


def _str(v: object) -> str:
    if not isinstance(v, str):
        raise TypeError("must be a string")
    return v


def _bool(v: object) -> bool:
    if not isinstance(v, bool):
        raise TypeError("must be true or false")
    return v


def _list(v: object) -> list[Any]:
    if not isinstance(v, list):
        raise TypeError("must be a list")
    return v


def _dict(v: object) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise TypeError("must be an object")
    return v


@dataclass
class Salvage:
    """What ``read_salvage`` could recognise, and the entries it could not."""

    records: dict[str, InstanceRecord]
    unreadable: dict[str, str]  # key -> why, with the raw pid when one can be seen
    raw: dict[str, Any] = field(default_factory=dict)  # the unreadable entries as they are

    def clues(self, key: str) -> tuple[int | None, list[str]]:
        """(port, argv) of an unreadable entry, where they can still be read: enough to find its process."""
        entry = self.raw.get(key)
        if not isinstance(entry, dict):
            return None, []
        port, argv = entry.get("port"), entry.get("argv")
        if isinstance(port, str) and port.isascii() and port.isdigit():
            port = int(port)
        args = [a for a in argv if isinstance(a, str)] if isinstance(argv, list) else []
        good_port = port if isinstance(port, int) and not isinstance(port, bool) else None
        return good_port, args if isinstance(argv, list) and len(args) == len(argv) else []


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

    def _raw(self) -> dict[str, Any]:
        try:
            raw = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise StateError(
                f"state file {self.path} is unreadable ({str(exc)[:200]}); move it aside, "
                "then stop what it started by pid (`ps`, `kill PID`)"
            ) from exc
        if not isinstance(raw, dict):
            raise StateError(
                f"state file {self.path} does not hold a JSON object; move it aside and stop strays by pid"
            )
        return raw

    def read(self) -> dict[str, InstanceRecord]:
        """Every record, by key. A missing file is an empty stack; a malformed entry is an error."""
        salvage = self.read_salvage(lax=False)
        if salvage.unreadable:
            listed = "\n".join(f"  {why}" for why in salvage.unreadable.values())
            raise StateError(
                f"state file {self.path} has {len(salvage.unreadable)} malformed entr"
                f"{'y' if len(salvage.unreadable) == 1 else 'ies'}:\n{listed}\n"
                "Run `modelfleet stop --all` to stop every instance it can still recognise and drop the rest, "
                "or fix the entry by hand."
            )
        return salvage.records

    def read_salvage(self, lax: bool = True) -> Salvage:
        """The records that can be recognised (``lax``: numbers written as strings too), and why not the rest."""
        salvage = Salvage({}, {})
        for key, data in self._raw().items():
            try:
                salvage.records[key] = InstanceRecord.from_json(key, data, lax=lax)
            except StateError as exc:
                pid = data.get("pid") if isinstance(data, dict) else None
                seen = f" (recorded pid: {_short(pid)})" if pid is not None else ""
                salvage.unreadable[key] = f"{exc}{seen}"
                salvage.raw[key] = data
        return salvage

    def write(self, records: dict[str, InstanceRecord]) -> None:
        """Replace the file atomically."""
        self.ensure()
        data = {k: r.to_json() for k, r in sorted(records.items(), key=lambda kv: kv[1].port)}
        write_atomic(self.path, json.dumps(data, indent=2) + "\n")

    @contextlib.contextmanager
    def lock(self, timeout_s: float = 900.0) -> Iterator[None]:
        """Exclusive lock for a read-modify-write, across processes."""
        self.ensure()
        with file_lock(self.dir / LOCK_FILE, timeout_s):
            yield

    def put(self, *records: InstanceRecord) -> None:
        """Add or replace records (call under :meth:`lock`); other entries are kept as they are."""
        raw = self._raw()
        for rec in records:
            raw[rec.key] = rec.to_json()
        self._write_raw(raw)

    def remove(self, keys: list[str]) -> None:
        """Drop records (call under :meth:`lock`); malformed entries of other keys are kept as they are."""
        raw = self._raw()
        for k in keys:
            raw.pop(k, None)
        self._write_raw(raw)

    def _write_raw(self, raw: dict[str, Any]) -> None:
        self.ensure()
        write_atomic(self.path, json.dumps(raw, indent=2) + "\n")
