"""Init hooks: run once the stack is healthy, and for instances that come up later.

A hook is either a built-in warm-up or a user function named in the config as
``module:function``. Each is called with a :class:`StackView` (roles -> instance URLs,
the instances it concerns, its timeout) in a daemon thread, and waited for at most
``timeout_s``: a hook still running then is reported as timed out and abandoned (a
thread cannot be killed; the hook should honour ``view.timeout_s`` itself).

* :func:`run_start_hooks` runs after ``start`` brought new instances up. A failed
  ``required`` hook stops the instances that start launched and raises
  :class:`HookError`; a failed optional one is only recorded.
* :func:`run_hooks` runs every start hook, or the named ones (``modelfleet hooks run``).
* :func:`run_instance_hooks` is for an instance that comes up later (a WARM expansion,
  a restart): the front door calls it once the instance is healthy and recorded.

Outcomes go to ``hooks.json`` beside the state file (not into it: every top-level key
of ``orchestrator_state.json`` is an instance record), newest per hook and target.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import importlib
import json
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

import httpx

from modelfleet.config import HookConfig
from modelfleet.errors import HookError, HookFailure, StateError, UsageError
from modelfleet.fileutil import file_lock, now_iso, write_atomic
from modelfleet.instance import Identity, Kind, reach_host, url_of
from modelfleet.stack import Stack, StartReport
from modelfleet.state import InstanceRecord

HOOKS_FILE = "hooks.json"
HOOKS_LOCK = "hooks.lock"
WARMUP_TEXT = "modelfleet warm-up"

Event = Literal["start", "instance_up", "manual"]


class HookStatus(StrEnum):
    """The outcome of one hook run."""

    OK = "ok"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    SKIPPED = "skipped"  # none of the components it applies to is running


@dataclass(frozen=True, kw_only=True)
class InstanceView(Identity):
    """One live instance as a hook sees it: its identity (``name``, ``component``, ``index``,
    ``kind``, ``port``, ``roles``...), its ``url``, its model and whether it embeds."""

    model_path: str | None = None
    embeddings: bool = False
    node_address: str = ""  # the node it runs on, when that is not this machine

    @property
    def url(self) -> str:
        return url_of(reach_host(self.host, self.node_address), self.port)


@dataclass(frozen=True)
class StackView:
    """What a hook is given: the live stack, the instances it concerns, and its time budget."""

    stack: str
    state_dir: str
    event: Event
    timeout_s: float
    instances: tuple[InstanceView, ...]  # every live instance (the front door excluded)
    roles: Mapping[str, tuple[str, ...]]  # role -> base URLs of the live instances serving it
    targets: tuple[InstanceView, ...] = ()  # the instances this hook applies to, for this event
    instance: InstanceView | None = None  # for ``instance_up``: the instance that came up
    api_url: str | None = None  # the front door, when it runs

    def urls(self, role: str) -> list[str]:
        """Base URLs of the live instances serving ``role`` (empty if none)."""
        return list(self.roles.get(role, ()))


@dataclass
class HookResult:
    """The outcome of one hook on one event, as recorded in ``hooks.json``."""

    name: str
    event: str
    status: HookStatus
    duration_s: float
    started_at: str
    required: bool = False
    target: str | None = None  # the instance, for ``instance_up``
    error: str | None = None
    detail: str | None = None

    @property
    def ok(self) -> bool:
        return self.status in (HookStatus.OK, HookStatus.SKIPPED)

    @property
    def blocking(self) -> bool:
        """A required hook that did not succeed: the instances it concerns are not ready."""
        return self.required and not self.ok

    @property
    def key(self) -> str:
        return f"{self.name}@{self.target}" if self.target else self.name

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "status": self.status.value}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> HookResult:
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        return cls(**{**values, "status": HookStatus(values["status"])})


HookFn = Callable[[StackView], object]


# --- running -------------------------------------------------------------------


def run_start_hooks(stack: Stack, report: StartReport) -> list[HookResult]:
    """Run the start hooks after ``start``; on a failed required hook, stop what it launched and raise.

    Nothing is run when the start launched nothing (every instance was kept): the hooks
    ran when those instances started, and ``modelfleet hooks run`` reruns them.
    """
    if not report.started:
        return []
    results = run_hooks(stack, "start")
    blocking = [r for r in results if r.blocking]
    if blocking:
        started = set(report.started)
        keys = [k for k, r in stack.store.read().items() if r.name in started]
        stopped = stack.stop_instances(keys)
        raise HookError(_blocking_message(stack, blocking, stopped))
    return results


def run_hooks(stack: Stack, event: Event = "manual", names: Iterable[str] = ()) -> list[HookResult]:
    """Run the named hooks, or every hook that runs at start, in config order; record and return the outcomes.

    A failed required hook ends the run: the hooks after it are not run.
    """
    hooks = _select(stack.cfg.effective_hooks(), list(names))
    view = build_view(stack, event)
    results: list[HookResult] = []
    for hook in hooks:
        targets = _targets(hook, view.instances)
        if hook.applies_to is not None and not targets:
            results.append(_skipped(hook, event))
            continue
        results.append(run_one(hook, dataclasses.replace(view, targets=targets, timeout_s=hook.timeout_s)))
        if results[-1].blocking:
            break
    record(stack.store.dir, results)
    return results


def run_instance_hooks(stack: Stack, instance_record: InstanceRecord) -> list[HookResult]:
    """Run the hooks that apply to an instance that came up after the stack started.

    Call it once the instance is healthy and in the state file (a WARM expansion, a
    restart). It runs every hook whose ``on`` has ``instance_up`` and whose ``applies_to``
    names the instance's component (or is unset), with ``view.instance`` and
    ``view.targets`` set to that instance; records the outcomes and returns them. It
    blocks for up to the sum of those hooks' timeouts (call it from a worker thread in
    async code) and never raises for a failed hook: a result with ``blocking`` set means
    a required hook failed, and the caller should not route to the instance (stop it).
    """
    comp = instance_record.component
    hooks = [h for h in stack.cfg.effective_hooks() if "instance_up" in h.events() and _applies(h, comp)]
    if not hooks or instance_record.kind is Kind.API:
        return []
    view = build_view(stack, "instance_up", instance_record)
    target = next(i for i in view.instances if i.port == instance_record.port)
    view = dataclasses.replace(view, instance=target, targets=(target,))
    results = []
    for hook in hooks:
        results.append(dataclasses.replace(run_one(hook, view), target=target.name))
        if results[-1].blocking:
            break
    record(stack.store.dir, results)
    return results


def run_one(hook: HookConfig, view: StackView) -> HookResult:
    """Call one hook in a daemon thread and wait at most ``hook.timeout_s`` for it."""
    view = dataclasses.replace(view, timeout_s=hook.timeout_s)
    started_at, t0 = now_iso(), time.monotonic()
    box: dict[str, object] = {}

    def call() -> None:
        try:
            box["value"] = resolve(hook)(view)
        except BaseException as exc:  # a hook's failure is data, whatever it raised
            box["error"] = _describe(exc)

    worker = threading.Thread(target=call, name=f"hook-{hook.name}", daemon=True)
    worker.start()
    worker.join(hook.timeout_s)
    result = HookResult(
        hook.name, view.event, HookStatus.OK, round(time.monotonic() - t0, 3), started_at, hook.required
    )
    if worker.is_alive():
        result.status = HookStatus.TIMED_OUT
        result.error = f"did not finish within {hook.timeout_s:g} s; raise its timeout_s or make it faster"
    elif "error" in box:
        result.status, result.error = HookStatus.FAILED, str(box["error"])
    elif box.get("value") is not None:
        result.detail = str(box["value"])[:300]
    return result


def resolve(hook: HookConfig) -> HookFn:
    """The callable behind a hook: a built-in, or ``module:function`` imported now."""
    if hook.builtin is not None:
        return BUILTINS[hook.builtin]
    assert hook.call is not None
    module_name, fn_name = hook.call.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise HookFailure(f"cannot import {module_name!r} ({exc}); put it on PYTHONPATH or fix 'call'") from exc
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise HookFailure(f"{module_name!r} has no function {fn_name!r}; fix 'call: {hook.call}'")
    return fn  # type: ignore[no-any-return]


# --- the view --------------------------------------------------------------------


def build_view(stack: Stack, event: Event, extra: InstanceRecord | None = None) -> StackView:
    """The live stack: every recorded instance whose process runs (plus ``extra``), by port."""
    records = {r.port: r for r in stack.store.read().values() if stack.launcher.alive(r.handle)}
    if extra is not None:
        records.setdefault(extra.port, extra)
    live = [records[p] for p in sorted(records)]
    instances = tuple(instance_view(r) for r in live if r.kind is not Kind.API)
    roles: dict[str, list[str]] = {}
    for inst in instances:
        for role in inst.roles:
            roles.setdefault(role, []).append(inst.url)
    return StackView(
        stack=stack.cfg.stack_name(),
        state_dir=str(stack.store.dir),
        event=event,
        timeout_s=0.0,
        instances=instances,
        roles={role: tuple(urls) for role, urls in roles.items()},
        api_url=next((r.base_url for r in live if r.kind is Kind.API), None),
    )


def instance_view(rec: InstanceRecord) -> InstanceView:
    embeds = rec.kind is Kind.LLAMA_SERVER and "--embeddings" in rec.argv
    return InstanceView.extend(rec, model_path=rec.model_path, embeddings=embeds, node_address=rec.node_address)


def _applies(hook: HookConfig, component: str) -> bool:
    return hook.applies_to is None or component in hook.applies_to


def _targets(hook: HookConfig, instances: Iterable[InstanceView]) -> tuple[InstanceView, ...]:
    return tuple(i for i in instances if _applies(hook, i.component))


def _select(hooks: list[HookConfig], names: list[str]) -> list[HookConfig]:
    if not names:
        return [h for h in hooks if "start" in h.events()]
    known = [h.name for h in hooks]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise UsageError(
            f"no hook named {', '.join(map(repr, unknown))}; configured hooks: {', '.join(known) or '(none)'}"
        )
    return [h for h in hooks if h.name in names]


def _skipped(hook: HookConfig, event: Event) -> HookResult:
    comps = ", ".join(hook.applies_to or [])
    return HookResult(
        hook.name, event, HookStatus.SKIPPED, 0.0, now_iso(), hook.required, detail=f"none of {comps} is running"
    )


def _describe(exc: BaseException) -> str:
    if isinstance(exc, HookFailure):
        return str(exc)
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _blocking_message(stack: Stack, blocking: list[HookResult], stopped: list[str]) -> str:
    index = {h.name: i for i, h in enumerate(stack.cfg.effective_hooks())}
    lines = [f"  hooks[{index.get(r.name, '?')}] {r.name}: {r.status.value}: {r.error}" for r in blocking]
    what = f"stopped what this start launched: {', '.join(stopped)}" if stopped else "nothing was left running"
    return (
        "a required hook did not succeed, so the start failed; " + what + ".\n" + "\n".join(lines) + "\n"
        "Fix the hook (`modelfleet hooks run NAME` retries it) or set `required: false`."
    )


# --- built-ins ---------------------------------------------------------------------


def embed_warmup(view: StackView) -> str:
    """One real ``/embedding`` request to every embedding instance among the targets."""
    targets = [i for i in view.targets if i.embeddings]
    _fan_out(targets, "/embedding", {"content": WARMUP_TEXT}, view.timeout_s)
    return f"warmed {len(targets)} embedding instance(s)"


def generate_warmup(view: StackView) -> str:
    """A one-token ``/completion`` on every generating llama-server among the targets."""
    targets = [i for i in view.targets if i.kind is Kind.LLAMA_SERVER and not i.embeddings]
    body = {"prompt": WARMUP_TEXT, "n_predict": 1, "cache_prompt": False}
    _fan_out(targets, "/completion", body, view.timeout_s)
    return f"warmed {len(targets)} generation instance(s)"


BUILTINS: dict[str, HookFn] = {"embed_warmup": embed_warmup, "generate_warmup": generate_warmup}


def _fan_out(targets: list[InstanceView], path: str, body: dict[str, Any], timeout_s: float) -> None:
    """POST ``body`` to every target at once; raise naming each one that failed."""
    if not targets:
        return
    with (
        httpx.Client(timeout=timeout_s) as client,
        concurrent.futures.ThreadPoolExecutor(max_workers=min(16, len(targets))) as pool,
    ):
        problems = [p for p in pool.map(lambda i: _post(client, i, path, body), targets) if p]
    if problems:
        raise HookFailure("; ".join(problems))


def _post(client: httpx.Client, inst: InstanceView, path: str, body: dict[str, Any]) -> str | None:
    try:
        resp = client.post(inst.url + path, json=body)
    except httpx.HTTPError as exc:
        return f"{inst.name} (:{inst.port}) did not answer {path}: {type(exc).__name__} {exc}".rstrip()
    if resp.status_code != 200:
        return f"{inst.name} (:{inst.port}) answered {path} with {resp.status_code}: {resp.text[:200]}"
    return None


# --- the record -----------------------------------------------------------------------


def record(state_dir: Path, results: list[HookResult]) -> None:
    """Merge outcomes into ``hooks.json``: the newest per hook and target wins."""
    if not results:
        return
    with file_lock(state_dir / HOOKS_LOCK, timeout_s=60.0):  # held for one file write
        merged = {r.key: r for r in read_results(state_dir)}
        merged.update({r.key: r for r in results})
        data = {"format": 1, "results": [r.to_json() for r in merged.values()]}
        write_atomic(state_dir / HOOKS_FILE, json.dumps(data, indent=2) + "\n")


def read_results(state_dir: Path) -> list[HookResult]:
    """The recorded outcomes, oldest hook first (empty when no hook ever ran)."""
    path = state_dir / HOOKS_FILE
    try:
        data = json.loads(path.read_text())
        return [HookResult.from_json(d) for d in data["results"]]
    except FileNotFoundError:
        return []
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise StateError(
            f"hook results {path} are unreadable ({exc}); delete the file, then `modelfleet hooks run`"
        ) from exc
