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
crash never leaves a half checkpoint that looks whole.

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
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import yaml

from modelfleet import hooks
from modelfleet.config import API_COMPONENT, StackConfig, load_config
from modelfleet.errors import CheckpointError, ConfigError, NoSuchCheckpoint, UsageError
from modelfleet.fileutil import write_atomic
from modelfleet.instance import Kind
from modelfleet.spec import BinaryInfo, InstanceSpec, find_llama_server, probe_binary
from modelfleet.stack import Stack
from modelfleet.state import STATE_FILE, InstanceRecord

CHECKPOINTS = "checkpoints"
MANIFEST = "manifest.json"
CONFIG_FILE = "config.yaml"
FORMAT = 1
SLOT_TIMEOUT_S = 600.0  # saving or restoring a big model's slot writes or reads gigabytes

_NAME = r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}"
NAME_RE = re.compile(_NAME)
ID_RE = re.compile(_NAME + r"_\d{8}_\d{6}")


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
    path = checkpoints_dir(state_dir) / validate_id(checkpoint_id)
    if not path.is_dir():
        raise NoSuchCheckpoint(
            f"no checkpoint {checkpoint_id!r} in {path.parent}; `modelfleet checkpoint list` shows them"
        )
    return path


# --- create --------------------------------------------------------------------------


def create(
    stack: Stack, name: str, include_state: bool = False, kv: bool = False, now: datetime | None = None
) -> CheckpointInfo:
    """Save the stack's config, what runs, and optionally its state and slot KV caches."""
    validate_name(name)
    created = now or datetime.now()
    checkpoint_id = f"{name}_{created:%Y%m%d_%H%M%S}"
    root = checkpoints_dir(stack.store.dir)
    root.mkdir(parents=True, exist_ok=True)
    with stack.store.lock():  # nothing starts or stops while we look
        if (root / checkpoint_id).exists():
            raise CheckpointError(f"checkpoint {checkpoint_id} already exists; wait a second or use another name")
        live = _live_records(stack)
        if kv:
            _require_slot_save(live)
        meta = {"format": FORMAT, "id": checkpoint_id, "name": name, "created_at": created.isoformat("T", "seconds")}
        tmp = Path(tempfile.mkdtemp(prefix=f".{checkpoint_id}.", dir=root))
        try:
            _fill(stack, tmp, meta, live, include_state, kv)
            tmp.rename(root / checkpoint_id)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return _info(root / checkpoint_id)


def _fill(stack: Stack, folder: Path, meta: dict[str, Any], live: list[InstanceRecord], state: bool, kv: bool) -> None:
    (folder / CONFIG_FILE).write_text(config_text(stack.cfg))
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
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


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
    dest.mkdir()
    for fname in (STATE_FILE, hooks.HOOKS_FILE):
        if (state_dir / fname).is_file():
            shutil.copy2(state_dir / fname, dest / fname)


def _sizes(folder: Path) -> dict[str, int]:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    return {p.relative_to(folder).as_posix(): p.stat().st_size for p in files}


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
    (folder / rel).parent.mkdir(parents=True, exist_ok=True)
    slot_dir = slot_dir_of(rec)
    assert slot_dir is not None
    shutil.move(slot_dir / fname, folder / rel)
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
    """Every checkpoint of the stack, oldest first; damaged ones carry their problems."""
    root = checkpoints_dir(stack.store.dir)
    if not root.is_dir():
        return []
    found = [_info(p) for p in root.iterdir() if p.is_dir() and ID_RE.fullmatch(p.name)]
    return sorted(found, key=lambda c: (c.id[-15:], c.id))  # by the id's timestamp, then name


def delete(stack: Stack, checkpoint_id: str) -> Path:
    """Remove one checkpoint folder; return its path."""
    path = _find(stack.store.dir, checkpoint_id)
    shutil.rmtree(path)
    return path


