"""Resolve a requested name (role, alias or task type) to the role that serves it."""

from __future__ import annotations

from modelfleet.config import StackConfig
from modelfleet.errors import NoSuchRole


def resolve(cfg: StackConfig, name: str | None) -> str:
    """The role for ``name``; None means the stack's default role."""
    if name is None:
        if cfg.default_role is None:
            raise NoSuchRole("no role was named and the stack has no default_role; name one of: " + _valid(cfg))
        name = cfg.default_role
    roles = cfg.roles()
    if name in roles:
        return name
    target = cfg.task_types.get(name, name)
    target = cfg.aliases.get(target, target)
    if target in roles:
        return target
    raise NoSuchRole(f"'{name}' is not a role, alias or task type of this stack; valid names: {_valid(cfg)}")


def names(cfg: StackConfig) -> list[str]:
    """Every name a client may ask for."""
    return sorted({*cfg.roles(), *cfg.aliases, *cfg.task_types})


def _valid(cfg: StackConfig) -> str:
    return ", ".join(names(cfg)) or "(none)"
