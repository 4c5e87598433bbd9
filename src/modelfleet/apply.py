"""``modelfleet apply``: bring what runs in line with an edited stack file, touching only what changed.

:func:`make_plan` compares the new file's specs (argv, environment, ports, tier, roles)
with the records of what runs and gives one :class:`Step` per component: ``start``
(a HOT component that does not run), ``stop`` (no longer in the file), ``reload`` (its
command line, environment or ports changed) or ``keep`` (unchanged, or changed only in
what needs no restart: tier and roles are taken in place). Each step says why.

The plan is carried out either by the CLI through :class:`~modelfleet.stack.Stack`
verbs (:func:`carry_out`), or, when the front door runs, by the front door itself
(:func:`carry_out_in_front_door`): it drains what it stops, and takes the new roles,
aliases, task types, pools and API settings in-process, so requests in flight finish.
A file that does not validate is refused before anything is planned.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol

from modelfleet.config import API_COMPONENT, Tier, load_config_file
from modelfleet.errors import ConfigError
from modelfleet.spec import InstanceSpec, env_digest
from modelfleet.stack import ENV_DIGEST, Stack
from modelfleet.state import InstanceRecord


class Action(StrEnum):
    START = "start"
    STOP = "stop"
    RELOAD = "reload"
    KEEP = "keep"


@dataclass(frozen=True)
class Step:
    action: Action
    component: str
    reasons: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {"action": self.action.value, "component": self.component, "reasons": list(self.reasons)}


@dataclass
class Plan:
    """What ``apply`` does, component by component, and the records it rewrites in place."""

    target: Stack
    steps: list[Step]
    retag: list[InstanceRecord] = field(default_factory=list)  # running records with a new tier/roles

    def names(self, action: Action) -> list[str]:
        return [s.component for s in self.steps if s.action is action]

    @property
    def restarts_front_door(self) -> bool:
        return any(s.component == API_COMPONENT and s.action is not Action.KEEP for s in self.steps)

    def to_json(self) -> dict[str, Any]:
        return {"steps": [s.to_json() for s in self.steps], "retagged": [r.name for r in self.retag]}


def load_target(current: Stack, path: Path) -> Stack:
    """A Stack for the edited file on the running stack's state dir and launcher.

    A file that does not validate raises ConfigError here, before anything is planned.
    """
    try:
        cfg = load_config_file(path)
    except ConfigError as exc:
        raise ConfigError(f"{exc}\nnothing was changed: fix the file and run `modelfleet apply` again") from exc
    return current.with_config(cfg, probe_if_missing=True)


def make_plan(target: Stack) -> Plan:
    """Compare ``target``'s specs with the live records in its state directory."""
    records = target.store.read()
    live = [r for r in records.values() if target.launcher.alive(r.handle)]
    wanted = target.component_names()
    specs = target.specs(wanted)
    comps = target.cfg.components()
    plan = Plan(target, [])
    for comp in wanted:
        mine = sorted((r for r in live if r.component == comp), key=lambda r: r.port)
        want = [s for s in specs if s.component == comp]
        if not mine:
            tier = comps[comp].tier if comp in comps else Tier.HOT
            if tier is Tier.HOT:
                why = "the front door is enabled" if comp == API_COMPONENT else "HOT"
                plan.steps.append(Step(Action.START, comp, (f"{why} and not running",)))
            else:
                how = "starts on demand" if tier is Tier.WARM else "start it by name"
                plan.steps.append(Step(Action.KEEP, comp, (f"{tier.value}, not running ({how})",)))
            continue
        restart, in_place = _differences(mine, want)
        if restart:
            plan.steps.append(Step(Action.RELOAD, comp, tuple(restart + in_place)))
        else:
            if in_place:
                plan.retag.extend(_retagged(mine, want))
            unchanged = "takes the new config in-process" if comp == API_COMPONENT else "unchanged"
            plan.steps.append(Step(Action.KEEP, comp, tuple(in_place) or (unchanged,)))
    for comp in sorted({r.component for r in live} - set(wanted)):
        plan.steps.append(Step(Action.STOP, comp, ("no longer in the stack file",)))
    return plan


def _differences(mine: list[InstanceRecord], want: list[InstanceSpec]) -> tuple[list[str], list[str]]:
    """Why the component must restart, and what changes without a restart."""
    restart: list[str] = []
    have_ports, want_ports = [r.port for r in mine], [s.port for s in want]
    if have_ports != want_ports:
        restart.append(f"ports {_ports(have_ports)} -> {_ports(want_ports)}")
    by_port = {s.port: s for s in want}
    for rec in mine:
        spec = by_port.get(rec.port)
        if spec is None:
            continue
        label = f"{rec.name}: " if len(mine) > 1 else ""
        if rec.host != spec.host:
            restart.append(f"{label}host {rec.host} -> {spec.host}")
        if _canonical(rec.argv) != _canonical(spec.argv):
            restart.append(f"{label}argv {argv_change(rec.argv, spec.argv)}")
        digest = rec.extra.get(ENV_DIGEST)
        if isinstance(digest, dict):
            change = _env_change(digest, env_digest(spec.env))
            if change:
                restart.append(f"{label}env {change}")
    restart = list(dict.fromkeys(restart))
    in_place: list[str] = []
    old, new = mine[0], want[0] if want else None
    if new is not None and old.tier is not new.tier:
        in_place.append(f"tier {old.tier.value} -> {new.tier.value} (no restart needed)")
    if new is not None and tuple(old.roles) != tuple(new.roles):
        in_place.append(f"roles [{', '.join(old.roles)}] -> [{', '.join(new.roles)}] (no restart needed)")
    return restart, in_place


