"""Named checkpoints of a stack: its config, what ran, its state and its slot KV caches.

A checkpoint is a folder ``<state dir>/checkpoints/NAME_YYYYMMDD_HHMMSS`` holding:

* ``config.yaml``: the stack file's text as it was (the stack's YAML source);
* ``manifest.json``: when, what was running (component, port, argv per instance),
  the KV files and the size of every file, so a damaged checkpoint is detected;
* ``state/``: with ``include_state``, copies of ``orchestrator_state.json`` and
  ``hooks.json``, kept for inspection (restore never writes them back: the live
  state file must describe the processes that run now);
* ``kv/<component>/<index>/slot<N>.bin``: with ``kv``, every slot of every generating
  llama-server instance (embedders are skipped), saved through llama-server's
  ``POST /slots/{id}?action=save`` (the server needs ``slot_save: true``, i.e.
  ``--slot-save-path``).

A checkpoint is built in a hidden temporary folder and renamed into place, so a
crash never leaves a half checkpoint that looks whole. It holds the stack file's text,
keys included, so its folders are created 0700 and its files 0600.

A checkpoint holds only its own regular files and folders: a symbolic link anywhere in
it (or a checkpoint folder that is itself a link) makes it damaged, and nothing ever
follows one, so restore never writes or sends a file from outside the checkpoint and
delete never removes one. A manifest that is not the JSON object this module writes
(its every field typed) is damaged too; ``list`` shows it with the reason.

:func:`restore` checks everything first and refuses a damaged checkpoint naming
what is missing, changing nothing. Then it writes the checkpoint's config text back
to the stack file, stops the components that were not running, reloads the ones whose
command line or config changed, starts the ones that were running and are not, runs
the start hooks if it started anything, and restores the saved slots.
The front door (component ``orchestrator``) is never stopped or started by a restore.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import stat
import tempfile
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, Annotated, Any

import httpx
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from modelfleet import hooks
from modelfleet.config import API_COMPONENT, StackConfig, load_config
from modelfleet.errors import CheckpointError, ConfigError, NoSuchCheckpoint, UsageError
from modelfleet.fileutil import write_atomic
from modelfleet.instance import Kind
from modelfleet.spec import InstanceSpec
from modelfleet.stack import Stack
from modelfleet.state import STATE_FILE, InstanceRecord

CHECKPOINTS = "checkpoints"
MANIFEST = "manifest.json"
CONFIG_FILE = "config.yaml"
FORMAT = 1
SLOT_TIMEOUT_S = 600.0  # saving or restoring a big model's slot writes or reads gigabytes

_NAME = r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}"
NAME_RE = re.compile(_NAME)
ID_RE = re.compile(_NAME + r"_[0-9]{8}_[0-9]{6}")
DIR_MODE = 0o700  # a checkpoint holds the stack file, keys included
FILE_MODE = 0o600
MAX_MANIFEST_BYTES = 16 * 1024 * 1024
MAX_PROBLEMS = 20  # per checkpoint, in a message or in `list`


@dataclass
class CheckpointInfo:
    """One checkpoint, as ``checkpoint list`` shows it."""

    id: str
    name: str
    created_at: str
    path: str
    include_state: bool
    kv: bool
    running: list[str]  # components that were running
    size_bytes: int
    problems: list[str] = field(default_factory=list)  # empty: the checkpoint is whole


@dataclass
class RestoreReport:
    """What :func:`restore` did."""

    id: str
    config_path: str | None
    config_written: bool
    kept: list[str] = field(default_factory=list)
    reloaded: list[str] = field(default_factory=list)
    started: list[str] = field(default_factory=list)
    stopped: list[str] = field(default_factory=list)
    kv_restored: list[str] = field(default_factory=list)
    kv_failed: list[str] = field(default_factory=list)
    hooks: list[hooks.HookResult] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        data = {k: v for k, v in self.__dict__.items() if k != "hooks"}
        return {**data, "hooks": [h.to_json() for h in self.hooks]}


# --- names ---------------------------------------------------------------------------


def validate_name(name: str) -> str:
    """A checkpoint name: letters, digits, '_' and '-', starting with a letter or digit, at most 64."""
    if not NAME_RE.fullmatch(name):
        raise UsageError(
            f"{name!r} is not a valid checkpoint name: use letters, digits, '_' and '-' "
            "(starting with a letter or digit, at most 64), no path separators or dots"
        )
    return name


def validate_id(checkpoint_id: str) -> str:
    """A checkpoint id as ``checkpoint list`` shows it: ``NAME_YYYYMMDD_HHMMSS``."""
    if not ID_RE.fullmatch(checkpoint_id):
        raise UsageError(
            f"{checkpoint_id!r} is not a checkpoint id: give NAME_YYYYMMDD_HHMMSS as `modelfleet checkpoint list` shows"
        )
    return checkpoint_id


def checkpoints_dir(state_dir: Path) -> Path:
    return state_dir / CHECKPOINTS


def _find(state_dir: Path, checkpoint_id: str) -> Path:
    """The checkpoint's folder: a real folder right inside the checkpoints folder, never a link."""
    path = checkpoints_dir(state_dir) / validate_id(checkpoint_id)
    if path.is_symlink():
        raise CheckpointError(
            f"checkpoint {checkpoint_id} is a symbolic link ({path} -> {_link_target(path)}), not a folder "
            f"made by `checkpoint create`; it is not followed and nothing was changed. Remove the link by hand "
            "if it is not wanted."
        )
    if not path.is_dir():
        raise NoSuchCheckpoint(
            f"no checkpoint {checkpoint_id!r} in {path.parent}; `modelfleet checkpoint list` shows them"
        )
    return path


