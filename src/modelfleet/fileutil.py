"""Files every module shares: one atomic writer, one cross-process lock, one timestamp."""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

from modelfleet.errors import StateError


def write_atomic(path: Path, text: str, mode: int = 0o644) -> None:
    """Replace ``path`` so that a reader sees the old file or the new one, never half of one.

    Written to a temp file beside it (unique per process and thread), fsynced, renamed over
    it, and the folder fsynced so the rename survives a crash.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as f:
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


def now_iso() -> str:
    return datetime.now().isoformat(timespec="seconds")
