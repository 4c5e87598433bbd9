"""The concurrency sweep: measure one server at several slot counts and pick its ``parallel``.

For each level the server's instance is (re)started through :class:`~modelfleet.stack.Stack`
with that many slots and a context of ``per-slot context x slots`` (so every slot keeps the
context it has in the config), then warm-up batches and measured batches of that many
concurrent streamed chat requests are sent. Every request row and every level's summary row
is appended to a CSV and flushed as it completes, so an interrupted sweep keeps what it
measured. Afterwards the stack is left as it was found.

The parts are separate so each can be tested alone:

* measurement: :func:`measure_level` (asyncio + httpx, SSE streaming, llama-server's timings);
* statistics: :func:`level_stats`, :func:`compare` (pure, on recorded requests);
* the decision rule: :func:`decide` (the seed's: the largest level whose p95 latency stays
  under 1.5x parallel 1's and whose aggregate throughput gains at least 10%);
* the CSV: :class:`CsvLog`, :func:`read_csv`, :func:`stats_from_csv`;
* orchestration: :class:`Sweep`; reports: :func:`table_rows`, :func:`render_markdown`;
* write-back: :func:`edit_parallel`, :func:`apply_parallel`; the plot: :func:`write_plot`.
"""

from __future__ import annotations

import asyncio
import csv
import json
import math
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any, NamedTuple

import httpx

from modelfleet.config import ServerConfig, StackConfig, load_config
from modelfleet.errors import ConfigError, StartupError, UsageError, gist
from modelfleet.stack import Stack

DEFAULT_LEVELS = (1, 2, 4)
DEFAULT_CTX_PER_SLOT = 4096  # when the config leaves ctx_size to llama-server
MAX_LEVEL = 256  # the config's limit on `parallel`
CONNECT_TIMEOUT_S = 10.0
WARMUP, MEASURED = "warmup", "measured"

DEFAULT_PROMPTS = (
    "Explain step by step how a hash map handles collisions, then compare chaining with open addressing.",
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "List the main causes of the French Revolution and describe each one in two sentences.",
    "Describe how to bake sourdough bread, from feeding the starter to taking the loaf out of the oven.",
)

Say = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


# --- the plan ------------------------------------------------------------------


@dataclass(frozen=True)
class SweepPlan:
    """What to measure: which server, which slot counts, how many batches of how many tokens."""

    server: str
    levels: tuple[int, ...] = DEFAULT_LEVELS
    warmup_batches: int = 2
    batches: int = 5
    max_tokens: int = 128
    prompts: tuple[str, ...] = DEFAULT_PROMPTS
    ctx_per_slot: int | None = None  # None: the config's ctx_size / parallel
    request_timeout_s: float = 300.0

    def __post_init__(self) -> None:
        if not self.levels or any(not 1 <= p <= MAX_LEVEL for p in self.levels):
            raise UsageError(f"slot counts must be from 1 to {MAX_LEVEL}; got {list(self.levels)}")
        if self.warmup_batches < 0 or self.batches < 1:
            raise UsageError("give at least one measured batch and zero or more warm-up batches")
        if self.max_tokens < 1 or not self.prompts:
            raise UsageError("give max_tokens of at least 1 and at least one prompt")

    def prompt(self, n: int) -> str:
        return self.prompts[n % len(self.prompts)]


# ASCII digits only: str.isdigit() also takes '²' and '١', which int() then refuses.
_LEVEL = re.compile(r"[0-9]{1,6}")


def parse_levels(text: str) -> tuple[int, ...]:
    """``"1,2,4"`` -> ``(1, 2, 4)``: sorted, without repeats; only ASCII positive integers."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        raise UsageError("--parallel: give at least one slot count, like 1,2,4")
    for p in parts:
        if not _LEVEL.fullmatch(p) or not 1 <= int(p) <= MAX_LEVEL:
            shown = p if len(p) <= 40 else p[:40] + "..."
            raise UsageError(
                f"--parallel: {shown!r} is not a slot count (an ASCII whole number from 1 to {MAX_LEVEL}); "
                "give a list like 1,2,4"
            )
    return tuple(sorted({int(p) for p in parts}))


def read_prompts(path: Path) -> tuple[str, ...]:
    """The prompts of a file: one per paragraph (prompts are separated by blank lines)."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise UsageError(f"--prompt-file {path}: cannot read it ({exc.strerror or exc})") from exc
    prompts = tuple(p.strip() for p in re.split(r"\n\s*\n", text) if p.strip())
    if not prompts:
        raise UsageError(f"--prompt-file {path} holds no prompt; write one prompt per paragraph")
    return prompts


