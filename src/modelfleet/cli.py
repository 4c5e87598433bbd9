"""The ``modelfleet`` command: the only place that prints tables and exits."""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import click
import httpx
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from modelfleet import apply, checkpoint, complete, health, hooks, memory, paths, provision, registry, stacks
from modelfleet import top as top_view
from modelfleet.bench import sweep as bench
from modelfleet.config import API_COMPONENT, StackConfig, load_config, load_config_file
from modelfleet.errors import (
    BinaryError,
    CheckpointError,
    ConfigError,
    FleetError,
    OverBudget,
    StartupError,
    UsageError,
)
from modelfleet.instance import LOCAL_NODE, Handle, local_url
from modelfleet.lifecycle import State
from modelfleet.placement import launcher_for
from modelfleet.spec import BinaryInfo, find_llama_server, plan_instances, probe_binary
from modelfleet.stack import Stack, Status, StatusRow

ENV_CONFIG = "MODELFLEET_CONFIG"
ENV_STATE_DIR = "MODELFLEET_STATE_DIR"

# Pipes get a wide, unwrapped console so scripts and logs see whole lines.
out = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True, highlight=False, soft_wrap=True, width=None if sys.stderr.isatty() else 200)

F = TypeVar("F", bound=Callable[..., Any])


def _remember_stack(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    ctx.meta[_STACK_META] = value
    return value


def stack_options(fn: F) -> F:
    """--config / --dev / --state-dir / --stack, shared by every command that acts on a stack."""
    fn = click.option(
        "--stack",
        "stack_name",
        metavar="NAME",
        expose_value=False,
        callback=_remember_stack,
        shell_complete=complete.stack_names,
        help="Act on this running stack (see `modelfleet ps`); without --config, the only running one is used.",
    )(fn)
    fn = click.option(
        "--state-dir",
        type=click.Path(file_okay=False, path_type=Path),
        help=f"State directory (state file, logs). Default: ${ENV_STATE_DIR}, the config's state_dir, "
        "or ~/.local/state/modelfleet/<stack name>.",
    )(fn)
    fn = click.option("--dev", is_flag=True, help="Use the built-in dev stack (SmolLM2-135M behind every role).")(fn)
    fn = click.option(
        "--config",
        "config_path",
        type=click.Path(dir_okay=False, path_type=Path),
        help=f"Stack file (YAML). Default: ${ENV_CONFIG}, then ./modelfleet.yaml.",
    )(fn)
    return fn


def load_stack_config(config_path: Path | None, dev: bool) -> StackConfig:
    if dev and config_path:
        raise UsageError("give --dev or --config, not both")
    if dev:
        return load_dev_config()
    named = _named_stack()
    if named is not None and config_path is not None:
        raise UsageError("give --stack or --config, not both")
    path = config_path or (Path(os.environ[ENV_CONFIG]) if os.environ.get(ENV_CONFIG) else None)
    if path is None and named is None and Path("modelfleet.yaml").is_file():
        path = Path("modelfleet.yaml")
    if path is None:
        return _running_stack_config(named)
    return load_config_file(path)


_STACK_META = "modelfleet.stack"
_CHOSEN_META = "modelfleet.chosen"


def _named_stack() -> str | None:
    ctx = click.get_current_context(silent=True)
    return None if ctx is None else ctx.meta.get(_STACK_META)


def _running_stack_config(named: str | None) -> StackConfig:
    """No stack file given: the running stack (the only one, or the one --stack names)."""
    chosen = stacks.Registry().choose(named)
    if chosen is None:
        raise UsageError(
            f"no stack file and no running stack: pass --config FILE, set ${ENV_CONFIG}, or use --dev for the dev stack"
        )
    entry = chosen.entry
    ctx = click.get_current_context(silent=True)
    if ctx is not None:
        ctx.meta[_CHOSEN_META] = Path(entry.state_dir)
    if entry.dev:
        return load_dev_config()
    if entry.config is None:
        raise UsageError(f"the running stack '{entry.name}' has no stack file; pass --config FILE")
    return load_config_file(Path(entry.config))


def load_dev_config() -> StackConfig:
    """The built-in dev stack, read from the installed package's file.

    It must come from a file on disk: the front door is started with ``--config`` that file.
    """
    ref = resources.files("modelfleet").joinpath("data/dev.yaml")
    path = Path(str(ref))
    if path.is_file():
        return load_config_file(path)
    return load_config(ref.read_text(), None)  # a zipped install: no front door for the dev stack


def resolve_state_dir(cfg: StackConfig, cli_value: Path | None) -> Path:
    """CLI > the running stack chosen without --config > environment > file > default."""
    if cli_value is not None:
        return cli_value.expanduser().resolve()
    ctx = click.get_current_context(silent=True)
    if ctx is not None and isinstance(ctx.meta.get(_CHOSEN_META), Path):
        return Path(ctx.meta[_CHOSEN_META])
    if os.environ.get(ENV_STATE_DIR):
        return Path(os.environ[ENV_STATE_DIR]).expanduser().resolve()
    if cfg.state_dir:
        return cfg.resolve_path(cfg.state_dir).resolve()
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "modelfleet" / cfg.stack_name()


def find_binary(cfg: StackConfig, required: bool) -> BinaryInfo | None:
    try:
        return probe_binary(find_llama_server(cfg))
    except BinaryError:
        if required:
            raise
        return None


def make_stack(config_path: Path | None, dev: bool, state_dir: Path | None, need_binary: bool) -> Stack:
    """A Stack for the chosen config; a missing binary is reported only when a server must start."""
    cfg = load_stack_config(config_path, dev)
    binary, problem = None, None
    if need_binary and cfg.servers:
        try:
            binary = probe_binary(find_llama_server(cfg))
        except BinaryError as exc:
            problem = exc
    return Stack(
        cfg,
        resolve_state_dir(cfg, state_dir),
        binary,
        launcher=launcher_for(cfg),
        say=lambda m: err.print(m, markup=False),
        progress=_Progress(),
        binary_error=problem,
    )


class _Progress:
    """Prints a line per instance still loading (elapsed time, the stage its log shows), at most every 2 s."""

    def __init__(self, every_s: float = 2.0) -> None:
        self.every_s = every_s
        self.last = time.monotonic()

    def __call__(self, pending: list[health.Waiter], done: health.Waiter | None) -> None:
        now = time.monotonic()
        if not pending or now - self.last < self.every_s:
            return
        self.last = now
        for w in pending:
            stage = w.stage()
            line = f"  {w.label}: {w.last.value} for {w.elapsed_s:.0f} s" + (f", {stage}" if stage else "")
            err.print(line, style="dim", markup=False)


# --- commands ------------------------------------------------------------------


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="modelfleet")
def cli() -> None:
    """Run a stack of llama-server processes and auxiliary services as one managed fleet."""


