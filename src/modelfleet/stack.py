"""The lifecycle verbs, used by the CLI and the API alike: start, stop, status, reload.

One :class:`Stack` owns one state directory. Every verb that changes what runs takes
the state lock for its whole duration, so two ``start`` commands at once serialise
and the second finds the first's instances healthy and keeps them.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

import psutil

from modelfleet import health, logs, memory
from modelfleet.config import API_COMPONENT, StackConfig, Tier
from modelfleet.errors import ConfigError, FleetError, StartupError, UsageError
from modelfleet.launcher import BinaryInfo, InstanceSpec, Launcher, LocalLauncher, plan_instances
from modelfleet.state import InstanceRecord, StateStore, now_iso

STOP_GRACE_S = 10.0
KILL_WAIT_S = 5.0


class Status(StrEnum):
    """What ``status`` says of an instance."""

    HEALTHY = "healthy"
    LOADING = "loading"
    UNHEALTHY = "unhealthy"
    DEAD = "dead"  # in the state file, process gone
    STALE = "stale"  # in the state file, pid now belongs to another process
    STOPPED = "stopped"  # configured, not running
    FAILED = "failed"  # the front door gave up restarting it (restart budget spent)


@dataclass
class StatusRow:
    name: str
    component: str
    port: int
    pid: int | None
    status: Status
    model: str
    tier: str
    roles: list[str]
    started_at: str | None = None
    log_file: str | None = None
    in_flight: int | None = None  # from the front door, when it runs
    queued: int | None = None
    routing: str | None = None  # the front door's view: ready, draining, failed...
    estimate_bytes: int | None = None  # memory estimate of one instance (from GGUF metadata or ram_gb)
    measured_bytes: int | None = None  # memory measured once it was ready (RSS or reported buffers)


@dataclass
class StartReport:
    started: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)  # kept, but running an older config
    ready_s: dict[str, float] = field(default_factory=dict)


Say = Callable[[str], None]
Progress = Callable[[list[health.Waiter], health.Waiter | None], None]


def _quiet(_: str) -> None:
    pass


class Stack:
    """Lifecycle of one stack: a config, a state directory, a launcher."""

    def __init__(
        self,
        cfg: StackConfig,
        state_dir: Path,
        binary: BinaryInfo | None,
        launcher: Launcher | None = None,
        say: Say = _quiet,
        progress: Progress | None = None,
        stop_grace_s: float = STOP_GRACE_S,
        binary_error: FleetError | None = None,
    ) -> None:
        self.cfg = cfg
        self.store = StateStore(state_dir)
        self.binary = binary
        self.binary_error = binary_error
        self.launcher = launcher or LocalLauncher()
        self.say = say
        self.progress = progress
        self.stop_grace_s = stop_grace_s
        self._procs: dict[int, subprocess.Popen[bytes]] = {}

    # --- selection -----------------------------------------------------------

    def select(self, names: Iterable[str] = (), hot_only: bool = False, include: Iterable[str] = ()) -> list[str]:
        """Component names to start: the named ones, or the HOT tier plus ``include``."""
        names, include = list(names), list(include)
        known = self.component_names()
        for n in [*names, *include]:
            self._check_component(n)
        if names and hot_only:
            raise UsageError("give component names or --hot-only, not both")
        if names:
            return [n for n in known if n in names]
        comps = self.cfg.components()
        chosen = {n for n, c in comps.items() if c.tier is Tier.HOT} | set(include) | {API_COMPONENT}
        return [n for n in known if n in chosen]

    def _check_component(self, name: str) -> None:
        known = self.component_names()
        if name not in known:
            raise UsageError(f"'{name}' is not a server or service of this stack; known: {', '.join(known)}")

    def component_names(self) -> list[str]:
        """Servers and services in config order, then the front door when it is enabled."""
        return [*self.cfg.components(), *([API_COMPONENT] if self.cfg.api.enabled else [])]

    def specs(self, names: Iterable[str]) -> list[InstanceSpec]:
        return plan_instances(self.cfg, names, self.store.dir, self.binary)

    # --- start ---------------------------------------------------------------

    def start(self, names: Iterable[str]) -> StartReport:
        """Start every instance of the named components that is not already running."""
        specs = self.specs(names)
        with self.store.lock():
            return self._start_locked(specs)

    def _start_locked(self, specs: list[InstanceSpec]) -> StartReport:
        report = StartReport()
        records = self.store.read()
        to_launch: list[InstanceSpec] = []
        adopt: list[tuple[InstanceSpec, InstanceRecord]] = []
        for spec in specs:
            rec = records.get(spec.key)
            if rec is not None and rec.component == spec.component and rec.process() is not None:
                adopt.append((spec, rec))
                report.kept.append(spec.name)
                if list(rec.argv) != list(spec.argv):
                    report.changed.append(spec.name)
            else:
                to_launch.append(spec)
        self._preflight(to_launch, records)
        if adopt:
            self._wait([self._waiter_for_record(spec, rec) for spec, rec in adopt])
        started: list[InstanceRecord] = []
        try:
            for batch, cooldown_s in _batches(to_launch):
                # The front door adopts what is running, so it starts once the models are up.
                launched = [self._launch(spec) for spec in batch]
                started.extend(launched)
                waiters = [self._waiter_for_launch(spec, rec) for spec, rec in zip(batch, launched, strict=True)]
                self._wait(waiters)
                for w, spec in zip(waiters, batch, strict=True):
                    report.ready_s[spec.name] = w.elapsed_s
                    report.started.append(spec.name)
                for spec, rec in zip(batch, launched, strict=True):
                    memory.record_ready(self.cfg, spec, rec, self.store)
                if cooldown_s:
                    self.say(f"cooling down {cooldown_s:g} s after {batch[0].name}")
                    time.sleep(cooldown_s)
        except BaseException:
            if started:
                self.say("start failed; stopping the instances this command started")
                self._stop_records(started)
            raise
        return report

    def _preflight(self, specs: list[InstanceSpec], records: dict[str, InstanceRecord]) -> None:
        """Refuse before starting anything: missing files, ports taken by other processes."""
        missing = [f"  {key}: {path}" for s in specs for key, path in s.required_files if not Path(path).is_file()]
        missing += [
            f"  services.{s.component}.command: program {s.argv[0]!r} was not found"
            for s in specs
            if s.kind == "service" and not _program_exists(s.argv[0], s.cwd)
        ]
        if missing:
            uniq = list(dict.fromkeys(missing))
            raise StartupError(f"{len(uniq)} required file(s) are missing; nothing was started:\n" + "\n".join(uniq))
        if specs and any(s.kind == "llama-server" for s in specs) and self.binary is None:
            raise self.binary_error or StartupError("no llama-server binary is known; run `modelfleet setup`")
        taken = [msg for s in specs if (msg := port_conflict(s.host, s.port))]
        if taken:
            raise StartupError("port(s) already in use; nothing was started:\n" + "\n".join(taken))
        # Records for these keys are dead or stale: forget them.
        stale = [s.key for s in specs if s.key in records]
        if stale:
            self.store.remove(stale)

    def _launch(self, spec: InstanceSpec) -> InstanceRecord:
        logs.rotate(Path(spec.log_file), self.cfg.logs)
        proc = self.launcher.spawn(spec)
        self._procs[proc.pid] = proc
        try:
            create_time = psutil.Process(proc.pid).create_time()
        except psutil.NoSuchProcess:
            create_time = 0.0
        rec = InstanceRecord(
            role=spec.roles[0] if spec.roles else spec.component,
            pid=proc.pid,
            port=spec.port,
            started_at=now_iso(),
            model_path=spec.model_path,
            log_file=spec.log_file,
            component=spec.component,
            index=spec.index,
            replicas=spec.replicas,
            kind=spec.kind,
            host=spec.host,
            roles=list(spec.roles),
            tier=spec.tier.value,
            create_time=create_time,
            argv=list(spec.argv),
            health_path=spec.health_path,
        )
        # Record at once, so a crash of this command leaves nothing the state file doesn't know.
        self.store.put(rec)
        self.say(f"{spec.name} (pid {proc.pid}, :{spec.port}) starting")
        return rec

    def _waiter_for_launch(self, spec: InstanceSpec, rec: InstanceRecord) -> health.Waiter:
        proc = self._procs[rec.pid]
        return health.Waiter(
            label=f"{spec.name} (pid {rec.pid}, :{spec.port})",
            url=spec.base_url + spec.health_path,
            timeout_s=spec.health_timeout_s,
            exit_code=proc.poll,
            log_file=Path(spec.log_file),
        )

    def _waiter_for_record(self, spec: InstanceSpec, rec: InstanceRecord) -> health.Waiter:
        def exit_code() -> int | None:
            return None if rec.process() is not None else -1

        return health.Waiter(
            label=f"{spec.name} (pid {rec.pid}, :{spec.port})",
            url=rec.base_url + rec.health_path,
            timeout_s=spec.health_timeout_s,
            exit_code=exit_code,
            log_file=Path(rec.log_file),
        )

    def _wait(self, waiters: list[health.Waiter]) -> None:
        def on_progress(pending: list[health.Waiter], done: health.Waiter | None) -> None:
            if done is not None:
                self.say(f"{done.label} ready in {done.elapsed_s:.2f} s")
            if self.progress:
                self.progress(pending, done)

        health.wait_all(waiters, on_progress)

    # --- stop ----------------------------------------------------------------

    def stop(self, names: Iterable[str] | None = None) -> list[str]:
        """Stop the named components (all when None); return what was stopped."""
        with self.store.lock():
            records = self.store.read()
            if names is None:
                chosen = list(records.values())
            else:
                wanted = list(names)
                known = {r.component for r in records.values()} | set(self.component_names())
                for n in wanted:
                    if n not in known:
                        raise UsageError(f"'{n}' is not a component of this stack; known: {', '.join(sorted(known))}")
                chosen = [r for r in records.values() if r.component in wanted]
            self._stop_records(chosen)
            return [r.name for r in chosen]

    def _stop_records(self, records: list[InstanceRecord]) -> None:
        """SIGTERM each process group, one shared deadline, then SIGKILL, then reap; forget the records."""
        live = [(r, p) for r in records if (p := r.process()) is not None]
        self._mark_stopping([r for r, _ in live])
        for _, proc in live:
            _signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + self.stop_grace_s
        pending = [(r, p) for r, p in live if not self._gone(p, deadline)]
        for rec, proc in pending:
            self.say(f"{rec.name} (pid {proc.pid}) ignored SIGTERM for {self.stop_grace_s:g} s; killing it")
            _signal_group(proc, signal.SIGKILL)
        for _, proc in pending:
            self._gone(proc, time.monotonic() + KILL_WAIT_S)
        for rec, proc in live:
            _signal_group(proc, signal.SIGKILL, leftovers_only=True)
            self._procs.pop(proc.pid, None)
            self.say(f"{rec.name} (pid {proc.pid}, :{rec.port}) stopped")
        if records:
            self.store.remove([r.key for r in records])

    def _mark_stopping(self, records: list[InstanceRecord]) -> None:
        """Flag records before signalling, so a watcher never mistakes this exit for a crash."""
        if not records:
            return
        current = self.store.read()
        for rec in records:
            rec.stopping = True
            current[rec.key] = rec
        self.store.write(current)

    def stop_instances(self, keys: Iterable[str]) -> list[str]:
        """Stop single instances by state key (``server_8102``); used to stop one replica."""
        with self.store.lock():
            records = self.store.read()
            chosen = [records[k] for k in keys if k in records]
            self._stop_records(chosen)
            return [r.name for r in chosen]

    def start_instances(self, keys: Iterable[str]) -> StartReport:
        """Start single instances by state key, whatever their component's other replicas do."""
        wanted = set(keys)
        specs = [s for s in self.specs(self.component_names()) if s.key in wanted]
        with self.store.lock():
            return self._start_locked(specs)

    def restart_crashed(self, key: str) -> bool:
        """Restart one instance whose process died, if it is still recorded and not being stopped.

        Checked under the lock: a CLI ``stop`` that raced with the crash wins.
        """
        with self.store.lock():
            rec = self.store.read().get(key)
            if rec is None or rec.stopping or rec.process() is not None:
                return False
            specs = [s for s in self.specs([rec.component]) if s.key == key]
            if not specs:
                return False
            self._start_locked(specs)
            return True

    def reap(self) -> None:
        """Collect exit statuses of children this process started, so none stays a zombie."""
        for pid, popen in list(self._procs.items()):
            if popen.poll() is not None:
                del self._procs[pid]

    def _gone(self, proc: psutil.Process, deadline: float) -> bool:
        popen = self._procs.get(proc.pid)
        while time.monotonic() < deadline:
            if popen is not None:
                if popen.poll() is not None:
                    return True
            else:
                try:
                    proc.wait(timeout=0)
                    return True
                except psutil.TimeoutExpired:
                    pass
                except psutil.NoSuchProcess:
                    return True
                if not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE:
                    return True
            time.sleep(0.02)
        return False

    # --- reload --------------------------------------------------------------

    def reload(self, name: str) -> StartReport:
        """Restart one component with the current config, leaving the others alone."""
        self._check_component(name)
        specs = self.specs([name])
        with self.store.lock():
            records = self.store.read()
            old = [r for r in records.values() if r.component == name]
            self._stop_records(old)
            return self._start_locked(specs)

    # --- status --------------------------------------------------------------

    def status(self, include_stopped: bool = True) -> list[StatusRow]:
        """One row per recorded instance (probed concurrently), plus configured ones not running."""
        records = sorted(self.store.read().values(), key=lambda r: r.port)
        procs = [r.process() for r in records]
        urls = [r.base_url + r.health_path for r, p in zip(records, procs, strict=True) if p is not None]
        probes = iter(health.probe_many(urls))
        rows = []
        for rec, proc in zip(records, procs, strict=True):
            st = _classify(next(probes)) if proc is not None else _why_gone(rec)
            estimate, measured = memory.recorded(rec)
            rows.append(
                StatusRow(
                    name=rec.name,
                    component=rec.component,
                    port=rec.port,
                    pid=rec.pid,
                    status=st,
                    model=_model_label(rec.model_path, rec.argv),
                    tier=rec.tier,
                    roles=list(rec.roles),
                    started_at=rec.started_at,
                    log_file=rec.log_file,
                    estimate_bytes=estimate,
                    measured_bytes=measured,
                )
            )
        if include_stopped:
            rows.extend(self._stopped_rows({r.port for r in records}))
        return rows

    def _stopped_rows(self, running_ports: set[int]) -> list[StatusRow]:
        rows = []
        try:
            specs = self.specs(self.component_names())
        except ConfigError:  # a config given as text only: no front door to show
            specs = self.specs(self.cfg.components())
        for spec in specs:
            if spec.port in running_ports:
                continue
            rows.append(
                StatusRow(
                    name=spec.name,
                    component=spec.component,
                    port=spec.port,
                    pid=None,
                    status=Status.STOPPED,
                    model=_model_label(spec.model_path, list(spec.argv)),
                    tier=spec.tier.value,
                    roles=list(spec.roles),
                    estimate_bytes=memory.estimate_bytes(self.cfg, spec.component),
                )
            )
        return rows


