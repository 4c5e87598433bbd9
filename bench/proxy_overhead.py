"""What the front door adds over calling llama-server directly, and how llama-server's
own router mode compares, measured in one run on the same binary and model.

    .venv/bin/python bench/proxy_overhead.py [--model PATH | --tiny] [--seconds 8] [--rounds 3] [--out DIR]

For each target (direct llama-server, modelfleet's front door in front of that same
server, llama-server router mode with a one-model preset) it measures:

* p50 / p99 latency of short non-streaming chat completions at concurrency 1,
* time to first token of streamed completions (sequential),
* requests per second at concurrency 1, 8 and 32.

Load comes from ``wrk`` (Debian package ``wrk``) when installed, else from an aiohttp
client. The targets are measured in interleaved rounds and the median round is kept,
because the machine is shared and noisy: compare the ratios, not the absolute numbers.
Before each measurement the llama-servers are let finish what the previous load level
left in flight, so no target pays for another's backlog.
Results go to ``bench/results/proxy_overhead.{json,md}``.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import aiohttp
import httpx

from modelfleet import provision
from modelfleet.config import load_config_file
from modelfleet.launcher import free_ports
from modelfleet.spec import find_llama_server, probe_binary
from modelfleet.stack import Stack
from modelfleet.tinymodel import write_tiny_llama

RESULTS = Path(__file__).parent / "results"
PROMPT = [{"role": "user", "content": "Say hi."}]
MAX_TOKENS = 8
CONCURRENCY = (1, 8, 32)


def body(model: str, stream: bool = False) -> dict[str, Any]:
    return {"model": model, "messages": PROMPT, "max_tokens": MAX_TOKENS, "stream": stream, "temperature": 0}


# --- the three targets ------------------------------------------------------------


@contextmanager
def modelfleet_stack(
    model: Path, parallel: int, threads: int, work: Path, pin_slots: bool = False
) -> Iterator[tuple[str, str]]:
    """llama-server + the front door, as `modelfleet start` runs them. Yields (direct, front door).
    ``pin_slots``: the front door picks each request's slot (and the server runs with similarity 1)."""
    srv, api = free_ports(2)
    cfg_path = work / "stack.yaml"
    cfg_path.write_text(
        textwrap.dedent(
            f"""
            servers:
              bench:
                model: {model}
                port: {srv}
                roles: [bench]
                parallel: {parallel}
                ctx_size: {2048 * parallel}
                threads: {threads}
                pin_slots: {str(pin_slots).lower()}
            api: {{port: {api}, queue_max: 1024}}
            """
        )
    )
    cfg = load_config_file(cfg_path)
    stack = Stack(cfg, work / "state", probe_binary(find_llama_server(cfg)))
    stack.start(stack.select())
    try:
        yield f"http://127.0.0.1:{srv}", f"http://127.0.0.1:{api}"
    finally:
        stack.stop()


@contextmanager
def router_mode(model: Path, parallel: int, threads: int, work: Path) -> Iterator[str]:
    """llama-server's own router mode with a one-model preset (--models-preset)."""
    (port,) = free_ports(1)
    preset = work / "preset.ini"
    preset.write_text(
        f"[bench]\nmodel = {model}\nparallel = {parallel}\nctx-size = {2048 * parallel}\n"
        f"threads = {threads}\nload-on-startup = true\n"
    )
    binary = str(find_llama_server())
    argv = [binary, "--models-preset", str(preset), "--host", "127.0.0.1", "--port", str(port), "--models-max", "1"]
    log = (work / "router.log").open("wb")
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:  # /models/load returns before loading: poll until a request succeeds
            assert proc.poll() is None, f"router mode exited with {proc.returncode}; see {work / 'router.log'}"
            try:
                if httpx.post(url + "/v1/chat/completions", json=body("bench"), timeout=30).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "router mode did not serve within 120 s"
            time.sleep(0.2)
        yield url
    finally:
        os.killpg(proc.pid, 15)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
        log.close()


# --- measurements -------------------------------------------------------------------


def wrk_run(url: str, model: str, concurrency: int, seconds: float, work: Path) -> dict[str, float]:
    script = work / f"post-{model}.lua"
    script.write_text(
        'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
        f"wrk.body = {json.dumps(json.dumps(body(model)))}\n"
        "done = function(summary, latency, requests)\n"
        '  io.write(string.format("RESULT %d %d %d %f %f\\n", summary.requests, summary.errors.status,'
        " summary.duration, latency:percentile(50), latency:percentile(99)))\nend\n"
    )
    threads = min(2, concurrency)
    res = subprocess.run(
        ["wrk", f"-t{threads}", f"-c{concurrency}", f"-d{seconds:g}s", "-s", str(script), url + "/v1/chat/completions"],
        capture_output=True,
        text=True,
        timeout=seconds + 60,
    )
    m = re.search(r"RESULT (\d+) (\d+) (\d+) ([\d.]+) ([\d.]+)", res.stdout)
    assert m, f"wrk failed: {res.stdout}{res.stderr}"
    n, errors, dur_us, p50_us, p99_us = (float(x) for x in m.groups())
    return {"rps": n / (dur_us / 1e6), "p50_ms": p50_us / 1000, "p99_ms": p99_us / 1000, "errors": errors}


