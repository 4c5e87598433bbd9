"""``placement: ray`` on a real Ray cluster on this machine: a head and two workers, each with its RAM.

One cluster for the module (it takes ~15 s to start on 2 cores): the head declares
1 GB of ``ram_gb`` and the label ``zone=h``, worker A 2 GB, the ``big_box`` resource and
``zone=a``, worker B 2 GB and ``zone=b``. Servers declare ``ram_gb`` so where they fit is
known. The node-loss tests (last in the file) remove workers; a test that needs both
workers alive gets a fresh node, of the same resources and labels, in place of a removed one.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from subprocess import PIPE
from typing import Any

import httpx
import psutil
import pytest

from conftest import MODELFLEET, free_ports, stack_cli
from modelfleet.config import load_config
from modelfleet.errors import StartupError
from modelfleet.placement import launcher_for
from modelfleet.spec import BinaryInfo
from modelfleet.stack import Stack
from modelfleet.state import InstanceRecord

ray = pytest.importorskip("ray")
cluster_utils = pytest.importorskip("ray.cluster_utils")

OBJECT_STORE = 80 * 1024 * 1024  # the smallest Ray accepts: these nodes hold no objects
FAST_MONITOR = "monitor: {interval_s: 0.3, failures_to_eject: 2, backoff_initial_s: 0.2}\n"
COMMON: dict[str, Any] = {"num_cpus": 2, "object_store_memory": OBJECT_STORE}
WORKER_A: dict[str, Any] = {"resources": {"ram_gb": 2, "big_box": 1}, "labels": {"zone": "a"}}
WORKER_B: dict[str, Any] = {"resources": {"ram_gb": 2}, "labels": {"zone": "b"}}


class Nodes:
    def __init__(self, cluster: Any, head: Any, a: Any, b: Any) -> None:
        self.cluster, self.head, self.a, self.b = cluster, head, a, b
        self.removed: set[str] = set()

    @property
    def address(self) -> str:
        return str(self.cluster.address)

    def id_of(self, node: Any) -> str:
        return str(node.node_id)

    def remove(self, node: Any) -> None:
        """Lose a worker at once, as a machine that dies: its raylet and workers are killed."""
        self.removed.add(self.id_of(node))
        self.cluster.remove_node(node, allow_graceful=False)

    def heal(self) -> None:
        """A fresh worker in place of each one a node-loss test removed (same resources and labels)."""
        if self.id_of(self.a) in self.removed:
            self.a = self.cluster.add_node(**COMMON, **WORKER_A)
        if self.id_of(self.b) in self.removed:
            self.b = self.cluster.add_node(**COMMON, **WORKER_B)
        self.cluster.wait_for_nodes()
        alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        assert {self.id_of(n) for n in (self.head, self.a, self.b)} <= alive


@pytest.fixture(scope="module")
def nodes() -> Iterator[Nodes]:
    cluster = cluster_utils.Cluster(
        initialize_head=True,
        head_node_args={
            **COMMON,
            "resources": {"ram_gb": 1},
            "labels": {"zone": "h"},
            # A lost node is noticed in about a second, not the default half minute.
            "_system_config": {"health_check_period_ms": 300, "health_check_failure_threshold": 3},
        },
    )
    try:
        a = cluster.add_node(**COMMON, **WORKER_A)
        b = cluster.add_node(**COMMON, **WORKER_B)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        yield Nodes(cluster, cluster.head_node, a, b)
    finally:
        ray.shutdown()
        cluster.shutdown()
    left = [p for p in psutil.process_iter(["cmdline"]) if _is_ray_daemon(p, cluster)]
    assert not left, f"the Ray cluster left processes: {[p.pid for p in left]}"


@pytest.fixture(autouse=True)
def _both_workers(request: pytest.FixtureRequest) -> None:
    """Every test of the cluster starts with the head and both workers alive."""
    if "nodes" in request.fixturenames:
        request.getfixturevalue("nodes").heal()


def _is_ray_daemon(p: psutil.Process, cluster: Any) -> bool:
    cmd = " ".join(p.info["cmdline"] or [])
    return ("raylet" in cmd or "gcs_server" in cmd) and str(cluster.address).split(":")[-1] in cmd


def stack_yaml(
    nodes: Nodes, servers: str, api_port: int | None = None, extra: str = "", monitor: str = FAST_MONITOR
) -> str:
    api = f"api: {{port: {api_port}}}\n" if api_port else "api: {enabled: false}\n"
    return (
        f"name: raytest\nplacement: {{kind: ray, address: '{nodes.address}', place_timeout_s: 3}}\n"
        + monitor
        + extra
        + api
        + "servers:\n"
        + servers
    )


def srv(name: str, model: Path, port: int, ram_gb: float, **fields: object) -> str:
    lines = [f"  {name}:", f"    model: {model}", f"    port: {port}", f"    roles: [{name}]", "    threads: 1"]
    # The tiny model's estimate is a few MB; naming the memory resource reserves a chosen amount instead.
    lines += [f"    resources: {{ram_gb: {ram_gb}}}", "    ctx_size: 256"]
    lines += [f"    {k}: {v}" for k, v in fields.items()]
    return "\n".join(lines) + "\n"


StackOf = Callable[[str], Stack]


@pytest.fixture
def ray_stack(tmp_path: Path, llama_server: BinaryInfo) -> Iterator[StackOf]:
    """Stacks on the cluster, built as the CLI builds them; all stopped at teardown."""
    made: list[Stack] = []

    def factory(text: str) -> Stack:
        (tmp_path / "stack.yaml").write_text(text)
        cfg = load_config(text, str(tmp_path / "stack.yaml"))
        stack = Stack(cfg, tmp_path / "state", llama_server, launcher=launcher_for(cfg), stop_grace_s=5.0)
        made.append(stack)
        return stack

    yield factory
    for stack in made:
        stack.stop()


def servers_of(model: Path) -> list[psutil.Process]:
    """llama-server processes serving ``model``, on any node (the nodes share this process table)."""
    out = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info["cmdline"] or []
        if cmd and os.path.basename(cmd[0]) == "llama-server" and str(model) in cmd:
            out.append(p)
    return out


def our_actors(namespace: str = "modelfleet-raytest") -> list[str]:
    """Names of the live named actors of the test stack's namespace."""
    named = ray.util.list_named_actors(all_namespaces=True)
    return [a["name"] for a in named if a["namespace"] == namespace]