@cli.command()
@click.option("--jobs", "-j", type=int, default=None, help="Parallel build jobs (default: all cores).")
def setup(jobs: int | None) -> None:
    """Build llama-server into the cache (once per machine) and fetch the dev model."""
    server = provision.ensure_llama_server(say=lambda m: err.print(m, markup=False), jobs=jobs)
    model = provision.ensure_dev_model(say=lambda m: err.print(m))
    out.print(f"llama-server: {server}\ndev model:    {model}")


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path))
def doctor(as_json: bool, config_path: Path | None) -> None:
    """Show which llama-server and dev model are used and whether each is ready."""
    cfg = load_config_file(config_path) if config_path else None
    report: dict[str, Any] = {}
    try:
        path = find_llama_server(cfg)
        info = probe_binary(path)
        report["llama_server"] = {"path": str(path), "version": info.version, "ready": True}
    except BinaryError as exc:
        report["llama_server"] = {"path": None, "version": None, "ready": False, "problem": str(exc)}
    model = paths.cached_dev_model()
    report["dev_model"] = {"path": str(model), "ready": model.is_file()}
    report["cache_dir"] = str(paths.cache_dir())
    if as_json:
        out.print_json(data=report)
    else:
        ls = report["llama_server"]
        mark = "[green]ready[/]" if ls["ready"] else "[red]missing[/]"
        out.print(f"llama-server  {mark}  {ls['path'] or ''}  {ls['version'] or ''}")
        if not ls["ready"]:
            out.print(f"              {ls['problem']}")
        dm = report["dev_model"]
        mark = "[green]ready[/]" if dm["ready"] else "[red]missing[/] (run `modelfleet setup`)"
        out.print(f"dev model     {mark}  {dm['path']}")
        out.print(f"cache         {report['cache_dir']}")
    if not all(v["ready"] for v in (report["llama_server"], report["dev_model"])):
        sys.exit(1)


@cli.group()
def config() -> None:
    """Inspect stack files."""


@config.command("check")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
def config_check(file: Path) -> None:
    """Validate a stack file (and its llama-server options against the binary, when found)."""
    cfg = load_config_file(file)
    info = find_binary(cfg, required=False)
    comps = cfg.components()
    plan_instances(cfg, comps, Path("/nonexistent-state"), info)  # checks flags against the binary
    n_inst = sum(len(c.instance_ports()) for c in comps.values())
    out.print(
        f"{file}: ok: {len(cfg.servers)} servers, {len(cfg.services)} services, {n_inst} instances, "
        f"{len(cfg.roles())} roles, {len(cfg.aliases)} aliases, {len(cfg.task_types)} task types"
    )
    if info is None:
        out.print("llama-server not found: options were not checked against a binary (run `modelfleet setup`)")
    else:
        out.print(f"options checked against {info.path} (version {info.version})")


