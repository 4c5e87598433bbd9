"""Memory: what each server will hold, whether the stack fits, whether a WARM instance fits now.

* **Estimates** (:func:`estimate_component`) come from the GGUF header
  (:mod:`modelfleet.ggufmeta`, tensors never loaded): the weights (the tensor bytes of
  every shard, plus the draft model and the mmproj), the KV cache llama.cpp allocates at
  start (layers x KV heads x (key + value head size) x cells x streams x bytes of the
  cache type, where sliding-window layers get their smaller cache and recurrent layers
  their fixed state), and the compute and output buffers. Replicas multiply. A declared
  ``ram_gb`` stands in when the file is absent, and a figure measured from a running
  instance of the same model and settings beats both. Every estimate says which it is.
* **The plan** (:func:`build_plan`, drawn by :func:`render_tree` like the seed's tree):
  the RAM total split into the HOT tier, the KV cache space (the HOT servers' caches plus
  what is free for WARM servers and growth) and the OS reserve, with WARM and COLD listed.
* **Admission** (:func:`admit`): before the front door starts a WARM instance, does it fit
  in the memory available now, or after stopping idle WARM instances (least recently used
  first)? HOT (and COLD) instances are never evicted.
* **Measurement** (:func:`record_ready`): once an instance is ready, its RSS and the buffer
  sizes llama-server logs go into the state file and into ``<state dir>/memory.json``,
  which later plans of the same model and settings use.

Sizes are bytes; "GB" in output means 10^9 bytes, as in the seed ("HOT Tier: 535GB").
The arithmetic follows llama.cpp as shipped (``src/llama-context.cpp`` pads the context to
256 cells and splits it per slot; ``src/llama-kv-cache-iswa.cpp`` sizes the sliding-window
cache as ``pad(min(n_ctx_seq, n_swa * (unified ? n_seq : 1) + n_ubatch), 256)``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from typing import Any

from modelfleet import ggufmeta
from modelfleet.config import ServerConfig, ServiceConfig, StackConfig, Tier
from modelfleet.errors import FleetError, OverBudget
from modelfleet.fileutil import now_iso, write_atomic
from modelfleet.instance import Kind
from modelfleet.launcher import Launcher, LocalLauncher
from modelfleet.spec import InstanceSpec
from modelfleet.state import InstanceRecord, StateStore

GB = 1_000_000_000
MIB = 1024 * 1024
DEFAULT_OS_RESERVE_PCT = 12.0  # the seed's "OS + Buffers: ~135GB (12%)"
DEFAULT_UBATCH = 512  # llama.cpp's n_ubatch
DEFAULT_BATCH = 2048  # llama.cpp's n_batch
CELL_PAD = 256  # llama.cpp pads context sizes to 256 cells
MEASUREMENTS_FILE = "memory.json"
START_MARKER = "--- modelfleet: starting "  # written by LocalLauncher before each spawn
LOG_TAIL_BYTES = 4 * MIB  # a model's load output at verbosity 4 is tens of kB


class Source(StrEnum):
    """Where a figure comes from."""

    MEASURED = "measured"  # a running instance of the same model and settings, recorded
    READ = "read"  # computed from the GGUF header
    DECLARED = "declared"  # ram_gb in the config
    UNKNOWN = "unknown"  # no file, nothing declared


@dataclass(frozen=True)
class Estimate:
    """The memory of one instance."""

    source: Source
    weights_bytes: int = 0  # model + draft + mmproj; a declared or measured size lands here
    kv_bytes: int = 0  # KV cache and recurrent state, allocated when the instance starts
    compute_bytes: int = 0  # compute and output buffers
    detail: str = ""

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.kv_bytes + self.compute_bytes

    @property
    def share_bytes(self) -> int:
        """What the instance takes outside the KV cache space."""
        return self.weights_bytes + self.compute_bytes


# --- llama-server settings that change memory ----------------------------------------


@dataclass(frozen=True)
class Settings:
    """What llama-server will be told, as far as memory goes."""

    ctx_size: int  # 0: the model's training context for every slot
    parallel: int
    cache_type_k: str = "f16"
    cache_type_v: str = "f16"
    ubatch: int = DEFAULT_UBATCH
    unified: bool = False
    swa_full: bool = False
    compute_mb: float | None = None

    @property
    def streams(self) -> int:
        return 1 if self.unified else self.parallel


def settings_for(cfg: StackConfig, srv: ServerConfig, draft: bool = False) -> Settings:
    """The server's settings; ``draft=True`` for its draft model (f16 cache unless -ctkd/-ctvd)."""
    args = srv.args
    batch = srv.batch_size or _arg_int(args, ("-b", "--batch-size"), DEFAULT_BATCH)
    ctk: str = srv.cache_type_k or "f16"
    ctv: str = srv.cache_type_v or "f16"
    if draft:
        ctk = _arg(args, ("-ctkd", "--cache-type-k-draft")) or "f16"
        ctv = _arg(args, ("-ctvd", "--cache-type-v-draft")) or "f16"
    return Settings(
        ctx_size=srv.ctx_size or 0,
        parallel=srv.parallel,
        cache_type_k=ctk,
        cache_type_v=ctv,
        ubatch=min(_arg_int(args, ("-ub", "--ubatch-size"), DEFAULT_UBATCH), batch),
        unified=_last_flag(args, ("-kvu", "--kv-unified"), ("-no-kvu", "--no-kv-unified")),
        swa_full="--swa-full" in args,
        compute_mb=cfg.memory.compute_buffer_mb,
    )