def server_config(cfg: StackConfig, name: str) -> ServerConfig:
    """The server to sweep, or a UsageError saying why it can't be swept."""
    if name in cfg.services:
        raise UsageError(f"'{name}' is a service, not a llama-server server; only servers have slots to sweep")
    if name not in cfg.servers:
        raise UsageError(f"'{name}' is not a server of this stack; known servers: {', '.join(cfg.servers) or '(none)'}")
    srv = cfg.servers[name]
    if srv.embeddings is not None:
        raise UsageError(f"servers.{name} is an embeddings server; the sweep measures chat completions")
    return srv


def ctx_per_slot(srv: ServerConfig, override: int | None = None) -> int:
    """The context each slot gets in the config; every level keeps it."""
    if override is not None:
        return override
    if srv.ctx_size:
        return max(1, srv.ctx_size // srv.parallel)
    return DEFAULT_CTX_PER_SLOT


def default_csv_path(server: str, now: datetime | None = None) -> Path:
    return Path(f"sweep-{server}-{(now or datetime.now()):%Y%m%d-%H%M%S}.csv")


# --- measurement ---------------------------------------------------------------


class Tag(NamedTuple):
    """Where a request belongs: level, phase, batch, position in the batch."""

    parallel: int
    phase: str
    batch: int
    position: int


@dataclass(frozen=True)
class RequestResult:
    """One streamed request: client-side times, token counts from llama-server's ``timings``."""

    parallel: int
    phase: str
    batch: int
    index: int
    latency_s: float
    ttft_s: float | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    generated_tokens: int = 0
    prompt_ms: float = 0.0
    predicted_ms: float = 0.0
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error


@dataclass(frozen=True)
class BatchResult:
    """``parallel`` requests sent together; ``wall_s`` runs from the first send to the last byte."""

    parallel: int
    phase: str
    batch: int
    wall_s: float
    requests: tuple[RequestResult, ...]


def request_body(plan: SweepPlan, prompt: str) -> dict[str, Any]:
    return {
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": plan.max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},  # llama-server sends `timings` with the usage chunk
        # Every request generates exactly max_tokens and processes its whole prompt, so levels
        # compare like for like (a cached prompt would make later batches look faster).
        "ignore_eos": True,
        "cache_prompt": False,
    }


async def measure_level(
    base_url: str, plan: SweepPlan, parallel: int, on_batch: Callable[[BatchResult], None]
) -> list[BatchResult]:
    """Warm-up then measured batches of ``parallel`` concurrent requests, one batch after another."""
    url = base_url + "/v1/chat/completions"
    # llama-server closes the connection after a stream even though it advertised keep-alive,
    # so a pooled connection would fail on reuse: never keep one.
    limits = httpx.Limits(max_connections=parallel + 4, max_keepalive_connections=0)
    timeout = httpx.Timeout(plan.request_timeout_s, connect=CONNECT_TIMEOUT_S)
    done: list[BatchResult] = []
    async with httpx.AsyncClient(limits=limits, timeout=timeout, trust_env=False) as client:
        for phase, count in ((WARMUP, plan.warmup_batches), (MEASURED, plan.batches)):
            for b in range(count):
                batch = await _run_batch(client, url, plan, Tag(parallel, phase, b, len(done) * parallel))
                on_batch(batch)
                done.append(batch)
    return done


async def _run_batch(client: httpx.AsyncClient, url: str, plan: SweepPlan, tag: Tag) -> BatchResult:
    """``tag.position`` is the number of the batch's first prompt."""
    start = time.perf_counter()
    sends = [
        _one_request(client, url, request_body(plan, plan.prompt(tag.position + i)), tag._replace(position=i))
        for i in range(tag.parallel)
    ]
    results = await asyncio.gather(*sends)
    return BatchResult(tag.parallel, tag.phase, tag.batch, time.perf_counter() - start, tuple(results))


async def _one_request(client: httpx.AsyncClient, url: str, body: dict[str, Any], tag: Tag) -> RequestResult:
    start = time.perf_counter()
    ttft_s: float | None = None
    final: dict[str, Any] = {}
    try:
        async with client.stream("POST", url, json=body) as resp:
            if resp.status_code != 200:
                detail = (await resp.aread()).decode(errors="replace").strip()[:200]
                return RequestResult(
                    *tag, latency_s=time.perf_counter() - start, error=f"HTTP {resp.status_code}: {detail}"
                )
            async for line in resp.aiter_lines():
                chunk = _sse_json(line)
                if chunk is None:
                    continue
                if ttft_s is None and _has_token(chunk):
                    ttft_s = time.perf_counter() - start
                if "timings" in chunk:
                    final = chunk
    except httpx.HTTPError as exc:
        return RequestResult(*tag, latency_s=time.perf_counter() - start, error=f"{type(exc).__name__}: {exc}")
    return _from_timings(tag, time.perf_counter() - start, ttft_s, final)


def _sse_json(line: str) -> dict[str, Any] | None:
    if not line.startswith("data:"):
        return None
    payload = line[5:].strip()
    if not payload or payload == "[DONE]":
        return None
    try:
        data = json.loads(payload)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def _has_token(chunk: dict[str, Any]) -> bool:
    for choice in chunk.get("choices") or []:
        delta = choice.get("delta") or {}
        if delta.get("content") or delta.get("reasoning_content"):
            return True
    return False


def _from_timings(tag: Tag, latency_s: float, ttft_s: float | None, final: dict[str, Any]) -> RequestResult:
    t = final.get("timings")
    if not isinstance(t, dict):
        return RequestResult(
            *tag, latency_s=latency_s, ttft_s=ttft_s, error="the stream ended without llama-server's timings"
        )
    return RequestResult(
        *tag,
        latency_s=latency_s,
        ttft_s=ttft_s,
        prompt_tokens=int(t.get("prompt_n", 0)),
        cached_tokens=int(t.get("cache_n", 0)),
        generated_tokens=int(t.get("predicted_n", 0)),
        prompt_ms=float(t.get("prompt_ms", 0.0)),
        predicted_ms=float(t.get("predicted_ms", 0.0)),
    )


# --- statistics ----------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile with linear interpolation (numpy's default); 0.0 for no values."""
    if not values:
        return 0.0
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


@dataclass(frozen=True)
class LevelStats:
    """One level's numbers. ``p95_multiplier`` and ``tps_gain`` are against the baseline level."""

    parallel: int
    requests: int = 0
    errors: int = 0
    generated_tokens: int = 0
    wall_s: float = 0.0
    aggregate_tps: float = 0.0  # generated tokens of all measured batches / their wall time
    per_request_tps: float = 0.0  # mean over requests of generated tokens / latency
    p50_latency_s: float = 0.0
    p95_latency_s: float = 0.0
    p50_ttft_s: float = 0.0
    p95_multiplier: float | None = None
    tps_gain: float | None = None  # 1.21 = +121%
    failure: str = ""  # the level could not be measured at all (the server did not start)
    first_error: str = ""

    @property
    def measurable(self) -> bool:
        """Every measured request succeeded, and there were some."""
        return not self.failure and self.errors == 0 and self.requests > 0 and self.wall_s > 0


def level_stats(parallel: int, batches: Sequence[BatchResult]) -> LevelStats:
    """Statistics of the measured batches of one level (warm-up batches are ignored)."""
    measured = [b for b in batches if b.phase == MEASURED]
    reqs = [r for b in measured for r in b.requests]
    ok = [r for r in reqs if r.ok]
    wall_s = sum(b.wall_s for b in measured)
    tokens = sum(r.generated_tokens for r in ok)
    rates = [r.generated_tokens / r.latency_s for r in ok if r.latency_s > 0]
    latencies = [r.latency_s for r in ok]
    ttfts = [r.ttft_s for r in ok if r.ttft_s is not None]
    return LevelStats(
        parallel=parallel,
        requests=len(reqs),
        errors=len(reqs) - len(ok),
        generated_tokens=tokens,
        wall_s=wall_s,
        aggregate_tps=tokens / wall_s if wall_s > 0 else 0.0,
        per_request_tps=sum(rates) / len(rates) if rates else 0.0,
        p50_latency_s=percentile(latencies, 50),
        p95_latency_s=percentile(latencies, 95),
        p50_ttft_s=percentile(ttfts, 50),
        first_error=next((r.error for r in reqs if not r.ok), ""),
    )


def failed_level(parallel: int, why: str) -> LevelStats:
    return LevelStats(parallel=parallel, failure=why)


def baseline(levels: Sequence[LevelStats]) -> LevelStats | None:
    """The lowest measurable level (parallel 1 in a normal sweep)."""
    ok = [lv for lv in levels if lv.measurable]
    return min(ok, key=lambda lv: lv.parallel) if ok else None


def compare(levels: Sequence[LevelStats]) -> list[LevelStats]:
    """Levels in ascending order, with p95 multiplier and TPS gain against the baseline."""
    ordered = sorted(levels, key=lambda lv: lv.parallel)
    base = baseline(ordered)
    if base is None or base.p95_latency_s <= 0 or base.aggregate_tps <= 0:
        return [replace(lv, p95_multiplier=None, tps_gain=None) for lv in ordered]
    return [
        replace(
            lv,
            p95_multiplier=lv.p95_latency_s / base.p95_latency_s if lv.measurable else None,
            tps_gain=lv.aggregate_tps / base.aggregate_tps - 1.0 if lv.measurable else None,
        )
        for lv in ordered
    ]


# --- the decision --------------------------------------------------------------


@dataclass(frozen=True)
class DecisionRule:
    """A level is worth it when its p95 multiplier stays under the limit and it gains enough TPS."""

    max_p95_multiplier: float = 1.5
    min_tps_gain: float = 0.10

    def __post_init__(self) -> None:
        if self.max_p95_multiplier <= 1.0:
            raise UsageError(f"the p95 multiplier limit must be above 1.0; got {self.max_p95_multiplier:g}")


BASELINE, ACCEPTED = "baseline", "accepted"


@dataclass(frozen=True)
class Decision:
    """The recommended ``parallel`` (None when nothing could be measured) and why."""

    parallel: int | None
    baseline: int | None
    reason: str
    verdicts: dict[int, str] = field(default_factory=dict)

    @property
    def summary(self) -> str:
        if self.parallel is None:
            return f"no recommendation: {self.reason}"
        if self.parallel == self.baseline:
            return f"keep parallel {self.parallel}: {self.reason}"
        return f"parallel {self.parallel}: {self.reason}"


def decide(levels: Sequence[LevelStats], rule: DecisionRule = DecisionRule()) -> Decision:
    """The largest level whose p95 multiplier is under the limit and whose TPS gain is enough."""
    ordered = compare(levels)
    base = baseline(ordered)
    verdicts = {lv.parallel: _verdict(lv, base, rule) for lv in ordered}
    if base is None:
        why = "; ".join(f"c={p}: {v}" for p, v in verdicts.items()) or "no level was run"
        return Decision(None, None, why, verdicts)
    accepted = [lv for lv in ordered if verdicts[lv.parallel] == ACCEPTED]
    chosen = accepted[-1] if accepted else base
    rejected_above = [f"c={p} rejected: {v}" for p, v in verdicts.items() if p > chosen.parallel]
    if chosen is base:
        reason = "; ".join(rejected_above) or "no other level was measured"
    else:
        reason = f"{_pct(chosen.tps_gain)} aggregate TPS, p95 multiplier {_mult(chosen.p95_multiplier, rule)}"
        reason = "; ".join([reason, *rejected_above])
    return Decision(chosen.parallel, base.parallel, reason, verdicts)


def _verdict(lv: LevelStats, base: LevelStats | None, rule: DecisionRule) -> str:
    if lv.failure:
        return f"failed: {lv.failure}"
    if lv.errors or not lv.requests:
        return f"{lv.errors} of {lv.requests} requests failed ({lv.first_error})"
    if base is None or lv.parallel == base.parallel:
        return BASELINE
    if lv.p95_multiplier is None or lv.tps_gain is None:
        return "not compared"
    if lv.p95_multiplier >= rule.max_p95_multiplier:
        return f"p95 multiplier {_mult(lv.p95_multiplier, rule)} ≥ {rule.max_p95_multiplier:g}"
    if lv.tps_gain < rule.min_tps_gain:
        return f"aggregate TPS {_pct(lv.tps_gain)} < {_pct(rule.min_tps_gain)}"
    return ACCEPTED


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x * 100:+.0f}%"