def wait_until(what: str, cond: Callable[[], bool], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def records(stack: Stack) -> dict[str, InstanceRecord]:
    return {r.component: r for r in stack.store.read().values()}


def test_placement_follows_memory_and_selectors(
    nodes: Nodes, ray_stack: StackOf, tmp_path: Path, tiny_model: Path
) -> None:
    pa, pb, pc = free_ports(3)
    text = stack_yaml(
        nodes,
        srv("alpha", tiny_model, pa, 1.5, node="big_box")  # only worker A has big_box
        + srv("beta", tiny_model, pb, 1.5)  # A is then full: only B has 1.5 GB left
        + srv("gamma", tiny_model, pc, 0.8),  # A and B have 0.5 left: the head's 1 GB
    )
    stack = ray_stack(text)
    stack.start(stack.select())
    recs = records(stack)
    assert recs["alpha"].node == nodes.id_of(nodes.a)
    assert recs["beta"].node == nodes.id_of(nodes.b)
    assert recs["gamma"].node == nodes.id_of(nodes.head)
    address = nodes.head.node_ip_address  # the nodes share this machine's address
    assert all(r.extra.get("node_address") == address for r in recs.values())
    for r in recs.values():  # each answers over plain HTTP, wherever it runs
        assert httpx.get(r.base_url + "/health", timeout=5).status_code == 200
    assert sorted(our_actors()) == sorted(r.key for r in recs.values())
    # The CLI shows where each runs, and stop --all leaves nothing on any node.
    shown = stack_cli(tmp_path, "status")
    assert shown.returncode == 0, shown.stderr
    assert "NODE" in shown.stdout and f"{nodes.id_of(nodes.a)[:8]}@{address}" in shown.stdout
    tail = stack.launcher.read_log(recs["alpha"].handle)  # read on its node, through its actor
    assert "modelfleet: starting alpha" in tail and "listening on " in tail
    assert stack.launcher.rss(recs["alpha"].handle) > 0
    assert len(servers_of(tiny_model)) == 3
    reloaded = stack_cli(tmp_path, "reload", "gamma")  # a new process, placed again where it fits
    assert reloaded.returncode == 0, reloaded.stderr
    again = records(stack)["gamma"]
    assert again.pid != recs["gamma"].pid and again.node == nodes.id_of(nodes.head)
    # This process's launcher still holds the actor it created for gamma, which the reload (another
    # process) replaced under the same name: liveness finds the new one, asked all at once.
    handles = [recs["gamma"].handle, again.handle, recs["alpha"].handle, recs["beta"].handle]
    assert stack.launcher.alive_many(handles) == [False, True, True, True]  # type: ignore[attr-defined]
    assert len(servers_of(tiny_model)) == 3 and sorted(our_actors()) == sorted(r.key for r in recs.values())
    stopped = stack_cli(tmp_path, "stop", "--all")
    assert stopped.returncode == 0, stopped.stderr
    assert servers_of(tiny_model) == []
    wait_until("the actors to go", lambda: our_actors() == [])


def test_a_hot_set_that_does_not_fit_is_refused_with_nothing_started(
    nodes: Nodes, ray_stack: StackOf, tiny_model: Path
) -> None:
    ports = free_ports(3)
    # 1.5 GB fits on A or B but never on the head: three of them have no placement.
    text = stack_yaml(nodes, "".join(srv(f"s{i}", tiny_model, p, 1.5) for i, p in enumerate(ports)))
    stack = ray_stack(text)
    with pytest.raises(StartupError) as err:
        stack.start(stack.select())
    msg = str(err.value)
    assert "do not fit on the Ray cluster together; nothing was started" in msg
    assert "Ray cluster: 3 node(s)" in msg and "2 GB" in msg and "big_box" in msg
    assert servers_of(tiny_model) == [] and stack.store.read() == {} and our_actors() == []


def test_too_big_for_any_node_and_missing_files_are_named(nodes: Nodes, ray_stack: StackOf, tiny_model: Path) -> None:
    (p,) = free_ports(1)
    stack = ray_stack(stack_yaml(nodes, srv("huge", tiny_model, p, 3)))
    with pytest.raises(StartupError, match=r"servers.huge: no node has 3 ram_gb \(its request\)"):
        stack.start(stack.select())
    missing = tiny_model.parent / "absent.gguf"
    stack = ray_stack(stack_yaml(nodes, srv("lost", missing, p, 0.5)))
    with pytest.raises(StartupError) as err:
        stack.start(stack.select())
    assert f"servers.lost.model: {missing} does not exist on node {nodes.head.node_ip_address}" in str(err.value)
    assert our_actors() == [] and stack.store.read() == {}


def test_plan_shows_the_tree_per_node_and_the_placement(nodes: Nodes, tmp_path: Path, tiny_model: Path) -> None:
    pa, pb = free_ports(2)
    (tmp_path / "stack.yaml").write_text(
        stack_yaml(
            nodes,
            srv("alpha", tiny_model, pa, 1.5, node="big_box")
            + srv("beta", tiny_model, pb, 0.5, node="{labels: {zone: b}}"),
        )
    )
    shown = stack_cli(tmp_path, "plan")
    assert shown.returncode == 0, shown.stdout + shown.stderr
    text = shown.stdout
    assert "Ray cluster: 3 node(s)" in text and "✓ the 2 HOT instance(s) fit" in text
    a_line = next(line for line in text.splitlines() if nodes.id_of(nodes.a)[:8] in line)
    assert "2 GB (ram_gb), HOT 1.5 GB" in a_line and a_line.endswith("; labels: zone=a")
    b_part = text.split(nodes.id_of(nodes.b)[:8], 1)[1]
    assert "labels: zone=b" in b_part.splitlines()[0] and "beta (:" in b_part and "; labels zone=b" in b_part
    assert "alpha (:" in text.split(nodes.id_of(nodes.a)[:8], 1)[1].split("node ", 1)[0]
    (tmp_path / "stack.yaml").write_text(
        stack_yaml(
            nodes, srv("alpha", tiny_model, pa, 1.5, node="big_box") + srv("beta", tiny_model, pb, 1.5, node="big_box")
        )
    )
    refused = stack_cli(tmp_path, "plan")
    assert refused.returncode == 6 and "do not fit on the Ray cluster together" in refused.stdout
    assert our_actors() == []


def test_placement_follows_node_labels(nodes: Nodes, ray_stack: StackOf, tiny_model: Path) -> None:
    ph, pb, pe, pw, p1, p2 = free_ports(6)
    # Left to Ray, each pair (0.4 GB each) would be packed on one node: the labels part them.
    stack = ray_stack(
        stack_yaml(
            nodes,
            srv("home", tiny_model, ph, 0.4, node="{labels: {zone: h}}")
            + srv("away", tiny_model, pb, 0.4, node="{labels: {zone: '!in(h, a)'}}")
            + srv("east", tiny_model, pe, 0.4, tier="warm", node="{labels: {zone: a}}")
            + srv("west", tiny_model, pw, 0.4, tier="warm", node="{labels: {zone: 'in(b, c)'}}"),
        )
    )
    stack.start(stack.select())  # the HOT set: one placement group, a label selector per bundle
    stack.start(["east", "west"])  # WARM: each an actor of its own, with its label selector
    recs = records(stack)
    assert recs["home"].node == nodes.id_of(nodes.head)
    assert recs["away"].node == nodes.id_of(nodes.b)
    assert recs["east"].node == nodes.id_of(nodes.a)
    assert recs["west"].node == nodes.id_of(nodes.b)
    assert sorted(our_actors()) == sorted(r.key for r in recs.values()) and len(servers_of(tiny_model)) == 4
    stack.stop()

    # Labels no node has are refused before anything starts, naming the key and showing the nodes' labels.
    lost = ray_stack(stack_yaml(nodes, srv("lost", tiny_model, p1, 0.5, node="{labels: {zone: x}}")))
    with pytest.raises(StartupError) as err:
        lost.start(lost.select())
    assert "servers.lost.node: no node has the labels zone=x" in str(err.value)
    assert "labels: zone=a" in str(err.value) and "ray start --labels" in str(err.value)
    # Two HOT instances that each fit the head but not together: the group is refused whole. (Ray
    # would put them on A and B if the bundles did not carry their label selectors.)
    pair = ray_stack(
        stack_yaml(
            nodes,
            srv("h1", tiny_model, p1, 0.6, node="{labels: {zone: h}}")
            + srv("h2", tiny_model, p2, 0.6, node="{labels: {zone: h}}"),
        )
    )
    with pytest.raises(StartupError, match="do not fit on the Ray cluster together; nothing was started") as err:
        pair.start(pair.select())
    assert "h1 (:" in str(err.value) and "0.6 ram_gb; labels zone=h" in str(err.value)
    assert servers_of(tiny_model) == [] and our_actors() == [] and pair.store.read() == {}


def test_a_new_actor_kills_the_leftover_its_node_recorded(tmp_path: Path) -> None:
    from modelfleet.ray_launcher import NodeKeeper, _pid_dir

    leftover = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        pidfile = _pid_dir("modelfleet-leftover-test") / "server_1.json"
        pidfile.parent.mkdir(parents=True, exist_ok=True)
        pidfile.write_text(json.dumps({"pid": leftover.pid, "create_time": psutil.Process(leftover.pid).create_time()}))
        keeper = NodeKeeper("server_1", "modelfleet-leftover-test")
        assert keeper.killed_leftover == leftover.pid
        leftover.wait(timeout=10)  # gone (the keeper reaped it, so its exit status is not ours to see)
        assert not psutil.pid_exists(leftover.pid) and not pidfile.exists()
    finally:
        leftover.kill()
        leftover.wait()


def front_door_status(port: int) -> dict[str, dict[str, Any]]:
    resp = httpx.get(f"http://127.0.0.1:{port}/admin/status", timeout=10)
    return {i["name"]: i for i in resp.json()["instances"]}


def chat(port: int, model: str) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    return httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=60)