def _info(path: Path) -> CheckpointInfo:
    manifest, problems = check(path)
    size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    running = sorted({str(e.get("component")) for e in manifest.get("running", []) if isinstance(e, dict)})
    return CheckpointInfo(
        id=path.name,
        name=str(manifest.get("name", path.name.rsplit("_", 2)[0])),
        created_at=str(manifest.get("created_at", "")),
        path=str(path),
        include_state=bool(manifest.get("include_state", False)),
        kv=bool(manifest.get("kv", False)),
        running=running,
        size_bytes=size,
        problems=problems,
    )


def check(path: Path) -> tuple[dict[str, Any], list[str]]:
    """The manifest and every problem found: missing or unreadable manifest, missing or truncated files."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError:
        return {}, [f"{MANIFEST} is missing"]
    except (OSError, ValueError) as exc:
        return {}, [f"{MANIFEST} is unreadable ({exc})"]
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        return {}, [f"{MANIFEST} has no 'files' table"]
    problems = [_file_problem(path, rel, size) for rel, size in manifest["files"].items()]
    problems += _kv_problems(manifest)
    if CONFIG_FILE not in manifest["files"]:
        problems.append(f"{CONFIG_FILE} is not listed in the manifest")
    return manifest, [p for p in problems if p]


def _file_problem(folder: Path, rel: str, size: object) -> str | None:
    if Path(rel).is_absolute() or ".." in Path(rel).parts:
        return f"{rel} is outside the checkpoint"
    f = folder / rel
    if not f.is_file():
        return f"{rel} is missing"
    if f.stat().st_size != size:
        return f"{rel} has {f.stat().st_size} bytes, the manifest says {size}"
    return None


def _kv_problems(manifest: dict[str, Any]) -> list[str]:
    keys = {"component": str, "index": int, "slot": int, "file": str}
    problems = []
    for i, entry in enumerate(manifest.get("kv_slots", [])):
        if not isinstance(entry, dict) or not all(isinstance(entry.get(k), t) for k, t in keys.items()):
            problems.append(f"kv_slots[{i}] in {MANIFEST} is malformed")
        elif entry["file"] not in manifest["files"]:
            problems.append(f"kv_slots[{i}]: {entry['file']} is not listed in the manifest's files")
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
    text = (path / CONFIG_FILE).read_text()
    try:
        cfg = load_config(text, stack.cfg.source)
    except ConfigError as exc:
        raise CheckpointError(
            f"the checkpoint's config does not validate any more; nothing was changed:\n{exc}"
        ) from exc
    wanted = [c for c in cfg.components() if c in {e.get("component") for e in manifest.get("running", [])}]
    live = [r for r in _live_records(stack) if r.component != API_COMPONENT]
    target = _stack_for(stack, cfg)
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


def _stack_for(stack: Stack, cfg: StackConfig) -> Stack:
    """A Stack on the same state dir and launcher, with ``cfg`` (and its llama-server, if it names another)."""
    binary: BinaryInfo | None = stack.binary
    if cfg.servers and cfg.llama_server != stack.cfg.llama_server:
        binary = probe_binary(find_llama_server(cfg))
    return Stack(
        cfg,
        stack.store.dir,
        binary,
        launcher=stack.launcher,
        say=stack.say,
        progress=stack.progress,
        stop_grace_s=stack.stop_grace_s,
        binary_error=stack.binary_error,
    )


def _write_config(source: str | None, text: str) -> bool:
    """Put the checkpoint's text back into the stack file (atomically); False when there is none or it matches."""
    if source is None:
        return False
    path = Path(source)
    with contextlib.suppress(OSError):
        if path.read_text() == text:
            return False
    write_atomic(path, text)
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
    shutil.copyfile(src, slot_dir / fname)
    try:
        data = _call(client, "POST", rec, f"/slots/{entry['slot']}?action=restore", {"filename": fname})
    finally:
        (slot_dir / fname).unlink(missing_ok=True)
    return int(data.get("n_restored", 0))
