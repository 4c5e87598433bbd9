"""What ``placement: ray`` costs against local placement, on one machine.

    .venv/bin/python bench/ray_placement.py [--rounds 3] [--requests 200] [--out DIR]

A ``ray.cluster_utils.Cluster`` with a head and two workers (each declaring 4 GB of
``ram_gb``) stands in for three machines. A stack of six tiny-model servers (each
reserving 2 GB, so two land on each node) plus its front door is started with
``placement: local`` and with ``placement: ray``, in alternating rounds, and for each:

* start time: ``Stack.start`` of the whole stack until every instance is healthy;
* p50 / p99 latency of short chat completions through the front door (sequential,
  one keep-alive connection), and straight to one server for reference;
* with ``placement: ray``, what one supervisor tick's liveness question costs for the six
  servers: the way it was asked before (each actor looked up by name, then asked, one
  after another, on the front door's event loop) and ``RayLauncher.alive_many`` (cached
  actors, all asked at once, one wait; the front door runs it in a worker thread).

Ray is only the control plane, so the latency through the front door should be the
same; the start pays for one actor (a worker process) per instance. Results go to
``bench/results/ray_placement.{json,md}``. The machine is shared: compare ratios.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import ray
from ray.cluster_utils import Cluster

from modelfleet.config import load_config
from modelfleet.launcher import alive_many, free_ports
from modelfleet.placement import launcher_for
from modelfleet.spec import find_llama_server, probe_binary
from modelfleet.stack import Stack
from modelfleet.tinymodel import TinyShape, write_tiny_llama

SERVERS = 6
OBJECT_STORE = 80 * 1024 * 1024


def stack_text(kind: str, address: str, model: Path, ports: list[int], api: int) -> str:
    lines = [
        "name: raybench",
        f"placement: {{kind: {kind}, address: '{address}'}}",
        f"api: {{port: {api}}}",
        "servers:",
    ]
    for i, port in enumerate(ports):
        lines += [
            f"  s{i}:",
            f"    model: {model}",
            f"    port: {port}",
            f"    roles: [s{i}]",
            "    threads: 1",
            "    ctx_size: 256",
            "    resources: {ram_gb: 2}",
        ]
    return "\n".join(lines) + "\n"


def latencies(url: str, body: dict[str, Any], n: int) -> list[float]:
    out = []
    with httpx.Client(timeout=30) as client:
        for _ in range(5):
            client.post(url, json=body)  # warm the connection and the server
        for _ in range(n):
            t = time.perf_counter()
            resp = client.post(url, json=body)
            out.append((time.perf_counter() - t) * 1000)
            resp.raise_for_status()
    return out


def liveness_ms(stack: Stack, reps: int = 20) -> dict[str, float]:
    """Median ms of one tick's liveness question for every Ray-placed instance: before and now."""
    handles = [r.handle for r in stack.store.read().values() if r.handle.ref]
    namespace = stack.cfg.placement.effective_namespace(stack.cfg.name)

    def one_by_one() -> None:  # what each supervisor tick did on the event loop before
        for h in handles:
            actor = ray.get_actor(h.ref, namespace=namespace)
            assert ray.get(actor.alive.remote(h.pid, h.create_time), timeout=10)

    def at_once() -> None:
        assert all(alive_many(stack.launcher, handles))

    out = {}
    for name, ask in (("liveness_one_by_one_ms", one_by_one), ("liveness_at_once_ms", at_once)):
        ask()  # warm: the first call creates the actors' handles
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            ask()
            times.append((time.perf_counter() - t) * 1000)
        out[name] = round(statistics.median(times), 3)
    return out


