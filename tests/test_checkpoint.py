"""Checkpoints on real llama-server processes: create, list, restore, delete, --kv, refusals."""

from __future__ import annotations

import json
import stat
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import StackFactory, free_ports, process_of, stack_cli
from modelfleet import checkpoint
from modelfleet.config import load_config_file
from modelfleet.errors import CheckpointError, NoSuchCheckpoint, UsageError
from modelfleet.stack import Stack
from modelfleet.state import StateStore

# ~190 bytes: the byte-level tiny model reads it as ~190 prompt tokens.
PROMPT = "Checkpoints keep the KV cache of every slot, so a restored server answers a long shared prefix " * 2


def server(name: str, model: Path, port: int, **fields: object) -> str:
    lines = [f"  {name}:", f"    model: {model}", f"    port: {port}", "    ctx_size: 512", "    threads: 1"]
    return "\n".join(lines + [f"    {k}: {v}" for k, v in fields.items()]) + "\n"


def reopen(stack: Stack) -> Stack:
    """The stack as a new CLI command would see it: the config file read again."""
    assert stack.cfg.source is not None
    return Stack(load_config_file(stack.cfg.source), stack.store.dir, stack.binary, stop_grace_s=5.0)


def edit_config(stack: Stack, old: str, new: str) -> Stack:
    assert stack.cfg.source is not None
    path = Path(stack.cfg.source)
    text = path.read_text()
    assert text.count(old) == 1
    path.write_text(text.replace(old, new))
    return reopen(stack)


def total_slots(port: int) -> int:
    return int(httpx.get(f"http://127.0.0.1:{port}/props", timeout=10).json()["total_slots"])


def complete(port: int, prompt: str = PROMPT) -> dict[str, Any]:
    body = {"prompt": prompt, "n_predict": 1, "id_slot": 0, "cache_prompt": True}
    resp = httpx.post(f"http://127.0.0.1:{port}/completion", json=body, timeout=60)
    assert resp.status_code == 200, resp.text
    timings: dict[str, Any] = resp.json()["timings"]
    return timings


def listening(port: int) -> bool:
    try:
        httpx.get(f"http://127.0.0.1:{port}/health", timeout=1)
        return True
    except httpx.HTTPError:
        return False


def pids(stack: Stack) -> dict[str, int]:
    return {r.component: r.pid for r in stack.store.read().values() if process_of(r) is not None}


# --- round trip ------------------------------------------------------------------------


def test_restore_undoes_a_config_change_and_what_ran(make_stack: StackFactory, tiny_model: Path) -> None:
    a, b, c = free_ports(3)
    stack = make_stack(
        "servers:\n"
        + server("alpha", tiny_model, a, parallel=1)
        + server("beta", tiny_model, b, tier="cold")
        + server("gamma", tiny_model, c)
        + "hooks:\n  - {name: warm, builtin: generate_warmup}\n"
    )
    assert stack.cfg.source is not None
    original = Path(stack.cfg.source).read_text()
    stack.start(["alpha", "gamma"])
    info = checkpoint.create(stack, "before_update", include_state=True)
    assert info.id.startswith("before_update_") and info.running == ["alpha", "gamma"] and not info.problems
    assert [i.id for i in checkpoint.list_checkpoints(stack)] == [info.id]
    folder = Path(info.path)
    assert (folder / "config.yaml").read_text() == original
    manifest = json.loads((folder / "manifest.json").read_text())
    running = {e["component"]: e for e in manifest["running"]}
    assert sorted(running) == ["alpha", "gamma"] and running["alpha"]["port"] == a
    argv = running["alpha"]["argv"]
    assert argv[argv.index("--parallel") + 1] == "1"
    saved_state = json.loads((folder / "state" / "orchestrator_state.json").read_text())
    assert set(saved_state) == {f"server_{a}", f"server_{c}"}

    # Change the config (parallel 1 -> 2) and apply it; start beta, stop gamma.
    changed = edit_config(stack, "parallel: 1", "parallel: 2")
    changed.reload("alpha")
    changed.start(["beta"])
    changed.stop(["gamma"])
    assert total_slots(a) == 2 and listening(b) and not listening(c)

    report = checkpoint.restore(changed, info.id)
    assert report.config_written and Path(stack.cfg.source).read_text() == original
    assert (report.reloaded, report.started, report.stopped, report.kept) == (["alpha"], ["gamma"], ["beta"], [])
    assert any("live state file was kept" in n for n in report.notes)
    assert [(h.name, h.detail) for h in report.hooks] == [("warm", "warmed 2 generation instance(s)")]
    assert total_slots(a) == 1, "the reload used the checkpoint's config"
    assert listening(c) and not listening(b)
    live = pids(reopen(stack))
    assert set(live) == {"alpha", "gamma"}
    assert all(process_of(StateStore(stack.store.dir).read()[f"server_{p}"]) for p in (a, c))

    # Restoring again changes nothing; then the checkpoint can be deleted.
    again = checkpoint.restore(reopen(stack), info.id)
    assert (again.config_written, again.kept, again.reloaded, again.started, again.stopped) == (
        False,
        ["alpha", "gamma"],
        [],
        [],
        [],
    )
    assert pids(reopen(stack)) == live and again.hooks == []
    checkpoint.delete(stack, info.id)
    assert checkpoint.list_checkpoints(stack) == [] and not folder.exists()
    with pytest.raises(NoSuchCheckpoint, match="checkpoint list"):
        checkpoint.delete(stack, info.id)


