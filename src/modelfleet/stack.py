"""The lifecycle verbs, used by the CLI and the API alike: start, stop, status, reload.

One :class:`Stack` owns one state directory. Every verb that changes what runs takes
the state lock for its whole duration, so two ``start`` commands at once serialise
and the second finds the first's instances healthy and keeps them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from modelfleet import health, loading, memory, warmkv
from modelfleet.config import API_COMPONENT, StackConfig, Tier
from modelfleet.errors import ConfigError, FleetError, StartupError, UsageError
from modelfleet.fileutil import now_iso
from modelfleet.instance import Identity, Kind
from modelfleet.launcher import Launcher, LocalLauncher, alive_many, tail_text
from modelfleet.spec import BinaryInfo, InstanceSpec, env_digest, find_llama_server, plan_instances, probe_binary
from modelfleet.state import InstanceRecord, StateStore

STOP_GRACE_S = 10.0
ENV_DIGEST = "env_sha256"  # a record's extra: a hash per environment variable it was started with


class Status(StrEnum):
    """What ``status`` says of an instance."""

    HEALTHY = "healthy"
    LOADING = "loading"
    UNHEALTHY = "unhealthy"
    DEAD = "dead"  # in the state file, process gone
    STALE = "stale"  # in the state file, pid now belongs to another process
    STOPPED = "stopped"  # configured, not running
    FAILED = "failed"  # the front door gave up restarting it (restart budget spent)

    @classmethod
    def of(cls, h: health.Health) -> Status:
        """The status a health probe shows as."""
        return {health.Health.HEALTHY: cls.HEALTHY, health.Health.LOADING: cls.LOADING}.get(h, cls.UNHEALTHY)


@dataclass(frozen=True, kw_only=True)
class StatusRow(Identity):
    """What ``status`` shows of one instance: its identity, what a probe says, the front door's view."""

    pid: int | None
    status: Status
    model: str
    started_at: str | None = None
    log_file: str | None = None
    in_flight: int | None = None  # from the front door, when it runs
    queued: int | None = None
    routing: str | None = None  # the front door's lifecycle state: ready, draining, failed...
    detail: str | None = None  # the front door's reason for that state
    estimate_bytes: int | None = None  # memory estimate of one instance (from GGUF metadata or ram_gb)
    measured_bytes: int | None = None  # memory measured once it was ready (RSS or reported buffers)
    node_address: str | None = None  # the address of the node it runs on, when that is not this machine
    prompt_evaluated: int | None = None  # prompt tokens the instance evaluated (front door, from timings)
    prompt_cached: int | None = None  # prompt tokens it served from its KV cache

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        return data | {
            "name": self.name,
            "status": self.status.value,
            "tier": self.tier.value,
            "roles": list(self.roles),
        }


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
        self.launcher: Launcher = launcher or LocalLauncher()
        self.say = say
        self.progress = progress
        self.stop_grace_s = stop_grace_s

    # --- selection -----------------------------------------------------------

    def with_config(self, cfg: StackConfig, probe_if_missing: bool = False) -> Stack:
        """A Stack on the same state dir, launcher and output that runs ``cfg``. Its llama-server is
        probed again when ``cfg`` names another one (or, with ``probe_if_missing``, when none is known)."""
        binary = self.binary
        if cfg.servers and (cfg.llama_server != self.cfg.llama_server or (probe_if_missing and binary is None)):
            binary = probe_binary(find_llama_server(cfg))
        return Stack(
            cfg,
            self.store.dir,
            binary,
            launcher=self.launcher,
            say=self.say,
            progress=self.progress,
            stop_grace_s=self.stop_grace_s,
            binary_error=self.binary_error,
        )

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
            if rec is not None and rec.component == spec.component and self.launcher.alive(rec.handle):
                adopt.append((spec, rec))
                report.kept.append(spec.name)
                if list(rec.argv) != list(spec.argv):
                    report.changed.append(spec.name)
            else:
                to_launch.append(spec)
        self._preflight(to_launch, records)
        if adopt:
            self._wait([self._waiter(spec, rec) for spec, rec in adopt])
        started: list[InstanceRecord] = []
        try:
            for batch, cooldown_s in _batches(to_launch):
                # The front door adopts what is running, so it starts once the models are up.
                launched = [self._launch(spec, started) for spec in batch]
                waiters = [self._waiter(spec, rec) for spec, rec in zip(batch, launched, strict=True)]
                self._wait(waiters)
                for w, spec in zip(waiters, batch, strict=True):
                    report.ready_s[spec.name] = w.elapsed_s
                    report.started.append(spec.name)
                for rec in launched:
                    memory.record_ready(self.cfg, self.launcher, rec, self.store)
                if cooldown_s:
                    self.say(f"cooling down {cooldown_s:g} s after {batch[0].name}")
                    time.sleep(cooldown_s)
        except BaseException:
            discard = getattr(self.launcher, "discard_placed", None)
            if discard is not None:
                discard()  # places found for instances that did not start
            if started:
                self.say("start failed; stopping the instances this command started")
                self._stop_records(started)
            raise
        return report

    def _preflight(self, specs: list[InstanceSpec], records: dict[str, InstanceRecord]) -> None:
        """Refuse before starting anything: missing files, ports taken by other processes."""
        place = getattr(self.launcher, "place", None)
        if place is not None and specs:
            # A launcher that places instances on other nodes checks files and ports there.
            if any(s.kind is Kind.LLAMA_SERVER for s in specs) and self.binary is None:
                raise self.binary_error or StartupError("no llama-server binary is known; run `modelfleet setup`")
            place(specs, self.cfg)
            stale = [s.key for s in specs if s.key in records]
            if stale:
                self.store.remove(stale)
            return
        missing = [f"  {key}: {path}" for s in specs for key, path in s.required_files if not Path(path).is_file()]
        missing += [
            f"  services.{s.component}.command: program {s.argv[0]!r} was not found"
            for s in specs
            if s.kind is Kind.SERVICE and not self.launcher.program_exists(s.argv[0], s.cwd)
        ]
        if missing:
            uniq = list(dict.fromkeys(missing))
            raise StartupError(f"{len(uniq)} required file(s) are missing; nothing was started:\n" + "\n".join(uniq))
        if specs and any(s.kind is Kind.LLAMA_SERVER for s in specs) and self.binary is None:
            raise self.binary_error or StartupError("no llama-server binary is known; run `modelfleet setup`")
        taken = [msg for s in specs if (msg := self.launcher.port_conflict(s.host, s.port))]
        if taken:
            raise StartupError("port(s) already in use; nothing was started:\n" + "\n".join(taken))
        # Records for these keys are dead or stale: forget them.
        stale = [s.key for s in specs if s.key in records]
        if stale:
            self.store.remove(stale)

    def _launch(self, spec: InstanceSpec, started: list[InstanceRecord]) -> InstanceRecord:
        """Spawn, then record it in ``started`` and the state file, with SIGINT/SIGTERM held off
        in between: an interrupted start always knows, and rolls back, what it spawned."""
        self.launcher.rotate_logs([spec.log_file], self.cfg.logs)
        with _signals_deferred():
            rec = self._spawn_and_record(spec)
            started.append(rec)
        self.say(f"{spec.name} (pid {rec.pid}, :{spec.port}) starting")
        return rec

    def _spawn_and_record(self, spec: InstanceSpec) -> InstanceRecord:
        handle = self.launcher.spawn(spec)
        rec = InstanceRecord.extend(
            dataclasses.replace(spec, node=handle.node),
            pid=handle.pid,
            started_at=now_iso(),
            log_file=spec.log_file,
            model_path=spec.model_path,
            create_time=handle.create_time,
            argv=spec.argv,
            health_path=spec.health_path,
            extra={ENV_DIGEST: env_digest(spec.env)} | ({"node_address": handle.address} if handle.address else {}),
        )
        # Record at once, so a crash of this command leaves nothing the state file doesn't know.
        self.store.put(rec)
        return rec

    def _waiter(self, spec: InstanceSpec, rec: InstanceRecord) -> health.Waiter:
        handle = rec.handle
        return health.Waiter(
            label=f"{spec.name} (pid {rec.pid}, :{spec.port})",
            url=rec.base_url + rec.health_path,
            timeout_s=spec.health_timeout_s,
            exit_code=lambda: self.launcher.exit_code(handle),
            log_tail=lambda: tail_text(self.launcher.read_log(handle), rec.log_file),
            stage=lambda: loading.stage(self.launcher.read_log(handle)) if spec.kind is Kind.LLAMA_SERVER else None,
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
        """Stop the named components (all when None); return what was stopped.

        ``stop --all`` also copes with a damaged state file: it stops every instance it can
        still recognise and drops the entries it cannot, naming each with its recorded pid.
        """
        with self.store.lock():
            if names is None:
                salvage = self.store.read_salvage()
                chosen = list(salvage.records.values())
                self._stop_records(chosen)
                stopped = [r.name for r in chosen]
                for key, why in salvage.unreadable.items():
                    port, argv = salvage.clues(key)
                    found = self.launcher.find(port, argv) if port is not None else None
                    if found is not None:
                        self.launcher.stop([found], self.stop_grace_s, self.say)
                        stopped.append(key)
                        self.say(f"{key}: stopped pid {found.pid}, found listening on :{port} with the recorded argv")
                    self.say(f"dropped an entry that could not be read: {why}")
                    if found is None:
                        self.say(f"  nothing on :{port} runs its recorded command; check `ps` if it still runs")
                if salvage.unreadable:
                    self.store.remove(list(salvage.unreadable))
                if warmkv.clean(sorted((self.store.dir / "slots").glob("*"))):
                    self.say("removed the KV caches saved at WARM stops")
                return stopped
            records = self.store.read()
            wanted = list(names)
            known = {r.component for r in records.values()} | set(self.component_names())
            for n in wanted:
                if n not in known:
                    raise UsageError(f"'{n}' is not a component of this stack; known: {', '.join(sorted(known))}")
            chosen = [r for r in records.values() if r.component in wanted]
            self._stop_records(chosen)
            return [r.name for r in chosen]

    def _stop_records(self, records: list[InstanceRecord]) -> None:
        """Stop the front door first (its clients get an answer, not a dropped connection), then the rest
        together: SIGTERM each process group, one shared deadline, SIGKILL; forget the records."""
        live = [r for r in records if self.launcher.alive(r.handle)]
        self._mark_stopping(live)
        doors = [r for r in live if r.kind is Kind.API]
        for batch in (doors, [r for r in live if r.kind is not Kind.API]):
            if batch:
                self.launcher.stop([r.handle for r in batch], self.stop_grace_s, self.say)
                for rec in batch:
                    self.say(f"{rec.name} (pid {rec.pid}, :{rec.port}) stopped")
        release = getattr(self.launcher, "release", None)
        if release is not None and records:
            release([r.handle for r in records])  # a remote launcher's agents of the dead ones too
        if records:
            self.store.remove([r.key for r in records])

    def _mark_stopping(self, records: list[InstanceRecord]) -> None:
        """Flag records before signalling, so a watcher never mistakes this exit for a crash."""
        if not records:
            return
        self.store.put(*(dataclasses.replace(rec, stopping=True) for rec in records))

    def stop_instances(self, keys: Iterable[str]) -> list[str]:
        """Stop single instances by state key (``server_8102``); used to stop one replica."""
        with self.store.lock():
            records = self.store.read()
            chosen = [records[k] for k in keys if k in records]
            self._stop_records(chosen)
            return [r.name for r in chosen]

    def start_instances(self, keys: Iterable[str], replace: bool = False) -> StartReport:
        """Start single instances by state key, whatever their component's other replicas do.

        A live process already recorded for a key is adopted, unless ``replace``: then it is stopped
        first, under the same lock (a reload must end with a process of the current config, even if
        a CLI started one behind the front door's back a moment before)."""
        wanted = set(keys)
        specs = [s for s in self.specs(self.component_names()) if s.key in wanted]
        with self.store.lock():
            if replace:
                self._stop_records([r for k, r in self.store.read().items() if k in wanted])
            return self._start_locked(specs)

    def restart_crashed(self, key: str) -> bool:
        """Restart one instance whose process died, if it is still recorded and not being stopped.

        Checked under the lock: a CLI ``stop`` that raced with the crash wins.
        """
        with self.store.lock():
            rec = self.store.read().get(key)
            if rec is None or rec.stopping or self.launcher.alive(rec.handle):
                return False
            specs = [s for s in self.specs([rec.component]) if s.key == key]
            if not specs:
                return False
            try:
                self._start_locked(specs)
            except FleetError:
                # Keep the crashed record: the instance is still wanted (the supervisor retries it);
                # a deliberate `stop` is what removes it.
                self.store.put(rec)
                raise
            return True

    def reap(self) -> None:
        """Collect exit statuses of children this process started, so none stays a zombie."""
        reap = getattr(self.launcher, "reap", None)
        if reap is not None:
            reap()

    # --- reload --------------------------------------------------------------

    def reload(self, name: str) -> StartReport:
        """Restart one component with the current config, leaving the others alone."""
        self._check_component(name)
        specs = self.specs([name])
        with self.store.lock():
            records = self.store.read()
            old = [r for r in records.values() if r.component == name]
            if name == API_COMPONENT and len(old) == 1 and len(specs) == 1 and self.launcher.alive(old[0].handle):
                try:
                    return self._hand_over(specs[0], old[0])
                except StartupError as exc:
                    if not self.launcher.alive(old[0].handle):
                        raise
                    self.say(f"{exc}".splitlines()[0] + "; restarting the front door instead")
            self._stop_records(old)
            return self._start_locked(specs)

    def _hand_over(self, spec: InstanceSpec, old: InstanceRecord) -> StartReport:
        """Reload the front door with no refused connection: the new one starts beside the old, takes its
        listening socket (see :mod:`modelfleet.handover`) and says when it serves; the old one then stops
        accepting, finishes what it has in flight and exits."""
        report = StartReport()
        started: list[InstanceRecord] = []
        new_handle = None
        try:
            new = self._launch(spec, started)
            new_handle = new.handle
            bound = spec.health_timeout_s + self.cfg.api.drain_timeout_s + self.stop_grace_s
            deadline = time.monotonic() + bound
            while self.launcher.alive(old.handle):
                code = self.launcher.exit_code(new_handle)
                if code is not None:
                    raise StartupError(
                        f"{spec.name} (pid {new.pid}) exited with code {code} while taking over; the running "
                        f"front door (pid {old.pid}) keeps serving.\n"
                        + tail_text(self.launcher.read_log(new_handle), new.log_file)
                    )
                if time.monotonic() > deadline:
                    self.say(f"the old front door (pid {old.pid}) did not hand over within {bound:g} s; stopping it")
                    self.launcher.stop([old.handle], self.stop_grace_s, self.say)
                    break
                time.sleep(health.POLL_INTERVAL_S)
            self.say(f"{spec.name} (pid {old.pid}) handed over to pid {new.pid}")
            waiter = self._waiter(spec, new)
            self._wait([waiter])
        except BaseException:
            if started:
                self._stop_records(started)
                if self.launcher.alive(old.handle):
                    self.store.put(old)  # it still serves: keep knowing it
            raise
        report.started.append(spec.name)
        report.ready_s[spec.name] = waiter.elapsed_s
        return report

    # --- status --------------------------------------------------------------

    def status(self, include_stopped: bool = True) -> list[StatusRow]:
        """One row per recorded instance (probed concurrently), plus configured ones not running."""
        records = sorted(self.store.read().values(), key=lambda r: r.port)
        alive = alive_many(self.launcher, [r.handle for r in records])  # on Ray: all actors asked at once
        urls = [r.base_url + r.health_path for r, up in zip(records, alive, strict=True) if up]
        probes = iter(health.probe_many(urls))
        rows = []
        for rec, up in zip(records, alive, strict=True):
            st = Status.of(next(probes)) if up else Status(self.launcher.describe_gone(rec.handle))
            estimate, measured = memory.recorded(rec)
            rows.append(
                StatusRow.extend(
                    rec,
                    pid=rec.pid,
                    status=st,
                    model=_model_label(rec.model_path, rec.argv),
                    started_at=rec.started_at,
                    log_file=rec.log_file,
                    estimate_bytes=estimate,
                    measured_bytes=measured,
                    node_address=rec.handle.address or None,
                )
            )
        if include_stopped:
            rows.extend(self._stopped_rows({r.port for r in records}))
        return rows

    def _stopped_rows(self, running_ports: set[int]) -> list[StatusRow]:
        try:
            specs = self.specs(self.component_names())
        except ConfigError:  # a config given as text only: no front door to show
            specs = self.specs(self.cfg.components())
        return [
            StatusRow.extend(
                spec,
                pid=None,
                status=Status.STOPPED,
                model=_model_label(spec.model_path, spec.argv),
                estimate_bytes=memory.estimate_bytes(self.cfg, spec.component),
            )
            for spec in specs
            if spec.port not in running_ports
        ]


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold off SIGINT and SIGTERM until the block ends, then act on one that came meanwhile.

    Done with handlers, not the signal mask: a blocked mask would be inherited by the
    processes spawned inside the block, and they would ignore SIGTERM for good.
    Signals reach Python handlers in the main thread only, so elsewhere this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    held = (signal.SIGINT, signal.SIGTERM)
    old = {sig: signal.signal(sig, lambda signum, frame: caught.append(signum)) for sig in held}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        if caught:
            handler = old[signal.Signals(caught[0])]
            if callable(handler):
                handler(caught[0], None)
            elif handler == signal.SIG_DFL:
                signal.raise_signal(caught[0])


def _batches(specs: list[InstanceSpec]) -> list[tuple[list[InstanceSpec], float]]:
    """Small instances start together; each large one alone, followed by its cooldown; the front door last."""
    out: list[tuple[list[InstanceSpec], float]] = []
    small: list[InstanceSpec] = []
    last = [s for s in specs if s.kind is Kind.API]
    for spec in (s for s in specs if s.kind is not Kind.API):
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


def _model_label(model_path: str | None, argv: tuple[str, ...]) -> str:
    if argv[1:3] == ("-m", "modelfleet.api"):
        return "uvicorn"
    if model_path:
        name = Path(model_path).name
        return name[:-5] if name.endswith(".gguf") else name
    return Path(argv[0]).name if argv else "-"
