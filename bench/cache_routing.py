"""Cache-aware routing against least-busy balancing, and KV restore after a WARM idle stop.

    .venv/bin/python bench/cache_routing.py [--sessions 8] [--turns 4] [--system-tokens 1500]
        [--rounds 2] [--think-s S] [--cache-ram MiB] [--share-min-chars N] [--server-arg ARG ...]
        [--policies lb px] [--pin-slots true|false] [--skip-skew] [--skip-warm] [--out bench/results]
        [--name NAME]

Scenario 1 (agents): K concurrent sessions share one long system prompt; each has its
own growing history (a tool result of about 120 tokens per turn, plus the model's short
answer). One front door serves two pools of 2 SmolLM2 replicas each (2 slots each, one
thread each, ``slot_save`` on), each pool with modelfleet's defaults for its policy:
``lb`` (``routing: least_busy``: llama-server chooses the slot) and ``px`` (``routing:
prefix``, with prefix sharing across replicas, ``--share-min-chars``, 0 turns it off, and
slot pinning, ``--pin-slots false`` turns it off). Rounds alternate lb, px, lb, px...; every round
salts the system prompt, so no round reuses another's cache. Measured per policy: TTFT
p50/p95 of streamed requests, prompt tokens evaluated (each answer's ``timings``, plus
what the front door evaluated to share a prefix) and served from cache, requests per
second, and the tokens evaluated by turn. ``--server-arg`` adds llama-server arguments
to the replicas (``--server-arg=--slot-prompt-similarity --server-arg=0``);
``--policies px`` runs one policy alone.

``--system-tokens`` is an estimate from short rules: 1500 gives about 2,020 SmolLM2 tokens
(the shared seed's count in the results), as every result here was measured with.

Scenario 1b (skew): one hot session sends 6 requests at once while 2 others go on,
on ``px``: how the load split between the replicas.

Scenario 2 (WARM restart): a WARM server with ``slot_save: true`` and one without answer
a long prompt, stop after ``warm_timeout_s``, and are asked the same prompt again: the
first request's TTFT after the restart (process start and restore included).

Results go to ``<out>/cache_routing.{json,md}`` with the command line that made them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from modelfleet.config import load_config_file
from modelfleet.launcher import free_ports
from modelfleet.spec import find_llama_server, probe_binary
from modelfleet.stack import Stack

TOKENS_PER_RULE = 15.5  # SmolLM2's tokenizer on the rule sentences below (measured: 40 rules, 642 tokens)


def system_prompt(tokens: int, salt: str) -> str:
    rules = " ".join(
        f"Rule {i}: before you act on item {i}, check the facts and answer politely."
        for i in range(1, 1 + int(tokens / TOKENS_PER_RULE))
    )
    return f"[{salt}] You are a coding agent working in a large repository. {rules}"


def tool_result(session: int, turn: int, rng: random.Random) -> str:
    words = " ".join(
        rng.choice(["def", "return", "self", "value", "error", "index", "file", "line"]) for _ in range(70)
    )
    return f"Session {session}, step {turn}: the tool printed: {words}. What next?"


def stack_yaml(
    ports: list[int],
    api_port: int,
    state: Path,
    cache_ram: int | None = None,
    share_min_chars: int = 2000,
    extra_args: tuple[str, ...] = (),
    pin_slots: bool | None = None,
) -> str:
    pin = "" if pin_slots is None else f"\n    pin_slots: {str(pin_slots).lower()}"
    server_args = ([] if cache_ram is None else ["--cache-ram", str(cache_ram)]) + list(extra_args)
    lb_a, lb_b, px_a, px_b, w1, w2 = ports

    def replicas(name: str, role: str, a: int, b: int, extra: str = "") -> str:
        return f"""  {name}:
    model: builtin:smollm2-135m-instruct
    ports: [{a}, {b}]
    roles: [{role}]
    parallel: 2
    ctx_size: 16384
    threads: 1
    threads_http: 32
    slot_save: true
    health_timeout_s: 120
    args: {json.dumps(server_args)}{extra}
"""

    return f"""