@cli.command()
@stack_options
@click.argument("names", nargs=-1, shell_complete=complete.component_names)
@click.option("--hot-only", is_flag=True, help="Start the HOT tier only (the default without NAMES).")
@click.option("--include-warm", "include", multiple=True, metavar="NAME", help="Also start this WARM/COLD component.")
@click.option("--json", "as_json", is_flag=True, help="Print the resulting status as JSON.")
@click.option("--ignore-memory", is_flag=True, help="Start even if the memory plan does not fit (with a warning).")
def start(
    config_path: Path | None,
    dev: bool,
    state_dir: Path | None,
    names: tuple[str, ...],
    hot_only: bool,
    include: tuple[str, ...],
    as_json: bool,
    ignore_memory: bool,
) -> None:
    """Start the stack (HOT tier), or the named components. Healthy instances are kept."""
    # SIGTERM (timeout, systemd, CI) rolls back like Ctrl-C: nothing half-started is left.
    signal.signal(signal.SIGTERM, _interrupt)
    stack = make_stack(config_path, dev, state_dir, need_binary=True)
    chosen = stack.select(names, hot_only=hot_only, include=include)
    if not chosen:
        raise UsageError("nothing to start: the stack has no HOT components; name some or use --include-warm")
    _check_memory(stack, chosen, ignore_memory)
    report = stack.start(chosen)
    _register(stack, dev)
    if report.kept:
        err.print(f"already running: {', '.join(report.kept)}")
    if report.changed:
        err.print(
            f"[yellow]running with an older config: {', '.join(report.changed)}; "
            f"`modelfleet reload NAME` applies the new one[/]"
        )
    if not report.started and stack.cfg.effective_hooks():
        err.print("nothing started, so hooks were not rerun; `modelfleet hooks run` reruns them", style="dim")
    _say_hooks(hooks.run_start_hooks(stack, report))
    rows = _merge_front_door_view(stack, stack.status())
    _print_status(rows, as_json, hooks.read_results(stack.store.dir))


def _register(stack: Stack, dev: bool) -> None:
    """Put the stack in the machine's registry, so later commands find it without --config."""
    source = stack.cfg.source
    config = str(Path(source).resolve()) if source else None
    stacks.Registry().register(stack.cfg.stack_name(), stack.store.dir.resolve(), config, dev)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _check_memory(stack: Stack, chosen: list[str], ignore: bool) -> None:
    """Before anything starts: the HOT tier, what this start adds and the OS reserve must fit."""
    if stack.cfg.placement.kind != "local":
        return  # on a cluster, each node's room is checked by the placement (see `modelfleet plan`)
    plan = memory.build_plan(stack.cfg, starting=chosen, store=memory.MeasurementStore.in_dir(stack.store.dir))
    if plan.fits:
        return
    err.print(memory.render_tree(plan), markup=False)
    if not ignore:
        memory.check_plan(plan)
    err.print(f"warning: the memory plan {plan.verdict()}; starting anyway (--ignore-memory)", style="yellow")


