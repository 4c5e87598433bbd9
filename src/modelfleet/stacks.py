"""The machine's running stacks: one registry file under the state root.

Every ``start`` registers its stack (name, config file, state directory), so later
commands find it without ``--config``: with one stack running they act on it, with
several they list them and ask for ``--stack NAME``. An entry is only a pointer: it is
trusted only while its state file names an instance that still runs (asked of the
launcher), and dropped as soon as it does not.

The registry lives in ``$MODELFLEET_STATE_ROOT``, else the parent of
``$MODELFLEET_STATE_DIR``, else ``$XDG_STATE_HOME/modelfleet`` (``~/.local/state/modelfleet``).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from modelfleet.errors import StateError, UsageError
from modelfleet.fileutil import file_lock, now_iso, write_atomic
from modelfleet.launcher import Launcher, LocalLauncher
from modelfleet.state import InstanceRecord, StateStore

ENV_STATE_ROOT = "MODELFLEET_STATE_ROOT"
REGISTRY_FILE = "stacks.json"
LOCK_FILE = "stacks.lock"


def state_root() -> Path:
    """Where the registry lives (see the module docstring)."""
    if os.environ.get(ENV_STATE_ROOT):
        return Path(os.environ[ENV_STATE_ROOT]).expanduser().resolve()
    if os.environ.get("MODELFLEET_STATE_DIR"):
        return Path(os.environ["MODELFLEET_STATE_DIR"]).expanduser().resolve().parent
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "modelfleet"


@dataclass(frozen=True)
class Entry:
    """One registered stack."""

    name: str
    state_dir: str
    config: str | None  # the stack file; None for a config given as text only
    dev: bool = False  # the built-in dev stack
    registered_at: str = ""

    @classmethod
    def from_json(cls, data: object) -> Entry | None:
        if not isinstance(data, dict):
            return None
        name, state_dir, config = data.get("name"), data.get("state_dir"), data.get("config")
        if not isinstance(name, str) or not isinstance(state_dir, str) or not isinstance(config, str | None):
            return None
        return cls(name, state_dir, config, bool(data.get("dev")), str(data.get("registered_at", "")))


@dataclass(frozen=True)
class RunningStack:
    """A registered stack with what runs of it now."""

    entry: Entry
    live: list[InstanceRecord]

    @property
    def name(self) -> str:
        return self.entry.name

    def to_json(self) -> dict[str, Any]:
        return asdict(self.entry) | {
            "instances": [
                {"name": r.name, "component": r.component, "port": r.port, "pid": r.pid, "tier": r.tier.value}
                for r in self.live
            ]
        }


class Registry:
    """The registry file, read and written under its own lock."""

    def __init__(self, root: Path | None = None, launcher: Launcher | None = None) -> None:
        self.root = root or state_root()
        self.path = self.root / REGISTRY_FILE
        self.launcher: Launcher = launcher or LocalLauncher()

    def _read(self) -> list[Entry]:
        try:
            raw = json.loads(self.path.read_text())
        except FileNotFoundError:
            return []
        except (OSError, ValueError):
            return []  # a damaged registry holds nothing worth trusting: the next write replaces it
        items = raw.get("stacks", []) if isinstance(raw, dict) else []
        return [e for e in (Entry.from_json(i) for i in items if isinstance(items, list)) if e is not None]

    def _write(self, entries: list[Entry]) -> None:
        text = json.dumps({"stacks": [asdict(e) for e in entries]}, indent=2) + "\n"
        write_atomic(self.path, text)

    def register(self, name: str, state_dir: Path, config: str | None, dev: bool) -> None:
        """Add (or refresh) the entry for ``state_dir``; one entry per state directory."""
        entry = Entry(name, str(state_dir), config, dev, now_iso())
        try:
            with file_lock(self.root / LOCK_FILE, timeout_s=30.0):
                kept = [e for e in self._read() if e.state_dir != entry.state_dir]
                self._write([*kept, entry])
        except OSError as exc:
            raise StateError(f"cannot write the stack registry {self.path}: {exc.strerror or exc}") from exc

    def running(self) -> list[RunningStack]:
        """Every registered stack with a live instance; the others are dropped from the file."""
        try:
            with file_lock(self.root / LOCK_FILE, timeout_s=30.0):
                entries = self._read()
                found = [RunningStack(e, self._live(e)) for e in entries]
                alive = [r for r in found if r.live]
                if len(alive) != len(entries):
                    self._write([r.entry for r in alive])
        except OSError:
            return []  # no state root yet (or not writable): nothing registered
        return alive

    def _live(self, entry: Entry) -> list[InstanceRecord]:
        try:
            records = StateStore(Path(entry.state_dir)).read_salvage().records
        except StateError:
            return []
        return sorted((r for r in records.values() if self.launcher.alive(r.handle)), key=lambda r: r.port)

    def choose(self, name: str | None) -> RunningStack | None:
        """The running stack to act on: ``name`` (a stack name or state directory), or the only one.

        None when nothing runs; a StackChoice error when several run and none was named.
        """
        alive = self.running()
        if name is not None:
            wanted = [r for r in alive if name in (r.name, r.entry.state_dir)]
            if len(wanted) == 1:
                return wanted[0]
            if not wanted:
                listed = ", ".join(r.name for r in alive) or "none"
                raise UsageError(f"no running stack is named '{name}'; running: {listed}")
            raise UsageError(
                f"several running stacks are named '{name}'; give the state directory instead:\n" + _listing(wanted)
            )
        if len(alive) > 1:
            raise UsageError(f"{len(alive)} stacks are running; say which with --stack NAME:\n" + _listing(alive))
        return alive[0] if alive else None


def _listing(stacks: list[RunningStack]) -> str:
    return "\n".join(
        f"  {r.name}  ({r.entry.config or 'no config file'}, state {r.entry.state_dir}, {len(r.live)} running)"
        for r in stacks
    )