def test_kv_round_trip_restores_the_slot_cache(make_stack: StackFactory, tiny_model: Path) -> None:
    port, emb = free_ports(2)
    stack = make_stack(
        "servers:\n"
        + server("alpha", tiny_model, port, parallel=1, slot_save="true")
        + server("emb", tiny_model, emb, embeddings="{}")  # an embedder: skipped by --kv, needs no slot_save
    )
    stack.start(["alpha", "emb"])
    slot_dir = stack.store.dir / "slots" / str(port)
    first = complete(port)
    assert first["cache_n"] == 0 and first["prompt_n"] > 150

    warm = checkpoint.create(stack, "warm", kv=True)
    cold = checkpoint.create(stack, "cold")  # the same moment, without the KV cache
    manifest = json.loads((Path(warm.path) / "manifest.json").read_text())
    (slot,) = manifest["kv_slots"]
    assert (slot["component"], slot["slot"]) == ("alpha", 0) and slot["n_saved"] > 150
    assert list(slot_dir.iterdir()) == [], "saved slots are moved into the checkpoint"
    kv_path = Path(warm.path) / slot["file"]
    assert stat.S_IMODE(kv_path.stat().st_mode) == 0o600, "llama-server's umask does not decide"
    for d in (Path(warm.path) / "kv", kv_path.parent.parent, kv_path.parent):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700, d

    # Control: a restarted server has nothing cached, and a restore without --kv leaves it so.
    stack.reload("alpha")
    report = checkpoint.restore(reopen(stack), cold.id)
    assert report.kept == ["alpha", "emb"] and report.kv_restored == []
    assert complete(port)["cache_n"] == 0

    stack.reload("alpha")
    report = checkpoint.restore(reopen(stack), warm.id)
    assert report.kept == ["alpha", "emb"] and not report.kv_failed
    assert report.kv_restored == [f"alpha[0] slot 0: {slot['n_saved']} tokens"]
    timings = complete(port)
    assert timings["cache_n"] >= first["prompt_n"] - 1, timings
    assert timings["prompt_n"] <= 2, timings
    assert list(slot_dir.iterdir()) == [], "restored slot files are removed from the slot dir"


def test_kv_checkpoint_needs_slot_save(make_stack: StackFactory, tiny_model: Path) -> None:
    (port,) = free_ports(1)
    stack = make_stack("servers:\n" + server("alpha", tiny_model, port))
    stack.start(["alpha"])
    with pytest.raises(CheckpointError) as exc:
        checkpoint.create(stack, "nokv", kv=True)
    assert (
        "alpha" in str(exc.value) and "slot_save: true" in str(exc.value) and "no checkpoint was made" in str(exc.value)
    )
    assert list((stack.store.dir / "checkpoints").iterdir()) == []


# --- refusals ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["../evil", "a/b", "", ".hidden", "x..y", "a b", "é", "-x", "x" * 65, "a\\b"])
def test_bad_names_are_refused(make_stack: StackFactory, tmp_path: Path, name: str) -> None:
    stack = make_stack("servers:\n" + server("alpha", tmp_path / "m.gguf", 9))
    with pytest.raises(UsageError, match="is not a valid checkpoint name"):
        checkpoint.create(stack, name)
    assert not (stack.store.dir / "checkpoints").exists()


@pytest.mark.parametrize("checkpoint_id", ["../x_20250101_000000", "nope", "a/b_20250101_000000", "..", "x_2025_1"])
def test_bad_ids_are_refused(make_stack: StackFactory, tmp_path: Path, checkpoint_id: str) -> None:
    stack = make_stack("servers:\n" + server("alpha", tmp_path / "m.gguf", 9))
    (stack.store.dir / "checkpoints").mkdir(parents=True)
    outside = stack.store.dir / "keep.txt"
    outside.write_text("x")
    for action in (checkpoint.restore, checkpoint.delete):
        with pytest.raises(UsageError, match="is not a checkpoint id"):
            action(stack, checkpoint_id)
    assert outside.exists()
    with pytest.raises(NoSuchCheckpoint):
        checkpoint.restore(stack, "missing_20250101_000000")