@cli.command()
@stack_options
@click.option("--total-gb", type=click.FloatRange(min=0, min_open=True), help="Plan for this much RAM (GB).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def plan(config_path: Path | None, dev: bool, state_dir: Path | None, total_gb: float | None, as_json: bool) -> None:
    """The memory plan: HOT tier, KV cache, WARM and COLD tiers, OS reserve. Exit code 6 if it does not fit."""
    cfg = load_stack_config(config_path, dev)
    store = memory.MeasurementStore.in_dir(resolve_state_dir(cfg, state_dir))
    result = memory.build_plan(cfg, total_gb=total_gb, store=store)
    if as_json:
        out.print_json(data=result.to_json())
    else:
        out.print(memory.render_tree(result), markup=False)
    if cfg.placement.kind != "local":
        placed_fits = _plan_placement(cfg, resolve_state_dir(cfg, state_dir), as_json)
        if not placed_fits:
            sys.exit(OverBudget.exit_code)
        return
    if not result.fits:
        sys.exit(OverBudget.exit_code)


def _plan_placement(cfg: StackConfig, state_dir: Path, as_json: bool) -> bool:
    """With `placement: ray`: the tree per node and where the HOT instances would go."""
    launcher = launcher_for(cfg)
    plan_placement = getattr(launcher, "plan_placement", None)
    if plan_placement is None:
        return True
    specs = plan_instances(cfg, cfg.components(), state_dir, None)
    text, fits = plan_placement(specs, cfg)
    if as_json:
        err.print(text, markup=False)
    else:
        out.print("\n" + text, markup=False)
    return bool(fits)


@cli.command()
@stack_options
@click.argument("names", nargs=-1, shell_complete=complete.component_names)
@click.option("--all", "all_", is_flag=True, help="Stop every instance of the stack.")
@click.option("--grace", "grace_s", type=float, default=None, help="Seconds to wait after SIGTERM before SIGKILL.")
def stop(
    config_path: Path | None,
    dev: bool,
    state_dir: Path | None,
    names: tuple[str, ...],
    all_: bool,
    grace_s: float | None,
) -> None:
    """Stop components: SIGTERM to each process group, bounded wait, SIGKILL."""
    if bool(names) == all_:
        raise UsageError("give component names or --all")
    stack = make_stack(config_path, dev, state_dir, need_binary=False)
    if grace_s is not None:
        stack.stop_grace_s = grace_s
    stopped = stack.stop(None if all_ else names)
    out.print(f"stopped {len(stopped)} instance(s)" + (f": {', '.join(stopped)}" if stopped else ""))


@cli.command()
@stack_options
@click.argument("name", shell_complete=complete.component_names)
def reload(config_path: Path | None, dev: bool, state_dir: Path | None, name: str) -> None:
    """Restart one component with the current config, leaving the others running.

    With the front door up and the component's config unchanged, the front door does it: it drains the
    instances (requests for them wait in line instead of failing) and a server with ``slot_save`` keeps
    its KV cache across the restart. Otherwise (or for the front door itself) it is restarted here."""
    stack = make_stack(config_path, dev, state_dir, need_binary=True)
    door = None if name == API_COMPONENT else _front_door(stack, stack.status(include_stopped=False))
    if door is not None:
        step = next((s for s in apply.make_plan(stack).steps if s.component == name), None)
        if step is not None and step.action is apply.Action.KEEP:
            states = _admin_post(stack, door, f"/admin/reload/{name}")["instances"]
            said = ", ".join(f"{k} {v}" for k, v in states.items()) if isinstance(states, dict) else "done"
            out.print(f"reloaded {name} through the front door ({door}): {said}", markup=False)
            return
        out.print(f"{name}'s config changed, so it restarts here (`modelfleet apply` takes the whole file)")
    report = stack.reload(name)
    out.print(f"reloaded {name}: {', '.join(report.started) or 'nothing to start'}")


def _admin_post(stack: Stack, door: str, path: str) -> dict[str, Any]:
    """POST an admin verb to the running front door; its refusal is a FleetError naming the answer."""
    admin = _bearer(stack.cfg.api.admin_key or stack.cfg.api.api_key)
    try:
        resp = httpx.post(door + path, json={}, headers=admin, timeout=httpx.Timeout(5.0, read=None))
    except httpx.HTTPError as exc:
        raise FleetError(f"the front door ({door}) did not answer POST {path}: {exc}") from exc
    if resp.status_code != 200:
        raise FleetError(f"the front door ({door}) refused POST {path}: {resp.status_code} {resp.text[:400]}")
    try:
        body = resp.json()
    except ValueError as exc:
        raise FleetError(f"the front door ({door}) answered POST {path} with no JSON: {resp.text[:200]}") from exc
    if not isinstance(body, dict):
        raise FleetError(f"the front door ({door}) answered POST {path} with {type(body).__name__}, not an object")
    return body


@cli.command()
@stack_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def status(config_path: Path | None, dev: bool, state_dir: Path | None, as_json: bool) -> None:
    """The stack's instances with a live health probe of each."""
    stack = make_stack(config_path, dev, state_dir, need_binary=False)
    rows = _merge_front_door_view(stack, stack.status())
    _print_status(rows, as_json, hooks.read_results(stack.store.dir))


def _front_door(stack: Stack, rows: list[StatusRow]) -> str | None:
    """Base URL of the running front door, if it is healthy."""
    api = next((r for r in rows if r.component == API_COMPONENT and r.status is Status.HEALTHY), None)
    return None if api is None else local_url(stack.cfg.api.host, api.port)


def _bearer(key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


def _merge_front_door_view(stack: Stack, rows: list[StatusRow]) -> list[StatusRow]:
    """In-flight and queued requests per instance, and FAILED instances, from the front door."""
    door = _front_door(stack, rows)
    if door is None:
        return rows
    try:
        admin = _bearer(stack.cfg.api.admin_key or stack.cfg.api.api_key)
        resp = httpx.get(door + "/admin/status", headers=admin, timeout=5.0)
        view = {i["port"]: i for i in resp.json()["instances"]} if resp.status_code == 200 else {}
    except (httpx.HTTPError, ValueError, KeyError, TypeError):
        return rows
    merged = []
    for row in rows:
        inst = view.get(row.port)
        if isinstance(inst, dict):
            try:
                state = State(inst["state"])
                row = dataclasses.replace(
                    row,
                    in_flight=int(inst["in_flight"]),
                    queued=int(inst["queued"]),
                    routing=state.value,
                    detail=str(inst.get("detail") or "") or None,
                    status=Status.FAILED if state is State.FAILED else row.status,
                    prompt_evaluated=int(inst.get("prompt_evaluated", 0)),
                    prompt_cached=int(inst.get("prompt_cached", 0)),
                )
            except (KeyError, ValueError, TypeError):
                pass
        merged.append(row)
    return merged


@cli.command()
@stack_options
@click.argument("message")
@click.option("--role", default=None, help="Role, alias or task type to ask (default: the stack's default role).")
@click.option("--max-tokens", type=int, default=64, show_default=True)
@click.option("--timeout", "timeout_s", type=float, default=120.0, show_default=True)
def chat(
    config_path: Path | None,
    dev: bool,
    state_dir: Path | None,
    message: str,
    role: str | None,
    max_tokens: int,
    timeout_s: float,
) -> None:
    """Send one chat completion to a running instance that serves ROLE and print the answer."""
    stack = make_stack(config_path, dev, state_dir, need_binary=False)
    target = registry.resolve(stack.cfg, role)
    rows = stack.status(include_stopped=False)
    door = _front_door(stack, rows)
    headers = _bearer(stack.cfg.api.api_key) if door is not None else {}
    if door is not None:  # through the front door: it routes by role, alias or task type
        url, via = door + "/v1/chat/completions", f"the front door ({door.split('//', 1)[1]})"
    else:  # no front door: straight to an instance that serves the role
        serving = [r for r in rows if target in r.roles and r.status is Status.HEALTHY]
        if not serving:
            raise UsageError(f"no healthy instance serves '{role or target}'; start the stack (`modelfleet start`)")
        url, via = f"http://127.0.0.1:{serving[0].port}/v1/chat/completions", f":{serving[0].port}"
    body = {"model": role or target, "messages": [{"role": "user", "content": message}], "max_tokens": max_tokens}
    try:
        resp = httpx.post(url, json=body, headers=headers, timeout=timeout_s)
    except httpx.HTTPError as exc:
        raise FleetError(f"{via} did not answer: {exc}") from exc
    if resp.status_code != 200:
        raise FleetError(f"{via} answered {resp.status_code}: {resp.text[:300]}")
    data = resp.json()
    tokens = data.get("usage", {}).get("completion_tokens", "?")
    note = f"{role or target} -> {target} served by {data.get('model')} via {via}, {tokens} tokens"
    err.print(note, style="dim", markup=False)
    out.print(data["choices"][0]["message"]["content"].strip())


@cli.command()
@stack_options
@click.argument("server")
@click.option("--parallel", "levels", default="1,2,4", show_default=True, help="Slot counts to measure: 1,2,4.")
@click.option("--warmup", type=click.IntRange(min=0), default=2, show_default=True, help="Warm-up batches per level.")
@click.option("--batches", type=click.IntRange(min=1), default=5, show_default=True, help="Measured batches per level.")
@click.option("--max-tokens", type=click.IntRange(min=1), default=128, show_default=True, help="Tokens per request.")
@click.option("--prompt-file", type=click.Path(dir_okay=False, path_type=Path), help="Prompts, one per paragraph.")
@click.option("--ctx-per-slot", type=click.IntRange(min=1), help="Context per slot (default: ctx_size / parallel).")
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False, path_type=Path), help="CSV to append rows to.")
@click.option("--report", "report_path", type=click.Path(dir_okay=False, path_type=Path), help="Write a report (.md).")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, path_type=Path), help="Write a PNG plot.")
@click.option("--apply", "apply_", is_flag=True, help="Write the recommended parallel into the stack file.")
@click.option("--max-p95-multiplier", type=float, default=1.5, show_default=True, help="p95 limit vs parallel 1.")
@click.option("--min-gain", type=float, default=0.10, show_default=True, help="Least aggregate TPS gain (0.10 = +10%).")
@click.option(
    "--timeout",
    "timeout_s",
    type=click.FloatRange(min=0, min_open=True),
    default=300.0,
    show_default=True,
    help="Seconds each request may take.",
)
def sweep(
    config_path: Path | None,
    dev: bool,
    state_dir: Path | None,
    server: str,
    levels: str,
    warmup: int,
    batches: int,
    max_tokens: int,
    prompt_file: Path | None,
    ctx_per_slot: int | None,
    csv_path: Path | None,
    report_path: Path | None,
    plot_path: Path | None,
    apply_: bool,
    max_p95_multiplier: float,
    min_gain: float,
    timeout_s: float,
) -> None:
    """Measure SERVER at several slot counts and recommend (or --apply) its `parallel`."""
    stack = make_stack(config_path, dev, state_dir, need_binary=True)
    if apply_ and stack.cfg.writable_source() is None:
        raise UsageError("--apply writes the stack file, and the built-in dev stack has none; pass --config FILE")
    prompts = bench.read_prompts(prompt_file) if prompt_file else bench.DEFAULT_PROMPTS
    plan = bench.SweepPlan(
        server, bench.parse_levels(levels), warmup, batches, max_tokens, prompts, ctx_per_slot, timeout_s
    )
    rule = bench.DecisionRule(max_p95_multiplier, min_gain)
    result = bench.Sweep(stack, plan, rule, csv_path or bench.default_csv_path(server)).run()
    _print_sweep(result)
    if report_path:
        report_path.parent.mkdir(parents=True, exist_ok=True)
        report_path.write_text(bench.render_markdown(result, plan, rule, "modelfleet " + shlex.join(sys.argv[1:])))
        err.print(f"report written to {report_path}", markup=False)
    if plot_path:
        skipped = bench.write_plot(result, plot_path)
        err.print(skipped or f"plot written to {plot_path}", markup=False)
    if result.interrupted:
        err.print("interrupted: the CSV keeps what was measured; nothing was applied", markup=False)
        sys.exit(130)
    if result.decision.parallel is None:
        raise StartupError(f"no level of {server} could be measured: {result.decision.reason}")
    if apply_:
        _apply_sweep(Path(str(stack.cfg.source)), result)


