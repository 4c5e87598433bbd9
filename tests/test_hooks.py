"""Init hooks on real llama-server processes: order, timeouts, failures, the live view."""

from __future__ import annotations

import json
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from conftest import StackFactory, config_from, free_ports, stack_cli
from modelfleet import hooks
from modelfleet.config import HookConfig, Tier
from modelfleet.errors import ConfigError, HookError, UsageError
from modelfleet.hooks import HookStatus
from modelfleet.instance import Kind
from modelfleet.state import StateStore

# A user hook module: every hook appends what it saw to LOG, one JSON object a line.
HOOK_MODULE = """
import json, os, threading

LOG = os.environ.get("HOOK_LOG") or {log!r}
release = threading.Event()


def _note(name, view):
    entry = {{
        "hook": name,
        "event": view.event,
        "timeout_s": view.timeout_s,
        "roles": {{k: list(v) for k, v in view.roles.items()}},
        "targets": [i.name for i in view.targets],
        "instance": view.instance.name if view.instance else None,
    }}
    with open(LOG, "a") as f:
        f.write(json.dumps(entry) + "\\n")


def first(view):
    _note("first", view)


def second(view):
    _note("second", view)
    return "seeded 3 rows"


def third(view):
    _note("third", view)


def boom(view):
    _note("boom", view)
    raise ValueError("seed database is missing")


def hang(view):
    _note("hang", view)
    release.wait(30)
"""


@pytest.fixture
def hook_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, Path]]:
    """A uniquely named user hook module in tmp_path, importable; yields (module name, its log)."""
    name = f"userhooks_{uuid.uuid4().hex[:8]}"
    log = tmp_path / "hooks.log"
    (tmp_path / f"{name}.py").write_text(HOOK_MODULE.format(log=str(log)))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name, log
    module = sys.modules.pop(name, None)
    if module is not None:
        module.release.set()  # let a hanging hook's thread finish


def calls(log: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def server(name: str, model: Path, port: int, **fields: object) -> str:
    lines = [f"  {name}:", f"    model: {model}", f"    port: {port}", "    ctx_size: 256", "    threads: 1"]
    return "\n".join(lines + [f"    {k}: {v}" for k, v in fields.items()]) + "\n"


def hook(name: str, **fields: object) -> str:
    return f"  - name: {name}\n" + "".join(f"    {k}: {v}\n" for k, v in fields.items())


def prompt_tokens(port: int) -> float:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    line = next(x for x in text.splitlines() if x.startswith("llamacpp:prompt_tokens_total"))
    return float(line.split()[1])


# --- config ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("hooks_yaml", "expected"),
    [
        ("  - {name: w, builtin: embed_warmup, call: 'm:f'}", "hooks[0]: give exactly one of 'builtin'"),
        ("  - {name: w}", "hooks[0]: give exactly one of 'builtin'"),
        ("  - {name: w, call: nocolon}", "hooks[0].call: 'nocolon' is not 'module:function'"),
        ("  - {name: w, call: 'a/b:f'}", "hooks[0].call: 'a/b:f' is not 'module:function'"),
        ("  - {name: w, builtin: warm_all}", "hooks[0].builtin: Input should be 'embed_warmup' or 'generate_warmup'"),
        ("  - {name: w, builtin: embed_warmup, tmeout_s: 3}", "hooks[0].tmeout_s: unknown key"),
        ("  - {name: w, builtin: embed_warmup, timeout_s: 0}", "hooks[0].timeout_s: must be from 0.05 to 3600 seconds"),
        (
            "  - {name: w, builtin: embed_warmup, on: [boot]}",
            "hooks[0].on[0]: Input should be 'start' or 'instance_up'",
        ),
        (
            "  - {name: w, builtin: embed_warmup}\n  - {name: w, call: 'm:f'}",
            "hooks[1].name: 'w' is already used by hooks[0]",
        ),
        (
            "  - {name: w, builtin: embed_warmup, applies_to: [ghost]}",
            "hooks[0].applies_to: 'ghost' is not a server or service; known: alpha",
        ),
    ],
)
def test_hook_config_errors_name_the_key_path(tmp_path: Path, hooks_yaml: str, expected: str) -> None:
    text = f"servers:\n{server('alpha', tmp_path / 'm.gguf', 9)}hooks:\n{hooks_yaml}\n"
    with pytest.raises(ConfigError) as exc:
        config_from(text, tmp_path)
    assert expected in str(exc.value)