def _mult(x: float | None, rule: DecisionRule | None = None) -> str:
    """Two decimals, three when two would hide which side of the limit it is on (1.505 vs 1.5)."""
    if x is None:
        return "-"
    near = rule is not None and abs(x - rule.max_p95_multiplier) < 0.01
    return f"{x:.3f}" if near else f"{x:.2f}"


# --- the CSV -------------------------------------------------------------------

CSV_COLUMNS = (
    *("run", "time", "kind", "server", "parallel", "ctx_per_slot", "phase", "batch", "request", "error"),
    *("latency_s", "ttft_s", "prompt_tokens", "cached_tokens", "generated_tokens", "prompt_ms", "predicted_ms"),
    *("batch_wall_s", "requests", "errors", "aggregate_tps", "per_request_tps", "p50_latency_s", "p95_latency_s"),
    *("p50_ttft_s", "p95_multiplier", "tps_gain"),
)


def _num(x: float | None) -> str:
    return "" if x is None else f"{x:.6f}"


class CsvLog:
    """Appends rows to the sweep's CSV; each row is flushed to disk as it is written."""

    def __init__(self, path: Path, run: str, server: str, ctx_per_slot: int) -> None:
        self.path, self.run, self.server, self.ctx_per_slot = path, run, server, ctx_per_slot
        fresh = not path.exists() or path.stat().st_size == 0
        if not fresh:
            self._check_header(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = path.open("a", newline="")
        except OSError as exc:
            raise UsageError(f"cannot write the CSV {path}: {exc.strerror or exc}; choose another --csv") from exc
        self._writer = csv.DictWriter(self._file, CSV_COLUMNS)
        if fresh:
            self._writer.writeheader()
            self._sync()

    @staticmethod
    def _check_header(path: Path) -> None:
        with path.open(newline="") as f:
            header = next(csv.reader(f), [])
        if tuple(header) != CSV_COLUMNS:
            raise UsageError(f"{path} is not a sweep CSV of this version (other columns); choose another --csv")

    def _sync(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())

    def _row(self, kind: str, parallel: int, **values: str | int) -> None:
        base = {"run": self.run, "time": datetime.now().isoformat(timespec="milliseconds"), "kind": kind}
        self._writer.writerow(
            {**base, "server": self.server, "parallel": parallel, "ctx_per_slot": self.ctx_per_slot, **values}
        )
        self._sync()

    def batch(self, batch: BatchResult) -> None:
        for r in batch.requests:
            self._row(
                "request",
                r.parallel,
                phase=r.phase,
                batch=r.batch,
                request=r.index,
                error=r.error,
                latency_s=_num(r.latency_s),
                ttft_s=_num(r.ttft_s),
                prompt_tokens=r.prompt_tokens,
                cached_tokens=r.cached_tokens,
                generated_tokens=r.generated_tokens,
                prompt_ms=_num(r.prompt_ms),
                predicted_ms=_num(r.predicted_ms),
                batch_wall_s=_num(batch.wall_s),
            )

    def summary(self, lv: LevelStats) -> None:
        self._row(
            "summary",
            lv.parallel,
            phase=MEASURED,
            error=lv.failure or lv.first_error,
            requests=lv.requests,
            errors=lv.errors,
            generated_tokens=lv.generated_tokens,
            batch_wall_s=_num(lv.wall_s),
            aggregate_tps=_num(lv.aggregate_tps),
            per_request_tps=_num(lv.per_request_tps),
            p50_latency_s=_num(lv.p50_latency_s),
            p95_latency_s=_num(lv.p95_latency_s),
            p50_ttft_s=_num(lv.p50_ttft_s),
            p95_multiplier=_num(lv.p95_multiplier),
            tps_gain=_num(lv.tps_gain),
        )

    def close(self) -> None:
        self._file.close()


def read_csv(path: Path, run: str | None = None) -> tuple[list[BatchResult], list[dict[str, str]]]:
    """The request batches and summary rows of one run of a sweep CSV (the last run by default)."""
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    run = run if run is not None else (rows[-1]["run"] if rows else "")
    rows = [r for r in rows if r["run"] == run]
    groups: dict[tuple[int, str, int], list[dict[str, str]]] = {}
    for r in rows:
        if r["kind"] == "request":
            groups.setdefault((int(r["parallel"]), r["phase"], int(r["batch"])), []).append(r)
    batches = [
        BatchResult(p, phase, b, float(rs[0]["batch_wall_s"]), tuple(_request_from_row(r) for r in rs))
        for (p, phase, b), rs in groups.items()
    ]
    return batches, [r for r in rows if r["kind"] == "summary"]


def _request_from_row(r: dict[str, str]) -> RequestResult:
    return RequestResult(
        parallel=int(r["parallel"]),
        phase=r["phase"],
        batch=int(r["batch"]),
        index=int(r["request"]),
        latency_s=float(r["latency_s"]),
        ttft_s=float(r["ttft_s"]) if r["ttft_s"] else None,
        prompt_tokens=int(r["prompt_tokens"]),
        cached_tokens=int(r["cached_tokens"]),
        generated_tokens=int(r["generated_tokens"]),
        prompt_ms=float(r["prompt_ms"]),
        predicted_ms=float(r["predicted_ms"]),
        error=r["error"],
    )


def stats_from_csv(path: Path, run: str | None = None) -> list[LevelStats]:
    """Recompute every level's statistics from the request rows of a sweep CSV."""
    batches, _ = read_csv(path, run)
    levels = sorted({b.parallel for b in batches})
    return compare([level_stats(p, [b for b in batches if b.parallel == p]) for p in levels])


# --- the sweep -----------------------------------------------------------------


@dataclass
class SweepResult:
    """What a sweep measured, what it recommends and what it did to the stack afterwards."""

    server: str
    port: int
    configured_parallel: int
    configured_ctx_size: int | None
    ctx_per_slot: int
    levels: list[LevelStats]
    decision: Decision
    run: str
    interrupted: bool = False
    restored: str = ""
    csv_path: Path | None = None
    load_before: tuple[float, float, float] = (0.0, 0.0, 0.0)
    load_after: tuple[float, float, float] = (0.0, 0.0, 0.0)

    def ctx_size_for(self, parallel: int) -> int | None:
        """The ctx_size that keeps the per-slot context at ``parallel`` (None if the file sets none)."""
        return self.ctx_per_slot * parallel if self.configured_ctx_size else None


class Sweep:
    """Runs a :class:`SweepPlan` against one server of a stack, then leaves the stack as it found it."""

    def __init__(
        self,
        stack: Stack,
        plan: SweepPlan,
        rule: DecisionRule = DecisionRule(),
        csv_path: Path | None = None,
        say: Say | None = None,
    ) -> None:
        self.stack, self.plan, self.rule, self.csv_path = stack, plan, rule, csv_path
        self.say = say or stack.say
        self.srv = server_config(stack.cfg, plan.server)
        self.ctx_per_slot = ctx_per_slot(self.srv, plan.ctx_per_slot)

    def run(self) -> SweepResult:
        """Measure every level in ascending order; Ctrl-C stops early and keeps what was measured."""
        result = self._new_result()
        log = CsvLog(self.csv_path, result.run, self.plan.server, self.ctx_per_slot) if self.csv_path else None
        was_running = self._running()
        try:
            self._levels(result, log)
        except KeyboardInterrupt:
            result.interrupted = True
            self.say(f"{self.plan.server}: sweep interrupted; keeping the {len(result.levels)} level(s) measured")
        finally:
            try:
                result.restored = self._restore(was_running)
            finally:
                if log is not None:
                    log.close()
        result.decision = decide(result.levels, self.rule)
        result.load_after = os.getloadavg()
        return result

    def _new_result(self) -> SweepResult:
        return SweepResult(
            server=self.plan.server,
            port=self.srv.instance_ports()[0],
            configured_parallel=self.srv.parallel,
            configured_ctx_size=self.srv.ctx_size or None,
            ctx_per_slot=self.ctx_per_slot,
            levels=[],
            decision=Decision(None, None, "no level was run"),
            run=datetime.now().isoformat(timespec="seconds"),
            csv_path=self.csv_path,
            load_before=os.getloadavg(),
        )

    def _levels(self, result: SweepResult, log: CsvLog | None) -> None:
        for parallel in self.plan.levels:
            stats = self._level(parallel, log)
            result.levels = compare([*result.levels, stats])
            done = next(lv for lv in result.levels if lv.parallel == parallel)
            if log is not None:
                log.summary(done)
            self.say(_level_line(self.plan.server, done))
            if done.failure:
                self.say(f"{self.plan.server}: not trying more slots after a level that failed to start")
                break

    def _level(self, parallel: int, log: CsvLog | None) -> LevelStats:
        stack = self._stack_at(parallel)
        name = self.plan.server
        ctx = self.ctx_per_slot * parallel
        self.say(f"{name}: parallel {parallel}, ctx_size {ctx} ({self.ctx_per_slot} per slot): (re)starting")
        try:
            stack.reload(name)
        except StartupError as exc:
            return failed_level(parallel, gist(exc))
        # Where the server runs now: on a Ray node, a wildcard bind is reached at the node's address.
        recs = [r for r in stack.store.read().values() if r.component == name]
        url = recs[0].base_url if recs else stack.specs([name])[0].base_url

        def on_batch(batch: BatchResult) -> None:
            if log is not None:
                log.batch(batch)
            n = self.plan.warmup_batches if batch.phase == WARMUP else self.plan.batches
            self.say(_batch_line(name, batch, n))

        batches = asyncio.run(measure_level(url, self.plan, parallel, on_batch))
        return level_stats(parallel, batches)

    def _stack_at(self, parallel: int) -> Stack:
        """The same stack with this server at ``parallel`` slots, one instance (the first port)."""
        ports = self.srv.instance_ports()
        srv = self.srv.model_copy(
            update={
                "parallel": parallel,
                "ctx_size": self.ctx_per_slot * parallel,
                "port": ports[0],
                "ports": None,
                "replicas": None,
            }
        )
        cfg = self.stack.cfg.model_copy(update={"servers": {**self.stack.cfg.servers, self.plan.server: srv}})
        return self.stack.with_config(cfg)

    def _running(self) -> bool:
        records = self.stack.store.read().values()
        return any(r.component == self.plan.server and self.stack.launcher.alive(r.handle) for r in records)

    def _restore(self, was_running: bool) -> str:
        name = self.plan.server
        if was_running:
            self.say(f"{name}: restarting it with its configured parallel {self.srv.parallel}")
            self.stack.reload(name)
            return f"restarted with its configured parallel {self.srv.parallel} (it was running before the sweep)"
        self.stack.stop([name])
        return "stopped (it was not running before the sweep)"


def _batch_line(server: str, batch: BatchResult, of: int) -> str:
    tokens = sum(r.generated_tokens for r in batch.requests if r.ok)
    failed = [r for r in batch.requests if not r.ok]
    line = (
        f"{server} parallel {batch.parallel} {batch.phase} {batch.batch + 1}/{of}: {len(batch.requests)} requests "
        f"in {batch.wall_s:.2f} s, {tokens} tokens ({tokens / batch.wall_s if batch.wall_s else 0:.1f} tok/s)"
    )
    return line + (f", {len(failed)} failed: {failed[0].error}" if failed else "")


def _level_line(server: str, lv: LevelStats) -> str:
    if lv.failure:
        return f"{server} parallel {lv.parallel}: failed: {lv.failure}"
    return (
        f"{server} parallel {lv.parallel}: {lv.aggregate_tps:.1f} tok/s aggregate, "
        f"{lv.per_request_tps:.1f} tok/s per request, p95 latency {lv.p95_latency_s:.2f} s "
        f"(x{_mult(lv.p95_multiplier)}, TPS {_pct(lv.tps_gain)}), {lv.errors} errors"
    )


# --- reports -------------------------------------------------------------------

TABLE_HEADERS = (
    *("slots", "requests", "errors", "agg TPS", "per-req TPS", "p50 latency", "p95 latency", "p50 TTFT"),
    *("p95 ×", "TPS gain", "verdict"),
)


def table_rows(result: SweepResult) -> list[list[str]]:
    """One row per level, in the order of :data:`TABLE_HEADERS`."""
    rows = []
    for lv in result.levels:
        verdict = "chosen" if lv.parallel == result.decision.parallel else result.decision.verdicts.get(lv.parallel, "")
        if lv.failure:
            rows.append([str(lv.parallel), "-", "-", "-", "-", "-", "-", "-", "-", "-", verdict])
            continue
        rows.append(
            [
                str(lv.parallel),
                str(lv.requests),
                str(lv.errors),
                f"{lv.aggregate_tps:.1f}",
                f"{lv.per_request_tps:.1f}",
                f"{lv.p50_latency_s:.2f} s",
                f"{lv.p95_latency_s:.2f} s",
                f"{lv.p50_ttft_s * 1000:.0f} ms",
                _mult(lv.p95_multiplier),
                _pct(lv.tps_gain),
                verdict,
            ]
        )
    return rows


def recommendation_row(result: SweepResult) -> list[str]:
    """The seed's results table row: server, port, recommended -np, rationale."""
    d = result.decision
    was = result.configured_parallel
    if d.parallel is None:
        rec = "—"
    elif d.parallel == was:
        rec = f"{d.parallel} (keep)"
    else:
        rec = f"**{d.parallel}** (was {was})"
    return [result.server, str(result.port), rec, d.reason]


def _md_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(headers), line(["---"] * len(headers)), *(line(r) for r in rows)])