def _print_sweep(result: bench.SweepResult) -> None:
    table = Table(box=None, header_style="bold", pad_edge=False)
    for col in bench.TABLE_HEADERS:
        table.add_column(col, no_wrap=col != "verdict")
    for row in bench.table_rows(result):
        table.add_row(*(escape(c) for c in row))
    out.print(table)
    out.print(f"{result.server}: {result.decision.summary}", markup=False)
    err.print(f"{result.server} was {result.restored}; rows are in {result.csv_path}", markup=False)


def _apply_sweep(path: Path, result: bench.SweepResult) -> None:
    chosen = result.decision.parallel
    assert chosen is not None
    changes = bench.apply_parallel(path, result.server, chosen, result.ctx_size_for(chosen))
    if not changes:
        out.print(f"{path}: servers.{result.server}.parallel is already {chosen}; nothing changed", markup=False)
    for change in changes:
        out.print(f"{path}: {change}", markup=False)
    if changes:
        out.print(f"`modelfleet reload {result.server}` restarts it with the new slots", markup=False)


def _print_status(rows: list[StatusRow], as_json: bool, hook_results: list[hooks.HookResult] | None = None) -> None:
    if as_json:
        instances = [r.to_json() for r in rows]
        out.print_json(data={"instances": instances, "hooks": [h.to_json() for h in hook_results or []]})
        return
    table = Table(box=None, header_style="bold", pad_edge=False)
    cols: tuple[str, ...] = ("COMPONENT", "PORT", "PID", "STATUS", "INFLIGHT", "QUEUED", "CACHED", "TIER", "EST")
    cols += ("MEASURED", "MODEL", "ROLES")
    placed = any(r.node != LOCAL_NODE for r in rows)  # some run on other nodes (placement: ray)
    if placed:
        cols = (*cols[:3], "NODE", *cols[3:])
    for col in cols:
        table.add_column(col, no_wrap=col != "ROLES")
    colors = {"healthy": "green", "loading": "yellow", "stopped": "dim"}
    for r in rows:
        color = colors.get(r.status.value, "red")
        node = [escape(_node_label(r))] if placed else []
        table.add_row(
            escape(r.name),
            str(r.port),
            str(r.pid or "-"),
            *node,
            f"[{color}]{r.status.value}[/]" + (f" ({r.routing})" if r.routing not in (None, "ready") else ""),
            "-" if r.in_flight is None else str(r.in_flight),
            "-" if r.queued is None else str(r.queued),
            _cached(r),
            r.tier.value,
            "-" if r.estimate_bytes is None else memory.fmt_bytes(r.estimate_bytes),
            "-" if r.measured_bytes is None else memory.fmt_bytes(r.measured_bytes),
            escape(r.model),
            escape(", ".join(r.roles)),
        )
    out.print(table)
    _print_hooks(hook_results or [])


