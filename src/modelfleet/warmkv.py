"""KV caches that survive a WARM stop: each slot saved before the process stops, restored after.

A server with ``slot_save: true`` runs with ``--slot-save-path <state>/slots/<port>``.
When the front door stops such an instance for idleness (or reloads it), :func:`save`
asks llama-server to write each slot (``POST /slots/{id}?action=save``) as
``warm-<slot>.bin`` next to ``warm.json``, which records the command line it was saved
under. When the instance starts again, before it takes traffic, :func:`restore` loads
each file back (``action=restore``) if the command line is the same, and then checks
that the cache is really used: it replays the saved tokens (read from the file's header,
llama.cpp's ``ggsq`` sequence-state format, whose token array newer servers use for
their own packed state) pinned to that slot and requires
``timings.cache_n > 0`` (some builds restore silently without effect).

Disk use is bounded per server (``worker_pool.kv_keep_mb``; the oldest files go first)
and ``modelfleet stop --all`` removes the files (:func:`clean`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modelfleet import upstream
from modelfleet.errors import UpstreamError
from modelfleet.fileutil import write_atomic

log = logging.getLogger("modelfleet.warmkv")

PREFIX = "warm-"
SHARE_PREFIX = "share-"  # a prefix being shared between replicas (share.py): only there for a moment
META = "warm.json"
SEQ_MAGIC = 0x67677371  # 'ggsq', LLAMA_STATE_SEQ_MAGIC
MAX_VERIFY_TOKENS = 1 << 24
TOKEN_NULL = -1  # LLAMA_TOKEN_NULL: first of a server_tokens state (tools/server/server-common.cpp)


@dataclass
class Target:
    """Where an instance listens, how many slots it has, where it saves them, what it runs."""

    name: str
    host: str
    port: int
    slots: int
    slot_dir: Path
    argv: tuple[str, ...]


@dataclass
class Outcome:
    """What a save or restore did, for the log and the counters."""

    slots: list[int] = field(default_factory=list)
    tokens: int = 0
    verified: bool = False
    detail: str = ""


def slot_file(slot: int) -> str:
    return f"{PREFIX}{slot}.bin"


async def call(
    client: upstream.Client, t: Target, path: str, body: dict[str, Any] | None, timeout_s: float | None
) -> Any:
    """POST JSON to the instance (GET when ``body`` is None); its decoded answer. Raises UpstreamError,
    TimeoutError or ValueError."""
    async with asyncio.timeout(timeout_s):
        if body is None:
            resp = await client.request("GET", t.host, t.port, path, {})
        else:
            data = json.dumps(body).encode()
            resp = await client.request("POST", t.host, t.port, path, {"content-type": "application/json"}, data)
        try:
            raw = b"".join([chunk async for chunk in resp.chunks()])
        finally:
            resp.close()
    if resp.status != 200:
        raise ValueError(f"{path} answered {resp.status}: {raw[:300].decode('utf-8', 'replace')}")
    return json.loads(raw)


async def save(client: upstream.Client, t: Target, cap_bytes: int, timeout_s: float = 120.0) -> Outcome:
    """Save every slot of an idle instance that holds tokens; drop the oldest files past the cap."""
    out = Outcome()
    t.slot_dir.mkdir(parents=True, exist_ok=True)
    for slot in range(t.slots):
        name = slot_file(slot)
        try:
            answer = await call(client, t, f"/slots/{slot}?action=save", {"filename": name}, timeout_s)
        except (UpstreamError, TimeoutError, ValueError) as exc:
            out.detail = f"slot {slot} not saved: {exc}"
            log.warning("%s: %s", t.name, out.detail)
            continue
        n = int(answer.get("n_saved", 0)) if isinstance(answer, dict) else 0
        if n <= 0:
            (t.slot_dir / name).unlink(missing_ok=True)  # an empty slot: nothing worth restoring
            continue
        out.slots.append(slot)
        out.tokens += n
    if out.slots:
        write_atomic(t.slot_dir / META, json.dumps({"argv": list(t.argv), "slots": out.slots}))
    dropped = prune(t.slot_dir, cap_bytes)
    if dropped:
        out.detail = f"dropped {', '.join(dropped)} to stay within {cap_bytes // (1024 * 1024)} MB"
    return out


def prune(slot_dir: Path, cap_bytes: int) -> list[str]:
    """Delete the oldest saved slots until the rest fit in ``cap_bytes``."""
    files = sorted(slot_dir.glob(f"{PREFIX}*.bin"), key=lambda p: p.stat().st_mtime)
    total = sum(p.stat().st_size for p in files)
    dropped = []
    while files and total > cap_bytes:
        oldest = files.pop(0)
        total -= oldest.stat().st_size
        oldest.unlink(missing_ok=True)
        dropped.append(oldest.name)
    return dropped


def saved_tokens(path: Path) -> list[int] | None:
    """The tokens a saved slot holds, from its header (None: not a sequence-state file this code knows)."""
    try:
        with path.open("rb") as f:
            head = f.read(12)
            if len(head) < 12:
                return None
            magic, _version, n = struct.unpack("<III", head)
            if magic != SEQ_MAGIC or n > MAX_VERIFY_TOKENS:
                return None
            body = f.read(4 * n)
    except OSError:
        return None
    if len(body) < 4 * n:
        return None
    tokens = list(struct.unpack(f"<{n}i", body))
    if tokens[:1] == [TOKEN_NULL]:
        # Newer servers pack their own state in the token array: -1, version, count, tokens, media...
        if len(tokens) < 3 or tokens[2] < 0 or 3 + tokens[2] > len(tokens):
            return None
        tokens = tokens[3 : 3 + tokens[2]]
    return tokens


def pending(slot_dir: Path | None) -> bool:
    return slot_dir is not None and (slot_dir / META).is_file()


async def restore(client: upstream.Client, t: Target, timeout_s: float = 120.0) -> Outcome:
    """Load the saved slots into a new process and check the cache is used; files are consumed."""
    out = Outcome()
    meta_path = t.slot_dir / META
    try:
        meta = json.loads(meta_path.read_bytes())
    except (OSError, ValueError):
        out.detail = "no saved KV cache"
        return out
    files = {
        int(p.stem[len(PREFIX) :]): p for p in t.slot_dir.glob(f"{PREFIX}*.bin") if p.stem[len(PREFIX) :].isdigit()
    }
    try:
        if not isinstance(meta, dict) or list(meta.get("argv", [])) != list(t.argv):
            out.detail = "saved under another command line; not restored"
            return out
        checks = []
        for slot, path in sorted(files.items()):
            if slot >= t.slots:
                continue
            try:
                answer = await call(client, t, f"/slots/{slot}?action=restore", {"filename": path.name}, timeout_s)
            except (UpstreamError, TimeoutError, ValueError) as exc:
                out.detail = f"slot {slot} not restored: {exc}"
                log.warning("%s: %s", t.name, out.detail)
                continue
            out.slots.append(slot)
            out.tokens += int(answer.get("n_restored", 0)) if isinstance(answer, dict) else 0
            checks.append((slot, saved_tokens(path)))
        out.verified = bool(checks)
        for slot, tokens in checks:
            if not tokens:
                out.verified = False
                out.detail = f"slot {slot}: cannot read the saved tokens to check the restore"
                continue
            body = {"prompt": tokens, "n_predict": 1, "id_slot": slot, "cache_prompt": True, "temperature": 0}
            try:
                answer = await call(client, t, "/completion", body, timeout_s)
                cache_n = int(answer.get("timings", {}).get("cache_n", 0))
            except (UpstreamError, TimeoutError, ValueError, AttributeError) as exc:
                out.verified = False
                out.detail = f"slot {slot}: the check request failed: {exc}"
                continue
            if cache_n <= 0:
                out.verified = False
                out.detail = f"slot {slot} was restored but its cache is not used (cache_n 0)"
        return out
    finally:
        for p in files.values():
            p.unlink(missing_ok=True)
        meta_path.unlink(missing_ok=True)


def clean(slot_dirs: list[Path]) -> int:
    """Remove every saved WARM slot (``stop --all``), and shared prefixes a stopped front door left; how many
    files went."""
    n = 0
    for d in slot_dirs:
        for p in [*d.glob(f"{PREFIX}*.bin"), *d.glob(f"{SHARE_PREFIX}*.bin"), d / META]:
            if p.is_file():
                p.unlink(missing_ok=True)
                n += 1
    return n
