"""Log rotation for processes that keep their log open.

Every component writes its own log file (``logs/<name>-<port>.log``), opened in
append mode when it was spawned, and keeps it open for its whole life; at
verbosity 4 llama-server writes about 25 lines per request. A log past
``logs.max_mb`` is copied to ``<log>.1`` (older copies shift up to
``<log>.<keep>``, the oldest is dropped) and then emptied in place. Because the
writer appends, its next line lands at the start of the emptied file. Lines written
between the copy and the emptying are lost, as with logrotate's ``copytruncate``.

Rotation happens before an instance is launched and on every tick of the front
door's monitor; with the front door disabled, only launches rotate.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable
from pathlib import Path

from modelfleet.config import LogsConfig
from modelfleet.fileutil import file_lock


def rotated(path: Path, n: int) -> Path:
    return path.with_name(f"{path.name}.{n}")


def rotate(path: Path, cfg: LogsConfig) -> bool:
    """Rotate ``path`` if it is past ``cfg.max_mb``; True if it was."""
    if cfg.max_mb is None:
        return False
    try:
        if path.stat().st_size <= cfg.max_mb * 1024 * 1024:
            return False
    except FileNotFoundError:
        return False
    with file_lock(path.parent / ".rotate.lock", timeout_s=30):
        if path.stat().st_size <= cfg.max_mb * 1024 * 1024:
            return False  # another process rotated it meanwhile
        for n in range(cfg.keep - 1, 0, -1):
            if rotated(path, n).exists():
                os.replace(rotated(path, n), rotated(path, n + 1))
        shutil.copyfile(path, rotated(path, 1))
        os.truncate(path, 0)
    return True


def rotate_all(paths: Iterable[str | Path], cfg: LogsConfig) -> list[Path]:
    """Rotate each log that is past the limit; the ones rotated."""
    return [Path(p) for p in dict.fromkeys(paths) if p and rotate(Path(p), cfg)]