def _node_label(r: StatusRow) -> str:
    """``3f2a9c1d@10.0.0.7`` for an instance on a Ray node, ``local`` for one on this machine."""
    if r.node == LOCAL_NODE:
        return "local" if r.pid else "-"
    return f"{r.node[:8]}@{r.node_address}" if r.node_address else r.node[:8]


def _cached(r: StatusRow) -> str:
    """Share of prompt tokens served from the KV cache, of all prompt tokens: ``93% of 12400``."""
    total = (r.prompt_evaluated or 0) + (r.prompt_cached or 0)
    if r.prompt_evaluated is None or not total:
        return "-"
    return f"{100 * (r.prompt_cached or 0) // total}% of {total}"


def _print_hooks(results: list[hooks.HookResult]) -> None:
    """The short "hooks:" section under the status table."""
    if not results:
        return
    out.print("\nhooks:")
    colors = {"ok": "green", "skipped": "dim"}
    for r in results:
        color = colors.get(r.status.value, "red")
        why = r.error or r.detail or ""
        req = " (required)" if r.required else ""
        line = f"  {escape(r.key)}{req}  [{color}]{r.status.value}[/]  {r.duration_s:.2f} s  {r.started_at}"
        out.print(line + (f"  {escape(why)}" if why else ""))


def _say_hooks(results: list[hooks.HookResult]) -> None:
    for r in results:
        mark = "[green]ok[/]" if r.ok else f"[red]{r.status.value}[/]"
        why = r.error or r.detail or ""
        err.print(f"hook {escape(r.key)}: {mark} in {r.duration_s:.2f} s" + (f": {escape(why)}" if why else ""))


# --- hooks and checkpoints -----------------------------------------------------------


@cli.group("hooks")
def hooks_group() -> None:
    """Init hooks: built-in warm-ups and user functions, run after start."""