def render_markdown(result: SweepResult, plan: SweepPlan, rule: DecisionRule, command: str) -> str:
    """The sweep's results as a markdown page: command, conditions, table, decision."""
    cores = os.cpu_count() or 1
    others = result.load_before[0]  # the figure after includes the sweep's own server
    parts = [
        f"# Concurrency sweep: {result.server}",
        f"Command:\n\n```bash\n{command}\n```",
        f"Run {result.run}. Levels {', '.join(map(str, plan.levels))}; {plan.warmup_batches} warm-up and "
        f"{plan.batches} measured batches per level, each batch one streamed chat request per slot, "
        f"{plan.max_tokens} generated tokens per request (`ignore_eos`, no prompt cache); "
        f"{result.ctx_per_slot} context tokens per slot at every level.",
        f"Machine: {cores} CPU cores; 1-minute load average {result.load_before[0]:.2f} before the sweep, "
        f"{result.load_after[0]:.2f} at its end (including the sweep's own server).",
        "## Results",
        _md_table(TABLE_HEADERS, table_rows(result)),
        "Aggregate TPS = generated tokens of all measured batches / their wall time; per-request TPS = "
        "generated tokens / latency, averaged; p95 × and TPS gain are against the lowest level; "
        "token counts come from llama-server's `timings`, latency and TTFT from the client.",
        "## Decision",
        f"Rule: the largest level whose p95 multiplier stays under {rule.max_p95_multiplier:g} and whose "
        f"aggregate TPS gains at least {_pct(rule.min_tps_gain)}.",
        _md_table(["Server", "Port", "Recommended `-np`", "Rationale"], [recommendation_row(result)]),
    ]
    if result.interrupted:
        parts.append("The sweep was interrupted: only the levels above were measured.")
    if others > cores * 0.25:
        parts.append(
            f"Note: the load average was already {others:.2f} on {cores} cores before the sweep started, so "
            "other processes competed with the server for the CPU and these numbers are noisy."
        )
    return "\n\n".join(parts) + "\n"


