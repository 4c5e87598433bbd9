"""Shell completion of the CLI's names: running stacks, components (and replicas), checkpoints.

Click calls these while the shell completes a word (``_MODELFLEET_COMPLETE=bash_source
modelfleet`` prints the script to source). They never fail: a stack file that does not
load or a state directory that is missing simply completes nothing.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

import click
from click.shell_completion import CompletionItem

from modelfleet import stacks
from modelfleet.config import API_COMPONENT, StackConfig, load_config_file
from modelfleet.errors import FleetError


def _stack_of(ctx: click.Context) -> tuple[StackConfig, Path | None] | None:
    """The config (and state dir, when known) the command line so far points at."""
    params = ctx.params
    try:
        if params.get("dev"):
            path = Path(str(resources.files("modelfleet").joinpath("data/dev.yaml")))
            return load_config_file(path), params.get("state_dir")
        config = params.get("config_path") or os.environ.get("MODELFLEET_CONFIG")
        if config is None and Path("modelfleet.yaml").is_file():
            config = "modelfleet.yaml"
        if config is not None:
            return load_config_file(Path(config)), params.get("state_dir")
        chosen = stacks.Registry().choose(ctx.meta.get("modelfleet.stack"))
        if chosen is None or chosen.entry.config is None:
            return None
        return load_config_file(Path(chosen.entry.config)), Path(chosen.entry.state_dir)
    except (FleetError, OSError):
        return None


def stack_names(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[CompletionItem]:
    """Names of the running stacks."""
    try:
        running = stacks.Registry().running()
    except (FleetError, OSError):
        return []
    return [CompletionItem(r.name) for r in running if r.name.startswith(incomplete)]


def component_names(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[CompletionItem]:
    """Servers and services of the stack, and the front door when it is enabled."""
    found = _stack_of(ctx)
    if found is None:
        return []
    cfg = found[0]
    names = [*cfg.components(), *([API_COMPONENT] if cfg.api.enabled else [])]
    return [CompletionItem(n) for n in names if n.startswith(incomplete)]


def instance_names(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[CompletionItem]:
    """Components, and each replica of a component with several (``embedder[2]``)."""
    found = _stack_of(ctx)
    if found is None:
        return []
    cfg = found[0]
    names: list[str] = []
    for name, comp in cfg.components().items():
        names.append(name)
        ports = comp.instance_ports()
        if len(ports) > 1:
            names.extend(f"{name}[{i}]" for i in range(len(ports)))
    if cfg.api.enabled:
        names.append(API_COMPONENT)
    return [CompletionItem(n) for n in names if n.startswith(incomplete)]


def checkpoint_ids(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[CompletionItem]:
    """The checkpoints under the stack's state directory."""
    found = _stack_of(ctx)
    if found is None:
        return []
    cfg, state_dir = found
    if state_dir is None:
        if os.environ.get("MODELFLEET_STATE_DIR"):
            state_dir = Path(os.environ["MODELFLEET_STATE_DIR"])
        elif cfg.state_dir:
            state_dir = cfg.resolve_path(cfg.state_dir)
        else:
            state_dir = stacks.state_root() / cfg.stack_name()
    folder = Path(state_dir) / "checkpoints"
    try:
        ids = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError:
        return []
    return [CompletionItem(i) for i in ids if i.startswith(incomplete)]