def _link_target(path: Path) -> str:
    try:
        target = os.readlink(path)
    except OSError:
        return "?"
    return target if len(target) <= 200 else target[:200] + "..."


# --- create --------------------------------------------------------------------------


def create(
    stack: Stack, name: str, include_state: bool = False, kv: bool = False, now: datetime | None = None
) -> CheckpointInfo:
    """Save the stack's config, what runs, and optionally its state and slot KV caches."""
    validate_name(name)
    created = now or datetime.now()
    checkpoint_id = f"{name}_{created:%Y%m%d_%H%M%S}"
    root = checkpoints_dir(stack.store.dir)
    root.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        root.mkdir(mode=DIR_MODE)
    with stack.store.lock():  # nothing starts or stops while we look
        if (root / checkpoint_id).exists():
            raise CheckpointError(f"checkpoint {checkpoint_id} already exists; wait a second or use another name")
        live = _live_records(stack)
        if kv:
            _require_slot_save(live)
        meta = {"format": FORMAT, "id": checkpoint_id, "name": name, "created_at": created.isoformat("T", "seconds")}
        tmp = Path(tempfile.mkdtemp(prefix=f".{checkpoint_id}.", dir=root))  # 0700
        try:
            _fill(stack, tmp, meta, live, include_state, kv)
            tmp.rename(root / checkpoint_id)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return _info(root / checkpoint_id)


def _fill(stack: Stack, folder: Path, meta: dict[str, Any], live: list[InstanceRecord], state: bool, kv: bool) -> None:
    _write_private(folder / CONFIG_FILE, config_text(stack.cfg).encode())
    if state:
        _copy_state(stack.store.dir, folder / "state")
    slots = _save_kv(live, folder, meta["id"]) if kv else []
    manifest = {
        **meta,
        "stack": stack.cfg.stack_name(),
        "config_path": stack.cfg.source,
        "include_state": state,
        "kv": kv,
        "running": [_running_entry(r) for r in live],
        "kv_slots": slots,
        "files": _sizes(folder),
    }
    _write_private(folder / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())


def _write_private(path: Path, data: bytes) -> None:
    """A new file only its owner can read (the checkpoint copies the stack file, keys included)."""
    with _open_private(path) as f:
        f.write(data)


def _open_private(path: Path) -> IO[bytes]:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, FILE_MODE)
    return os.fdopen(fd, "wb")


def _mkdir_private(folder: Path, rel: str) -> Path:
    """``folder/rel`` and every folder on the way, each 0700 (``mkdir -p`` would leave the parents 0755)."""
    path = folder
    for part in Path(rel).parts:
        path = path / part
        with contextlib.suppress(FileExistsError):
            path.mkdir(mode=DIR_MODE)
    return path