# --- writing the result back ---------------------------------------------------


@dataclass(frozen=True)
class Change:
    """One key of the stack file changed by ``--apply``."""

    key: str
    old: object
    new: int

    def __str__(self) -> str:
        old = "(unset)" if self.old is None else str(self.old)
        return f"{self.key}: {old} → {self.new}"


_SCALAR = re.compile(r"[^\s#,}\]]+")


def edit_parallel(text: str, server: str, parallel: int, ctx_size: int | None = None) -> tuple[str, list[Change]]:
    """Set ``servers.<server>.parallel`` (and ``ctx_size``) in YAML text, changing only those lines.

    ruamel.yaml's round-trip parser finds where each value sits; the edit replaces that
    token or inserts a line after ``model:``, so comments, quoting and layout stay as they were.
    """
    node = _server_node(text, server)
    lines = text.splitlines(keepends=True)
    changes: list[Change] = []
    missing: list[str] = []
    for key, value in (("parallel", parallel), ("ctx_size", ctx_size)):
        if value is None or node.get(key) == value:
            continue
        changes.append(Change(f"servers.{server}.{key}", node.get(key), value))
        if key in node:
            line, col = node.lc.value(key)
            lines[line] = _replace_scalar(lines[line], col, str(value), changes[-1].key)
        else:
            missing.append(f"{key}: {value}")
    if missing:
        lines = _insert_after_model(lines, node, server, missing)
    return "".join(lines), changes


