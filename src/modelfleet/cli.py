"""The ``modelfleet`` command: the only place that prints tables and exits."""

from __future__ import annotations

import os
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

from modelfleet import health, provision, registry
from modelfleet.config import StackConfig, load_config, load_config_file
from modelfleet.errors import BinaryError, FleetError, UsageError
from modelfleet.launcher import BinaryInfo, find_llama_server, plan_instances, probe_binary
from modelfleet.stack import Stack, StatusRow

ENV_CONFIG = "MODELFLEET_CONFIG"
ENV_STATE_DIR = "MODELFLEET_STATE_DIR"

# Pipes get a wide, unwrapped console so scripts and logs see whole lines.
out = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True, highlight=False, soft_wrap=True, width=None if sys.stderr.isatty() else 200)

F = TypeVar("F", bound=Callable[..., Any])


def stack_options(fn: F) -> F:
    """--config / --dev / --state-dir, shared by every command that acts on a stack."""
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
        text = resources.files("modelfleet").joinpath("data/dev.yaml").read_text()
        return load_config(text, None).model_copy(update={"source": None})
    path = config_path or (Path(os.environ[ENV_CONFIG]) if os.environ.get(ENV_CONFIG) else None)
    if path is None and Path("modelfleet.yaml").is_file():
        path = Path("modelfleet.yaml")
    if path is None:
        raise UsageError(f"no stack file: pass --config FILE, set ${ENV_CONFIG}, or use --dev for the dev stack")
    return load_config_file(path)


def resolve_state_dir(cfg: StackConfig, cli_value: Path | None) -> Path:
    """CLI > environment > file > default."""
    if cli_value is not None:
        return cli_value.expanduser().resolve()
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
        say=lambda m: err.print(m, markup=False),
        progress=_Progress(),
        binary_error=problem,
    )


class _Progress:
    """Prints which instances are still loading, at most every 2 s."""

    def __init__(self) -> None:
        self.last = time.monotonic()

    def __call__(self, pending: list[health.Waiter], done: health.Waiter | None) -> None:
        now = time.monotonic()
        if not pending or now - self.last < 2.0:
            return
        self.last = now
        parts = [f"{w.label} {w.last.value} {w.elapsed_s:.0f} s" for w in pending]
        err.print("waiting: " + "; ".join(parts), style="dim", markup=False)


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
    model = provision.cached_dev_model()
    report["dev_model"] = {"path": str(model), "ready": model.is_file()}
    report["cache_dir"] = str(provision.cache_dir())
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
@click.argument("names", nargs=-1)
@click.option("--hot-only", is_flag=True, help="Start the HOT tier only (the default without NAMES).")
@click.option("--include-warm", "include", multiple=True, metavar="NAME", help="Also start this WARM/COLD component.")
@click.option("--json", "as_json", is_flag=True, help="Print the resulting status as JSON.")
def start(
    config_path: Path | None,
    dev: bool,
    state_dir: Path | None,
    names: tuple[str, ...],
    hot_only: bool,
    include: tuple[str, ...],
    as_json: bool,
) -> None:
    """Start the stack (HOT tier), or the named components. Healthy instances are kept."""
    stack = make_stack(config_path, dev, state_dir, need_binary=True)
    chosen = stack.select(names, hot_only=hot_only, include=include)
    if not chosen:
        raise UsageError("nothing to start: the stack has no HOT components; name some or use --include-warm")
    report = stack.start(chosen)
    if report.kept:
        err.print(f"already running: {', '.join(report.kept)}")
    if report.changed:
        err.print(
            f"[yellow]running with an older config: {', '.join(report.changed)}; "
            f"`modelfleet reload NAME` applies the new one[/]"
        )
    _print_status(stack.status(), as_json)


@cli.command()
@stack_options
@click.argument("names", nargs=-1)
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
@click.argument("name")
def reload(config_path: Path | None, dev: bool, state_dir: Path | None, name: str) -> None:
    """Restart one component with the current config, leaving the others running."""
    stack = make_stack(config_path, dev, state_dir, need_binary=True)
    report = stack.reload(name)
    out.print(f"reloaded {name}: {', '.join(report.started) or 'nothing to start'}")


@cli.command()
@stack_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def status(config_path: Path | None, dev: bool, state_dir: Path | None, as_json: bool) -> None:
    """The stack's instances with a live health probe of each."""
    stack = make_stack(config_path, dev, state_dir, need_binary=False)
    _print_status(stack.status(), as_json)


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
    cfg = stack.cfg
    target = registry.resolve(cfg, role)
    wanted = role or target
    rows = [r for r in stack.status(include_stopped=False) if target in r.roles and r.status.value == "healthy"]
    if not rows:
        raise UsageError(f"no healthy instance serves '{wanted}'; start the stack first (`modelfleet start`)")
    url = f"http://127.0.0.1:{rows[0].port}/v1/chat/completions"
    body = {"model": target, "messages": [{"role": "user", "content": message}], "max_tokens": max_tokens}
    try:
        resp = httpx.post(url, json=body, timeout=timeout_s)
    except httpx.HTTPError as exc:
        raise FleetError(f"{rows[0].name} (:{rows[0].port}) did not answer: {exc}") from exc
    if resp.status_code != 200:
        raise FleetError(f"{rows[0].name} (:{rows[0].port}) answered {resp.status_code}: {resp.text[:300]}")
    data = resp.json()
    err.print(f"[dim]{target} via {rows[0].name} (:{rows[0].port}), {data['usage']['completion_tokens']} tokens[/]")
    out.print(data["choices"][0]["message"]["content"].strip())


def _print_status(rows: list[StatusRow], as_json: bool) -> None:
    if as_json:
        out.print_json(data=[{**asdict(r), "status": r.status.value} for r in rows])
        return
    table = Table(box=None, header_style="bold", pad_edge=False)
    for col in ("COMPONENT", "PORT", "PID", "STATUS", "TIER", "MODEL", "ROLES"):
        table.add_column(col, no_wrap=col != "ROLES")
    colors = {"healthy": "green", "loading": "yellow", "stopped": "dim"}
    for r in rows:
        color = colors.get(r.status.value, "red")
        table.add_row(
            escape(r.name),
            str(r.port),
            str(r.pid or "-"),
            f"[{color}]{r.status.value}[/]",
            r.tier,
            escape(r.model),
            escape(", ".join(r.roles)),
        )
    out.print(table)


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
    except KeyboardInterrupt:
        err.print("Interrupted.")
        sys.exit(130)


if __name__ == "__main__":
    main()