def _canonical(argv: Iterable[str]) -> tuple[str, ...]:
    """The command line with its program resolved: `python` and `python3` of one venv are one program."""
    args = tuple(argv)
    return (os.path.realpath(args[0]), *args[1:]) if args and "/" in args[0] else args


def _retagged(mine: list[InstanceRecord], want: list[InstanceSpec]) -> list[InstanceRecord]:
    by_port = {s.port: s for s in want}
    return [
        dataclasses.replace(r, tier=by_port[r.port].tier, roles=by_port[r.port].roles)
        for r in mine
        if r.port in by_port
    ]


def _ports(ports: list[int]) -> str:
    return ",".join(str(p) for p in ports) or "none"


def argv_change(old: Iterable[str], new: Iterable[str]) -> str:
    """The command line's change in a few words: ``--ctx-size 512 -> --ctx-size 1024; added --metrics``."""
    a, b = list(old), list(new)
    parts: list[str] = []
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(a=a, b=b, autojunk=False).get_opcodes():
        if op == "equal":
            continue
        # A changed value reads better with its flag in front of it.
        flag = a[i1 - 1] if i1 > 0 and a[i1 - 1].startswith("-") and not a[i1].startswith("-") else None
        if op == "replace" and i1 < len(a):
            before, after = " ".join(a[i1:i2]), " ".join(b[j1:j2])
            if flag:
                before, after = f"{flag} {before}", f"{flag} {after}"
            parts.append(f"{before} -> {after}")
        elif op == "delete":
            parts.append(f"removed {' '.join(a[i1:i2])}")
        else:
            parts.append(f"added {' '.join(b[j1:j2])}")
    return "; ".join(parts) or "reordered"


def _env_change(old: dict[str, Any], new: dict[str, str]) -> str:
    parts = [f"changed {k}" for k in sorted(set(old) & set(new)) if old[k] != new[k]]
    parts += [f"added {k}" for k in sorted(set(new) - set(old))]
    parts += [f"removed {k}" for k in sorted(set(old) - set(new))]
    return ", ".join(parts)


# --- carrying it out ----------------------------------------------------------------------


def carry_out(plan: Plan) -> None:
    """Through the Stack verbs (no front door to ask): stops, reloads, starts; the front door last."""
    target = plan.target
    stop = plan.names(Action.STOP)
    if stop:
        target.stop(stop)
    retag(plan)
    reload = plan.names(Action.RELOAD)
    for comp in [c for c in reload if c != API_COMPONENT]:
        target.reload(comp)
    start = [c for c in plan.names(Action.START) if c != API_COMPONENT]
    if start:
        target.start(start)
    if API_COMPONENT in reload:
        target.reload(API_COMPONENT)
    if API_COMPONENT in plan.names(Action.START):
        target.start([API_COMPONENT])


def retag(plan: Plan) -> None:
    """Rewrite the tier and roles of running records in place (their processes are untouched)."""
    if not plan.retag:
        return
    store = plan.target.store
    with store.lock():
        live = store.read()
        store.put(*(r for r in plan.retag if r.key in live))


class FrontDoorVerbs(Protocol):
    """What the front door offers :func:`carry_out_in_front_door` (the Router's verbs)."""

    async def stop_component(self, name: str, reason: str) -> Any: ...
    async def start_component(self, name: str, reason: str) -> Any: ...
    async def reload_component(self, name: str, reason: str) -> Any: ...


async def carry_out_in_front_door(
    plan: Plan,
    verbs: FrontDoorVerbs,
    take_config: Callable[[Stack], None],
    in_thread: Callable[[Callable[[], None]], Awaitable[None]],
) -> None:
    """In the front door: drain and stop what leaves (or moves port), take the config in-process,
    then reload and start. The front door itself must not need a restart (the CLI does that one)."""
    reason = "apply"
    moved = [s.component for s in plan.steps if s.action is Action.RELOAD and any("ports" in r for r in s.reasons)]
    for comp in [*plan.names(Action.STOP), *moved]:
        await verbs.stop_component(comp, reason)
    take_config(plan.target)
    await in_thread(lambda: retag(plan))
    for comp in plan.names(Action.RELOAD):
        if comp in moved:
            await verbs.start_component(comp, reason)
        elif comp != API_COMPONENT:
            await verbs.reload_component(comp, reason)
    for comp in plan.names(Action.START):
        if comp != API_COMPONENT:
            await verbs.start_component(comp, reason)
