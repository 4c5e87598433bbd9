"""How instances run: the :class:`Launcher` protocol and the local one.

A launcher owns everything process-level about an instance: it spawns the process for
a spec and hands back a :class:`Handle` (node, pid, kernel start time), and given a
handle it says whether the process still runs (a reused pid is never taken for ours),
stops it (SIGTERM to its process group, one shared grace, then SIGKILL), measures its
resident memory and reads its log. It also answers for its node: is a port free, is a
program there, how much memory is available. Nothing outside a launcher signals a
process, asks psutil about one or reads a log file, so another launcher (one that
places instances on other machines) can stand in for :class:`LocalLauncher`.

The state file records each instance's handle, so a later command or front door,
through the same kind of launcher, re-adopts the process.
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
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Protocol

import psutil

from modelfleet import logs
from modelfleet.config import LogsConfig
from modelfleet.errors import StartupError
from modelfleet.instance import LOCAL_NODE, Handle
from modelfleet.spec import InstanceSpec

# psutil's create_time is rounded; the same process always gives the same value, but
# allow a little slack for the float round trip through JSON.
_CREATE_TIME_SLACK_S = 0.05
KILL_WAIT_S = 5.0
LOG_TAIL_BYTES = 16384

Say = Callable[[str], None]


class Launcher(Protocol):
    """Runs instances somewhere and answers for their processes."""

    def spawn(self, spec: InstanceSpec) -> Handle:
        """Start the process (detached, own process group, its log file); raise StartupError if it can't run."""
        ...

    def alive(self, handle: Handle) -> bool:
        """True while the process runs (not a zombie, and the pid still belongs to it)."""
        ...

    def exit_code(self, handle: Handle) -> int | None:
        """None while it runs; its exit code (or -1 when unknown) once gone."""
        ...

    def stop(self, handles: Sequence[Handle], grace_s: float, say: Say) -> None:
        """SIGTERM each process group, one shared deadline, SIGKILL what is left, reap."""
        ...

    def rss(self, handle: Handle) -> int:
        """Resident memory of the process and its children, in bytes."""
        ...

    def read_log(self, handle: Handle, max_bytes: int = LOG_TAIL_BYTES) -> str:
        """The end of the instance's log (empty when there is none)."""
        ...

    def port_conflict(self, host: str, port: int) -> str | None:
        """None if the port can be bound on the node, else a sentence naming who holds it."""
        ...

    def program_exists(self, program: str, cwd: str | None) -> bool: ...

    def available_bytes(self) -> int:
        """Memory the node can give a new instance now."""
        ...

    def total_bytes(self) -> int: ...

    def rotate_logs(self, paths: Sequence[str], cfg: LogsConfig) -> list[str]:
        """Rotate the logs past their size limit; return the rotated ones."""
        ...

    def follow_log(self, handle: Handle, poll_s: float = 0.25) -> Iterator[str]:
        """What is appended to the log from now on, as it comes (``tail -f``); it never ends by itself."""
        ...

    def describe_gone(self, handle: Handle) -> str:
        """Why a recorded process is not ours any more: ``dead`` or ``stale`` (pid reused)."""
        ...

    def find(self, port: int, argv: Sequence[str]) -> Handle | None:
        """The process listening on ``port`` if it runs exactly ``argv``: how a damaged record is recognised."""
        ...


def alive_many(launcher: Launcher, handles: Sequence[Handle]) -> list[bool]:
    """:meth:`Launcher.alive` of each handle, in order, in one step.

    A launcher whose question is remote offers ``alive_many(handles)`` and asks about them all
    at once, with one bounded wait; any other is asked one handle after another."""
    batched: Callable[[Sequence[Handle]], list[bool]] | None = getattr(launcher, "alive_many", None)
    if batched is not None:
        return batched(handles)
    return [launcher.alive(h) for h in handles]