def _batches(specs: list[InstanceSpec]) -> list[tuple[list[InstanceSpec], float]]:
    """Small instances start together; each large one alone, followed by its cooldown; the front door last."""
    out: list[tuple[list[InstanceSpec], float]] = []
    small: list[InstanceSpec] = []
    last = [s for s in specs if s.kind == "api"]
    for spec in (s for s in specs if s.kind != "api"):
        if spec.large:
            if small:
                out.append((small, 0.0))
                small = []
            out.append(([spec], spec.cooldown_s))
        else:
            small.append(spec)
    if small:
        out.append((small, max((s.cooldown_s for s in small), default=0.0)))
    if last:
        out.append((last, 0.0))
    return out


def _classify(h: health.Health) -> Status:
    return {
        health.Health.HEALTHY: Status.HEALTHY,
        health.Health.LOADING: Status.LOADING,
    }.get(h, Status.UNHEALTHY)


def _why_gone(rec: InstanceRecord) -> Status:
    return Status.STALE if psutil.pid_exists(rec.pid) else Status.DEAD


def _model_label(model_path: str | None, argv: list[str]) -> str:
    if argv[1:3] == ["-m", "modelfleet.api"]:
        return "uvicorn"
    if model_path:
        name = Path(model_path).name
        return name[:-5] if name.endswith(".gguf") else name
    return Path(argv[0]).name if argv else "-"