def test_front_door_routes_to_ray_placed_servers_and_readopts_them(
    nodes: Nodes, ray_stack: StackOf, tiny_model: Path
) -> None:
    pa, pb, api = free_ports(3)
    # beta listens on every interface: the front door reaches it at its node's address, as it would on
    # another machine (here every node has this machine's address); alpha only on loopback.
    servers = srv("alpha", tiny_model, pa, 1.5) + srv("beta", tiny_model, pb, 1.5, host="0.0.0.0")
    stack = ray_stack(stack_yaml(nodes, servers, api))
    stack.start(stack.select())
    recs = records(stack)
    assert recs["alpha"].node != recs["beta"].node  # 1.5 + 1.5 fit on no single node
    node_ip = nodes.head.node_ip_address
    assert node_ip not in ("127.0.0.1", "")
    assert recs["beta"].base_url == f"http://{node_ip}:{pb}" and recs["alpha"].base_url == f"http://127.0.0.1:{pa}"
    for name in ("alpha", "beta"):
        resp = chat(api, name)
        assert resp.status_code == 200 and resp.json()["model"] == name, resp.text
    pids = {n: recs[n].pid for n in ("alpha", "beta")}
    # A restarted front door adopts the running instances by their actors' names.
    stack.stop(["orchestrator"])
    stack.start(["orchestrator"])
    wait_until("adoption", lambda: all(front_door_status(api)[n]["state"] == "ready" for n in pids))
    assert front_door_status(api)["beta"]["address"] == f"{node_ip}:{pb}"
    assert front_door_status(api)["alpha"]["address"] == f"127.0.0.1:{pa}"
    assert chat(api, "beta").status_code == 200
    assert {n: r.pid for n, r in records(stack).items() if n in pids} == pids