name: cachebench
state_dir: {state}
servers:
{replicas("replica_lb", "lb", lb_a, lb_b)}{replicas("replica_px", "px", px_a, px_b, pin)}  warm_kv:
    model: builtin:smollm2-135m-instruct
    port: {w1}
    tier: warm
    slot_save: true
    roles: [warm_kv]
    parallel: 1
    ctx_size: 4096
    threads: 1
  warm_plain:
    model: builtin:smollm2-135m-instruct
    port: {w2}
    tier: warm
    roles: [warm_plain]
    parallel: 1
    ctx_size: 4096
    threads: 1
pools: [lb, px]
routing: {{lb: least_busy, px: prefix}}
worker_pool: {{warm_timeout_s: 3, expansion_threshold: 1000}}
api: {{port: {api_port}, queue_max: 256, queue_wait_s: 1200, request_timeout_s: 1800, start_wait_s: 600,
  share_prefix_min_chars: {share_min_chars}}}
monitor: {{interval_s: 0.5}}
hooks: []
"""


async def turn(
    client: httpx.AsyncClient,
    url: str,
    role: str,
    messages: list[dict[str, str]],
    max_tokens: int,
    session: str | None = None,
) -> dict[str, Any]:
    body = {"model": role, "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    headers = {"X-Session-Id": session} if session else {}
    t0 = time.perf_counter()
    ttft = None
    text, timings = [], {}
    async with client.stream("POST", url + "/v1/chat/completions", json=body, headers=headers) as resp:
        resp.raise_for_status()
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            for choice in chunk.get("choices", []):
                piece = (choice.get("delta") or {}).get("content")
                if piece:
                    ttft = ttft if ttft is not None else time.perf_counter() - t0
                    text.append(piece)
            if "timings" in chunk:
                timings = chunk["timings"]
    return {
        "ttft": ttft if ttft is not None else time.perf_counter() - t0,
        "total": time.perf_counter() - t0,
        "prompt_n": int(timings.get("prompt_n", 0)),
        "cache_n": int(timings.get("cache_n", 0)),
        "prompt_ms": float(timings.get("prompt_ms", 0.0)),
        "predicted_ms": float(timings.get("predicted_ms", 0.0)),
        "text": "".join(text),
    }


async def agents_round(url: str, role: str, args: argparse.Namespace, salt: str) -> dict[str, Any]:
    system = system_prompt(args.system_tokens, salt)
    results: list[dict[str, Any]] = []

    async def session(k: int) -> None:
        rng = random.Random(f"{salt}-{k}")
        messages = [{"role": "system", "content": system}]
        async with httpx.AsyncClient(timeout=3600) as client:
            for t in range(args.turns):
                messages.append({"role": "user", "content": tool_result(k, t, rng)})
                r = await turn(client, url, role, messages, args.max_tokens)
                r["session"], r["turn"] = k, t
                results.append(r)
                messages.append({"role": "assistant", "content": r["text"] or "ok"})
                if args.think_s:  # the agent runs its tool before the next turn
                    await asyncio.sleep(rng.uniform(0.5, 1.5) * args.think_s)

    before = await sharing(url)
    t0 = time.perf_counter()
    await asyncio.gather(*(session(k) for k in range(args.sessions)))
    wall = time.perf_counter() - t0
    # Prompt tokens the front door evaluated to share a prefix (share.py) count like the requests' own.
    seeded = (await sharing(url))["tokens"] - before["tokens"]
    return {"role": role, "salt": salt, "wall_s": wall, "requests": results, "seed_tokens": seeded}


async def sharing(url: str) -> dict[str, int]:
    async with httpx.AsyncClient(timeout=30) as c:
        found: dict[str, int] = (await c.get(url + "/admin/status")).json()["sharing"]
    return found


async def skew_round(url: str, args: argparse.Namespace, status: Any) -> dict[str, Any]:
    """One hot session: 6 requests of it at once, while two other sessions go on."""
    system = system_prompt(args.system_tokens, "skew")
    before = await status()
    peak: dict[str, int] = {}
    done = asyncio.Event()

    async def sample() -> None:
        while not done.is_set():
            for name, inst in (await status()).items():
                peak[name] = max(peak.get(name, 0), inst["in_flight"])
            await asyncio.sleep(0.2)

    async def hot(i: int) -> None:
        msgs = [{"role": "system", "content": system}, {"role": "user", "content": f"hot question {i}"}]
        async with httpx.AsyncClient(timeout=3600) as c:
            await turn(c, url, "px", msgs, args.max_tokens, session="hot")

    async def other(k: int) -> None:
        rng = random.Random(k)
        msgs = [{"role": "system", "content": system}]
        async with httpx.AsyncClient(timeout=3600) as c:
            for t in range(2):
                msgs.append({"role": "user", "content": tool_result(k, t, rng)})
                r = await turn(c, url, "px", msgs, args.max_tokens, session=f"other-{k}")
                msgs.append({"role": "assistant", "content": r["text"] or "ok"})

    sampler = asyncio.create_task(sample())
    await asyncio.gather(*(hot(i) for i in range(6)), other(1), other(2))
    done.set()
    await sampler
    after = await status()
    served = {n: after[n]["served"] - before[n]["served"] for n in after if n.startswith("replica_px")}
    return {"served": served, "peak_in_flight": {n: v for n, v in peak.items() if n.startswith("replica_px")}}


async def warm_restart(url: str, role: str, args: argparse.Namespace, status: Any) -> dict[str, Any]:
    msgs = [
        {"role": "system", "content": system_prompt(args.system_tokens, f"warm-{role}")},
        {"role": "user", "content": "Summarise the rules."},
    ]
    async with httpx.AsyncClient(timeout=3600) as c:
        first = await turn(c, url, role, msgs, args.max_tokens)  # starts it on demand
        deadline = time.monotonic() + 600
        while (await status())[role]["state"] != "stopped":
            assert time.monotonic() < deadline, f"{role} never stopped for idleness"
            await asyncio.sleep(0.2)
        again = await turn(c, url, role, msgs, args.max_tokens)
    return {"cold": first, "after_restart": again}


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


def summarise(rounds: list[dict[str, Any]], role: str) -> dict[str, Any]:
    reqs = [r for rd in rounds if rd["role"] == role for r in rd["requests"]]
    wall = sum(rd["wall_s"] for rd in rounds if rd["role"] == role)
    ttft = [r["ttft"] for r in reqs]
    seeded = sum(rd.get("seed_tokens", 0) for rd in rounds if rd["role"] == role)
    return {
        "requests": len(reqs),
        "ttft_p50_s": round(statistics.median(ttft), 3),
        "ttft_p95_s": round(pct(ttft, 0.95), 3),
        "prompt_tokens_evaluated": sum(r["prompt_n"] for r in reqs) + seeded,
        "of_which_shared_prefix": seeded,
        "prompt_tokens_cached": sum(r["cache_n"] for r in reqs),
        "requests_per_s": round(len(reqs) / wall, 4),
        "wall_s": round(wall, 1),
    }


def agents_summary(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    lb, px = summarise(rounds, "lb"), summarise(rounds, "px")
    ratios = {
        "ttft_p50_least_busy_over_prefix": round(lb["ttft_p50_s"] / px["ttft_p50_s"], 2),
        "ttft_p95_least_busy_over_prefix": round(lb["ttft_p95_s"] / px["ttft_p95_s"], 2),
        "prompt_evaluated_least_busy_over_prefix": round(
            lb["prompt_tokens_evaluated"] / max(1, px["prompt_tokens_evaluated"]), 2
        ),
        "throughput_prefix_over_least_busy": round(px["requests_per_s"] / lb["requests_per_s"], 2),
    }
    return {"least_busy": lb, "prefix": px, "ratios": ratios}


async def run(args: argparse.Namespace, url: str) -> dict[str, Any]:
    async def status() -> dict[str, Any]:
        async with httpx.AsyncClient(timeout=30) as c:
            data = (await c.get(url + "/admin/status")).json()
        return {i["name"]: i for i in data["instances"]}

    rounds = []
    for i, role in enumerate([p for p in ("lb", "px") if p in args.policies] * args.rounds):
        rd = await agents_round(url, role, args, salt=f"round-{i}")
        print(f"round {i} {role}: {summarise([rd], role)}", file=sys.stderr, flush=True)
        detail = sorted((r["session"], r["turn"], r["prompt_n"], r["cache_n"]) for r in rd["requests"])
        print(f"  (session, turn, prompt_n, cache_n): {detail}", file=sys.stderr, flush=True)
        rounds.append(rd)
    out: dict[str, Any] = {}
    # Prompt tokens evaluated by turn, per policy: where the policies differ.
    out["evaluated_by_turn"] = {
        role: [
            sum(r["prompt_n"] for rd in rounds if rd["role"] == role for r in rd["requests"] if r["turn"] == t)
            for t in range(args.turns)
        ]
        for role in args.policies
    }
    # Median TTFT by turn, and the median time the server spent on the prompt and on the answer:
    # what is queueing (or waiting for a shared prefix) and what is work.
    out["by_turn_ttft_prompt_ms_predicted_ms"] = {
        role: [
            [
                round(
                    statistics.median(
                        r[k] for rd in rounds if rd["role"] == role for r in rd["requests"] if r["turn"] == t
                    ),
                    3,
                )
                for k in ("ttft", "prompt_ms", "predicted_ms")
            ]
            for t in range(args.turns)
        ]
        for role in args.policies
    }
    print(f"by turn (ttft s, prompt ms, predicted ms): {out['by_turn_ttft_prompt_ms_predicted_ms']}", file=sys.stderr)
    if rounds and len(args.policies) == 2:
        out.update(agents_summary(rounds))
        print(f"ratios: {out['ratios']}", file=sys.stderr, flush=True)
    if not args.skip_skew:
        out["skew"] = await skew_round(url, args, status)
        print(f"skew: {out['skew']}", file=sys.stderr, flush=True)
    if not args.skip_warm:
        out["warm_restart"] = {
            "with_kv_restore": await warm_restart(url, "warm_kv", args, status),
            "without": await warm_restart(url, "warm_plain", args, status),
        }
        for v in out["warm_restart"].values():
            for r in v.values():
                r.pop("text", None)
        print(f"warm: {out['warm_restart']}", file=sys.stderr, flush=True)
    st = await status()
    out["front_door_status"] = {n: {k: st[n][k] for k in ("served", "prompt_evaluated", "prompt_cached")} for n in st}
    return out


def agents_markdown(res: dict[str, Any]) -> list[str]:
    lines = [
        "| policy | requests | TTFT p50 (s) | TTFT p95 (s) | prompt tokens evaluated (shared prefix) "
        "| served from cache | req/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in ("least_busy", "prefix"):
        s = res[name]
        lines.append(
            f"| {name} | {s['requests']} | {s['ttft_p50_s']} | {s['ttft_p95_s']} | {s['prompt_tokens_evaluated']} "
            f"({s.get('of_which_shared_prefix', 0)}) | {s['prompt_tokens_cached']} | {s['requests_per_s']} |"
        )
    lines += ["", "Ratios (same run, rounds interleaved):", ""]
    return lines + [f"- {k}: **{v}**" for k, v in res["ratios"].items()]


def markdown(res: dict[str, Any], command: str) -> str:
    lines = [
        "# Cache-aware routing: least_busy vs prefix",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {res['machine']}. Config: {res['config']}.",
    ]
    if "ratios" in res:
        lines += ["", *agents_markdown(res)]
    if res.get("evaluated_by_turn"):
        by_turn = "; ".join(f"{role}: {counts}" for role, counts in res["evaluated_by_turn"].items())
        lines += ["", f"Prompt tokens evaluated by turn (turn 0 first, all rounds): {by_turn}."]
    if res.get("by_turn_ttft_prompt_ms_predicted_ms"):
        lines += ["", "Median by turn, [TTFT s, prompt ms, answer ms] (turn 0 first):", ""]
        lines += [f"- {role}: {v}" for role, v in res["by_turn_ttft_prompt_ms_predicted_ms"].items()]
    if "skew" in res:
        lines += [
            "",
            f"Skew (one hot session, 6 at once, plus 2 sessions; prefix): served {res['skew']['served']}, "
            f"peak in flight {res['skew']['peak_in_flight']} (2 slots each).",
        ]
    if "warm_restart" in res:
        w = res["warm_restart"]
        lines += [
            "",
            "WARM idle stop and restart, first request after the restart (process start included):",
            "",
            "| server | cold TTFT (s) | TTFT after restart (s) | cache_n after restart | prompt_n after restart |",
            "|---|---|---|---|---|",
        ]
        for name, v in w.items():
            a = v["after_restart"]
            lines.append(f"| {name} | {v['cold']['ttft']:.3f} | {a['ttft']:.3f} | {a['cache_n']} | {a['prompt_n']} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sessions", type=int, default=8)
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--system-tokens", type=int, default=1500)
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--rounds", type=int, default=2, help="rounds of each policy, interleaved")
    p.add_argument("--think-s", type=float, default=0.0, help="mean pause between a session's turns (tool time)")
    p.add_argument("--policies", nargs="+", choices=("lb", "px"), default=["lb", "px"], help="only these")
    p.add_argument("--skip-skew", action="store_true")
    p.add_argument("--skip-warm", action="store_true")
    p.add_argument("--cache-ram", type=int, help="the replicas' --cache-ram MiB (llama-server's prompt cache; 0: off)")
    p.add_argument(
        "--share-min-chars",
        type=int,
        default=2000,
        help="api.share_prefix_min_chars: a system prompt this long is evaluated once per pool (0: off)",
    )
    p.add_argument(
        "--server-arg", action="append", default=[], help="one more llama-server argument for the replicas (repeat)"
    )
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    p.add_argument("--name", default="cache_routing", help="results file name, without .md/.json")
    p.add_argument(
        "--pin-slots",
        choices=("true", "false"),
        help="pin_slots of the prefix pool's replicas (default: modelfleet's, on in a prefix pool)",
    )
    args = p.parse_args()
    args.pin_slots = None if args.pin_slots is None else args.pin_slots == "true"
    command = "python bench/cache_routing.py " + shlex.join(sys.argv[1:])
    with tempfile.TemporaryDirectory(prefix="cachebench-") as tmp:
        ports = free_ports(7)
        path = Path(tmp) / "stack.yaml"
        path.write_text(
            stack_yaml(
                ports[:6],
                ports[6],
                Path(tmp) / "state",
                args.cache_ram,
                args.share_min_chars,
                tuple(args.server_arg),
                args.pin_slots,
            )
        )
        cfg = load_config_file(path)
        stack = Stack(cfg, Path(tmp) / "state", probe_binary(find_llama_server(cfg)), say=lambda m: None)
        try:
            stack.start(stack.select())
            res = asyncio.run(run(args, f"http://127.0.0.1:{ports[6]}"))
        finally:
            stack.stop()
    res["machine"] = f"{platform.machine()}, {os.cpu_count()} cores, load avg {os.getloadavg()[0]:.1f} at the end"
    res["config"] = (
        f"{args.sessions} sessions x {args.turns} turns, system prompt ~{args.system_tokens} tokens, "
        f"~120-token tool result per turn, think time {args.think_s:g} s, max_tokens {args.max_tokens}, "
        f"{args.rounds} rounds per policy; "
        "2 SmolLM2-135M replicas per policy, 2 slots and 1 thread each"
        + ("" if args.cache_ram is None else f", --cache-ram {args.cache_ram}")
        + (f", args {' '.join(args.server_arg)}" if args.server_arg else "")
        + f", slot_save on, api.share_prefix_min_chars {args.share_min_chars}"
        + ("" if args.pin_slots is None else f", prefix replicas pin_slots {str(args.pin_slots).lower()}")
    )
    res["command"] = command
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(res, indent=2) + "\n")
    (args.out / f"{args.name}.md").write_text(markdown(res, command))
    print(markdown(res, command))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