def _signal_group(proc: psutil.Process, sig: signal.Signals, leftovers_only: bool = False) -> None:
    """Signal the process group the instance leads (its own session), or just the process."""
    pid = proc.pid
    try:
        pgid = os.getpgid(pid)
    except ProcessLookupError:
        pgid = pid if leftovers_only else -1
    except PermissionError:
        return
    if pgid == pid:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, sig)
    elif not leftovers_only and pgid != -1:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def _program_exists(program: str, cwd: str | None) -> bool:
    if "/" in program:
        p = Path(program)
        if not p.is_absolute() and cwd:
            p = Path(cwd) / p
        return p.is_file() and os.access(p, os.X_OK)
    return shutil.which(program) is not None


def port_conflict(host: str, port: int) -> str | None:
    """None if the port can be bound, else a sentence naming the process that holds it."""
    bind_host = "127.0.0.1" if host in ("localhost", "") else host
    with socket.socket(socket.AF_INET6 if ":" in bind_host else socket.AF_INET) as s:
        # As llama-server's own listener does: connections it closed linger in TIME-WAIT for a
        # minute and must not block a restart on the same port; a live listener still does.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((bind_host, port))
            return None
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                return f"  {bind_host}:{port}: cannot bind ({exc.strerror})"
    return f"  {bind_host}:{port} is in use by {describe_listener(port)}; stop it or change the port"


def describe_listener(port: int) -> str:
    try:
        conns = psutil.net_connections(kind="inet")
    except (psutil.AccessDenied, OSError):
        return "another process"
    for c in conns:
        if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port and c.pid:
            try:
                p = psutil.Process(c.pid)
                cmd = " ".join(p.cmdline())[:120] or p.name()
                return f"pid {c.pid} ({cmd})"
            except psutil.Error:
                return f"pid {c.pid}"
    return "another process"