def test_a_loopback_server_on_another_machine_is_refused_before_it_starts(
    nodes: Nodes, ray_stack: StackOf, tiny_model: Path
) -> None:
    from modelfleet.ray_launcher import NodeKeeper

    (p,) = free_ports(1)
    stack = ray_stack(stack_yaml(nodes, srv("far", tiny_model, p, 0.5)))
    (spec,) = stack.specs(["far"])
    keeper = NodeKeeper(spec.key, "modelfleet-check-test")
    here = keeper.node()["address"]
    assert keeper.check(spec, here) == []  # a node on this machine: loopback is fine
    keeper.node = lambda: {"node_id": "n", "address": "203.0.113.9", "leftover": None}  # type: ignore[method-assign]
    problems = keeper.check(spec, here)
    assert len(problems) == 1 and "servers.far.host: 127.0.0.1 on node 203.0.113.9 cannot be reached" in problems[0]
    assert "set it to 0.0.0.0" in problems[0]
    assert keeper.check(dataclasses.replace(spec, host="0.0.0.0"), here) == []


def test_a_warm_server_starts_on_demand_on_a_node_with_room(nodes: Nodes, ray_stack: StackOf, tiny_model: Path) -> None:
    (p, api) = free_ports(2)
    stack = ray_stack(stack_yaml(nodes, srv("lazy", tiny_model, p, 1.5, tier="warm"), api))
    stack.start(stack.select())
    assert "lazy" not in records(stack)  # WARM: nothing runs until asked for
    resp = chat(api, "lazy")
    assert resp.status_code == 200 and resp.json()["model"] == "lazy", resp.text
    rec = records(stack)["lazy"]
    assert rec.node in (nodes.id_of(nodes.a), nodes.id_of(nodes.b))  # 1.5 GB: never the 1 GB head
    assert our_actors() == [rec.key]