def _server_node(text: str, server: str) -> Any:
    from ruamel.yaml import YAML
    from ruamel.yaml.comments import CommentedMap
    from ruamel.yaml.error import YAMLError

    try:
        doc = YAML(typ="rt").load(text)
    except YAMLError as exc:
        raise ConfigError(f"the stack file is not valid YAML ({exc}); nothing was changed") from exc
    servers = doc.get("servers") if isinstance(doc, CommentedMap) else None
    node = servers.get(server) if isinstance(servers, CommentedMap) else None
    if not isinstance(node, CommentedMap):
        raise ConfigError(f"servers.{server} is not a mapping in the stack file; nothing was changed")
    return node


def _replace_scalar(line: str, col: int, new: str, key: str) -> str:
    m = _SCALAR.match(line, col)
    if m is None:
        raise ConfigError(f"{key}: cannot find its value to replace; set it by hand")
    return line[: m.start()] + new + line[m.end() :]


def _insert_after_model(lines: list[str], node: Any, server: str, entries: list[str]) -> list[str]:
    if node.fa.flow_style():
        raise ConfigError(
            f"servers.{server} is written in flow style ({{...}}); add {', '.join(entries)} to it by hand"
        )
    line = node.lc.value("model")[0]
    indent = " " * node.lc.key("model")[1]
    if not lines[line].endswith("\n"):
        lines[line] += "\n"
    return [*lines[: line + 1], *(f"{indent}{e}\n" for e in entries), *lines[line + 1 :]]