def test_slot_save_path_is_managed_by_modelfleet(tmp_path: Path) -> None:
    text = f"servers:\n{server('alpha', tmp_path / 'm.gguf', 9, args='[--slot-save-path, /tmp]')}"
    with pytest.raises(ConfigError, match=r"servers\.alpha\.args.*'--slot-save-path' is set by modelfleet"):
        config_from(text, tmp_path)


def test_default_hooks_warm_the_embedders_only_when_there_are_some(tmp_path: Path) -> None:
    plain = config_from(f"servers:\n{server('a', tmp_path / 'm.gguf', 9)}", tmp_path)
    assert plain.effective_hooks() == []
    embed = config_from(f"servers:\n{server('a', tmp_path / 'm.gguf', 9, embeddings='{}')}", tmp_path)
    (only,) = embed.effective_hooks()
    assert (only.builtin, only.events()) == ("embed_warmup", ["start", "instance_up"])
    none = config_from(f"servers:\n{server('a', tmp_path / 'm.gguf', 9, embeddings='{}')}hooks: []\n", tmp_path)
    assert none.effective_hooks() == []


# --- running ---------------------------------------------------------------------------


def test_hooks_run_in_config_order_with_the_live_view(
    make_stack: StackFactory, tiny_model: Path, hook_module: tuple[str, Path]
) -> None:
    mod, log = hook_module
    (port,) = free_ports(1)
    stack = make_stack(
        f"servers:\n{server('alpha', tiny_model, port, roles='[frontdoor]')}hooks:\n"
        + hook("third", call=f"{mod}:third", timeout_s=7)
        + hook("first", call=f"{mod}:first")
        + hook("second", call=f"{mod}:second")
    )
    report = stack.start(["alpha"])
    results = hooks.run_start_hooks(stack, report)

    assert [r.name for r in results] == ["third", "first", "second"]
    assert all(r.status is HookStatus.OK for r in results)
    assert results[2].detail == "seeded 3 rows"
    seen = calls(log)
    assert [c["hook"] for c in seen] == ["third", "first", "second"]
    assert seen[0]["roles"] == {"frontdoor": [f"http://127.0.0.1:{port}"]}
    assert seen[0]["targets"] == ["alpha"] and seen[0]["event"] == "start" and seen[0]["timeout_s"] == 7
    # Recorded beside the state file, which old readers still read.
    assert [r.name for r in hooks.read_results(stack.store.dir)] == ["third", "first", "second"]
    assert list(StateStore(stack.store.dir).read()) == [f"server_{port}"]


def test_start_that_launches_nothing_does_not_rerun_hooks(
    make_stack: StackFactory, tiny_model: Path, hook_module: tuple[str, Path]
) -> None:
    mod, log = hook_module
    (port,) = free_ports(1)
    stack = make_stack(f"servers:\n{server('alpha', tiny_model, port)}hooks:\n" + hook("first", call=f"{mod}:first"))
    assert len(hooks.run_start_hooks(stack, stack.start(["alpha"]))) == 1
    assert hooks.run_start_hooks(stack, stack.start(["alpha"])) == []
    assert len(calls(log)) == 1


def test_hook_that_outlives_its_timeout_is_reported_and_the_next_one_runs(
    make_stack: StackFactory, tmp_path: Path, hook_module: tuple[str, Path]
) -> None:
    mod, log = hook_module
    stack = make_stack(
        f"servers:\n{server('alpha', tmp_path / 'm.gguf', 9)}hooks:\n"
        + hook("hang", call=f"{mod}:hang", timeout_s=0.3)
        + hook("first", call=f"{mod}:first")
    )
    hung, after = hooks.run_hooks(stack, "manual")
    assert hung.status is HookStatus.TIMED_OUT
    assert "did not finish within 0.3 s" in (hung.error or "")
    assert 0.25 <= hung.duration_s < 5.0, "the wait is bounded by timeout_s, not by the hook"
    assert after.status is HookStatus.OK
    assert [c["hook"] for c in calls(log)] == ["hang", "first"]