async def _aio_run(url: str, model: str, concurrency: int, seconds: float) -> dict[str, float]:
    lat: list[float] = []
    errors = 0
    deadline = time.perf_counter() + seconds
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

        async def worker() -> None:
            nonlocal errors
            while time.perf_counter() < deadline:
                t = time.perf_counter()
                async with session.post(url + "/v1/chat/completions", json=body(model)) as r:
                    await r.read()
                    errors += r.status != 200
                lat.append(time.perf_counter() - t)

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    lat.sort()
    return {
        "rps": len(lat) / elapsed,
        "p50_ms": lat[len(lat) // 2] * 1000,
        "p99_ms": lat[int(len(lat) * 0.99)] * 1000,
        "errors": float(errors),
    }


def load(url: str, model: str, concurrency: int, seconds: float, work: Path) -> dict[str, float]:
    if shutil.which("wrk"):
        return wrk_run(url, model, concurrency, seconds, work)
    return asyncio.run(_aio_run(url, model, concurrency, seconds))


def ttft(url: str, model: str, n: int) -> dict[str, float]:
    """Time to the first content token of streamed completions, one at a time (each read to its end)."""
    times = []
    with httpx.Client(timeout=60) as client:
        for _ in range(n):
            t = time.perf_counter()
            first: float | None = None
            # llama-server closes the connection after a stream while advertising keep-alive: don't reuse it.
            stream = client.stream(
                "POST", url + "/v1/chat/completions", json=body(model, stream=True), headers={"Connection": "close"}
            )
            with stream as r:
                for line in r.iter_lines():
                    if first is None and line.startswith("data: ") and '"content":"' in line:
                        first = time.perf_counter() - t
            assert first is not None, f"{url} streamed no content"
            times.append(first)
    times.sort()
    return {"p50_ms": statistics.median(times) * 1000, "p99_ms": times[int(len(times) * 0.99)] * 1000}


def paired_latency(targets: dict[str, tuple[str, str]], n: int) -> dict[str, dict[str, float]]:
    """Sequential short requests, one to each target in turn, n times over.

    Interleaving cancels the machine's drift; the per-round difference to ``direct``
    isolates what each path adds. Each target keeps one kept-alive connection.
    """
    conns = {name: http.client.HTTPConnection(url.split("//")[1], timeout=60) for name, (url, _) in targets.items()}
    lat: dict[str, list[float]] = {name: [] for name in targets}
    try:
        for _ in range(n):
            for name, (_, model) in targets.items():
                payload = json.dumps({**body(model), "max_tokens": 1}).encode()
                t = time.perf_counter()
                conns[name].request("POST", "/v1/chat/completions", payload, {"Content-Type": "application/json"})
                resp = conns[name].getresponse()
                resp.read()
                lat[name].append(time.perf_counter() - t)
                assert resp.status == 200, f"{name} answered {resp.status}"
    finally:
        for c in conns.values():
            c.close()
    out = {}
    for name, xs in lat.items():
        diffs = sorted(a - b for a, b in zip(xs, lat["direct"], strict=True))
        xs = sorted(xs)
        out[name] = {
            "p50_ms": statistics.median(xs) * 1000,
            "p99_ms": xs[int(len(xs) * 0.99)] * 1000,
            "added_median_ms": statistics.median(diffs) * 1000,
        }
    return out


def settle(slots_urls: list[str], timeout_s: float = 120.0) -> None:
    """Wait until no llama-server slot is busy.

    A load generator that stops leaves requests in flight; llama-server finishes
    non-streamed ones even after their client has gone, and that backlog would
    land on whichever target is measured next on the same server.
    """
    deadline = time.monotonic() + timeout_s
    for url in slots_urls:
        while time.monotonic() < deadline:
            slots = httpx.get(url, timeout=10).json()
            if not isinstance(slots, list):
                raise SystemExit(f"{url} did not list slots: {slots}")
            if not any(s.get("is_processing") for s in slots):
                break
            time.sleep(0.25)


# --- the run ------------------------------------------------------------------------------


def measure(
    targets: dict[str, tuple[str, str]], seconds: float, rounds: int, work: Path, slots_urls: list[str]
) -> dict[str, Any]:
    """Interleaved rounds over every target; the median round of each figure is kept."""
    raw: dict[str, dict[str, list[dict[str, float]]]] = {t: {} for t in targets}
    print("paired short requests", file=sys.stderr, flush=True)
    paired = paired_latency(targets, 100 * rounds)
    for name in targets:
        raw[name]["short"] = [paired[name]]
    for r in range(rounds):
        for name, (url, model) in targets.items():
            print(f"round {r + 1}/{rounds}: {name}", file=sys.stderr, flush=True)
            settle(slots_urls)
            raw[name].setdefault("ttft", []).append(ttft(url, model, 30))
            for c in CONCURRENCY:
                settle(slots_urls)
                raw[name].setdefault(f"c{c}", []).append(load(url, model, c, seconds, work))
    return {name: {k: _median_round(v) for k, v in figures.items()} for name, figures in raw.items()}


def _median_round(samples: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.median(s[k] for s in samples) for k in samples[0]}


def summarize(res: dict[str, Any]) -> dict[str, Any]:
    direct = res["direct"]
    out: dict[str, Any] = {}
    for name in ("frontdoor", "router_mode"):
        t = res[name]
        out[name] = {
            "added_p50_ms_short": t["short"]["p50_ms"] - direct["short"]["p50_ms"],
            "added_median_paired_ms": t["short"]["added_median_ms"],
            "added_p50_ms_c1": t["c1"]["p50_ms"] - direct["c1"]["p50_ms"],
            "added_p99_ms_c1": t["c1"]["p99_ms"] - direct["c1"]["p99_ms"],
            "added_ttft_p50_ms": t["ttft"]["p50_ms"] - direct["ttft"]["p50_ms"],
            **{f"rps_ratio_c{c}": t[f"c{c}"]["rps"] / direct[f"c{c}"]["rps"] for c in CONCURRENCY},
        }
    return out


def render(res: dict[str, Any], summary: dict[str, Any], meta: dict[str, Any]) -> str:
    lines = [
        "# Front door overhead vs direct llama-server and router mode",
        "",
        f"Command: `{meta['command']}`  ",
        f"Date: {meta['date']}; machine: {meta['machine']}; load generator: {meta['loadgen']}; "
        f"model: {meta['model']}; slots: {meta['parallel']}; llama-server threads: {meta['threads']}; "
        f"pin_slots: {str(meta.get('pin_slots', False)).lower()}; "
        f"{meta['seconds']:g} s per load level; median of {meta['rounds']} interleaved rounds.",
        "",
        "Short requests (max_tokens 1) go one at a time to each target in turn, so the per-pair",
        f"difference isolates what a path adds. The load levels use max_tokens {MAX_TOKENS} through the",
        "load generator. The machine is shared and noisy: read the ratios, measured in the same run.",
        "",
        "| target | short p50 ms | short p99 ms | TTFT p50 ms | p50 ms c=1 | rps c=1 | rps c=8 | rps c=32 | errors |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, t in res.items():
        errors = sum(t[f"c{c}"]["errors"] for c in CONCURRENCY)
        lines.append(
            f"| {name} | {t['short']['p50_ms']:.2f} | {t['short']['p99_ms']:.2f} | {t['ttft']['p50_ms']:.2f} | "
            f"{t['c1']['p50_ms']:.2f} | {t['c1']['rps']:.1f} | {t['c8']['rps']:.1f} | {t['c32']['rps']:.1f} | "
            f"{errors:.0f} |"
        )
    lines += ["", "| vs direct | added ms (paired median) | added TTFT ms | rps ratio c=1 | c=8 | c=32 |"]
    lines += ["|---|---|---|---|---|---|"]
    for name, sm in summary.items():
        lines.append(
            f"| {name} | {sm['added_median_paired_ms']:+.2f} | {sm['added_ttft_p50_ms']:+.2f} | "
            f"{sm['rps_ratio_c1']:.3f} | {sm['rps_ratio_c8']:.3f} | {sm['rps_ratio_c32']:.3f} |"
        )
    added = summary["frontdoor"]["added_median_paired_ms"]
    ratio = summary["frontdoor"]["rps_ratio_c32"]
    lines += [
        "",
        f"Targets: p50 added latency under 1 ms: **{'met' if added < 1 else 'NOT met'}** ({added:+.2f} ms); "
        f"at least 95% of direct throughput at c=32: **{'met' if ratio >= 0.95 else 'NOT met'}** ({ratio:.1%}).",
    ]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="GGUF to serve (default: the dev model)")
    parser.add_argument(
        "--tiny", action="store_true", help="serve a generated tiny model: the backend costs ~2 ms, the path shows"
    )
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--parallel", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--pin-slots", action="store_true", help="the server pins slots (pin_slots: true): what pinning adds"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="mf-bench-") as tmp:
        work = Path(tmp)
        model = args.model or (write_tiny_llama(work / "tiny.gguf") if args.tiny else provision.ensure_dev_model())
        with (
            modelfleet_stack(model, args.parallel, args.threads, work, args.pin_slots) as (direct, door),
            router_mode(model, args.parallel, args.threads, work) as router,
        ):
            targets = {"direct": (direct, "bench"), "frontdoor": (door, "bench"), "router_mode": (router, "bench")}
            slots = [direct + "/slots", router + "/slots?model=bench&autoload=false"]
            res = measure(targets, args.seconds, args.rounds, work, slots)
    summary = summarize(res)
    meta = {
        "command": "python bench/proxy_overhead.py " + " ".join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "loadgen": "wrk" if shutil.which("wrk") else "aiohttp",
        "model": model.name,
        "parallel": args.parallel,
        "threads": args.threads,
        "pin_slots": args.pin_slots,
        "seconds": args.seconds,
        "rounds": args.rounds,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "proxy_overhead.json").write_text(
        json.dumps({"meta": meta, "results": res, "summary": summary}, indent=2)
    )
    md = render(res, summary, meta)
    (args.out / "proxy_overhead.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