def config_text(cfg: StackConfig) -> str:
    """The stack file's text, or (for a config given without a file, like --dev) the config as YAML."""
    if cfg.source and Path(cfg.source).is_file():
        return Path(cfg.source).read_text()
    return yaml.safe_dump(cfg.model_dump(mode="json", exclude_unset=True), sort_keys=False)


def _live_records(stack: Stack) -> list[InstanceRecord]:
    records = sorted(stack.store.read().values(), key=lambda r: r.port)
    return [r for r in records if stack.launcher.alive(r.handle)]


def _running_entry(rec: InstanceRecord) -> dict[str, Any]:
    keys = ("component", "index", "name", "kind", "port", "pid", "started_at", "argv")
    return {k: getattr(rec, k) for k in keys}


def _copy_state(state_dir: Path, dest: Path) -> None:
    dest.mkdir(mode=DIR_MODE)
    for fname in (STATE_FILE, hooks.HOOKS_FILE):
        if (state_dir / fname).is_file():
            with (state_dir / fname).open("rb") as src, _open_private(dest / fname) as out:
                shutil.copyfileobj(src, out)


def _sizes(folder: Path) -> dict[str, int]:
    files, _, _ = _scan(folder)
    return {rel: size for rel, size in sorted(files.items()) if rel != MANIFEST}


def _scan(folder: Path) -> tuple[dict[str, int], set[str], list[str]]:
    """Every regular file under ``folder`` (relative path -> size), the symbolic links, and a problem
    for each link or special file. Nothing is followed: a link is reported, never entered."""
    files: dict[str, int] = {}
    links: set[str] = set()
    problems: list[str] = []
    pending = [folder]
    while pending:
        current = pending.pop()
        try:
            with os.scandir(current) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            problems.append(f"{current.relative_to(folder).as_posix()}/ cannot be read ({exc.strerror or exc})")
            continue
        for entry in entries:
            rel = Path(entry.path).relative_to(folder).as_posix()
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError as exc:
                problems.append(f"{rel} cannot be read ({exc.strerror or exc})")
                continue
            if stat.S_ISLNK(st.st_mode):
                links.add(rel)
                problems.append(
                    f"{rel} is a symbolic link (to {_link_target(Path(entry.path))}); a checkpoint holds only its "
                    "own files and is never read through a link"
                )
            elif stat.S_ISDIR(st.st_mode):
                pending.append(Path(entry.path))
            elif stat.S_ISREG(st.st_mode):
                files[rel] = st.st_size
            else:
                problems.append(f"{rel} is not a regular file")
    return files, links, problems


# --- KV caches -----------------------------------------------------------------------


def slot_dir_of(rec: InstanceRecord) -> Path | None:
    """The ``--slot-save-path`` an instance runs with, from its recorded argv."""
    argv = rec.argv
    if "--slot-save-path" in argv[:-1]:
        return Path(argv[argv.index("--slot-save-path") + 1])
    return None


def _has_kv(rec: InstanceRecord) -> bool:
    """Generating llama-servers; an embedder's cache holds nothing worth keeping between requests."""
    return rec.kind is Kind.LLAMA_SERVER and "--embeddings" not in rec.argv


def _require_slot_save(live: list[InstanceRecord]) -> None:
    missing = sorted({r.component for r in live if _has_kv(r) and slot_dir_of(r) is None})
    if missing:
        raise CheckpointError(
            "--kv needs every generating llama-server to save slots, and these run without --slot-save-path: "
            + ", ".join(missing)
            + ". Set `slot_save: true` under each in the stack file, `modelfleet reload NAME`, and retry; "
            "no checkpoint was made."
        )


def _save_kv(live: list[InstanceRecord], folder: Path, checkpoint_id: str) -> list[dict[str, Any]]:
    """Save every slot of every llama-server into its slot dir, then move the files into ``folder``."""
    entries = []
    with httpx.Client(timeout=SLOT_TIMEOUT_S) as client:
        for rec in filter(_has_kv, live):
            for slot in range(_total_slots(client, rec)):
                entries.append(_save_slot(client, rec, slot, folder, checkpoint_id))
    return entries


def _total_slots(client: httpx.Client, rec: InstanceRecord) -> int:
    data = _call(client, "GET", rec, "/props", None)
    return int(data["total_slots"])