def test_failing_optional_hook_is_recorded_and_the_stack_stays_up(
    make_stack: StackFactory, tiny_model: Path, hook_module: tuple[str, Path]
) -> None:
    mod, _ = hook_module
    (port,) = free_ports(1)
    stack = make_stack(
        f"servers:\n{server('alpha', tiny_model, port)}hooks:\n"
        + hook("boom", call=f"{mod}:boom")
        + hook("first", call=f"{mod}:first")
    )
    results = hooks.run_start_hooks(stack, stack.start(["alpha"]))
    boom, first = results
    assert boom.status is HookStatus.FAILED and not boom.blocking
    assert boom.error == "ValueError: seed database is missing"
    assert first.status is HookStatus.OK
    assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200
    stored = {r.name: r for r in hooks.read_results(stack.store.dir)}
    assert stored["boom"].status is HookStatus.FAILED and stored["boom"].error == boom.error


def test_failing_required_hook_stops_only_what_the_start_launched(
    make_stack: StackFactory, tiny_model: Path, hook_module: tuple[str, Path]
) -> None:
    mod, log = hook_module
    kept_port, new_port = free_ports(2)
    stack = make_stack(
        f"servers:\n{server('kept', tiny_model, kept_port)}{server('new', tiny_model, new_port)}hooks:\n"
        + hook("boom", call=f"{mod}:boom", required="true")
        + hook("first", call=f"{mod}:first")
    )
    stack.start(["kept"])  # an earlier start, without hooks
    kept_pid = stack.store.read()[f"server_{kept_port}"].pid
    report = stack.start(["kept", "new"])
    assert report.started == ["new"]

    with pytest.raises(HookError) as exc:
        hooks.run_start_hooks(stack, report)
    msg = str(exc.value)
    assert "hooks[0] boom: failed: ValueError: seed database is missing" in msg
    assert "stopped what this start launched: new" in msg and "required: false" in msg
    assert exc.value.exit_code == 4
    records = stack.store.read()
    assert list(records) == [f"server_{kept_port}"] and records[f"server_{kept_port}"].pid == kept_pid
    assert not _listening(new_port)
    assert [c["hook"] for c in calls(log)] == ["boom"], "hooks after a failed required one do not run"


def test_user_hook_that_cannot_be_imported_fails_with_the_fix(make_stack: StackFactory, tmp_path: Path) -> None:
    stack = make_stack(
        f"servers:\n{server('alpha', tmp_path / 'm.gguf', 9)}hooks:\n"
        + hook("gone", call="no_such_module_for_hooks:f")
        + hook("typo", call="json:no_such_function")
    )
    gone, typo = hooks.run_hooks(stack)
    assert gone.status is HookStatus.FAILED
    assert "cannot import 'no_such_module_for_hooks'" in (gone.error or "") and "PYTHONPATH" in (gone.error or "")
    assert typo.error == "'json' has no function 'no_such_function'; fix 'call: json:no_such_function'"


def test_builtin_warmups_send_real_requests(make_stack: StackFactory, tiny_model: Path) -> None:
    emb, gen = free_ports(2)
    stack = make_stack(
        f"servers:\n{server('embed', tiny_model, emb, embeddings='{}')}{server('gen', tiny_model, gen)}hooks:\n"
        + hook("warm_embed", builtin="embed_warmup")
        + hook("warm_gen", builtin="generate_warmup")
    )
    stack.start(["embed", "gen"])
    before = prompt_tokens(emb), prompt_tokens(gen)
    warm_embed, warm_gen = hooks.run_hooks(stack, "manual")
    assert (warm_embed.status, warm_embed.detail) == (HookStatus.OK, "warmed 1 embedding instance(s)")
    assert (warm_gen.status, warm_gen.detail) == (HookStatus.OK, "warmed 1 generation instance(s)")
    assert prompt_tokens(emb) > before[0] and prompt_tokens(gen) > before[1]


def test_builtin_warmup_names_the_instance_that_failed(tmp_path: Path) -> None:
    (port,) = free_ports(1)  # nothing listens there
    dead = hooks.InstanceView(
        component="gen",
        index=1,
        replicas=2,
        port=port,
        host="127.0.0.1",
        kind=Kind.LLAMA_SERVER,
        tier=Tier.HOT,
        roles=(),
    )
    view = hooks.StackView("s", str(tmp_path), "manual", 0.0, (dead,), {}, targets=(dead,))
    res = hooks.run_one(HookConfig(name="w", builtin="generate_warmup", timeout_s=5), view)
    assert res.status is HookStatus.FAILED
    assert (res.error or "").startswith(f"gen[1] (:{port}) did not answer /completion: ConnectError")