# ~100 bytes: the byte-level tiny model reads it as ~100 prompt tokens.
PROMPT = "A checkpoint of a Ray-placed stack keeps the KV cache of its slot, wherever the server runs. "


def complete(port: int) -> dict[str, Any]:
    body = {"prompt": PROMPT, "n_predict": 1, "id_slot": 0, "cache_prompt": True}
    resp = httpx.post(f"http://127.0.0.1:{port}/completion", json=body, timeout=60)
    assert resp.status_code == 200, resp.text
    timings: dict[str, Any] = resp.json()["timings"]
    return timings


def total_slots(port: int) -> int:
    return int(httpx.get(f"http://127.0.0.1:{port}/props", timeout=10).json()["total_slots"])


def test_checkpoint_create_and_restore_of_a_ray_placed_stack(
    nodes: Nodes, ray_stack: StackOf, tmp_path: Path, tiny_model: Path
) -> None:
    pa, pb = free_ports(2)
    stack = ray_stack(
        stack_yaml(
            nodes,
            srv("alpha", tiny_model, pa, 1.5, parallel=1, slot_save="true")
            + srv("beta", tiny_model, pb, 0.5, slot_save="true", node="{labels: {zone: h}}"),
        )
    )
    stack.start(stack.select())
    first = complete(pa)
    assert first["cache_n"] == 0 and first["prompt_n"] > 50
    made = stack_cli(tmp_path, "checkpoint", "create", "base", "--kv", "--json")
    assert made.returncode == 0, made.stderr
    ckpt = json.loads(made.stdout)
    assert ckpt["running"] == ["alpha", "beta"] and ckpt["kv"]

    # Change alpha (parallel 1 -> 2) and reload it, stop beta: both through the CLI, as a user would.
    cfg = tmp_path / "stack.yaml"
    original = cfg.read_text()
    cfg.write_text(original.replace("parallel: 1", "parallel: 2"))
    assert stack_cli(tmp_path, "reload", "alpha").returncode == 0 and total_slots(pa) == 2
    assert stack_cli(tmp_path, "stop", "beta").returncode == 0 and "beta" not in records(stack)

    restored = stack_cli(tmp_path, "checkpoint", "restore", ckpt["id"], "--json")
    assert restored.returncode == 0, restored.stdout + restored.stderr
    report = json.loads(restored.stdout)
    assert (report["reloaded"], report["started"], report["stopped"]) == (["alpha"], ["beta"], [])
    assert report["kv_failed"] == [] and sorted(k.split(":")[0] for k in report["kv_restored"]) == [
        "alpha[0] slot 0",
        "beta[0] slot 0",
    ]
    assert cfg.read_text() == original and total_slots(pa) == 1
    recs = records(stack)
    assert recs["beta"].node == nodes.id_of(nodes.head)  # placed again by its labels
    assert recs["alpha"].node in (nodes.id_of(nodes.a), nodes.id_of(nodes.b))
    assert sorted(our_actors()) == sorted(r.key for r in recs.values()) and len(servers_of(tiny_model)) == 2
    timings = complete(pa)  # the restored slot cache serves the prompt again
    assert timings["cache_n"] >= first["prompt_n"] - 1 and timings["prompt_n"] <= 2, timings