def _save_slot(
    client: httpx.Client, rec: InstanceRecord, slot: int, folder: Path, checkpoint_id: str
) -> dict[str, Any]:
    fname = f"{checkpoint_id}-slot{slot}.bin"
    data = _call(client, "POST", rec, f"/slots/{slot}?action=save", {"filename": fname})
    rel = f"kv/{rec.component}/{rec.index}/slot{slot}.bin"
    _mkdir_private(folder, f"kv/{rec.component}/{rec.index}")
    slot_dir = slot_dir_of(rec)
    assert slot_dir is not None
    shutil.move(slot_dir / fname, folder / rel)
    os.chmod(folder / rel, FILE_MODE)  # llama-server made it with its own umask
    return {"component": rec.component, "index": rec.index, "slot": slot, "file": rel, "n_saved": data.get("n_saved")}


def _call(client: httpx.Client, method: str, rec: InstanceRecord, path: str, body: object) -> dict[str, Any]:
    try:
        resp = client.request(method, rec.base_url + path, json=body)
    except httpx.HTTPError as exc:
        raise CheckpointError(f"{rec.name} (:{rec.port}) did not answer {method} {path}: {exc}") from exc
    if resp.status_code != 200:
        raise CheckpointError(
            f"{rec.name} (:{rec.port}) answered {method} {path} with {resp.status_code}: {resp.text[:300]}"
        )
    data: dict[str, Any] = resp.json()
    return data


# --- list / delete ---------------------------------------------------------------------


def list_checkpoints(stack: Stack) -> list[CheckpointInfo]:
    """Every checkpoint of the stack, oldest first; damaged ones (links included) carry their problems."""
    root = checkpoints_dir(stack.store.dir)
    if not root.is_dir():
        return []
    found = [_info(p) for p in root.iterdir() if ID_RE.fullmatch(p.name) and (p.is_symlink() or p.is_dir())]
    return sorted(found, key=lambda c: (c.id[-15:], c.id))  # by the id's timestamp, then name


def delete(stack: Stack, checkpoint_id: str) -> Path:
    """Remove one checkpoint folder; return its path. A link is refused, never followed."""
    path = _find(stack.store.dir, checkpoint_id)
    root = checkpoints_dir(stack.store.dir)
    if path.resolve().parent != root.resolve():  # _find refuses links; this is the last word
        raise CheckpointError(f"checkpoint {checkpoint_id} is not inside {root}; nothing was deleted")
    try:
        shutil.rmtree(path)  # removes links inside the folder, never what they point to
    except OSError as exc:
        raise CheckpointError(f"could not delete checkpoint {checkpoint_id} ({path}): {exc.strerror or exc}") from exc
    return path


def _info(path: Path) -> CheckpointInfo:
    try:
        manifest, problems, files = _examine(path)
    except OSError as exc:  # one unreadable checkpoint never hides the others
        manifest, problems, files = {}, [f"cannot be read ({exc.strerror or exc})"], {}
    running = sorted({str(e["component"]) for e in manifest.get("running", [])})
    return CheckpointInfo(
        id=path.name,
        name=str(manifest.get("name", path.name.rsplit("_", 2)[0])),
        created_at=str(manifest.get("created_at", _created_from_id(path.name))),
        path=str(path),
        include_state=bool(manifest.get("include_state", False)),
        kv=bool(manifest.get("kv", False)),
        running=running,
        size_bytes=sum(files.values()),
        problems=problems,
    )


def _created_from_id(checkpoint_id: str) -> str:
    try:
        return datetime.strptime(checkpoint_id[-15:], "%Y%m%d_%H%M%S").isoformat("T", "seconds")
    except ValueError:
        return ""


def check(path: Path) -> tuple[dict[str, Any], list[str]]:
    """The manifest and every problem found: a link, a missing, unreadable or malformed manifest,
    missing, truncated or linked files. The manifest is ``{}`` unless it is well formed."""
    manifest, problems, _ = _examine(path)
    return manifest, problems