class LocalLauncher:
    """Runs instances on this machine: detached sessions, argv only, one log file per instance."""

    node = LOCAL_NODE

    def __init__(self, die_with_parent: bool = False) -> None:
        self._children: dict[int, subprocess.Popen[bytes]] = {}  # started by this process: reaped here
        # A node agent (the Ray launcher's actor) asks for its children to be killed when it dies,
        # so a lost agent never leaves a server running unmanaged (Linux's PR_SET_PDEATHSIG).
        self._preexec = _die_with_parent if die_with_parent else None

    # --- processes ---------------------------------------------------------------

    def spawn(self, spec: InstanceSpec) -> Handle:
        log = Path(spec.log_file)
        log.parent.mkdir(parents=True, exist_ok=True)
        if spec.slot_dir:
            Path(spec.slot_dir).mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **spec.env}
        with log.open("ab") as out:
            out.write(f"--- modelfleet: starting {spec.name}: {' '.join(spec.argv)}\n".encode())
            out.flush()
            try:
                proc = subprocess.Popen(
                    list(spec.argv),
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    cwd=spec.cwd,
                    env=env,
                    start_new_session=True,  # own process group: stop signals the whole group
                    close_fds=True,
                    preexec_fn=self._preexec,
                )
            except (OSError, ValueError) as exc:
                why = getattr(exc, "strerror", None) or exc
                raise StartupError(f"{spec.label}: cannot run {spec.argv[0]}: {why}") from exc
        self._children[proc.pid] = proc
        try:
            create_time = psutil.Process(proc.pid).create_time()
        except psutil.NoSuchProcess:
            create_time = 0.0
        return Handle(self.node, proc.pid, create_time, spec.log_file, spec.label)

    def process(self, handle: Handle) -> psutil.Process | None:
        try:
            proc = psutil.Process(handle.pid)
            if abs(proc.create_time() - handle.create_time) > _CREATE_TIME_SLACK_S:
                return None  # same pid, another process: not ours
            if proc.status() == psutil.STATUS_ZOMBIE:
                self._reap(handle.pid)
                return None
            return proc
        except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError, OverflowError):
            return None

    def alive(self, handle: Handle) -> bool:
        return self.process(handle) is not None

    def exit_code(self, handle: Handle) -> int | None:
        child = self._children.get(handle.pid)
        if child is not None:
            code = child.poll()
            if code is not None:
                del self._children[handle.pid]
            return code
        return None if self.alive(handle) else -1

    def describe_gone(self, handle: Handle) -> str:
        try:
            return "stale" if psutil.pid_exists(handle.pid) else "dead"
        except (ValueError, OverflowError):
            return "dead"

    def find(self, port: int, argv: Sequence[str]) -> Handle | None:
        if not argv:
            return None
        try:
            conns = psutil.net_connections(kind="inet")
        except (psutil.AccessDenied, OSError):
            return None
        for c in conns:
            if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port and c.pid:
                try:
                    proc = psutil.Process(c.pid)
                    if proc.cmdline() == list(argv):
                        return Handle(self.node, proc.pid, proc.create_time())
                except psutil.Error:
                    return None
        return None

    def reap(self) -> None:
        """Collect the exit statuses of children that ended, so none stays a zombie."""
        for pid, child in list(self._children.items()):
            if child.poll() is not None:
                del self._children[pid]

    def _reap(self, pid: int) -> None:
        child = self._children.pop(pid, None)
        if child is not None:
            child.poll()

    def stop(self, handles: Sequence[Handle], grace_s: float, say: Say) -> None:
        live = [(h, p) for h in handles if (p := self.process(h)) is not None]
        for _, proc in live:
            _signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        pending = [(h, p) for h, p in live if not self._gone(p, deadline)]
        for handle, proc in pending:
            say(f"{handle.label or proc.pid} (pid {proc.pid}) ignored SIGTERM for {grace_s:g} s; killing it")
            _signal_group(proc, signal.SIGKILL)
        for _, proc in pending:
            self._gone(proc, time.monotonic() + KILL_WAIT_S)
        for _, proc in live:
            _signal_group(proc, signal.SIGKILL, leftovers_only=True)
            self._reap(proc.pid)

    def _gone(self, proc: psutil.Process, deadline: float) -> bool:
        child = self._children.get(proc.pid)
        while time.monotonic() < deadline:
            if child is not None:
                if child.poll() is not None:
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

    # --- measuring and reading -------------------------------------------------------

    def rss(self, handle: Handle) -> int:
        proc = self.process(handle)
        if proc is None:
            raise StartupError(f"{handle.label or handle.pid} is not running")
        try:
            total = proc.memory_info().rss
            for child in proc.children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    total += child.memory_info().rss
        except psutil.Error as exc:
            raise StartupError(f"cannot measure pid {handle.pid}: {exc}") from exc
        return int(total)

    def read_log(self, handle: Handle, max_bytes: int = LOG_TAIL_BYTES) -> str:
        return read_tail(handle.log_file, max_bytes)

    def rotate_logs(self, paths: Sequence[str], cfg: LogsConfig) -> list[str]:
        return [str(p) for p in logs.rotate_all(paths, cfg)]

    def follow_log(self, handle: Handle, poll_s: float = 0.25) -> Iterator[str]:
        return follow_file(handle.log_file, poll_s)

    # --- the node ------------------------------------------------------------------------

    def port_conflict(self, host: str, port: int) -> str | None:
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
        return f"  {bind_host}:{port} is in use by {_describe_listener(port)}; stop it or change the port"

    def program_exists(self, program: str, cwd: str | None) -> bool:
        if "/" in program:
            p = Path(program)
            if not p.is_absolute() and cwd:
                p = Path(cwd) / p
            return p.is_file() and os.access(p, os.X_OK)
        return shutil.which(program) is not None

    def available_bytes(self) -> int:
        return int(psutil.virtual_memory().available)

    def total_bytes(self) -> int:
        return int(psutil.virtual_memory().total)


_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL when the thread that spawned it ends (Linux only)."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """``n`` distinct ports free on this machine right now, held open together so none repeats."""
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind((host, 0))
            socks.append(s)
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def read_tail(path: str | Path | None, max_bytes: int = LOG_TAIL_BYTES) -> str:
    """The end of a local log file, decoded leniently (empty when unreadable)."""
    if not path:
        return ""
    try:
        with Path(path).open("rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - max_bytes))
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def follow_file(path: str | Path, poll_s: float = 0.25) -> Iterator[str]:
    """Text appended to a local file from now on. A file emptied in place (rotation's
    copytruncate) is read again from its start; a missing one is waited for."""
    offset: int | None = None
    while True:
        try:
            with Path(path).open("rb") as f:
                size = f.seek(0, os.SEEK_END)
                if offset is None or size < offset:
                    offset = size if offset is None else 0
                f.seek(offset)
                chunk = f.read()
        except OSError:
            chunk, offset = b"", offset or 0
        if chunk:
            offset += len(chunk)
            yield chunk.decode(errors="replace")
        else:
            yield ""  # nothing new: the caller may stop here
            time.sleep(poll_s)


def tail_text(text: str, path: str, lines: int = 15) -> str:
    """The last lines of a log's text, quoted for an error message."""
    tail = text.splitlines()[-lines:]
    if not tail:
        return f"(log {path} is empty)" if path else ""
    return f"last lines of {path}:\n" + "\n".join(f"  | {line}" for line in tail)


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


def _describe_listener(port: int) -> str:
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