def test_the_sweep_measures_a_ray_placed_server_and_leaves_it_as_it_was(
    nodes: Nodes, ray_stack: StackOf, tmp_path: Path, tiny_model: Path
) -> None:
    (p,) = free_ports(1)
    stack = ray_stack(stack_yaml(nodes, srv("alpha", tiny_model, p, 0.5, node="{labels: {zone: b}}")))
    stack.start(stack.select())
    before = records(stack)["alpha"]
    table = tmp_path / "sweep.csv"
    args = ["sweep", "alpha", "--parallel", "1,2", "--warmup", "0", "--batches", "1", "--max-tokens", "4"]
    seen: set[tuple[str, str]] = set()  # (node, --parallel) of each process the sweep ran

    def watch() -> None:
        rec = records(stack).get("alpha")
        if rec is not None:
            seen.add((rec.node, rec.argv[rec.argv.index("--parallel") + 1]))

    where = ["--config", str(tmp_path / "stack.yaml"), "--state-dir", str(tmp_path / "state")]
    sweep = subprocess.Popen([MODELFLEET, *args, "--csv", str(table), *where], stdout=PIPE, stderr=PIPE)
    try:
        while sweep.poll() is None:
            watch()
            time.sleep(0.1)
        out, errs = sweep.communicate(timeout=10)
    finally:
        if sweep.poll() is None:
            sweep.kill()
            sweep.wait()
    assert sweep.returncode == 0, out.decode() + errs.decode()
    with table.open(newline="") as f:
        summaries = [r for r in csv.DictReader(f) if r["kind"] == "summary"]
    assert [(r["parallel"], r["requests"], r["errors"], r["error"]) for r in summaries] == [
        ("1", "1", "0", ""),
        ("2", "2", "0", ""),
    ]
    b = nodes.id_of(nodes.b)
    assert {(b, "1"), (b, "2")} <= seen and all(node == b for node, _ in seen), seen
    after = records(stack)["alpha"]  # running before, so restarted with its own config, placed again
    assert after.pid != before.pid and after.node == b and "--parallel" in after.argv
    assert after.argv[after.argv.index("--parallel") + 1] == "1"
    assert our_actors() == [after.key] and len(servers_of(tiny_model)) == 1