def apply_parallel(path: Path, server: str, parallel: int, ctx_size: int | None = None) -> list[Change]:
    """Write the recommendation into a stack file (atomically); return what changed."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from exc
    current = load_config(text, str(path)).servers.get(server)
    if current is not None and current.parallel == parallel and ctx_size in (None, current.ctx_size):
        return []  # already so, perhaps by default: leave the file alone
    new_text, changes = edit_parallel(text, server, parallel, ctx_size)
    if not changes:
        return []
    try:
        got = load_config(new_text, str(path)).servers[server]
    except ConfigError as exc:
        raise ConfigError(f"editing {path} would make it invalid, so nothing was changed:\n{exc}") from exc
    if got.parallel != parallel or (ctx_size is not None and got.ctx_size != ctx_size):
        raise ConfigError(f"{path}: servers.{server}.parallel could not be edited safely; set it by hand")
    _write_atomic(path, new_text)
    return changes


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        shutil.copymode(path, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# --- the plot ------------------------------------------------------------------

PLOT_MISSING = "matplotlib is not installed, so no plot was written; install it with: pip install 'modelfleet[plot]'"


def write_plot(result: SweepResult, path: Path) -> str | None:
    """A PNG of aggregate TPS and p95 latency against slots; returns why it was skipped, if it was."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot as plt
    except ImportError:
        return PLOT_MISSING
    levels = [lv for lv in result.levels if lv.measurable]
    if not levels:
        return "no level was measured, so no plot was written"
    xs = [lv.parallel for lv in levels]
    fig, ax_tps = plt.subplots(figsize=(7.0, 4.5))
    ax_tps.plot(xs, [lv.aggregate_tps for lv in levels], "o-", color="tab:blue", label="aggregate TPS")
    ax_tps.set_xlabel("parallel slots (-np)")
    ax_tps.set_ylabel("aggregate tokens/s", color="tab:blue")
    ax_tps.set_xticks(xs)
    ax_lat = ax_tps.twinx()
    ax_lat.plot(xs, [lv.p95_latency_s for lv in levels], "s--", color="tab:red", label="p95 latency")
    ax_lat.set_ylabel("p95 latency (s)", color="tab:red")
    ax_tps.set_ylim(bottom=0)
    ax_lat.set_ylim(bottom=0)
    if result.decision.parallel is not None:
        ax_tps.axvline(result.decision.parallel, color="grey", linestyle=":", label="recommended")
    ax_tps.set_title(f"{result.server}: concurrency sweep, recommended parallel {result.decision.parallel or '-'}")
    fig.legend(loc="upper left", bbox_to_anchor=(0.1, 0.88))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None