def _examine(path: Path) -> tuple[dict[str, Any], list[str], dict[str, int]]:
    if path.is_symlink():
        return {}, [f"{path.name} is a symbolic link (to {_link_target(path)}), not a checkpoint folder"], {}
    files, links, link_problems = _scan(path)
    manifest, problems = _read_manifest(path, files, links)
    if manifest:
        problems += [p for rel, size in manifest["files"].items() if (p := _file_problem(files, links, rel, size))]
        problems += _kv_problems(manifest)
        if CONFIG_FILE not in manifest["files"]:
            problems.append(f"{CONFIG_FILE} is not listed in the manifest")
        elif CONFIG_FILE in files and not _file_problem(files, links, CONFIG_FILE, manifest["files"][CONFIG_FILE]):
            problems += _config_problem(path / CONFIG_FILE)
    problems += link_problems
    if len(problems) > MAX_PROBLEMS:
        problems = [*problems[:MAX_PROBLEMS], f"... and {len(problems) - MAX_PROBLEMS} more problems"]
    return manifest, problems, files


class _Entry(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow", frozen=True)


class _Running(_Entry):
    component: str
    index: int = Field(ge=0)
    port: int = Field(ge=1, le=65535)
    argv: list[str]


class _KvSlot(_Entry):
    component: str
    index: int = Field(ge=0)
    slot: int = Field(ge=0)
    file: str


class _Manifest(_Entry):
    """What :func:`_fill` writes; ``strict``: a string is never a number, a number never a boolean."""

    format: int
    id: str
    name: str
    created_at: str
    include_state: bool = False
    kv: bool = False
    running: list[_Running] = Field(default_factory=list)
    kv_slots: list[_KvSlot] = Field(default_factory=list)
    files: dict[str, Annotated[int, Field(ge=0)]]


def _read_manifest(path: Path, files: dict[str, int], links: set[str]) -> tuple[dict[str, Any], list[str]]:
    """The manifest if it is what :func:`_fill` writes, else ``{}`` and why not."""
    if MANIFEST in links:
        return {}, []  # the scan reports the link
    if MANIFEST not in files:
        return {}, [f"{MANIFEST} is missing" if not (path / MANIFEST).exists() else f"{MANIFEST} is not a file"]
    if files[MANIFEST] > MAX_MANIFEST_BYTES:
        return {}, [f"{MANIFEST} is unreadable (more than {MAX_MANIFEST_BYTES} bytes)"]
    try:
        data = json.loads(_read_nofollow(path / MANIFEST))
    except OSError as exc:
        return {}, [f"{MANIFEST} is unreadable ({exc.strerror or exc})"]
    except (ValueError, RecursionError) as exc:  # not JSON, not UTF-8, nested past the parser's depth
        return {}, [f"{MANIFEST} is unreadable (not JSON: {_short(str(exc))})"]
    if not isinstance(data, dict):
        return {}, [f"{MANIFEST} is not a JSON object but {type(data).__name__}"]
    if not isinstance(data.get("files"), dict):
        return {}, [f"{MANIFEST} has no 'files' table"]
    try:
        _Manifest.model_validate(data)
    except ValidationError as exc:
        return {}, [f"{MANIFEST} is malformed: {_where(e['loc'])}: {e['msg']}" for e in exc.errors()[:MAX_PROBLEMS]]
    problems = []
    if data["format"] != FORMAT:
        problems.append(f"{MANIFEST} has format {data['format']}; this version reads format {FORMAT}")
    if data["id"] != path.name:
        problems.append(f"{MANIFEST} names checkpoint {_short(data['id'])}, but its folder is {path.name}")
    if not NAME_RE.fullmatch(data["name"]) or not path.name.startswith(data["name"] + "_"):
        problems.append(f"{MANIFEST} has the name {_short(data['name'])}, which does not match {path.name}")
    try:
        datetime.fromisoformat(data["created_at"])
    except ValueError:
        problems.append(f"{MANIFEST}: created_at {_short(data['created_at'])} is not a date and time")
    return ({}, problems) if problems else (data, [])


def _where(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else ("." if out else "") + _short(str(part), 80)
    return out or "(top level)"


def _short(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _read_nofollow(path: Path) -> bytes:
    """A file's bytes, refusing (OSError ELOOP) a path whose last part is a symbolic link."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(fd, "rb") as f:
        return f.read()


def _config_problem(path: Path) -> list[str]:
    try:
        _read_nofollow(path).decode("utf-8")
    except OSError as exc:
        return [f"{CONFIG_FILE} is unreadable ({exc.strerror or exc})"]
    except UnicodeDecodeError as exc:
        return [f"{CONFIG_FILE} is not UTF-8 text (byte offset {exc.start})"]
    return []


def _file_problem(files: dict[str, int], links: set[str], rel: str, size: int) -> str | None:
    if Path(rel).is_absolute() or ".." in Path(rel).parts:
        return f"{_short(rel)} is outside the checkpoint"
    parts = Path(rel).parts
    if any("/".join(parts[:n]) in links for n in range(1, len(parts) + 1)):
        return None  # it is, or is under, a link: the scan reports that
    if rel not in files:
        return f"{_short(rel)} is missing"
    if files[rel] != size:
        return f"{rel} has {files[rel]} bytes, the manifest says {size}"
    return None


def _kv_problems(manifest: dict[str, Any]) -> list[str]:
    problems = []
    for i, entry in enumerate(manifest.get("kv_slots", [])):
        if entry["file"] not in manifest["files"]:
            problems.append(f"kv_slots[{i}]: {_short(entry['file'])} is not listed in the manifest's files")
        elif not entry["file"].startswith("kv/"):
            problems.append(f"kv_slots[{i}]: {_short(entry['file'])} is not a KV file (under kv/)")
    return problems


# --- restore --------------------------------------------------------------------------


@dataclass
class _Plan:
    target: Stack  # the stack with the checkpoint's config
    text: str
    keep: list[str]
    reload: list[str]
    start: list[str]
    stop: list[str]


@dataclass
class Prepared:
    """A checked restore, its config written back, no process touched yet."""

    plan: _Plan
    path: Path
    manifest: dict[str, Any]
    report: RestoreReport


def restore(stack: Stack, checkpoint_id: str, run_hooks: bool = True) -> RestoreReport:
    """Bring the stack back to a checkpoint and say what was done.

    Everything is checked before anything changes: a damaged checkpoint, a config
    that no longer validates, or KV slots that cannot be put back are refused and
    nothing is touched. ``stack`` keeps its old config; reload it from the file after.
    """
    prepared = prepare(stack, checkpoint_id)
    _apply(prepared.plan.target, prepared.plan, prepared.report)
    finish(prepared, run_hooks)
    return prepared.report


def prepare(stack: Stack, checkpoint_id: str) -> Prepared:
    """Check a checkpoint and plan its restore; write its config back. Starts and stops nothing."""
    path = _find(stack.store.dir, checkpoint_id)
    manifest, problems = check(path)
    if problems:
        raise CheckpointError(
            f"checkpoint {checkpoint_id} is damaged; nothing was changed:\n" + "\n".join(f"  {p}" for p in problems)
        )
    plan = _plan(stack, path, manifest)
    writable = stack.cfg.writable_source()
    report = RestoreReport(checkpoint_id, writable, _write_config(writable, plan.text))
    if writable is None:
        report.notes.append("the stack has no config file (--dev): the checkpoint's config was used, not written")
    if manifest.get("include_state"):
        report.notes.append(
            f"the saved state is in {path / 'state'}; the live state file was kept (it names live pids)"
        )
    return Prepared(plan, path, manifest, report)


def finish(prepared: Prepared, run_hooks: bool = True) -> None:
    """After the plan's starts and stops: the start hooks (if anything started) and the saved slots."""
    report = prepared.report
    if run_hooks and (report.started or report.reloaded):
        report.hooks = hooks.run_hooks(prepared.plan.target, "start")
    _restore_kv(prepared.plan.target, prepared.path, prepared.manifest, report)


def _plan(stack: Stack, path: Path, manifest: dict[str, Any]) -> _Plan:
    try:
        text = _read_nofollow(path / CONFIG_FILE).decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:  # changed since it was checked
        raise CheckpointError(
            f"checkpoint {path.name}: {CONFIG_FILE} cannot be read ({exc}); nothing was changed"
        ) from exc
    try:
        cfg = load_config(text, stack.cfg.source)
    except ConfigError as exc:
        raise CheckpointError(
            f"the checkpoint's config does not validate any more; nothing was changed:\n{exc}"
        ) from exc
    wanted = [c for c in cfg.components() if c in {e.get("component") for e in manifest.get("running", [])}]
    live = [r for r in _live_records(stack) if r.component != API_COMPONENT]
    target = stack.with_config(cfg)
    specs = target.specs(wanted)
    plan = _Plan(target, text, [], [], [], sorted({r.component for r in live if r.component not in wanted}))
    buckets = {"start": plan.start, "keep": plan.keep, "reload": plan.reload}
    for comp in wanted:
        mine = [r for r in live if r.component == comp]
        buckets[_classify(comp, mine, specs, stack.cfg, cfg)].append(comp)
    _check_kv_plan(cfg, manifest)
    return plan


def _classify(
    comp: str, mine: list[InstanceRecord], specs: list[InstanceSpec], old: StackConfig, new: StackConfig
) -> str:
    """start: not running; keep: same ports, command lines and config; reload: anything else."""
    if not mine:
        return "start"
    want = {s.port: s for s in specs if s.component == comp}
    same_argv = {r.port for r in mine} == set(want) and all(want[r.port].argv == r.argv for r in mine)
    same_cfg = old.components().get(comp) == new.components()[comp]
    return "keep" if same_argv and same_cfg else "reload"


def _check_kv_plan(cfg: StackConfig, manifest: dict[str, Any]) -> None:
    bad = sorted(
        {
            str(e.get("component"))
            for e in manifest.get("kv_slots", [])
            if e.get("component") not in cfg.servers or not cfg.servers[e["component"]].slot_save
        }
    )
    if bad:
        raise CheckpointError(
            f"the checkpoint holds KV caches for {', '.join(bad)}, but its config does not run them with "
            "`slot_save: true`; nothing was changed"
        )


def _write_config(source: str | None, text: str) -> bool:
    """Put the checkpoint's text back into the stack file (atomically); False when there is none or it matches."""
    if source is None:
        return False
    path = Path(source)
    mode = None
    with contextlib.suppress(OSError, UnicodeDecodeError):
        mode = stat.S_IMODE(path.stat().st_mode)
        if path.read_text() == text:
            return False
    # Created with the stack file's own mode (0600 for a file with keys), never readable by others meanwhile.
    write_atomic(path, text, mode=0o600 if mode is None else mode)
    if mode is not None:
        os.chmod(path, mode)  # the umask may have narrowed it
    return True


def _apply(target: Stack, plan: _Plan, report: RestoreReport) -> None:
    report.kept = list(plan.keep)
    if plan.stop:
        target.stop(plan.stop)
        report.stopped = list(plan.stop)
    for comp in plan.reload:
        target.reload(comp)
        report.reloaded.append(comp)
    if plan.start:
        target.start(plan.start)
        report.started = list(plan.start)


def _restore_kv(target: Stack, path: Path, manifest: dict[str, Any], report: RestoreReport) -> None:
    """Copy each saved slot into its instance's slot dir and ask llama-server to load it."""
    slots = manifest.get("kv_slots", [])
    if not slots:
        return
    live = {(r.component, r.index): r for r in _live_records(target)}
    with httpx.Client(timeout=SLOT_TIMEOUT_S) as client:
        for entry in slots:
            label = f"{entry['component']}[{entry['index']}] slot {entry['slot']}"
            rec = live.get((entry["component"], entry["index"]))
            try:
                if rec is None:
                    raise CheckpointError("the instance is not running")
                n = _restore_slot(client, rec, entry, path / entry["file"], manifest["id"])
                report.kv_restored.append(f"{label}: {n} tokens")
            except CheckpointError as exc:
                report.kv_failed.append(f"{label}: {exc}")


def _restore_slot(client: httpx.Client, rec: InstanceRecord, entry: dict[str, Any], src: Path, ckpt: str) -> int:
    slot_dir = slot_dir_of(rec)
    if slot_dir is None:
        raise CheckpointError(f"{rec.name} runs without --slot-save-path")
    fname = f"{ckpt}-slot{entry['slot']}.bin"
    slot_dir.mkdir(parents=True, exist_ok=True)
    try:
        with os.fdopen(os.open(src, os.O_RDONLY | os.O_NOFOLLOW), "rb") as f, (slot_dir / fname).open("wb") as out:
            shutil.copyfileobj(f, out)  # never through a link, even one made after the check
    except OSError as exc:
        raise CheckpointError(f"cannot copy {src.name}: {exc.strerror or exc}") from exc
    try:
        data = _call(client, "POST", rec, f"/slots/{entry['slot']}?action=restore", {"filename": fname})
    finally:
        (slot_dir / fname).unlink(missing_ok=True)
    return int(data.get("n_restored", 0))
