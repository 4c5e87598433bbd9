"""Checkpoint folders on disk: links are never followed, malformed manifests are damaged
checkpoints (never tracebacks), and what a checkpoint holds is private to its owner.

No process is started here: the stacks run nothing, so create, list, restore and delete
only handle files.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import config_from, stack_cli
from modelfleet import checkpoint
from modelfleet.checkpoint import CheckpointError
from modelfleet.config import load_config_file
from modelfleet.stack import Stack

CONFIG = "servers:\n  alpha: {model: m.gguf, port: 9, ctx_size: 512}\napi: {enabled: false, api_key: sk-secret}\n"


@pytest.fixture
def stack(tmp_path: Path) -> Stack:
    """A stack with one server that is not running; its file is tmp_path/stack.yaml."""
    return Stack(config_from(CONFIG, tmp_path), tmp_path / "state", None)


@pytest.fixture
def private_umask() -> Iterator[None]:
    """umask 0: any mode the checkpoint gets is the one it asked for."""
    old = os.umask(0)
    yield
    os.umask(old)


def stack_file(stack: Stack) -> Path:
    assert stack.cfg.source is not None
    return Path(stack.cfg.source)


def folder_of(stack: Stack, checkpoint_id: str) -> Path:
    return stack.store.dir / "checkpoints" / checkpoint_id


def rewrite_manifest(folder: Path, change: Any) -> None:
    path = folder / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def refused(stack: Stack, checkpoint_id: str, *fragments: str) -> str:
    """Restore must refuse with a CheckpointError naming ``fragments``, changing nothing."""
    before = stack_file(stack).read_bytes()
    with pytest.raises(CheckpointError) as info:
        checkpoint.restore(stack, checkpoint_id)
    msg = str(info.value)
    assert "nothing was changed" in msg, msg
    for fragment in fragments:
        assert fragment in msg, msg
    assert stack_file(stack).read_bytes() == before
    return msg


# --- permissions -----------------------------------------------------------------------


def test_checkpoints_are_private_to_their_owner(stack: Stack, private_umask: None) -> None:
    stack.store.dir.mkdir(parents=True)
    (stack.store.dir / "orchestrator_state.json").write_text("{}")
    (stack.store.dir / "hooks.json").write_text("[]")
    info = checkpoint.create(stack, "private", include_state=True)
    folder = Path(info.path)
    assert "sk-secret" in (folder / "config.yaml").read_text(), "the copy holds the keys"
    assert mode(folder.parent) == 0o700
    dirs = [folder, *(p for p in folder.rglob("*") if p.is_dir())]
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert {p.name for p in files} == {"config.yaml", "manifest.json", "orchestrator_state.json", "hooks.json"}
    assert {mode(d) for d in dirs} == {0o700}, [(d, oct(mode(d))) for d in dirs]
    assert {mode(f) for f in files} == {0o600}, [(f, oct(mode(f))) for f in files]


def test_restore_keeps_the_stack_file_private(stack: Stack, private_umask: None) -> None:
    path = stack_file(stack)
    path.chmod(0o600)
    info = checkpoint.create(stack, "keys")
    path.write_text(CONFIG.replace("ctx_size: 512", "ctx_size: 1024"))
    report = checkpoint.restore(stack, info.id)
    assert report.config_written and path.read_text() == CONFIG
    assert mode(path) == 0o600


# --- links -------------------------------------------------------------------------------


def test_a_linked_config_is_refused_and_the_stack_file_is_not_written(stack: Stack, tmp_path: Path) -> None:
    info = checkpoint.create(stack, "base")
    folder = Path(info.path)
    evil = CONFIG.replace("ctx_size: 512", "ctx_size: 999")  # the same size: the size check alone passes
    assert len(evil) == len(CONFIG)
    outside = tmp_path / "outside.yaml"
    outside.write_text(evil)
    (folder / "config.yaml").unlink()
    (folder / "config.yaml").symlink_to(outside)
    refused(stack, info.id, f"checkpoint {info.id} is damaged", "config.yaml is a symbolic link", str(outside))
    assert stack_file(stack).read_text() == CONFIG
    (listed,) = checkpoint.list_checkpoints(stack)
    assert any("config.yaml is a symbolic link" in p for p in listed.problems)


def linked_kv(stack: Stack, folder: Path, target: Path, link_at: str) -> None:
    """Give the checkpoint a KV slot whose file (or a folder on its way) is a link to ``target``."""
    kv_file = "kv/alpha/0/slot0.bin"
    (folder / link_at).parent.mkdir(parents=True, exist_ok=True)
    (folder / link_at).symlink_to(target)
    size = (folder / kv_file).stat().st_size

    def add_slot(m: dict[str, Any]) -> None:
        m["kv"] = True
        m["kv_slots"] = [{"component": "alpha", "index": 0, "slot": 0, "file": kv_file, "n_saved": 1}]
        m["files"][kv_file] = size

    rewrite_manifest(folder, add_slot)


def test_a_linked_kv_file_is_refused(stack: Stack, tmp_path: Path) -> None:
    stack_file(stack).write_text(CONFIG.replace("ctx_size: 512", "slot_save: true"))
    stack = Stack(load_config_file(stack_file(stack)), stack.store.dir, None)
    info = checkpoint.create(stack, "kv")
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"not a kv cache")
    linked_kv(stack, Path(info.path), secret, "kv/alpha/0/slot0.bin")
    refused(stack, info.id, "kv/alpha/0/slot0.bin is a symbolic link")


def test_a_linked_folder_inside_a_checkpoint_is_refused(stack: Stack, tmp_path: Path) -> None:
    stack_file(stack).write_text(CONFIG.replace("ctx_size: 512", "slot_save: true"))
    stack = Stack(load_config_file(stack_file(stack)), stack.store.dir, None)
    info = checkpoint.create(stack, "kvdir")
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "alpha" / "0").mkdir(parents=True)
    (elsewhere / "alpha" / "0" / "slot0.bin").write_bytes(b"x" * 10)
    linked_kv(stack, Path(info.path), elsewhere, "kv")
    msg = refused(stack, info.id, "kv is a symbolic link")
    assert "slot0.bin" not in msg, "the link was not entered"


def linked_checkpoint(stack: Stack, tmp_path: Path) -> tuple[str, Path]:
    """A checkpoint folder that is a link to a whole, valid checkpoint made for another state dir."""
    other = Stack(stack.cfg, tmp_path / "other-state", None)
    real = Path(checkpoint.create(other, "evil").path)
    link_id = real.name.replace("evil_", "linked_")
    real = real.rename(real.with_name(link_id))
    rewrite_manifest(real, lambda m: m.update(id=link_id, name="linked"))
    link = folder_of(stack, link_id)
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(real, target_is_directory=True)
    return link_id, real


def test_a_checkpoint_folder_that_is_a_link_is_refused_listed_and_kept(stack: Stack, tmp_path: Path) -> None:
    good = checkpoint.create(stack, "good")
    link_id, real = linked_checkpoint(stack, tmp_path)
    stack_file(stack).write_text(CONFIG + "# edited\n")
    refused(stack, link_id, "is a symbolic link", "not followed")
    with pytest.raises(CheckpointError, match="is a symbolic link") as info:
        checkpoint.delete(stack, link_id)
    assert "nothing was changed" in str(info.value)
    assert folder_of(stack, link_id).is_symlink() and (real / "manifest.json").is_file()
    listed = {c.id: c for c in checkpoint.list_checkpoints(stack)}
    assert listed[good.id].problems == []
    assert listed[link_id].problems and "symbolic link" in listed[link_id].problems[0]
    assert listed[link_id].size_bytes == 0 and listed[link_id].running == []
    checkpoint.restore(stack, good.id)  # the others still work
    assert stack_file(stack).read_text() == CONFIG


def test_deleting_a_checkpoint_removes_links_inside_it_not_what_they_point_to(stack: Stack, tmp_path: Path) -> None:
    info = checkpoint.create(stack, "withlink")
    keep = tmp_path / "keep.txt"
    keep.write_text("keep me")
    (Path(info.path) / "extra").symlink_to(keep)
    checkpoint.delete(stack, info.id)
    assert not Path(info.path).exists() and keep.read_text() == "keep me"


def test_cli_refuses_a_linked_checkpoint_without_a_traceback(tmp_path: Path) -> None:
    (tmp_path / "stack.yaml").write_text(CONFIG)
    stack = Stack(load_config_file(tmp_path / "stack.yaml"), tmp_path / "state", None)
    link_id, _ = linked_checkpoint(stack, tmp_path)
    for action in ("delete", "restore"):
        res = stack_cli(tmp_path, "checkpoint", action, link_id)
        assert res.returncode == 7, res.stderr
        assert "is a symbolic link" in res.stderr and "Traceback" not in res.stderr
    res = stack_cli(tmp_path, "checkpoint", "list", "--json")
    assert res.returncode == 0, res.stderr
    (listed,) = json.loads(res.stdout)
    assert listed["id"] == link_id and "symbolic link" in listed["problems"][0]


# --- malformed manifests --------------------------------------------------------------------


def _set(key: str, value: Any) -> Any:
    return lambda m: m.__setitem__(key, value)


MALFORMED: dict[str, tuple[Any, str]] = {
    "not-json": ("{not json", "manifest.json is unreadable (not JSON"),
    "not-utf8": (b"\xff\xfe{}", "manifest.json is unreadable"),
    "deep": ("[" * 100_000 + "]" * 100_000, "manifest.json is"),
    "a-list": ("[1, 2]", "manifest.json is not a JSON object but list"),
    "a-string": ('"manifest"', "manifest.json is not a JSON object but str"),
    "files-a-list": (_set("files", ["config.yaml"]), "has no 'files' table"),
    "size-a-string": (lambda m: m["files"].__setitem__("config.yaml", "93"), "files.config.yaml"),
    "size-a-boolean": (lambda m: m["files"].__setitem__("config.yaml", True), "files.config.yaml"),
    "size-negative": (lambda m: m["files"].__setitem__("config.yaml", -1), "files.config.yaml"),
    "running-a-number": (_set("running", 5), "running"),
    "running-entry-wrong": (_set("running", [{"component": 1, "index": 0, "port": 9, "argv": []}]), "running[0]"),
    "kv-slot-wrong": (_set("kv_slots", [{"component": "alpha"}]), "kv_slots[0]"),
    "kv-outside-kv": (
        _set("kv_slots", [{"component": "alpha", "index": 0, "slot": 0, "file": "config.yaml"}]),
        "is not a KV file",
    ),
    "created-at-a-number": (_set("created_at", 5), "created_at"),
    "created-at-markup": (_set("created_at", "[red]x[/]"), "is not a date and time"),
    "include-state-a-string": (_set("include_state", "yes"), "include_state"),
    "id-elsewhere": (_set("id", "../../../x_20250101_000000"), "names checkpoint"),
    "format-2": (_set("format", 2), "this version reads format 1"),
    "no-format": (lambda m: m.pop("format"), "format"),
}


def damage(folder: Path, how: Any) -> None:
    if isinstance(how, bytes):
        (folder / "manifest.json").write_bytes(how)
    elif isinstance(how, str):
        (folder / "manifest.json").write_text(how)
    else:
        rewrite_manifest(folder, how)


@pytest.mark.parametrize("kind", list(MALFORMED))
def test_a_malformed_manifest_is_a_damaged_checkpoint(stack: Stack, kind: str) -> None:
    how, problem = MALFORMED[kind]
    good = checkpoint.create(stack, "good")
    bad = checkpoint.create(stack, "bad")
    damage(Path(bad.path), how)
    listed = {c.id: c for c in checkpoint.list_checkpoints(stack)}
    assert listed[good.id].problems == [] and listed[good.id].running == []
    assert listed[bad.id].problems, listed[bad.id]
    assert any(problem in p for p in listed[bad.id].problems), listed[bad.id].problems
    assert all(len(p) < 1000 for p in listed[bad.id].problems)
    assert listed[bad.id].name == "bad" and listed[bad.id].created_at.startswith("20")
    refused(stack, bad.id, f"checkpoint {bad.id} is damaged", problem)
    checkpoint.delete(stack, bad.id)  # a damaged checkpoint can always be removed
    assert [c.id for c in checkpoint.list_checkpoints(stack)] == [good.id]


def test_cli_lists_every_checkpoint_when_one_manifest_is_malformed(tmp_path: Path) -> None:
    (tmp_path / "stack.yaml").write_text(CONFIG)
    stack = Stack(load_config_file(tmp_path / "stack.yaml"), tmp_path / "state", None)
    good = checkpoint.create(stack, "good")
    bad = checkpoint.create(stack, "bad")
    damage(Path(bad.path), _set("running", 5))
    res = stack_cli(tmp_path, "checkpoint", "list")
    assert res.returncode == 0, res.stderr
    assert good.id in res.stdout and bad.id in res.stdout and "running" in res.stdout
    res = stack_cli(tmp_path, "checkpoint", "restore", bad.id)
    assert res.returncode == 7 and "is damaged" in res.stderr and "Traceback" not in res.stderr


def test_a_config_that_is_not_utf8_is_a_damaged_checkpoint(stack: Stack) -> None:
    info = checkpoint.create(stack, "latin1")
    folder = Path(info.path)
    (folder / "config.yaml").write_bytes(CONFIG.replace("sk-secret", "sk-secr\xe9").encode("latin-1"))
    rewrite_manifest(folder, lambda m: m["files"].__setitem__("config.yaml", (folder / "config.yaml").stat().st_size))
    refused(stack, info.id, "config.yaml is not UTF-8 text")


def test_a_special_file_in_a_checkpoint_is_damage_not_a_hang(stack: Stack) -> None:
    info = checkpoint.create(stack, "fifo")
    folder = Path(info.path)
    (folder / "config.yaml").unlink()
    os.mkfifo(folder / "config.yaml")
    refused(stack, info.id, "config.yaml is not a regular file")