def test_node_loss_replaces_the_hot_instance_and_leaves_no_orphan(
    nodes: Nodes, ray_stack: StackOf, tiny_model: Path
) -> None:
    (p, api) = free_ports(2)
    stack = ray_stack(stack_yaml(nodes, srv("solo", tiny_model, p, 1.5), api))
    stack.start(stack.select())
    first = records(stack)["solo"]
    on, other = (nodes.a, nodes.b) if first.node == nodes.id_of(nodes.a) else (nodes.b, nodes.a)
    assert first.node == nodes.id_of(on)  # 1.5 GB: a worker, never the head
    wait_until("the front door to route to it", lambda: front_door_status(api)["solo"]["state"] == "ready")
    nodes.remove(on)
    wait_until("the old process to die with its node", lambda: not psutil.pid_exists(first.pid) or _zombie(first.pid))

    def replaced() -> bool:
        rec = records(stack).get("solo")
        return rec is not None and rec.pid != first.pid and front_door_status(api)["solo"]["state"] == "ready"

    wait_until("re-placement", replaced, timeout_s=60)
    assert records(stack)["solo"].node == nodes.id_of(other)
    assert chat(api, "solo").status_code == 200
    assert len(servers_of(tiny_model)) == 1


def _zombie(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_a_warm_server_whose_node_is_lost_starts_again_on_demand_on_another_node(
    nodes: Nodes, ray_stack: StackOf, tiny_model: Path
) -> None:
    (p, api) = free_ports(2)
    stack = ray_stack(stack_yaml(nodes, srv("lazy", tiny_model, p, 1.5, tier="warm"), api))
    stack.start(stack.select())
    assert chat(api, "lazy").status_code == 200
    first = records(stack)["lazy"]
    on, other = (nodes.a, nodes.b) if first.node == nodes.id_of(nodes.a) else (nodes.b, nodes.a)
    assert first.node == nodes.id_of(on)  # 1.5 GB: a worker, never the head
    nodes.remove(on)
    wait_until("the old process to die with its node", lambda: not psutil.pid_exists(first.pid) or _zombie(first.pid))
    wait_until("the front door to notice", lambda: front_door_status(api)["lazy"]["state"] == "stopped")
    resp = chat(api, "lazy")  # on demand again: placed where there is room now
    assert resp.status_code == 200 and resp.json()["model"] == "lazy", resp.text
    again = records(stack)["lazy"]
    assert again.pid != first.pid and again.node == nodes.id_of(other)
    assert len(servers_of(tiny_model)) == 1 and our_actors() == [again.key]


def test_a_hot_server_whose_node_is_lost_and_that_fits_nowhere_else_ends_failed(
    nodes: Nodes, ray_stack: StackOf, tiny_model: Path
) -> None:
    (p, api) = free_ports(2)
    monitor = "monitor: {interval_s: 0.3, failures_to_eject: 2, backoff_initial_s: 0.2, restart_budget: 2}\n"
    pinned = srv("pinned", tiny_model, p, 0.5, node="{labels: {zone: a}}")  # only worker A has zone=a
    stack = ray_stack(stack_yaml(nodes, pinned, api, monitor=monitor))
    stack.start(stack.select())
    first = records(stack)["pinned"]
    assert first.node == nodes.id_of(nodes.a)
    wait_until("the front door to route to it", lambda: front_door_status(api)["pinned"]["state"] == "ready")
    nodes.remove(nodes.a)
    wait_until("the restart budget to run out", lambda: front_door_status(api)["pinned"]["state"] == "failed", 60)
    detail = front_door_status(api)["pinned"]["detail"]
    assert "no node has the labels zone=a" in detail, detail
    assert "2 restarts within" in detail and "monitor.restart_budget 2" in detail, detail
    assert servers_of(tiny_model) == [] and our_actors() == []  # nothing left on any node
    assert chat(api, "pinned").status_code >= 500