@hooks_group.command("run")
@stack_options
@click.argument("name", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def hooks_run(config_path: Path | None, dev: bool, state_dir: Path | None, name: str | None, as_json: bool) -> None:
    """Rerun the start hooks (or the one named) against the running stack."""
    stack = make_stack(config_path, dev, state_dir, need_binary=False)
    results = hooks.run_hooks(stack, "manual", [name] if name else [])
    if as_json:
        out.print_json(data=[r.to_json() for r in results])
    else:
        _print_hooks(results)
    failed = [r.name for r in results if not r.ok]
    if failed:
        raise FleetError(f"hook(s) did not succeed: {', '.join(failed)}; the errors are shown above")


@cli.group("checkpoint")
def checkpoint_group() -> None:
    """Save and restore the stack: config, what runs, state and slot KV caches."""


@checkpoint_group.command("create")
@stack_options
@click.argument("name")
@click.option("--include-state", is_flag=True, help="Also keep a copy of the state file and hook results.")
@click.option("--kv", is_flag=True, help="Also save every slot's KV cache (servers need `slot_save: true`).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def checkpoint_create(
    config_path: Path | None,
    dev: bool,
    state_dir: Path | None,
    name: str,
    include_state: bool,
    kv: bool,
    as_json: bool,
) -> None:
    """Create checkpoint NAME_YYYYMMDD_HHMMSS under the state directory."""
    stack = make_stack(config_path, dev, state_dir, need_binary=False)
    info = checkpoint.create(stack, name, include_state=include_state, kv=kv)
    if as_json:
        out.print_json(data=asdict(info))
    else:
        out.print(f"created checkpoint {info.id} ({_size(info.size_bytes)}) in {info.path}", markup=False)


@checkpoint_group.command("list")
@stack_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def checkpoint_list(config_path: Path | None, dev: bool, state_dir: Path | None, as_json: bool) -> None:
    """The stack's checkpoints, oldest first; damaged ones say what is wrong."""
    stack = make_stack(config_path, dev, state_dir, need_binary=False)
    infos = checkpoint.list_checkpoints(stack)
    if as_json:
        out.print_json(data=[asdict(i) for i in infos])
        return
    table = Table(box=None, header_style="bold", pad_edge=False)
    for col in ("CHECKPOINT", "CREATED", "RUNNING", "STATE", "KV", "SIZE", "PROBLEMS"):
        table.add_column(col)
    for i in infos:
        problems = f"[red]{escape('; '.join(i.problems))}[/]" if i.problems else "-"
        yes = {True: "yes", False: "-"}
        running = escape(", ".join(i.running) or "-")
        table.add_row(
            escape(i.id), i.created_at, running, yes[i.include_state], yes[i.kv], _size(i.size_bytes), problems
        )
    out.print(table if infos else "no checkpoints")


@checkpoint_group.command("restore")
@stack_options
@click.argument("checkpoint_id", metavar="NAME_TIMESTAMP", shell_complete=complete.checkpoint_ids)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def checkpoint_restore(
    config_path: Path | None, dev: bool, state_dir: Path | None, checkpoint_id: str, as_json: bool
) -> None:
    """Bring the stack back to a checkpoint: config file, what runs, slot KV caches."""
    stack = make_stack(config_path, dev, state_dir, need_binary=True)
    report = checkpoint.restore(stack, checkpoint_id)
    if as_json:
        out.print_json(data=report.to_json())
    else:
        _print_restore(report)
    problems = report.kv_failed + [h.key for h in report.hooks if h.blocking]
    if problems:
        raise CheckpointError(f"restored {checkpoint_id} only partly: {'; '.join(problems)}")


def _print_restore(report: checkpoint.RestoreReport) -> None:
    if report.config_written:
        out.print(f"config: wrote the checkpoint's text back to {report.config_path}", markup=False)
    elif report.config_path:
        out.print(f"config: {report.config_path} already matched", markup=False)
    for label, names in (
        ("kept", report.kept),
        ("reloaded (config changed)", report.reloaded),
        ("started", report.started),
        ("stopped", report.stopped),
        ("KV restored", report.kv_restored),
    ):
        if names:
            out.print(f"{label}: {', '.join(names)}", markup=False)
    for line in report.kv_failed:
        out.print(f"[red]KV not restored: {escape(line)}[/]")
    _print_hooks(report.hooks)
    for note in report.notes:
        out.print(f"note: {note}", markup=False)


@checkpoint_group.command("delete")
@stack_options
@click.argument("checkpoint_id", metavar="NAME_TIMESTAMP", shell_complete=complete.checkpoint_ids)
def checkpoint_delete(config_path: Path | None, dev: bool, state_dir: Path | None, checkpoint_id: str) -> None:
    """Delete one checkpoint."""
    stack = make_stack(config_path, dev, state_dir, need_binary=False)
    path = checkpoint.delete(stack, checkpoint_id)
    out.print(f"deleted checkpoint {checkpoint_id} ({path})", markup=False)


# --- running stacks: ps, apply, logs, top -------------------------------------------------


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def ps(as_json: bool) -> None:
    """Every running stack on this machine with its components (stale entries are dropped)."""
    running = stacks.Registry().running()
    if as_json:
        out.print_json(data={"stacks": [r.to_json() for r in running]})
        return
    if not running:
        out.print("no stack is running")
        return
    table = Table(box=None, header_style="bold", pad_edge=False)
    for col in ("STACK", "COMPONENTS", "PORTS", "STATE DIR", "CONFIG"):
        table.add_column(col, no_wrap=col not in ("COMPONENTS", "PORTS"))
    for r in running:
        counts: dict[str, int] = {}
        for rec in r.live:
            counts[rec.component] = counts.get(rec.component, 0) + 1
        comps = ", ".join(f"{c} ({n})" if n > 1 else c for c, n in counts.items())
        ports = ",".join(str(rec.port) for rec in r.live)
        config = "built-in dev stack" if r.entry.dev else r.entry.config or "-"
        table.add_row(escape(r.name), escape(comps), ports, escape(r.entry.state_dir), escape(config))
    out.print(table)


@cli.command("apply")
@stack_options
@click.option("--dry-run", is_flag=True, help="Print the plan; change nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan (and what was done) as JSON.")
def apply_cmd(config_path: Path | None, dev: bool, state_dir: Path | None, dry_run: bool, as_json: bool) -> None:
    """Apply the edited stack file: restart only what changed; the front door takes the rest in-process."""
    try:
        current = make_stack(config_path, dev, state_dir, need_binary=True)
    except ConfigError as exc:
        raise ConfigError(f"{exc}\nnothing was changed: fix the file and run `modelfleet apply` again") from exc
    target = current.with_config(current.cfg, probe_if_missing=True)
    the_plan = apply.make_plan(target)
    rows = current.status(include_stopped=False)
    door = _front_door(current, rows)
    via_door = door is not None and not the_plan.restarts_front_door
    if not as_json:
        _print_plan(the_plan, current.cfg.source)
    if dry_run:
        if as_json:
            out.print_json(data={"applied": False, **the_plan.to_json()})
        return
    if via_door:
        assert door is not None
        body = _admin_post(current, door, "/admin/apply")
    else:
        apply.carry_out(the_plan)
        body = {"applied": True, **the_plan.to_json()}
    _register(target, dev)
    if as_json:
        out.print_json(data=body | {"via": "front door" if via_door else "cli"})
        return
    # What was done, as the doer reports it (the front door plans again against what it sees).
    steps = [s for s in body.get("steps", []) if isinstance(s, dict)] if isinstance(body.get("steps"), list) else []
    done = [f"{s.get('action')} {s.get('component')}" for s in steps if s.get("action") != "keep"]
    how = f"through the front door ({door})" if via_door else "directly"
    changed = ", ".join(done) or "nothing restarted"
    out.print(f"applied {how}: {changed}", markup=False)


def _print_plan(the_plan: apply.Plan, source: str | None) -> None:
    colors = {"start": "green", "stop": "red", "reload": "yellow", "keep": "dim"}
    out.print(f"plan for {escape(source or 'the built-in config')}:")
    width = max((len(s.component) for s in the_plan.steps), default=0)
    for step in the_plan.steps:
        color = colors[step.action.value]
        why = escape("; ".join(step.reasons))
        out.print(f"  [{color}]{step.action.value:<6}[/] {escape(step.component):<{width}}  {why}")


@cli.command()
@stack_options
@click.argument("name", shell_complete=complete.instance_names)
@click.option("-f", "--follow", is_flag=True, help="Keep printing what is appended (Ctrl-C stops).")
@click.option("-n", "--lines", type=click.IntRange(min=0), default=50, show_default=True, help="Lines to show first.")
def logs(config_path: Path | None, dev: bool, state_dir: Path | None, name: str, follow: bool, lines: int) -> None:
    """The log of a component (every replica), or of one replica as NAME[i]."""
    stack = make_stack(config_path, dev, state_dir, need_binary=False)
    targets = _log_targets(stack, name)
    many = len(targets) > 1
    for label, handle in targets:
        text = stack.launcher.read_log(handle, max(16384, lines * 512))
        tail = text.splitlines()[-lines:] if lines else []
        if many:
            out.print(f"==> {label} ({handle.log_file}) <==", markup=False, style="bold")
        for line in tail:
            out.print(line, markup=False, highlight=False)
    if not follow:
        return
    streams = [(label, stack.launcher.follow_log(handle)) for label, handle in targets]
    partial = {label: "" for label, _ in streams}
    while True:
        for label, stream in streams:
            chunk = next(stream)
            if not chunk:
                continue
            text = partial[label] + chunk
            *whole, partial[label] = text.split("\n")
            for line in whole:
                out.print(f"{label}: {line}" if many else line, markup=False, highlight=False)


def _log_targets(stack: Stack, name: str) -> list[tuple[str, Handle]]:
    """The instances NAME means, with a handle to read each log by (a stopped one's log file too)."""
    match = re.fullmatch(r"(.+)\[(\d+)\]", name)
    comp, index = (match.group(1), int(match.group(2))) if match else (name, None)
    known = stack.component_names()
    if comp not in known:
        raise UsageError(f"'{comp}' is not a server or service of this stack; known: {', '.join(known)}")
    records = {r.port: r for r in stack.store.read().values() if r.component == comp}
    specs = [s for s in stack.specs([comp]) if index is None or s.index == index]
    if not specs:
        n = len(stack.specs([comp]))
        raise UsageError(f"{comp} has {n} instance(s): use {comp}[0] to {comp}[{n - 1}]")
    targets = []
    for spec in specs:
        rec = records.get(spec.port)
        handle = rec.handle if rec is not None else Handle(spec.node, 0, 0.0, spec.log_file, spec.label)
        targets.append((spec.name, handle))
    return targets


@cli.command()
@stack_options
@click.option("--interval", type=click.FloatRange(min=0.1), default=1.0, show_default=True, help="Seconds per refresh.")
@click.option("--iterations", type=click.IntRange(min=1), default=None, help="Stop after this many refreshes.")
def top(config_path: Path | None, dev: bool, state_dir: Path | None, interval: float, iterations: int | None) -> None:
    """A live view of the instances: state, in-flight/slots, queue, req/s, tokens/s, memory. `q` quits."""
    stack = make_stack(config_path, dev, state_dir, need_binary=False)
    door = _front_door(stack, stack.status(include_stopped=False))
    if door is None:
        raise UsageError("the front door is not running; `modelfleet top` reads it (start the stack first)")
    admin = _bearer(stack.cfg.api.admin_key or stack.cfg.api.api_key)

    def measured() -> dict[int, int]:
        found = {}
        for rec in stack.store.read_salvage().records.values():
            _, bytes_ = memory.recorded(rec)
            if bytes_ is not None:
                found[rec.port] = bytes_
        return found

    top_view.run(door, admin, measured, out, interval, iterations)


def _size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GB"


def main() -> None:
    """Console entry point: one place maps errors to messages and exit codes."""
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        err.print("Aborted.")
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except FleetError as exc:
        err.print("Error:", style="red", end=" ")
        err.print(str(exc), markup=False)
        sys.exit(exc.exit_code)
    except OSError as exc:  # a file or folder the command needs (permissions, a full disk...)
        err.print("Error:", style="red", end=" ")
        err.print(f"{exc}; check the path and its permissions", markup=False)
        sys.exit(1)
    except KeyboardInterrupt:
        err.print("Interrupted.")
        sys.exit(130)


if __name__ == "__main__":
    main()