def _arg(args: Sequence[str], names: tuple[str, ...]) -> str | None:
    """The value of the last ``NAME VALUE`` or ``NAME=VALUE`` in ``args``."""
    found = None
    for i, a in enumerate(args):
        head, eq, value = a.partition("=")
        if head in names:
            found = value if eq else (args[i + 1] if i + 1 < len(args) else None)
    return found


def _arg_int(args: Sequence[str], names: tuple[str, ...], default: int) -> int:
    value = _arg(args, names)
    try:
        return int(value) if value is not None else default
    except ValueError:
        return default


def _last_flag(args: Sequence[str], on: tuple[str, ...], off: tuple[str, ...]) -> bool:
    state = False
    for a in args:
        if a in on:
            state = True
        elif a in off:
            state = False
    return state


# --- the arithmetic ------------------------------------------------------------------


def _pad(n: int) -> int:
    return -(-n // CELL_PAD) * CELL_PAD


def context_cells(info: ggufmeta.ModelInfo, s: Settings) -> int:
    """KV cells per stream (``n_ctx_seq``), as ``llama_context`` sizes them."""
    if s.ctx_size <= 0:  # unset: the training context for every sequence (common/fit.cpp)
        return _pad(info.n_ctx_train or 4096)
    n_ctx = _pad(s.ctx_size)
    return n_ctx if s.unified else _pad(n_ctx // s.parallel)


def swa_cells(info: ggufmeta.ModelInfo, s: Settings) -> int:
    """Cells per stream of the sliding-window cache (llama_kv_cache_iswa)."""
    full = context_cells(info, s)
    if s.swa_full:
        return full
    return _pad(min(full, info.n_swa * (s.parallel if s.unified else 1) + s.ubatch))


def element_bytes(cache_type: str, n_elements: int) -> int:
    """Bytes of ``n_elements`` values of a ggml type (``f16``, ``q8_0``, ``q4_0``...)."""
    import gguf

    try:
        block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[cache_type.upper()]]
    except KeyError as exc:
        raise ValueError(f"unknown cache type {cache_type!r}") from exc
    return n_elements * size // block


def kv_cache_bytes(info: ggufmeta.ModelInfo, s: Settings) -> int:
    """The KV cache (every stream) plus the recurrent state of recurrent layers."""
    full, window = context_cells(info, s), swa_cells(info, s) if info.n_swa else 0
    per_stream = 0
    for layer, heads in enumerate(info.head_kv):
        if not heads:
            continue
        cells = window if info.swa_layers[layer] else full
        per_stream += cells * (
            element_bytes(s.cache_type_k, heads * info.head_k) + element_bytes(s.cache_type_v, heads * info.head_v)
        )
    recurrent = sum(info.recurrent_layers) * info.recurrent_state_floats * 4 * max(1, s.parallel)
    return per_stream * s.streams + recurrent


def compute_bytes(info: ggufmeta.ModelInfo, s: Settings) -> int:
    """Compute and output buffers (an allowance; ``memory.compute_buffer_mb`` overrides it).

    Fitted to what llama-server reports on CPU with flash attention (the default): the
    widest per-token step of the graph (the FFN, or the attention projections) in f32 for
    every token of a ubatch, one f16 mask row of every cache per ubatch token, and the
    output buffer (one row of logits per slot). Within 20% of the reported compute buffer
    for the shapes in tests/test_memory.py.
    """
    if s.compute_mb is not None:
        return int(s.compute_mb * MIB)
    width = max(4 * info.n_ff + 2 * info.n_embd, 4 * info.n_embd + 2 * info.q_width + info.kv_width)
    masks = context_cells(info, s) + (swa_cells(info, s) if any(info.swa_layers) else 0)
    return s.ubatch * (4 * width + 2 * masks) + s.parallel * info.n_vocab * 4


def model_estimate(info: ggufmeta.ModelInfo, s: Settings) -> Estimate:
    """The estimate for one model run with settings ``s`` (pure)."""
    cells = context_cells(info, s)
    n_swa = sum(info.swa_layers)
    slots = f"ctx {cells} shared by {s.parallel} slot(s)" if s.unified else f"ctx {cells} x {s.parallel} slot(s)"
    detail = f"{slots}, K {s.cache_type_k} V {s.cache_type_v}"
    if n_swa:
        detail += f", {n_swa} sliding-window layer(s) at {swa_cells(info, s)} cells"
    if any(info.recurrent_layers):
        detail += f", {sum(info.recurrent_layers)} recurrent layer(s)"
    return Estimate(Source.READ, info.weights_bytes, kv_cache_bytes(info, s), compute_bytes(info, s), detail)


def _plus(a: Estimate, b: Estimate, note: str) -> Estimate:
    return Estimate(
        a.source,
        a.weights_bytes + b.weights_bytes,
        a.kv_bytes + b.kv_bytes,
        a.compute_bytes + b.compute_bytes,
        f"{a.detail}; {note}",
    )


# --- estimates of config components ---------------------------------------------------


def estimate_component(cfg: StackConfig, name: str, store: MeasurementStore | None = None) -> Estimate:
    """One instance of a server or service: measured > read from the file > declared > unknown."""
    comp = cfg.components()[name]
    if store is not None:
        measured = store.get(measurement_key(cfg, name))
        if measured is not None:
            return measured.as_estimate()
    if isinstance(comp, ServerConfig) and cfg.resolve_path(comp.model).is_file():
        return _read_server(cfg, comp)
    if comp.ram_gb is not None:
        return Estimate(Source.DECLARED, int(comp.ram_gb * GB), detail="ram_gb")
    what = "model file is absent" if isinstance(comp, ServerConfig) else "service"
    return Estimate(Source.UNKNOWN, detail=f"{what}; declare ram_gb")


def _read_server(cfg: StackConfig, srv: ServerConfig) -> Estimate:
    est = model_estimate(ggufmeta.model_info(cfg.resolve_path(srv.model)), settings_for(cfg, srv))
    if srv.draft is not None:
        draft = cfg.resolve_path(srv.draft.model)
        if draft.is_file():
            est = _plus(est, model_estimate(ggufmeta.model_info(draft), settings_for(cfg, srv, draft=True)), "draft")
        elif srv.draft.ram_gb is not None:
            est = _plus(est, Estimate(Source.DECLARED, int(srv.draft.ram_gb * GB)), "draft declared")
        else:
            est = _plus(est, Estimate(Source.UNKNOWN), "draft absent, not counted")
    if srv.mmproj is not None:
        mmproj = cfg.resolve_path(srv.mmproj)
        if mmproj.is_file():
            est = _plus(est, Estimate(Source.READ, ggufmeta.model_info(mmproj).weights_bytes), "mmproj")
        else:
            est = _plus(est, Estimate(Source.UNKNOWN), "mmproj absent, not counted")
    return est


def instance_estimate(cfg: StackConfig, name: str) -> Estimate | None:
    """The metadata estimate (never the measured one) of a component, or None if unreadable."""
    if name not in cfg.components():
        return None
    try:
        return estimate_component(cfg, name)
    except (FleetError, OSError):
        return None


def estimate_bytes(cfg: StackConfig, name: str) -> int | None:
    """Bytes of one instance of a component by its metadata estimate, or None when unknown."""
    est = instance_estimate(cfg, name)
    return est.total_bytes if est is not None and est.source is not Source.UNKNOWN else None


# --- the plan ------------------------------------------------------------------------


@dataclass(frozen=True)
class ComponentPlan:
    """A server or service in the plan: one estimate per instance, times its replicas."""

    name: str
    kind: Kind
    tier: Tier
    replicas: int
    each: Estimate
    starting: bool = False  # a WARM/COLD component this start adds to the resident set

    @property
    def share_bytes(self) -> int:
        return self.each.share_bytes * self.replicas

    @property
    def kv_bytes(self) -> int:
        return self.each.kv_bytes * self.replicas

    @property
    def total_bytes(self) -> int:
        return self.each.total_bytes * self.replicas

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "tier": self.tier.value,
            "replicas": self.replicas,
            "source": self.each.source.value,
            "each_bytes": self.each.total_bytes,
            "bytes": self.total_bytes,
            "weights_bytes": self.each.weights_bytes * self.replicas,
            "kv_bytes": self.kv_bytes,
            "compute_bytes": self.each.compute_bytes * self.replicas,
            "detail": self.each.detail,
            "starting": self.starting,
        }


