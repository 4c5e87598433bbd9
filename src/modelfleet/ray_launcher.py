"""Instances on the nodes of a Ray cluster: ``placement: {kind: ray}`` (``pip install 'modelfleet[ray]'``).

Ray is only the control plane. Each instance gets one detached, named actor
(:class:`NodeKeeper`, ``num_cpus=0``, named by the instance's state key in the stack's
namespace) on a node with room for it: the actor asks for the instance's memory
estimate as the custom resource the nodes declare their RAM in (``ram_gb`` by default,
``ray start --resources '{"ram_gb": 64}'``), plus the component's ``resources:`` and the
resource its ``node:`` names, and goes only to a node whose labels match the ``labels``
of its ``node:`` (``ray start --labels zone=a``; Ray's ``label_selector``). The actor
spawns the process there through a :class:`~modelfleet.launcher.LocalLauncher` (own
process group, killed by the kernel if the actor dies: ``PR_SET_PDEATHSIG``), records it
in the node's pid file, and answers for it: alive, exit code, RSS, log tail, stop.
Requests go straight to the instance over HTTP; the front door routes to it like to any
other. Actor handles are cached by state key, and the liveness of many instances is
asked at once (:meth:`RayLauncher.alive_many`), with one bounded wait.

:meth:`RayLauncher.place` runs before anything starts: the HOT instances are placed
together as one placement group, each bundle with its instance's label selector
(``bundle_label_selector``), so a HOT set that does not fit is refused whole, with the
nodes' resources and labels; then one actor per instance is created where Ray put it, and
each actor checks its node for the model files, the program and the port.

The front door itself (the ``orchestrator`` component) always runs on this machine.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from modelfleet import memory
from modelfleet.config import LogsConfig, StackConfig, Tier, format_labels
from modelfleet.errors import StartupError
from modelfleet.instance import LOCAL_NODE, Handle, Kind, instance_key
from modelfleet.launcher import KILL_WAIT_S, LOG_TAIL_BYTES, LocalLauncher, Say
from modelfleet.spec import InstanceSpec

log = logging.getLogger(__name__)

CALL_TIMEOUT_S = 10.0  # one question to an actor; no answer in time counts as a lost node
NAME_FREE_TIMEOUT_S = 15.0  # a killed actor's name is free again within this
ACTOR_START_S = 60.0  # a node's new worker process (Python, Ray, this package) starts within this
MIN_RESOURCE = 0.001  # what asking for a selector resource takes of it


def _pid_dir(namespace: str) -> Path:
    """The node-local folder of pid files: one per instance, read by the next actor of that name."""
    return Path(tempfile.gettempdir()) / f"modelfleet-ray-{os.getuid()}" / namespace


class NodeKeeper:
    """Runs on a node, as a Ray actor: one instance's process, from spawn to stop."""

    def __init__(self, name: str, namespace: str) -> None:
        self.local = LocalLauncher(die_with_parent=True)
        self.handle: Handle | None = None
        self.pidfile = _pid_dir(namespace) / f"{name}.json"
        self.killed_leftover = self._kill_leftover()

    def _kill_leftover(self) -> int | None:
        """A process an earlier actor of this name started and did not stop: kill it before anything else."""
        try:
            data = json.loads(self.pidfile.read_text())
            old = Handle(LOCAL_NODE, int(data["pid"]), float(data["create_time"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None
        pid = None
        if self.local.alive(old):
            self.local.stop([old], KILL_WAIT_S, lambda _: None)
            pid = old.pid
        self.pidfile.unlink(missing_ok=True)
        return pid

    def node(self) -> dict[str, Any]:
        ctx = ray.get_runtime_context()
        address = ray.util.get_node_ip_address()  # type: ignore[no-untyped-call]
        return {"node_id": ctx.get_node_id(), "address": address, "leftover": self.killed_leftover}

    def check(self, spec: InstanceSpec, door_address: str = "") -> list[str]:
        """What is missing on this node for ``spec`` to start: files, the program, the port, and a way in
        for the front door at ``door_address`` (a loopback bind on another machine has none)."""
        address = self.node()["address"]
        where = f"node {address}"
        problems = []
        if door_address and address != door_address and _loopback(spec.host):
            key = f"{'servers' if spec.kind is Kind.LLAMA_SERVER else 'services'}.{spec.component}.host"
            problems.append(
                f"  {key}: {spec.host} on {where} cannot be reached from the front door's machine "
                f"({door_address}); set it to 0.0.0.0 (reached at the node's address) or to {address}"
            )
        files = spec.required_files
        problems += [f"  {key}: {path} does not exist on {where}" for key, path in files if not Path(path).is_file()]
        if spec.argv and not self.local.program_exists(spec.argv[0], spec.cwd):
            problems.append(f"  {spec.label}: program {spec.argv[0]!r} was not found on {where}")
        taken = self.local.port_conflict(spec.host, spec.port)
        if taken:
            problems.append(f"{taken} (on {where})")
        return problems

    def spawn(self, spec: InstanceSpec, logs_cfg: LogsConfig) -> dict[str, Any]:
        self.local.rotate_logs([spec.log_file], logs_cfg)
        self.handle = self.local.spawn(spec)
        self.pidfile.parent.mkdir(parents=True, exist_ok=True)
        self.pidfile.write_text(json.dumps({"pid": self.handle.pid, "create_time": self.handle.create_time}))
        return self.node() | {"pid": self.handle.pid, "create_time": self.handle.create_time}

    def _mine(self, pid: int, create_time: float) -> Handle | None:
        h = self.handle
        if h is None or h.pid != pid or abs(h.create_time - create_time) > 0.05:
            return None
        return h

    def alive(self, pid: int, create_time: float) -> bool:
        h = self._mine(pid, create_time)
        return h is not None and self.local.alive(h)

    def exit_code(self, pid: int, create_time: float) -> int | None:
        h = self._mine(pid, create_time)
        return -1 if h is None else self.local.exit_code(h)

    def stop(self, grace_s: float) -> list[str]:
        said: list[str] = []
        if self.handle is not None:
            self.local.stop([self.handle], grace_s, said.append)
        self.pidfile.unlink(missing_ok=True)
        return said

    def rss(self) -> int:
        if self.handle is None:
            raise StartupError("nothing runs here")
        return self.local.rss(self.handle)

    def read_log(self, max_bytes: int) -> str:
        return self.local.read_log(self.handle, max_bytes) if self.handle is not None else ""

    def matches(self, port: int, argv: Sequence[str]) -> dict[str, Any] | None:
        found = self.local.find(port, argv)
        return None if found is None else self.node() | {"pid": found.pid, "create_time": found.create_time}


FOLLOW_WINDOW = 65536


def _after(seen: str, now: str) -> str:
    """What ``now`` (a log's tail) has beyond ``seen`` (an earlier tail of the same log)."""
    if not seen or now == seen:
        return "" if now == seen else now
    anchor = seen[-1024:]
    at = now.rfind(anchor)
    return now[at + len(anchor) :] if at >= 0 else now  # rotated or jumped past the window: all of it


_Keeper = ray.remote(num_cpus=0, max_restarts=0)(NodeKeeper)


@dataclass(frozen=True)
class Ask:
    """What one instance asks of the node it runs on: Ray resources to hold, node labels to match."""

    resources: dict[str, float]
    labels: dict[str, str] = field(default_factory=dict)

    def describe(self) -> str:
        text = _fmt_request(self.resources)
        return f"{text}; labels {format_labels(self.labels)}" if self.labels else text


@dataclass(frozen=True)
class NodeInfo:
    """A node of the cluster as the plan shows it."""

    node_id: str
    address: str
    total: dict[str, float]
    available: dict[str, float]
    labels: dict[str, str] = field(default_factory=dict)

    @property
    def short(self) -> str:
        return f"{self.node_id[:8]} ({self.address})"


class RayLauncher:
    """The :class:`~modelfleet.launcher.Launcher` for ``placement: ray``; local handles go to a LocalLauncher."""

    node = "ray"

    def __init__(self, cfg: StackConfig) -> None:
        self.placement = cfg.placement
        self.namespace = cfg.placement.effective_namespace(cfg.name)
        self.resource = cfg.placement.memory_resource
        self.local = LocalLauncher()
        self._placed: dict[str, Any] = {}  # state key -> the actor place() created for it
        # State key -> its actor's handle, so a question does not look the name up in the GCS each
        # time. Dropped when the actor is killed or a call finds it gone (another command may have
        # replaced it under the same name: then it is looked up again once).
        self._actors: dict[str, Any] = {}
        self._logs = cfg.logs

    # --- the cluster ------------------------------------------------------------------

    def connect(self) -> None:
        if ray.is_initialized():
            return
        address = self.placement.address
        try:
            ray.init(
                address=address,
                namespace=self.namespace,
                ignore_reinit_error=True,
                log_to_driver=False,
                logging_level=logging.WARNING,
                configure_logging=False,
            )
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise StartupError(
                f"placement.address: cannot reach a Ray cluster at {address!r} ({exc}). Start one with "
                "`ray start --head` (and `ray start --address HEAD:6379` on the other machines), "
                "or set placement.address"
            ) from exc

    def nodes(self) -> list[NodeInfo]:
        self.connect()
        avail: dict[str, dict[str, float]] = {}
        with contextlib.suppress(Exception):
            avail = ray._private.state.available_resources_per_node()  # type: ignore[no-untyped-call]
        return [
            NodeInfo(
                n["NodeID"],
                n["NodeManagerAddress"],
                dict(n["Resources"]),
                dict(avail.get(n["NodeID"], {})),
                {str(k): str(v) for k, v in (n.get("Labels") or {}).items()},
            )
            for n in ray.nodes()  # type: ignore[no-untyped-call]
            if n.get("Alive")
        ]

    def _actor(self, key: str, fresh: bool = False) -> Any | None:
        """The actor named ``key``: the cached handle, or (``fresh``, or none cached) looked up by name."""
        if not fresh and (cached := self._actors.get(key)) is not None:
            return cached
        self.connect()
        try:
            actor = ray.get_actor(key, namespace=self.namespace)
        except ValueError:
            self._actors.pop(key, None)
            return None
        self._actors[key] = actor
        return actor

    def _kill(self, key: str, actor: Any) -> None:
        self._actors.pop(key, None)
        with contextlib.suppress(Exception):
            ray.kill(actor)

    def _ask(self, handle: Handle, method: str, *args: Any, timeout: float = CALL_TIMEOUT_S) -> Any:
        """Call the instance's actor; raise _Lost when it (or its node) is gone."""
        key = handle.ref
        cached = key in self._actors
        actor = self._actor(key)
        if actor is None:
            raise _Lost(f"{handle.label or key}: no actor {key!r} in namespace {self.namespace}")
        try:
            return ray.get(getattr(actor, method).remote(*args), timeout=timeout)
        except ray.exceptions.RayActorError as exc:
            self._actors.pop(key, None)
            if cached and (now := self._actor(key, fresh=True)) is not None and now != actor:
                try:  # the cached actor was replaced under the same name: ask the new one
                    return ray.get(getattr(now, method).remote(*args), timeout=timeout)
                except _GONE as again:
                    self._actors.pop(key, None)
                    raise _Lost(f"{handle.label or key}: its actor is gone ({type(again).__name__})") from again
            raise _Lost(f"{handle.label or key}: its actor is gone ({type(exc).__name__})") from exc
        except _GONE as exc:
            self._actors.pop(key, None)
            raise _Lost(f"{handle.label or key}: its node does not answer ({type(exc).__name__})") from exc

    # --- placement ------------------------------------------------------------------------

    def request(self, cfg: StackConfig, spec: InstanceSpec) -> dict[str, float]:
        """The Ray resources one instance holds: its memory estimate, its resources, its node's resource."""
        comp = cfg.components().get(spec.component)
        est = memory.estimate_bytes(cfg, spec.component)
        out: dict[str, float] = {}
        if est:
            out[self.resource] = math.ceil(est / memory.GB * 1000) / 1000
        if comp is not None:
            out |= comp.resources
            if comp.node is not None and comp.node.resource:
                name = comp.node.resource
                out[name] = max(out.get(name, 0.0), MIN_RESOURCE)
        return {k: v for k, v in out.items() if v > 0}

    def ask(self, cfg: StackConfig, spec: InstanceSpec) -> Ask:
        """What one instance asks of its node: :meth:`request`, and the node labels its ``node:`` selects."""
        comp = cfg.components().get(spec.component)
        labels = dict(comp.node.labels) if comp is not None and comp.node is not None else {}
        return Ask(self.request(cfg, spec), labels)

    def place(self, specs: Sequence[InstanceSpec], cfg: StackConfig) -> None:
        """Find a node for each instance and check it there; raise StartupError, nothing started, if any can't."""
        remote = [s for s in specs if s.kind is not Kind.API]
        if not remote:
            return
        nodes = self.nodes()
        asks = {s.key: self.ask(cfg, s) for s in remote}
        self._check_declared(cfg, remote, asks, nodes)
        hot = [s for s in remote if s.tier is Tier.HOT]
        pins = self._place_group(hot, asks, nodes) if hot else {}
        created: list[Any] = []
        try:
            for spec in remote:
                self._release(spec.key)
                actor = self._create(spec, asks[spec.key], pins.get(spec.key))
                created.append(actor)
                self._placed[spec.key] = actor
                self._actors[spec.key] = actor
            problems = self._check_nodes(remote, asks, nodes)
            if problems:
                raise StartupError(
                    f"{len(problems)} problem(s) on the Ray nodes; nothing was started:\n" + "\n".join(problems)
                )
        except BaseException:
            for spec in remote:
                self._placed.pop(spec.key, None)
                self._actors.pop(spec.key, None)
            for actor in created:
                with contextlib.suppress(Exception):
                    ray.kill(actor)
            raise

    def _check_declared(
        self, cfg: StackConfig, specs: Sequence[InstanceSpec], asks: dict[str, Ask], nodes: list[NodeInfo]
    ) -> None:
        """Refuse what no node of the cluster could ever hold: labels no node has, more than any node has."""
        problems = []
        for spec in specs:
            ask = asks[spec.key]
            key = f"{'servers' if spec.kind is Kind.LLAMA_SERVER else 'services'}.{spec.component}"
            fit = [n for n in nodes if label_match(n.labels, ask.labels)]
            if not fit:
                problems.append(f"  {key}.node: no node has the labels {format_labels(ask.labels)}")
                continue
            among = f" with the labels {format_labels(ask.labels)}" if ask.labels else ""
            for name, amount in ask.resources.items():
                if not any(n.total.get(name, 0.0) >= amount for n in fit):
                    what = "memory estimate" if name == self.resource and name not in _own(cfg, spec) else "request"
                    problems.append(f"  {key}: no node{among} has {amount:g} {name} (its {what})")
        if problems:
            hint = f"declare each node's RAM with `ray start --resources '{{\"{self.resource}\": GB}}'`"
            if any(asks[s.key].labels for s in specs):
                hint += " and its labels with `ray start --labels zone=a,disk=ssd`"
            raise StartupError(
                "the Ray cluster cannot hold these instances; nothing was started:\n"
                + "\n".join(problems)
                + "\n"
                + self.render_nodes(nodes)
                + "\n"
                + hint
            )

    def _place_group(self, hot: Sequence[InstanceSpec], asks: dict[str, Ask], nodes: list[NodeInfo]) -> dict[str, str]:
        """Place the HOT set as one placement group: where Ray puts each bundle, or a refusal.

        Each bundle carries its instance's label selector (``bundle_label_selector``), so a HOT
        instance with ``node: {labels: ...}`` is placed on a matching node as part of the set."""
        # A bundle may not be empty: an instance of unknown size takes a token of the memory resource.
        bundles = [asks[s.key].resources or {self.resource: MIN_RESOURCE} for s in hot]
        selectors = [asks[s.key].labels for s in hot]
        pg = placement_group(bundles, strategy="PACK", bundle_label_selector=selectors if any(selectors) else None)
        try:
            if not pg.wait(self.placement.place_timeout_s):
                lines = [f"  {s.label}: {asks[s.key].describe()}" for s in hot]
                raise StartupError(
                    "the HOT instances do not fit on the Ray cluster together; nothing was started:\n"
                    + "\n".join(lines)
                    + "\n"
                    + self.render_nodes(nodes)
                )
            table = placement_group_table(pg).get("bundles_to_node_id", {})
            return {s.key: table[i] for i, s in enumerate(hot) if table.get(i)}
        finally:
            remove_placement_group(pg)

    def _release(self, key: str) -> None:
        """Kill an earlier actor of this instance (its process is dead or stale) and wait for its name."""
        self._placed.pop(key, None)
        actor = self._actor(key, fresh=True)
        if actor is None:
            return
        self._kill(key, actor)
        deadline = time.monotonic() + NAME_FREE_TIMEOUT_S
        while self._actor(key, fresh=True) is not None:
            if time.monotonic() > deadline:
                raise StartupError(f"Ray actor {key!r} does not go away; check `ray list actors`")
            time.sleep(0.1)

    def _create(self, spec: InstanceSpec, ask: Ask, node_id: str | None) -> Any:
        options: dict[str, Any] = {
            "name": spec.key,
            "namespace": self.namespace,
            "lifetime": "detached",
            "resources": ask.resources,
        }
        if ask.labels:
            options["label_selector"] = dict(ask.labels)
        if node_id:
            options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node_id, soft=False)
        return _Keeper.options(**options).remote(spec.key, self.namespace)

    def _check_nodes(self, specs: Sequence[InstanceSpec], asks: dict[str, Ask], nodes: list[NodeInfo]) -> list[str]:
        door = ray.util.get_node_ip_address()  # type: ignore[no-untyped-call]
        refs = {s.key: self._placed[s.key].check.remote(s, door) for s in specs}
        problems: list[str] = []
        # Room is found within place_timeout_s; a new actor's worker process takes a while to start besides.
        deadline = time.monotonic() + self.placement.place_timeout_s + ACTOR_START_S
        for spec in specs:
            try:
                problems += ray.get(refs[spec.key], timeout=max(0.1, deadline - time.monotonic()))
            except ray.exceptions.GetTimeoutError:
                problems.append(
                    f"  {spec.label}: no node has room for {asks[spec.key].describe()} now "
                    f"(waited {self.placement.place_timeout_s:g} s)\n" + self.render_nodes(nodes)
                )
            except ray.exceptions.RayError as exc:
                problems.append(f"  {spec.label}: its Ray actor failed: {exc}")
        return problems

    def plan_placement(self, specs: Sequence[InstanceSpec], cfg: StackConfig) -> tuple[str, bool]:
        """The tree per node (its RAM from Ray's resources, its labels) with where the HOT instances would go.

        Ray decides, as a start would: the HOT set is offered as a placement group, then released.
        """
        remote = [s for s in specs if s.kind is not Kind.API and s.tier is Tier.HOT]
        nodes = self.nodes()
        asks = {s.key: self.ask(cfg, s) for s in remote}
        try:
            self._check_declared(cfg, remote, asks, nodes)
            pins = self._place_group(remote, asks, nodes) if remote else {}
        except StartupError as exc:
            return f"✗ {exc}", False
        lines = [f"Ray cluster: {len(nodes)} node(s), RAM from the {self.resource!r} resource; HOT placement:"]
        for i, n in enumerate(nodes):
            last = i == len(nodes) - 1
            total = n.total.get(self.resource, 0.0)
            here = [s for s in remote if pins.get(s.key) == n.node_id]
            used = sum(asks[s.key].resources.get(self.resource, 0.0) for s in here)
            head = f"node {n.short}: {total:g} GB ({self.resource})"
            if here:
                head += f", HOT {used:g} GB, {n.available.get(self.resource, 0.0) - used:g} GB free after"
            head += _node_labels(n)
            lines.append(("└── " if last else "├── ") + head)
            items = [f"{s.label}: {asks[s.key].describe()}" for s in here]
            lines += _tree(items, "    " if last else "│   ")
        placed = len([s for s in remote if s.key in pins])
        lines.append(f"✓ the {placed} HOT instance(s) fit; WARM ones are placed on demand where there is room")
        return "\n".join(lines), True

    def render_nodes(self, nodes: list[NodeInfo] | None = None) -> str:
        """The cluster as a tree: each node's RAM (its memory resource), its other resources and its labels."""
        nodes = self.nodes() if nodes is None else nodes
        lines = [f"Ray cluster: {len(nodes)} node(s), RAM from the {self.resource!r} resource"]
        for i, n in enumerate(nodes):
            last = i == len(nodes) - 1
            total = n.total.get(self.resource)
            free = n.available.get(self.resource, 0.0)
            ram = f"{total:g} GB, {free:g} GB free" if total is not None else f"no {self.resource!r} resource"
            extra = sorted(k for k in n.total if not _builtin_resource(k) and k != self.resource)
            more = f"; resources: {', '.join(extra)}" if extra else ""
            lines.append(f"{'└── ' if last else '├── '}node {n.short}: {ram}{more}{_node_labels(n)}")
        return "\n".join(lines)

    # --- the Launcher protocol ------------------------------------------------------------

    def spawn(self, spec: InstanceSpec) -> Handle:
        if spec.kind is Kind.API:
            return self.local.spawn(spec)
        actor = self._placed.pop(spec.key, None)
        if actor is None:
            raise StartupError(f"{spec.label}: not placed on a Ray node (place() was not called)")
        try:
            info = ray.get(actor.spawn.remote(spec, self._logs), timeout=CALL_TIMEOUT_S + spec.health_timeout_s)
        except ray.exceptions.RayTaskError as exc:
            self._kill(spec.key, actor)
            raise StartupError(f"{spec.label}: {exc.cause if exc.cause else exc}") from exc
        except ray.exceptions.RayError as exc:
            self._kill(spec.key, actor)
            raise StartupError(f"{spec.label}: its Ray actor failed: {exc}") from exc
        node, address = info["node_id"], info["address"]
        return Handle(node, info["pid"], info["create_time"], spec.log_file, spec.label, spec.key, address)

    def alive(self, handle: Handle) -> bool:
        return self.alive_many([handle])[0]

    def alive_many(self, handles: Sequence[Handle]) -> list[bool]:
        """:meth:`alive` of each handle: every actor asked at once, then one wait of at most CALL_TIMEOUT_S.

        An actor that does not answer in time (its node is lost) counts as dead. A cached actor
        found dead may have been replaced under its name by another command: those are looked up
        again and asked once more, within the same deadline (or one more second, if it has passed)."""
        out = [False] * len(handles)
        remote: dict[int, Handle] = {}
        for i, h in enumerate(handles):
            if h.ref:
                remote[i] = h
            else:
                out[i] = self.local.alive(h)
        if not remote:
            return out
        deadline = time.monotonic() + CALL_TIMEOUT_S
        stale = self._ask_alive(remote, out, deadline, fresh=False)
        if stale:
            self._ask_alive(stale, out, max(deadline, time.monotonic() + 1.0), fresh=True)
        return out

    def _ask_alive(self, asked: dict[int, Handle], out: list[bool], deadline: float, fresh: bool) -> dict[int, Handle]:
        """Ask the actors of ``asked`` at once and fill ``out``; return those whose cached actor was dead."""
        calls: dict[int, tuple[Any, bool]] = {}  # index -> (object ref, whether the actor came from the cache)
        for i, h in asked.items():
            cached = not fresh and h.ref in self._actors
            actor = self._actor(h.ref, fresh=fresh)
            if actor is not None:
                calls[i] = (actor.alive.remote(h.pid, h.create_time), cached)
        if not calls:
            return {}
        refs = [ref for ref, _ in calls.values()]
        try:  # the usual case: every actor answers
            answers = ray.get(refs, timeout=max(0.0, deadline - time.monotonic()))
        except ray.exceptions.RayError:
            pass  # one is gone, or some did not answer in time: each is sorted out below
        else:
            for i, answer in zip(calls, answers, strict=True):
                out[i] = bool(answer)
            return {}
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=max(0.0, deadline - time.monotonic()))
        done = set(ready)
        stale: dict[int, Handle] = {}
        for i, (ref, cached) in calls.items():
            if ref not in done:
                self._actors.pop(asked[i].ref, None)  # no answer in time: its node is lost (or slow)
                continue
            try:
                out[i] = bool(ray.get(ref, timeout=0))
            except ray.exceptions.RayActorError:
                self._actors.pop(asked[i].ref, None)
                if cached:
                    stale[i] = asked[i]
            except ray.exceptions.RayError:  # unavailable, or its call failed: not known to run
                self._actors.pop(asked[i].ref, None)
        return stale

    def exit_code(self, handle: Handle) -> int | None:
        if not handle.ref:
            return self.local.exit_code(handle)
        try:
            code = self._ask(handle, "exit_code", handle.pid, handle.create_time)
            return None if code is None else int(code)
        except _Lost:
            return -1

    def describe_gone(self, handle: Handle) -> str:
        return self.local.describe_gone(handle) if not handle.ref else "dead"

    def stop(self, handles: Sequence[Handle], grace_s: float, say: Say) -> None:
        local = [h for h in handles if not h.ref]
        if local:
            self.local.stop(local, grace_s, say)
        # Looked up afresh: a cached handle may name an actor another command has since replaced.
        remote = [(h, a) for h in handles if h.ref and (a := self._actor(h.ref, fresh=True)) is not None]
        refs = [(h, a, a.stop.remote(grace_s)) for h, a in remote]
        for h, actor, ref in refs:
            try:
                for line in ray.get(ref, timeout=grace_s + KILL_WAIT_S + CALL_TIMEOUT_S):
                    say(line)
            except ray.exceptions.RayError as exc:
                say(f"{h.label or h.ref}: its node did not answer the stop ({type(exc).__name__}); its actor is killed")
            self._kill(h.ref, actor)

    def discard_placed(self) -> None:
        """Kill the actors placed for instances a failed start never spawned."""
        for key, actor in self._placed.items():
            self._kill(key, actor)
        self._placed.clear()

    def release(self, handles: Sequence[Handle]) -> None:
        """Kill the actors of instances that are forgotten (stopped or found dead): they hold node resources."""
        for h in handles:
            if h.ref and (actor := self._actor(h.ref, fresh=True)) is not None:
                self._kill(h.ref, actor)

    def rss(self, handle: Handle) -> int:
        if not handle.ref:
            return self.local.rss(handle)
        try:
            return int(self._ask(handle, "rss"))
        except _Lost as exc:
            raise StartupError(str(exc)) from exc
        except ray.exceptions.RayTaskError as exc:
            raise StartupError(f"{handle.label}: cannot measure it: {exc.cause}") from exc

    def read_log(self, handle: Handle, max_bytes: int = LOG_TAIL_BYTES) -> str:
        if not handle.ref:
            return self.local.read_log(handle, max_bytes)
        try:
            return str(self._ask(handle, "read_log", max_bytes))
        except _Lost:
            return ""

    def follow_log(self, handle: Handle, poll_s: float = 0.25) -> Iterator[str]:
        """``tail -f`` through the instance's actor: its log's tail, polled, less what was already seen."""
        if not handle.ref:
            yield from self.local.follow_log(handle, poll_s)
            return
        seen = self.read_log(handle, FOLLOW_WINDOW)
        while True:
            now = self.read_log(handle, FOLLOW_WINDOW)
            yield _after(seen, now)
            if now == seen:
                time.sleep(poll_s)
            seen = now

    def rotate_logs(self, paths: Sequence[str], cfg: LogsConfig) -> list[str]:
        # Logs of Ray-placed instances are rotated by their actor, on their node, before each spawn.
        return self.local.rotate_logs([p for p in paths if Path(p).parent.is_dir()], cfg)

    def port_conflict(self, host: str, port: int) -> str | None:
        return self.local.port_conflict(host, port)

    def program_exists(self, program: str, cwd: str | None) -> bool:
        return self.local.program_exists(program, cwd)

    def available_bytes(self) -> int:
        """The most memory one node can give a new instance now (its free memory resource)."""
        free = [n.available.get(self.resource, 0.0) for n in self.nodes()]
        return int(max(free, default=0.0) * memory.GB)

    def available_for(self, cfg: StackConfig, spec: InstanceSpec) -> int:
        """The most memory a node the instance may run on can give it now: among the nodes whose labels
        its ``node:`` selects and that have every other resource it asks for free (WARM admission)."""
        ask = self.ask(cfg, spec)
        others = {k: v for k, v in ask.resources.items() if k != self.resource}
        free = [
            n.available.get(self.resource, 0.0)
            for n in self.nodes()
            if label_match(n.labels, ask.labels) and all(n.available.get(k, 0.0) >= v for k, v in others.items())
        ]
        return int(max(free, default=0.0) * memory.GB)

    def total_bytes(self) -> int:
        return int(sum(n.total.get(self.resource, 0.0) for n in self.nodes()) * memory.GB)

    def find(self, port: int, argv: Sequence[str]) -> Handle | None:
        local = self.local.find(port, argv)
        if local is not None:
            return local
        key = instance_key(port)
        try:
            info = self._ask(Handle("ray", 0, 0.0, ref=key), "matches", port, list(argv))
        except _Lost:
            return None
        if info is None:
            return None
        return Handle(info["node_id"], info["pid"], info["create_time"], "", key, key, info["address"])


_GONE = (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError, ray.exceptions.ActorUnavailableError)


class _Lost(Exception):
    """The actor of an instance, or its node, is gone."""


def _tree(items: list[str], indent: str) -> list[str]:
    return [f"{indent}{'└── ' if i == len(items) - 1 else '├── '}{item}" for i, item in enumerate(items)]


def _own(cfg: StackConfig, spec: InstanceSpec) -> dict[str, float]:
    comp = cfg.components().get(spec.component)
    return dict(comp.resources) if comp is not None else {}


def _loopback(host: str) -> bool:
    return host == "localhost" or host == "::1" or host.startswith("127.")


def _builtin_resource(name: str) -> bool:
    return name in ("CPU", "GPU", "memory", "object_store_memory") or name.startswith("node:")


def label_match(labels: dict[str, str], selector: dict[str, str]) -> bool:
    """Whether a node with ``labels`` matches a label ``selector`` (``a``, ``!a``, ``in(a,b)``, ``!in(a,b)``,
    as the config writes them).

    As Ray reads it; a negative term also matches a node without the label. Only used to refuse early
    what no node could take and to show the plan: Ray itself places."""
    for key, term in selector.items():
        negate = term.startswith("!")
        body = term[1:] if negate else term
        wanted = set(body[3:-1].split(",")) if body.startswith("in(") else {body}
        has = labels.get(key) in wanted
        if has == negate:
            return False
    return True


HIDDEN_LABELS = ("ray.io/node-id",)  # Ray's own label of each node: its id, shown anyway


def _node_labels(n: NodeInfo) -> str:
    shown = {k: v for k, v in n.labels.items() if k not in HIDDEN_LABELS}
    return f"; labels: {format_labels(shown)}" if shown else ""


def _fmt_request(req: dict[str, float]) -> str:
    return ", ".join(f"{v:g} {k}" for k, v in sorted(req.items())) or "nothing"