def one_round(kind: str, address: str, model: Path, folder: Path, n: int) -> dict[str, Any]:
    *ports, api = free_ports(SERVERS + 1)
    text = stack_text(kind, address, model, ports, api)
    path = folder / f"{kind}.yaml"
    path.write_text(text)
    cfg = load_config(text, str(path))
    stack = Stack(cfg, folder / f"state-{kind}", probe_binary(find_llama_server()), launcher=launcher_for(cfg))
    try:
        t = time.perf_counter()
        stack.start(stack.select())
        start_s = time.perf_counter() - t
        nodes = sorted({r.node for r in stack.store.read().values() if r.component != "orchestrator"})
        body = {"model": "s0", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
        door = latencies(f"http://127.0.0.1:{api}/v1/chat/completions", body, n)
        direct = latencies(f"http://127.0.0.1:{ports[0]}/v1/chat/completions", body, n)
        liveness = liveness_ms(stack) if kind == "ray" else {}
    finally:
        stack.stop()
    return {
        "kind": kind,
        "start_s": round(start_s, 3),
        "nodes": len(nodes),
        "door_p50_ms": round(statistics.median(door), 3),
        "door_p99_ms": round(sorted(door)[int(len(door) * 0.99) - 1], 3),
        "direct_p50_ms": round(statistics.median(direct), 3),
        **liveness,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    common: dict[str, Any] = {"num_cpus": 2, "object_store_memory": OBJECT_STORE, "resources": {"ram_gb": 4}}
    cluster = Cluster(initialize_head=True, head_node_args=common)
    rows: list[dict[str, Any]] = []
    try:
        cluster.add_node(**common)
        cluster.add_node(**common)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        with tempfile.TemporaryDirectory(prefix="raybench-") as tmp:
            folder = Path(tmp)
            model = write_tiny_llama(folder / "tiny.gguf", TinyShape())
            for r in range(args.rounds):
                for kind in ("local", "ray") if r % 2 == 0 else ("ray", "local"):
                    row = one_round(kind, cluster.address, model, folder, args.requests)
                    print(json.dumps(row), file=sys.stderr)
                    rows.append(row)
    finally:
        ray.shutdown()
        cluster.shutdown()
    summary = {}
    for kind in ("local", "ray"):
        mine = [r for r in rows if r["kind"] == kind]
        summary[kind] = {k: statistics.median(r[k] for r in mine) for k in mine[0] if k != "kind"}
    result = {
        "machine": {"cpus": __import__("os").cpu_count(), "python": platform.python_version(), "ray": ray.__version__},
        "servers": SERVERS,
        "requests": args.requests,
        "rounds": rows,
        "median": summary,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ray_placement.json").write_text(json.dumps(result, indent=2) + "\n")
    loc, ray_ = summary["local"], summary["ray"]
    md = [
        "# placement: ray against placement: local",
        "",
        f"`.venv/bin/python bench/ray_placement.py --rounds {args.rounds} --requests {args.requests}`: "
        f"{SERVERS} tiny-model servers + the front door; a Ray `Cluster` of a head and two workers on this "
        f"machine ({result['machine']['cpus']} cores, shared), Ray {ray.__version__}. Medians of {args.rounds} rounds.",
        "",
        "| | local | ray | ray / local |",
        "|---|---|---|---|",
        f"| nodes used | {loc['nodes']:g} | {ray_['nodes']:g} | |",
        f"| start of the stack (s) | {loc['start_s']:.2f} | {ray_['start_s']:.2f} | "
        f"{ray_['start_s'] / loc['start_s']:.2f} |",
        f"| p50 via the front door (ms) | {loc['door_p50_ms']:.2f} | {ray_['door_p50_ms']:.2f} | "
        f"{ray_['door_p50_ms'] / loc['door_p50_ms']:.2f} |",
        f"| p99 via the front door (ms) | {loc['door_p99_ms']:.2f} | {ray_['door_p99_ms']:.2f} | |",
        f"| p50 straight to the server (ms) | {loc['direct_p50_ms']:.2f} | {ray_['direct_p50_ms']:.2f} | |",
        "",
        f"Added p50 of the front door: local {loc['door_p50_ms'] - loc['direct_p50_ms']:.2f} ms, "
        f"ray {ray_['door_p50_ms'] - ray_['direct_p50_ms']:.2f} ms.",
        "",
        f"Liveness of the {SERVERS} Ray-placed servers, one supervisor tick: looked up and asked one by one "
        f"(as the front door did on its event loop) {ray_['liveness_one_by_one_ms']:.2f} ms; "
        f"`alive_many` (all at once, in a worker thread) {ray_['liveness_at_once_ms']:.2f} ms.",
    ]
    (args.out / "ray_placement.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