@dataclass(frozen=True)
class Plan:
    """The RAM budget: HOT tier + its KV caches + what starts now + OS reserve against the total."""

    total_bytes: int
    total_from: str
    reserve_bytes: int
    reserve_from: str
    components: tuple[ComponentPlan, ...]
    warm_idle_s: float = 300.0

    def tier(self, tier: Tier) -> list[ComponentPlan]:
        return [c for c in self.components if c.tier is tier]

    @property
    def hot_bytes(self) -> int:
        """The HOT tier outside the KV cache space: weights, buffers, declared sizes."""
        return sum(c.share_bytes for c in self.tier(Tier.HOT))

    @property
    def hot_kv_bytes(self) -> int:
        """KV caches the HOT servers allocate when they start."""
        return sum(c.kv_bytes for c in self.tier(Tier.HOT))

    @property
    def starting_bytes(self) -> int:
        return sum(c.total_bytes for c in self.components if c.starting and c.tier is not Tier.HOT)

    @property
    def kv_space_bytes(self) -> int:
        """The seed's "KV Cache" node: what the HOT tier and the OS reserve leave."""
        return self.total_bytes - self.hot_bytes - self.reserve_bytes

    @property
    def required_bytes(self) -> int:
        return self.hot_bytes + self.hot_kv_bytes + self.starting_bytes + self.reserve_bytes

    @property
    def free_bytes(self) -> int:
        """Left for WARM instances and growth once everything resident has started."""
        return self.total_bytes - self.required_bytes

    @property
    def fits(self) -> bool:
        return self.free_bytes >= 0

    @property
    def overflow_bytes(self) -> int:
        return max(0, -self.free_bytes)

    def pct(self, n: int) -> float:
        return 100.0 * n / self.total_bytes if self.total_bytes else 0.0

    def sources(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {s.value: [] for s in Source}
        for c in self.components:
            out[c.each.source.value].append(c.name)
        return out

    def verdict(self) -> str:
        """One sentence: fits, or by how much it does not."""
        parts = (
            f"HOT {fmt_bytes(self.hot_bytes)} + KV caches {fmt_bytes(self.hot_kv_bytes)}"
            + (f" + starting {fmt_bytes(self.starting_bytes)}" if self.starting_bytes else "")
            + f" + OS reserve {fmt_bytes(self.reserve_bytes)}"
        )
        if self.fits:
            return f"fits: {parts} = {fmt_bytes(self.required_bytes)} of {fmt_bytes(self.total_bytes)}"
        return (
            f"does not fit: {parts} = {fmt_bytes(self.required_bytes)}, "
            f"{fmt_bytes(self.overflow_bytes)} more than the {fmt_bytes(self.total_bytes)} total"
        )

    def to_json(self) -> dict[str, Any]:
        def side(t: Tier) -> dict[str, Any]:
            comps = self.tier(t)
            return {"bytes": sum(c.total_bytes for c in comps), "servers": [c.to_json() for c in comps]}

        hot = side(Tier.HOT) | {"bytes": self.hot_bytes, "pct": round(self.pct(self.hot_bytes), 1)}
        kv = {
            "bytes": self.kv_space_bytes,
            "pct": round(self.pct(self.kv_space_bytes), 1),
            "allocated_bytes": self.hot_kv_bytes,
            "free_bytes": self.free_bytes,
        }
        reserve = {"bytes": self.reserve_bytes, "pct": round(self.pct(self.reserve_bytes), 1)}
        return {
            "total_bytes": self.total_bytes,
            "total_from": self.total_from,
            "hot": hot,
            "kv_cache": kv,
            "warm": side(Tier.WARM),
            "cold": side(Tier.COLD),
            "os_reserve": reserve | {"from": self.reserve_from},
            "required_bytes": self.required_bytes,
            "fits": self.fits,
            "overflow_bytes": self.overflow_bytes,
            "verdict": self.verdict(),
            "sources": self.sources(),
        }


def build_plan(
    cfg: StackConfig,
    *,
    total_gb: float | None = None,
    starting: Iterable[str] = (),
    store: MeasurementStore | None = None,
    machine_total_bytes: int | None = None,
) -> Plan:
    """The plan of ``cfg``; ``starting`` names WARM/COLD components a start adds to the HOT tier."""
    total, total_from = _total(cfg, total_gb, machine_total_bytes)
    reserve, reserve_from = _reserve(cfg, total)
    chosen = set(starting)
    comps = tuple(
        ComponentPlan(
            name,
            Kind.LLAMA_SERVER if isinstance(comp, ServerConfig) else Kind.SERVICE,
            comp.tier,
            len(comp.instance_ports()),
            estimate_component(cfg, name, store),
            starting=name in chosen and comp.tier is not Tier.HOT,
        )
        for name, comp in cfg.components().items()
    )
    return Plan(total, total_from, reserve, reserve_from, comps, cfg.worker_pool.warm_timeout_s)


def _total(cfg: StackConfig, total_gb: float | None, machine: int | None) -> tuple[int, str]:
    if total_gb is not None:
        return int(total_gb * GB), "--total-gb"
    if cfg.memory.total_gb is not None:
        return int(cfg.memory.total_gb * GB), "memory.total_gb"
    return (machine if machine is not None else LocalLauncher().total_bytes()), "this machine"


def _reserve(cfg: StackConfig, total: int) -> tuple[int, str]:
    mem = cfg.memory
    if mem.os_reserve_gb is not None:
        return int(mem.os_reserve_gb * GB), "memory.os_reserve_gb"
    if mem.os_reserve_pct is not None:
        return int(total * mem.os_reserve_pct / 100), f"memory.os_reserve_pct: {mem.os_reserve_pct:g}%"
    return int(total * DEFAULT_OS_RESERVE_PCT / 100), f"default {DEFAULT_OS_RESERVE_PCT:g}%"


# --- the tree ----------------------------------------------------------------------


def fmt_bytes(n: int) -> str:
    """``536.4 GB``, ``96.6 MB``: decimal units, like the seed's figures."""
    sign, n = ("-" if n < 0 else ""), abs(n)
    for unit, size in (("GB", GB), ("MB", 1_000_000), ("kB", 1000)):
        if n >= size:
            return f"{sign}{n / size:.1f} {unit}"
    return f"{sign}{n} B"


def _label(c: ComponentPlan) -> str:
    return f"{c.name} ({c.replicas}x)" if c.replicas > 1 else c.name


def _size(n: int, c: ComponentPlan) -> str:
    return "?" if c.each.source is Source.UNKNOWN else fmt_bytes(n)


def _why(c: ComponentPlan, resident: bool) -> str:
    e = c.each
    each = f", {fmt_bytes(e.total_bytes)} each" if c.replicas > 1 else ""
    if e.source is Source.UNKNOWN:
        return f"size unknown: {e.detail}"
    if e.source is Source.DECLARED:
        return f"declared{each}"
    kv = f"; KV cache {fmt_bytes(c.kv_bytes)}" if resident and c.kv_bytes else ""
    if e.source is Source.MEASURED:
        return f"measured{each}{kv}"
    return f"read: weights {fmt_bytes(e.weights_bytes)}, buffers {fmt_bytes(e.compute_bytes)}{each}{kv}; {e.detail}"


def _branch(items: list[str], indent: str) -> list[str]:
    return [f"{indent}{'└── ' if i == len(items) - 1 else '├── '}{item}" for i, item in enumerate(items)]


def _hot_lines(plan: Plan) -> list[str]:
    over = "  ✗ OVER BUDGET" if not plan.fits else ""
    head = f"HOT Tier: {fmt_bytes(plan.hot_bytes)} ({plan.pct(plan.hot_bytes):.0f}%) - always resident{over}"
    items = [f"{_label(c)}: {_size(c.share_bytes, c)} ({_why(c, True)})" for c in plan.tier(Tier.HOT)]
    return [head, *_branch(items, "│   ")]


def _kv_line(plan: Plan) -> str:
    head = f"KV Cache: {fmt_bytes(max(plan.kv_space_bytes, 0))} ({plan.pct(max(plan.kv_space_bytes, 0)):.0f}%)"
    allocated = f"{fmt_bytes(plan.hot_kv_bytes)} allocated by HOT servers at start"
    if plan.starting_bytes:
        allocated += f", {fmt_bytes(plan.starting_bytes)} by what this start adds"
    if plan.fits:
        return f"{head} - dynamic: {allocated}, {fmt_bytes(plan.free_bytes)} free for WARM servers and growth"
    return f"{head} - ✗ {allocated}; short by {fmt_bytes(plan.overflow_bytes)}"


def _side_tier(plan: Plan, tier: Tier, what: str) -> list[str]:
    comps = plan.tier(tier)
    if not comps:
        return [f"{tier.name} Tier: none"]
    items = []
    for c in comps:
        mark = " (starting now)" if c.starting else ""
        if not c.starting and c.total_bytes > plan.free_bytes:
            mark = "  ⚠ larger than the free space"
        items.append(f"{_label(c)}: {_size(c.total_bytes, c)} ({_why(c, False)}){mark}")
    head = f"{tier.name} Tier: {fmt_bytes(sum(c.total_bytes for c in comps))} {what}"
    return [head, *_branch(items, "│   ")]


def render_tree(plan: Plan) -> str:
    """The plan as a tree like the seed's "Tier Allocation", plus a verdict line."""
    pct = plan.pct(plan.reserve_bytes)
    reserve = f"OS + Buffers: {fmt_bytes(plan.reserve_bytes)} ({pct:.0f}%) ({plan.reserve_from})"
    warm_what = f"on demand - started into the free space, stopped after {plan.warm_idle_s:g} s idle"
    nodes = [
        _hot_lines(plan),
        [_kv_line(plan)],
        _side_tier(plan, Tier.WARM, warm_what),
        _side_tier(plan, Tier.COLD, "started by hand"),
        [reserve],
    ]
    lines = [f"Total RAM: {fmt_bytes(plan.total_bytes)} ({plan.total_from})"]
    for i, node in enumerate(nodes):
        last = i == len(nodes) - 1
        lines.append(("└── " if last else "├── ") + node[0])
        lines.extend(("    " if last else "") + sub for sub in node[1:])
    lines.append(("✓ " if plan.fits else "✗ ") + plan.verdict())
    unknown = plan.sources()[Source.UNKNOWN.value]
    if unknown:
        lines.append(f"⚠ not counted (size unknown): {', '.join(unknown)}; declare ram_gb for them")
    return "\n".join(lines)


def check_plan(plan: Plan) -> None:
    """Raise OverBudget, naming the overflow and the ways out, if the plan does not fit."""
    if plan.fits:
        return
    raise OverBudget(
        f"the memory plan {plan.verdict()}; nothing was started. Move servers to the WARM tier, "
        "lower their ctx_size or parallel, set memory.total_gb if this machine has more, "
        "or pass --ignore-memory to start anyway"
    )


# --- measurements ------------------------------------------------------------------


@dataclass(frozen=True)
class Measurement:
    """What a ready instance holds: its RSS and the buffers llama-server reported."""

    rss_bytes: int
    buffers: dict[str, int] = field(default_factory=dict)  # model, kv, rs, compute, output
    measured_at: str = ""

    @property
    def buffers_bytes(self) -> int:
        return sum(self.buffers.values())

    @property
    def resident_bytes(self) -> int:
        """The figure plans use: the larger of RSS and the reported buffers."""
        return max(self.rss_bytes, self.buffers_bytes)

    def as_estimate(self) -> Estimate:
        kv = self.buffers.get("kv", 0) + self.buffers.get("rs", 0)
        compute = self.buffers.get("compute", 0) + self.buffers.get("output", 0)
        weights = max(self.resident_bytes - kv - compute, 0)
        return Estimate(Source.MEASURED, weights, kv, compute, f"measured {self.measured_at}")

    def to_json(self) -> dict[str, Any]:
        return asdict(self) | {"resident_bytes": self.resident_bytes}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Measurement:
        buffers = {str(k): int(v) for k, v in dict(data.get("buffers") or {}).items()}
        return cls(int(data["rss_bytes"]), buffers, str(data.get("measured_at", "")))


_BUFFER_LINE = re.compile(r"\S+\s+(model|KV|RS|compute|output) buffer size =\s*([\d.]+) MiB")


def parse_buffer_log(text: str) -> dict[str, int]:
    """Buffer sizes llama-server logged (at verbosity 4) since the last start marker, by kind.

    Lines look like ``load_tensors:   CPU_Mapped model buffer size =    92.10 MiB`` and
    ``llama_kv_cache:        CPU KV buffer size =    22.50 MiB``; every device, every cache
    (sliding-window models have two) and the draft model's are summed per kind.
    """
    start = text.rfind(START_MARKER)
    out: dict[str, int] = {}
    for m in _BUFFER_LINE.finditer(text[max(start, 0) :]):
        kind = m.group(1).lower()
        out[kind] = out.get(kind, 0) + round(float(m.group(2)) * MIB)
    return out


def measure(launcher: Launcher, rec: InstanceRecord) -> Measurement:
    """RSS now, plus the buffer sizes in the instance's log."""
    handle = rec.handle
    return Measurement(launcher.rss(handle), parse_buffer_log(launcher.read_log(handle, LOG_TAIL_BYTES)), now_iso())


class MeasurementStore:
    """``<state dir>/memory.json``: the last measurement of each model + settings."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @classmethod
    def in_dir(cls, state_dir: Path) -> MeasurementStore:
        return cls(state_dir / MEASUREMENTS_FILE)

    def _read(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def get(self, key: str) -> Measurement | None:
        entry = self._read().get(key)
        try:
            return Measurement.from_json(entry) if isinstance(entry, dict) else None
        except (KeyError, TypeError, ValueError):
            return None

    def put(self, key: str, component: str, m: Measurement) -> None:
        """Record atomically (callers hold the state lock, so writers do not race)."""
        data = self._read()
        data[key] = m.to_json() | {"component": component}
        write_atomic(self.path, json.dumps(data, indent=2, sort_keys=True) + "\n")


_KEY_FIELDS = {"model", "ctx_size", "parallel", "batch_size", "args", "draft", "mmproj", "embeddings"}
_KEY_FIELDS |= {"cache_type_k", "cache_type_v", "moe_active_experts", "load_mode"}


def measurement_key(cfg: StackConfig, name: str) -> str:
    """Model file (path, size, mtime) + the settings that change memory, hashed."""
    comp = cfg.components()[name]
    if isinstance(comp, ServiceConfig):
        ident: dict[str, Any] = {"service": name, "command": comp.command}
    else:
        ident = comp.model_dump(include=_KEY_FIELDS) | {"file": _file_id(cfg.resolve_path(comp.model))}
        ident["compute_buffer_mb"] = cfg.memory.compute_buffer_mb
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _file_id(path: Path) -> str:
    try:
        st = path.stat()
    except OSError:
        return str(path)
    return f"{path}:{st.st_size}:{st.st_mtime_ns}"


def record_ready(cfg: StackConfig, launcher: Launcher, rec: InstanceRecord, state: StateStore) -> None:
    """Measure a ready instance; record it in the state file and the measurements file.

    Best effort: a measurement that fails leaves the start alone. Call under the state lock.
    """
    if rec.component not in cfg.components():
        return  # the front door itself
    try:
        m = measure(launcher, rec)
    except (FleetError, OSError):
        return
    est = instance_estimate(cfg, rec.component)
    rec.extra["memory"] = {
        "estimate_bytes": est.total_bytes if est else None,
        "estimate_source": est.source.value if est else None,
        "measured_bytes": m.resident_bytes,
        "rss_bytes": m.rss_bytes,
        "buffers": m.buffers,
        "measured_at": m.measured_at,
    }
    state.put(rec)
    with contextlib.suppress(OSError):
        MeasurementStore.in_dir(state.dir).put(measurement_key(cfg, rec.component), rec.component, m)


def recorded(rec: InstanceRecord) -> tuple[int | None, int | None]:
    """(estimate, measured) bytes recorded for an instance when it became ready."""
    mem = rec.extra.get("memory")
    if not isinstance(mem, dict):
        return None, None
    est, measured = mem.get("estimate_bytes"), mem.get("measured_bytes")
    return (int(est) if est is not None else None), (int(measured) if measured is not None else None)


# --- admission of WARM instances -----------------------------------------------------


class Verdict(StrEnum):
    FITS = "fits"
    FITS_AFTER_EVICTION = "fits_after_eviction"
    REFUSED = "refused"


@dataclass(frozen=True)
class IdleInstance:
    """A running instance with no request in flight, that the front door could stop."""

    name: str  # echoed back in Admission.evict: a state key, an instance name, anything
    component: str
    tier: Tier
    last_request_at: float  # any clock; only the order matters (the oldest goes first)
    resident_bytes: int | None = None  # what stopping it frees; None: its recorded or estimated size


@dataclass(frozen=True)
class Admission:
    """The answer to "may this WARM instance start now?"."""

    verdict: Verdict
    instance: str
    needed_bytes: int
    available_bytes: int
    keep_free_bytes: int
    source: Source
    evict: tuple[str, ...] = ()  # stop these first, in this order
    freed_bytes: int = 0
    reason: str = ""

    @property
    def admitted(self) -> bool:
        return self.verdict is not Verdict.REFUSED

    @property
    def http_status(self) -> int:
        return 200 if self.admitted else OverBudget.http_status

    def raise_if_refused(self) -> None:
        """OverBudget (HTTP 503, exit code 6) with the reason, when refused."""
        if not self.admitted:
            raise OverBudget(self.reason)


def admit(
    cfg: StackConfig,
    state_dir: Path,
    spec: InstanceSpec,
    idle: Sequence[IdleInstance],
    available_bytes: int | None = None,
) -> Admission:
    """May ``spec`` (a WARM instance) start now, possibly after stopping idle WARM instances?

    ``available_bytes`` defaults to what this machine has available now. The instance's
    size is its measured figure, else its estimate; ``memory.min_free_gb`` stays free.
    Only WARM instances in ``idle`` are candidates, least recently used first; HOT and
    COLD ones are never stopped to make room.
    """
    store = MeasurementStore.in_dir(state_dir)
    est = estimate_component(cfg, spec.component, store) if spec.component in cfg.components() else None
    needed = est.total_bytes if est else 0
    source = est.source if est else Source.UNKNOWN
    avail = LocalLauncher().available_bytes() if available_bytes is None else available_bytes
    base = Admission(Verdict.FITS, spec.name, needed, avail, int(cfg.memory.min_free_gb * GB), source)
    if avail - base.keep_free_bytes >= needed:
        return _fits(base)
    return _evict_lru(cfg, base, [i for i in idle if i.tier is Tier.WARM and i.name != spec.name], store)


def _fits(a: Admission) -> Admission:
    why = f"{a.instance} needs {fmt_bytes(a.needed_bytes)} ({a.source.value}), {fmt_bytes(a.available_bytes)} available"
    if a.source is Source.UNKNOWN:
        why += "; its size is unknown, so it was not checked (declare ram_gb)"
    return replace(a, reason=why)


def _evict_lru(cfg: StackConfig, a: Admission, candidates: list[IdleInstance], store: MeasurementStore) -> Admission:
    evict: list[str] = []
    freed = 0
    for inst in sorted(candidates, key=lambda i: i.last_request_at):
        evict.append(inst.name)
        freed += _frees(cfg, inst, store)
        if a.available_bytes + freed - a.keep_free_bytes >= a.needed_bytes:
            why = (
                f"{a.instance} needs {fmt_bytes(a.needed_bytes)} ({a.source.value}) and "
                f"{fmt_bytes(a.available_bytes)} is available; stopping {', '.join(evict)} "
                f"(idle WARM, least recently used first) frees {fmt_bytes(freed)}"
            )
            return replace(a, verdict=Verdict.FITS_AFTER_EVICTION, evict=tuple(evict), freed_bytes=freed, reason=why)
    return _refuse(a, evict, freed)


def _frees(cfg: StackConfig, inst: IdleInstance, store: MeasurementStore) -> int:
    if inst.resident_bytes is not None:
        return inst.resident_bytes
    if inst.component not in cfg.components():
        return 0
    return estimate_component(cfg, inst.component, store).total_bytes


def _refuse(a: Admission, evict: list[str], freed: int) -> Admission:
    short = a.needed_bytes + a.keep_free_bytes - a.available_bytes - freed
    stoppable = (
        f"stopping every idle WARM instance ({', '.join(evict)}) would free {fmt_bytes(freed)}"
        if evict
        else "no idle WARM instance can be stopped to make room"
    )
    why = (
        f"not enough memory to start {a.instance}: it needs {fmt_bytes(a.needed_bytes)} ({a.source.value}), "
        f"{fmt_bytes(a.available_bytes)} is available and {fmt_bytes(a.keep_free_bytes)} is kept free "
        f"(memory.min_free_gb); {stoppable}, still {fmt_bytes(short)} short. Retry when load drops, "
        "stop an instance by hand, or lower its ctx_size or parallel"
    )
    return replace(a, verdict=Verdict.REFUSED, reason=why)