def test_damaged_checkpoints_are_refused_and_nothing_changes(make_stack: StackFactory, tiny_model: Path) -> None:
    (port,) = free_ports(1)
    stack = make_stack("servers:\n" + server("alpha", tiny_model, port, parallel=1, slot_save="true"))
    stack.start(["alpha"])
    complete(port)
    names = ("no_config", "short_kv", "no_manifest", "escapes")
    ids = [checkpoint.create(stack, name, kv=True).id for name in names]
    folders = [stack.store.dir / "checkpoints" / i for i in ids]
    (folders[0] / "config.yaml").unlink()
    kv_file = folders[1] / "kv" / "alpha" / "0" / "slot0.bin"
    kv_file.write_bytes(kv_file.read_bytes()[:100])
    (folders[2] / "manifest.json").unlink()
    manifest = json.loads((folders[3] / "manifest.json").read_text())
    manifest["files"]["../../orchestrator_state.json"] = 1
    (folders[3] / "manifest.json").write_text(json.dumps(manifest))

    changed = edit_config(stack, "parallel: 1", "parallel: 2")
    assert changed.cfg.source is not None
    edited = Path(changed.cfg.source).read_text()
    before = pids(changed)
    expected = [
        "config.yaml is missing",
        "kv/alpha/0/slot0.bin has 100 bytes, the manifest says",
        "manifest.json is missing",
        "../../orchestrator_state.json is outside the checkpoint",
    ]
    for checkpoint_id, problem in zip(ids, expected, strict=True):
        with pytest.raises(CheckpointError) as exc:
            checkpoint.restore(changed, checkpoint_id)
        assert f"checkpoint {checkpoint_id} is damaged; nothing was changed" in str(exc.value)
        assert problem in str(exc.value)
        assert Path(changed.cfg.source).read_text() == edited
        assert pids(changed) == before and total_slots(port) == 1
    listed = {i.id: i.problems for i in checkpoint.list_checkpoints(stack)}
    assert [listed[i][0].split(" ")[0] for i in ids] == [
        "config.yaml",
        "kv/alpha/0/slot0.bin",
        "manifest.json",
        "../../orchestrator_state.json",
    ]


def test_checkpoint_whose_config_no_longer_validates_is_refused(make_stack: StackFactory, tiny_model: Path) -> None:
    (port,) = free_ports(1)
    stack = make_stack("servers:\n" + server("alpha", tiny_model, port))
    stack.start(["alpha"])
    info = checkpoint.create(stack, "old")
    cfg_file = Path(info.path) / "config.yaml"
    cfg_file.write_text(cfg_file.read_text() + "retired_key: 1\n")
    manifest_file = Path(info.path) / "manifest.json"
    manifest = json.loads(manifest_file.read_text())
    manifest["files"]["config.yaml"] = cfg_file.stat().st_size
    manifest_file.write_text(json.dumps(manifest))
    before = pids(stack)
    with pytest.raises(CheckpointError, match=r"does not validate any more; nothing was changed(.|\n)*retired_key"):
        checkpoint.restore(stack, info.id)
    assert pids(stack) == before


def test_same_name_in_the_same_second_is_refused(make_stack: StackFactory, tmp_path: Path) -> None:
    from datetime import datetime

    stack = make_stack("servers:\n" + server("alpha", tmp_path / "m.gguf", 9))
    now = datetime(2026, 1, 28, 10, 30, 0)
    assert checkpoint.create(stack, "x", now=now).id == "x_20260128_103000"
    with pytest.raises(CheckpointError, match="already exists"):
        checkpoint.create(stack, "x", now=now)


# --- the command line ------------------------------------------------------------------------


def test_cli_checkpoint_create_list_restore_delete(cli_stack: Path, tiny_model: Path) -> None:
    (port,) = free_ports(1)
    cfg = cli_stack / "stack.yaml"
    original = "servers:\n" + server("alpha", tiny_model, port, parallel=1) + "api: {enabled: false}\n"
    cfg.write_text(original)
    assert stack_cli(cli_stack, "start").returncode == 0

    res = stack_cli(cli_stack, "checkpoint", "create", "base", "--json")
    assert res.returncode == 0, res.stderr
    ckpt_id = json.loads(res.stdout)["id"]
    listed = json.loads(stack_cli(cli_stack, "checkpoint", "list", "--json").stdout)
    assert [(c["id"], c["running"], c["problems"]) for c in listed] == [(ckpt_id, ["alpha"], [])]
    assert ckpt_id in stack_cli(cli_stack, "checkpoint", "list").stdout

    cfg.write_text(original.replace("parallel: 1", "parallel: 2"))
    assert stack_cli(cli_stack, "reload", "alpha").returncode == 0 and total_slots(port) == 2
    res = stack_cli(cli_stack, "checkpoint", "restore", ckpt_id)
    assert res.returncode == 0, res.stderr
    assert "reloaded (config changed): alpha" in res.stdout and "wrote the checkpoint's text back" in res.stdout
    assert cfg.read_text() == original and total_slots(port) == 1

    res = stack_cli(cli_stack, "checkpoint", "create", "../up")
    assert res.returncode == 2 and "is not a valid checkpoint name" in res.stderr
    res = stack_cli(cli_stack, "checkpoint", "delete", ckpt_id)
    assert res.returncode == 0 and f"deleted checkpoint {ckpt_id}" in res.stdout
    assert json.loads(stack_cli(cli_stack, "checkpoint", "list", "--json").stdout) == []