def test_instance_hooks_run_only_for_the_components_they_apply_to(
    make_stack: StackFactory, tiny_model: Path, hook_module: tuple[str, Path]
) -> None:
    mod, log = hook_module
    a, b = free_ports(2)
    stack = make_stack(
        f"servers:\n{server('a', tiny_model, a)}{server('b', tiny_model, b, roles='[worker]')}hooks:\n"
        + hook("seen", call=f"{mod}:first", applies_to="[b]", on="[instance_up]")
        + hook("at_start", call=f"{mod}:second")
    )
    stack.start(["a", "b"])
    records = stack.store.read()
    assert hooks.run_instance_hooks(stack, records[f"server_{a}"]) == []
    (res,) = hooks.run_instance_hooks(stack, records[f"server_{b}"])
    assert (res.name, res.target, res.status, res.event) == ("seen", "b", HookStatus.OK, "instance_up")
    (call,) = calls(log)
    assert call["instance"] == "b" and call["targets"] == ["b"] and call["event"] == "instance_up"
    assert "seen@b" in {r.key for r in hooks.read_results(stack.store.dir)}


def test_hook_applying_to_stopped_components_is_skipped(
    make_stack: StackFactory, tmp_path: Path, hook_module: tuple[str, Path]
) -> None:
    mod, log = hook_module
    stack = make_stack(
        f"servers:\n{server('a', tmp_path / 'm.gguf', 9)}hooks:\n" + hook("x", call=f"{mod}:first", applies_to="[a]")
    )
    (res,) = hooks.run_hooks(stack, "manual", ["x"])
    assert (res.status, res.detail, res.ok) == (HookStatus.SKIPPED, "none of a is running", True)
    assert calls(log) == []
    with pytest.raises(UsageError, match="no hook named 'nope'; configured hooks: x"):
        hooks.run_hooks(stack, "manual", ["nope"])


# --- the command line ----------------------------------------------------------------------


def _listening(port: int) -> bool:
    try:
        httpx.get(f"http://127.0.0.1:{port}/health", timeout=1)
        return True
    except httpx.HTTPError:
        return False


def test_cli_runs_hooks_after_start_and_shows_them(
    cli_stack: Path, tiny_model: Path, hook_module: tuple[str, Path]
) -> None:
    mod, log = hook_module
    (port,) = free_ports(1)
    text = f"servers:\n{server('alpha', tiny_model, port)}api: {{enabled: false}}\nhooks:\n"
    (cli_stack / "stack.yaml").write_text(text + hook("greet", call=f"{mod}:second"))

    res = stack_cli(cli_stack, "start")
    assert res.returncode == 0, res.stderr
    assert "hook greet: ok" in res.stderr and "seeded 3 rows" in res.stderr
    res = stack_cli(cli_stack, "status")
    assert "hooks:" in res.stdout and "greet" in res.stdout
    data = json.loads(stack_cli(cli_stack, "status", "--json").stdout)
    assert [i["name"] for i in data["instances"]] == ["alpha"]
    assert [(h["name"], h["status"]) for h in data["hooks"]] == [("greet", "ok")]

    res = stack_cli(cli_stack, "hooks", "run", "greet")
    assert res.returncode == 0, res.stderr
    assert [c["hook"] for c in calls(log)] == ["second", "second"]
    res = stack_cli(cli_stack, "hooks", "run", "nope")
    assert res.returncode == 2 and "no hook named 'nope'" in res.stderr


def test_cli_start_fails_on_a_required_hook_and_leaves_nothing_running(
    cli_stack: Path, tiny_model: Path, hook_module: tuple[str, Path]
) -> None:
    mod, _ = hook_module
    (port,) = free_ports(1)
    text = f"servers:\n{server('alpha', tiny_model, port)}api: {{enabled: false}}\nhooks:\n"
    (cli_stack / "stack.yaml").write_text(text + hook("boom", call=f"{mod}:boom", required="true"))

    res = stack_cli(cli_stack, "start")
    assert res.returncode == 4, res.stderr
    assert "a required hook did not succeed" in res.stderr and "seed database is missing" in res.stderr
    assert "stopped what this start launched: alpha" in res.stderr
    assert StateStore(cli_stack / "state").read() == {}
    assert not _listening(port)
