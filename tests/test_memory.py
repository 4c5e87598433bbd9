"""Memory estimates, the plan, the start refusal, WARM admission and measurements.

Tolerances of the estimate against what llama-server itself reports (its log at
verbosity 4), asserted for every shape below:

* weights: the GGUF tensor bytes equal the "model buffer size" to the log's 0.01 MiB;
* KV cache: equal to the "KV buffer size" lines to the log's rounding (0.01 MiB a line),
  GQA, custom head sizes, q8_0/q4_0 caches and sliding-window layers included;
* compute + output buffers: within 25% (measured: -8% .. +16%);
* total: within 10% (measured: -3.5% .. +9.8%).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import psutil
import pytest
import yaml

from conftest import LOCAL, MODELFLEET, StackFactory, free_ports, make_record, process_of
from modelfleet import ggufmeta, memory, tinymodel
from modelfleet.config import Tier, load_config, load_config_file
from modelfleet.errors import ConfigError, OverBudget
from modelfleet.spec import server_args
from modelfleet.stack import Stack
from modelfleet.state import StateStore
from modelfleet.tinymodel import TinyShape, write_tiny_llama

MIB = 1024 * 1024
GB = memory.GB
LOG_ROUNDING = 0.01 * MIB  # llama-server prints MiB with two decimals
COMPUTE_TOLERANCE = 0.25
TOTAL_TOLERANCE = 0.10
PRODUCTION = Path(__file__).resolve().parent.parent / "examples" / "production.yaml"


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([MODELFLEET, *args], capture_output=True, text=True, timeout=180)


def server_yaml(name: str, model: Path, port: int, **fields: Any) -> str:
    lines = [f"  {name}:", f"    model: {model}", f"    port: {port}", "    threads: 1"]
    lines += [f"    {k}: {json.dumps(v)}" for k, v in fields.items()]
    return "\n".join(lines) + "\n"


# --- the header reader ---------------------------------------------------------------


@pytest.mark.parametrize(
    "shape",
    [TinyShape(n_head=4, n_head_kv=2, head_dim=32), TinyShape(arch="gemma3", sliding_window=64, n_layer=6)],
    ids=["llama-gqa", "gemma3-swa"],
)
def test_header_reader_agrees_with_gguf_reader(tmp_path: Path, shape: TinyShape) -> None:
    path = write_tiny_llama(tmp_path / "m.gguf", shape)
    header = ggufmeta.read_header(path)
    reader = gguf.GGUFReader(str(path), "r")
    expected = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert header.fields.keys() == expected.keys()
    for key, value in expected.items():
        assert header.fields[key] == (pytest.approx(value) if isinstance(value, float) else value), key
    assert header.tensor_bytes == sum(int(t.n_bytes) for t in reader.tensors)
    assert header.array_lengths["tokenizer.ggml.tokens"] == 259


def test_long_arrays_are_skipped_but_counted(tmp_path: Path) -> None:
    path = write_tiny_llama(tmp_path / "m.gguf", TinyShape())
    w = gguf.GGUFWriter(tmp_path / "long.gguf", arch="llama")
    w.add_array("test.tokens", [f"t{i}" for i in range(ggufmeta.MAX_PARSED_ARRAY + 1)])
    w.add_array("test.small", [1, 2, 3])
    w.add_uint32("test.after", 7)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    header = ggufmeta.read_header(tmp_path / "long.gguf")
    assert "test.tokens" not in header.fields and header.array_lengths["test.tokens"] == 4097
    assert header.fields["test.small"] == [1, 2, 3] and header.fields["test.after"] == 7
    assert ggufmeta.read_fields(path)["general.architecture"] == "llama"


def test_not_a_gguf_file_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"NOPE" + b"\0" * 32)
    with pytest.raises(ConfigError, match=r"bad\.gguf is not a readable GGUF file"):
        ggufmeta.read_header(bad)


def write_first_shard(path: Path, count: int) -> Path:
    """A tiny model that says it is shard 1 of ``count`` (``split.count``), as llama.cpp's gguf-split writes."""
    shape = TinyShape()
    writer = gguf.GGUFWriter(path, arch="llama")
    tinymodel._add_metadata(writer, shape, "tiny", False)
    writer.add_uint16("split.count", count)
    for name, data in tinymodel._tensors(shape, np.random.default_rng(0), f16=False, printable=True):
        writer.add_tensor(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_split_model_sums_every_shard_and_names_a_missing_one(tmp_path: Path) -> None:
    first = write_first_shard(tmp_path / "m-00001-of-00002.gguf", 2)
    second = write_tiny_llama(tmp_path / "m-00002-of-00002.gguf", TinyShape(n_layer=3))
    info = ggufmeta.model_info(first)
    assert info.shards == 2
    assert info.weights_bytes == ggufmeta.read_header(first).tensor_bytes + ggufmeta.read_header(second).tensor_bytes
    second.unlink()
    with pytest.raises(ConfigError, match=r"split in 2 files but .*m-00002-of-00002\.gguf is missing"):
        ggufmeta.model_info(first)


# --- KV cache arithmetic on metadata dicts ------------------------------------------------


def llama_fields(**over: Any) -> dict[str, Any]:
    """A Llama-3-8B-like header: 32 layers, 32 query heads, 8 KV heads of 128."""
    base = {
        "general.architecture": "llama",
        "llama.block_count": 32,
        "llama.embedding_length": 4096,
        "llama.attention.head_count": 32,
        "llama.attention.head_count_kv": 8,
        "llama.feed_forward_length": 14336,
        "llama.context_length": 8192,
        "llama.vocab_size": 128256,
    }
    return base | over


def kv(fields: dict[str, Any], **settings: Any) -> int:
    info = ggufmeta.info_from_fields(fields)
    return memory.kv_cache_bytes(info, memory.Settings(**({"ctx_size": 8192, "parallel": 1} | settings)))


def test_kv_of_a_gqa_model() -> None:
    # 32 layers x 8 KV heads x (128 + 128) x 8192 cells x 2 bytes = 1 GiB (Llama-3-8B at 8k, f16)
    assert kv(llama_fields()) == 1024 * MIB
    # Without GQA (32 KV heads) the cache is four times larger.
    assert kv(llama_fields(**{"llama.attention.head_count_kv": 32})) == 4096 * MIB


@pytest.mark.parametrize(
    ("ctk", "ctv", "expected_mib"), [("q8_0", "q8_0", 544), ("q4_0", "q4_0", 288), ("q8_0", "q4_0", 416)]
)
def test_kv_of_quantized_caches(ctk: str, ctv: str, expected_mib: int) -> None:
    # q8_0 stores 32 values in 34 bytes, q4_0 in 18: 1024 MiB of f16 -> 544 / 288 MiB.
    assert kv(llama_fields(), cache_type_k=ctk, cache_type_v=ctv) == expected_mib * MIB


def test_kv_follows_llama_cpp_context_rounding() -> None:
    fields = llama_fields()
    per_cell = 32 * 8 * 256 * 2
    # llama.cpp pads n_ctx to 256 and splits it per slot, padding each slot to 256 again:
    # -c 1000 -np 3 -> 1024 / 3 = 341 -> 512 cells per slot, 1536 cells in all (seen in its log).
    assert kv(fields, ctx_size=1000, parallel=3) == 1536 * per_cell
    # ctx_size unset: the training context for every slot.
    assert kv(fields, ctx_size=0, parallel=2) == 2 * 8192 * per_cell
    # A unified cache is shared: the total stays ctx_size.
    assert kv(fields, ctx_size=4096, parallel=4, unified=True) == 4096 * per_cell


def gemma3_fields(**over: Any) -> dict[str, Any]:
    """A Gemma-3-27B-like header: 62 layers, 16 KV heads of 128, a 1024-token window."""
    base = {
        "general.architecture": "gemma3",
        "gemma3.block_count": 62,
        "gemma3.embedding_length": 5376,
        "gemma3.attention.head_count": 32,
        "gemma3.attention.head_count_kv": 16,
        "gemma3.attention.key_length": 128,
        "gemma3.attention.value_length": 128,
        "gemma3.attention.sliding_window": 1024,
        "gemma3.feed_forward_length": 21504,
        "gemma3.context_length": 131072,
    }
    return base | over


def test_kv_of_a_sliding_window_model() -> None:
    info = ggufmeta.info_from_fields(gemma3_fields())
    # gemma3: five sliding-window layers, then a full one (llama.cpp's load_swa_pattern(ml, 6)).
    assert info.swa_layers[:6] == (True, True, True, True, True, False)
    assert sum(info.swa_layers) == 52 and info.n_swa == 1024
    per_cell = 16 * 256 * 2
    # Full layers keep 32768 cells; window layers pad(1024 + 512 ubatch) = 1536 cells.
    assert kv(gemma3_fields(), ctx_size=32768) == per_cell * (10 * 32768 + 52 * 1536)
    # Ignoring the window (what Ollama does) would count 62 full layers: 4x more here.
    assert kv(gemma3_fields(), ctx_size=32768, swa_full=True) == per_cell * 62 * 32768
    # Unified across 4 slots, the window cache holds 4 windows + a ubatch.
    unified = kv(gemma3_fields(), ctx_size=32768, parallel=4, unified=True)
    assert unified == per_cell * (10 * 32768 + 52 * 4608)


def test_gemma2_uses_its_default_window_and_an_explicit_pattern_wins() -> None:
    fields = {k.replace("gemma3", "gemma2"): v for k, v in gemma3_fields().items()} | {"general.architecture": "gemma2"}
    del fields["gemma2.attention.sliding_window"]
    info = ggufmeta.info_from_fields(fields)
    assert info.n_swa == 4096 and info.swa_layers[:4] == (True, False, True, False)
    flags = [i % 3 == 0 for i in range(62)]
    info = ggufmeta.info_from_fields(gemma3_fields(**{"gemma3.attention.sliding_window_pattern": flags}))
    assert list(info.swa_layers) == flags


def test_hybrid_recurrent_model_keeps_kv_only_for_attention_layers() -> None:
    fields = {
        "general.architecture": "qwen3next",
        "qwen3next.block_count": 48,
        "qwen3next.embedding_length": 2048,
        "qwen3next.attention.head_count": 16,
        "qwen3next.attention.head_count_kv": 2,
        "qwen3next.attention.key_length": 256,
        "qwen3next.attention.value_length": 256,
        "qwen3next.context_length": 262144,
        "qwen3next.ssm.conv_kernel": 4,
        "qwen3next.ssm.inner_size": 4096,
        "qwen3next.ssm.state_size": 128,
        "qwen3next.ssm.group_count": 16,
        "qwen3next.expert_feed_forward_length": 512,
        "qwen3next.expert_used_count": 10,
    }
    info = ggufmeta.info_from_fields(fields)
    assert sum(1 for h in info.head_kv if h) == 12  # every 4th layer attends
    state = 3 * (4096 + 2 * 16 * 128) + 128 * 4096  # conv + ssm floats per layer and sequence
    assert info.recurrent_state_floats == state
    expected = 12 * 2 * 512 * 2 * 8192 + 36 * state * 4
    assert kv(fields) == expected
    assert info.n_ff == 5120  # the active experts


def test_encoders_keep_no_kv_cache() -> None:
    fields = {
        "general.architecture": "bert",
        "bert.block_count": 24,
        "bert.embedding_length": 1024,
        "bert.attention.head_count": 16,
        "bert.context_length": 512,
    }
    assert kv(fields, ctx_size=512) == 0


# --- estimates against llama-server's own buffers -------------------------------------------

SHAPES = {
    "default": (TinyShape(), {"ctx_size": 1024, "parallel": 2}),
    "gqa-head_dim": (TinyShape(n_layer=4, n_embd=128, n_head=8, n_head_kv=2, head_dim=32), {"ctx_size": 1024}),
    "head_dim-64": (TinyShape(n_embd=128, n_ff=256, head_dim=64), {"ctx_size": 2048, "parallel": 2}),
    "wide-ffn": (TinyShape(n_embd=128, n_ff=1024), {"ctx_size": 1024, "parallel": 2}),
    "deep": (TinyShape(n_layer=8, n_embd=128, n_ff=256), {"ctx_size": 4096, "parallel": 4}),
    # Quantized caches need head sizes that are a multiple of their block (32).
    "q8_0": (
        TinyShape(n_layer=4, n_embd=128, n_head=8, n_head_kv=2, head_dim=32),
        {"ctx_size": 1024, "cache_type_k": "q8_0"},
    ),
    "q4_0": (
        TinyShape(n_layer=4, n_embd=128, n_head=4, n_head_kv=2),
        {"ctx_size": 2048, "parallel": 2, "cache_type_k": "q4_0", "cache_type_v": "q4_0"},
    ),
    "swa": (
        TinyShape(arch="gemma3", sliding_window=128, n_layer=6, n_head_kv=2, head_dim=32),
        {"ctx_size": 4096, "parallel": 2, "cache_type_k": "q8_0", "cache_type_v": "q8_0"},
    ),
    "swa-unified": (
        TinyShape(arch="gemma3", sliding_window=128, n_layer=6, n_head_kv=2),
        {"ctx_size": 6144, "parallel": 3, "args": ["--kv-unified"]},
    ),
}


def assert_close_to_reported(est: memory.Estimate, reported: dict[str, int], n_kv_lines: int = 1) -> None:
    assert abs(est.weights_bytes - reported["model"]) <= LOG_ROUNDING
    assert abs(est.kv_bytes - reported["kv"]) <= LOG_ROUNDING * n_kv_lines
    buffers = reported["compute"] + reported.get("output", 0)
    assert abs(est.compute_bytes - buffers) <= COMPUTE_TOLERANCE * buffers
    assert abs(est.total_bytes - sum(reported.values())) <= TOTAL_TOLERANCE * sum(reported.values())


@pytest.mark.parametrize("case", list(SHAPES), ids=list(SHAPES))
def test_estimate_matches_llama_server_buffers(make_stack: StackFactory, tmp_path: Path, case: str) -> None:
    shape, fields = SHAPES[case]
    model = write_tiny_llama(tmp_path / f"{case}.gguf", shape)
    (port,) = free_ports(1)
    stack = make_stack("servers:\n" + server_yaml("srv", model, port, **fields))
    stack.start(["srv"])
    rec = stack.store.read()[f"server_{port}"]
    reported = memory.parse_buffer_log(Path(rec.log_file).read_text())
    est = memory.estimate_component(stack.cfg, "srv")
    assert est.source is memory.Source.READ
    assert_close_to_reported(est, reported, n_kv_lines=2 if shape.sliding_window else 1)

    # The state file keeps the estimate beside the measurement; status shows both.
    mem = rec.extra["memory"]
    assert mem["estimate_bytes"] == est.total_bytes and mem["buffers"] == reported
    assert mem["measured_bytes"] >= sum(reported.values()) and mem["rss_bytes"] > 0
    (row,) = [r for r in stack.status() if r.name == "srv"]
    assert (row.estimate_bytes, row.measured_bytes) == (est.total_bytes, mem["measured_bytes"])


def test_draft_model_is_counted(make_stack: StackFactory, tiny_model: Path) -> None:
    (port,) = free_ports(1)
    stack = make_stack(
        "servers:\n" + server_yaml("srv", tiny_model, port, ctx_size=1024, draft={"model": str(tiny_model), "max": 4})
    )
    stack.start(["srv"])
    rec = stack.store.read()[f"server_{port}"]
    reported = memory.parse_buffer_log(Path(rec.log_file).read_text())
    alone = memory.model_estimate(
        ggufmeta.model_info(tiny_model), memory.settings_for(stack.cfg, stack.cfg.servers["srv"])
    )
    est = memory.estimate_component(stack.cfg, "srv")
    assert est.total_bytes == 2 * alone.total_bytes  # the draft runs with the same context and slots
    assert_close_to_reported(est, reported, n_kv_lines=2)


@pytest.mark.dev_model
def test_estimate_of_the_dev_model(make_stack: StackFactory, dev_model: Path) -> None:
    (port,) = free_ports(1)
    stack = make_stack("servers:\n" + server_yaml("dev", dev_model, port, ctx_size=2048, parallel=2))
    stack.start(["dev"])
    rec = stack.store.read()[f"server_{port}"]
    reported = memory.parse_buffer_log(Path(rec.log_file).read_text())
    est = memory.estimate_component(stack.cfg, "dev")
    assert_close_to_reported(est, reported)
    assert abs(est.total_bytes - sum(reported.values())) <= 0.02 * sum(reported.values())


def test_later_plans_use_the_measured_figure(make_stack: StackFactory, tiny_model: Path) -> None:
    (port,) = free_ports(1)
    stack = make_stack("servers:\n" + server_yaml("srv", tiny_model, port, ctx_size=512))
    store = memory.MeasurementStore.in_dir(stack.store.dir)
    before = memory.build_plan(stack.cfg, store=store, machine_total_bytes=64 * GB)
    assert before.sources()["read"] == ["srv"]
    stack.start(["srv"])
    measured = stack.store.read()[f"server_{port}"].extra["memory"]["measured_bytes"]
    after = memory.build_plan(stack.cfg, store=store, machine_total_bytes=64 * GB)
    (srv,) = after.components
    assert srv.each.source is memory.Source.MEASURED and srv.total_bytes == measured
    # Other settings of the same model are another measurement.
    srv_cfg = stack.cfg.servers["srv"].model_copy(update={"ctx_size": 1024})
    other = stack.cfg.model_copy(update={"servers": {"srv": srv_cfg}})
    assert memory.build_plan(other, store=store, machine_total_bytes=64 * GB).sources()["read"] == ["srv"]


def test_buffer_log_is_read_from_the_last_start_only() -> None:
    text = (
        f"{memory.START_MARKER}srv: old\nload_tensors:   CPU_Mapped model buffer size =   100.00 MiB\n"
        f"{memory.START_MARKER}srv: new\nload_tensors:   CPU_Mapped model buffer size =     2.00 MiB\n"
        "load_tensors:   CPU_REPACK model buffer size =     1.00 MiB\n"
        "llama_kv_cache:        CPU KV buffer size =     0.50 MiB\n"
        "llama_kv_cache:        CPU KV buffer size =     0.25 MiB\n"
        "llama_context:        CPU  output buffer size =     0.38 MiB\n"
        "sched_reserve:        CPU compute buffer size =     2.77 MiB\n"
        "llama_context: CPU compute buffer size is 2.7700 MiB, matches expectation of 2.7700 MiB\n"
    )
    assert memory.parse_buffer_log(text) == {
        "model": 3 * MIB,
        "kv": round(0.75 * MIB),
        "output": round(0.38 * MIB),
        "compute": round(2.77 * MIB),
    }


def test_buffers_are_logged_unless_switched_off(tmp_path: Path) -> None:
    on = load_config(f"servers:\n  s: {{model: {tmp_path}/m.gguf, port: 8080}}\n")
    off = load_config(f"servers:\n  s: {{model: {tmp_path}/m.gguf, port: 8080}}\nmemory: {{log_buffers: false}}\n")
    assert _after(server_args(on, "s", on.servers["s"], 8080, None), "--verbosity") == ["--verbosity", "4"]
    assert "--verbosity" not in server_args(off, "s", off.servers["s"], 8080, None)


def _after(argv: list[str], flag: str) -> list[str]:
    i = argv.index(flag)
    return argv[i : i + 2]


# --- the plan ----------------------------------------------------------------------------


def test_production_example_comes_out_at_the_seed_figures() -> None:
    plan = memory.build_plan(load_config_file(PRODUCTION))
    assert plan.total_bytes == 1130 * GB and plan.total_from == "memory.total_gb"
    assert 535 * GB <= plan.hot_bytes <= 538 * GB  # seed: "HOT Tier: 535GB (47%)", "~538GB (48%)"
    assert 47 <= round(plan.pct(plan.hot_bytes)) <= 48
    assert plan.reserve_bytes == pytest.approx(135.6 * GB)  # "OS + Buffers: ~135GB (12%)"
    assert round(plan.pct(plan.kv_space_bytes)) == 41  # "KV Cache: ~460GB (41%)"
    assert plan.fits
    sources = plan.sources()
    assert "architect_coding" in sources["declared"] and "embedder" in sources["declared"]
    assert sources["read"] == [] and sources["unknown"] == ["document_formalizer"]
    (embedder,) = [c for c in plan.components if c.name == "embedder"]
    assert embedder.replicas == 6 and embedder.total_bytes == 6 * int(0.67 * GB)
    assert [c.name for c in plan.tier(Tier.WARM)] == ["worker_fast_1", "worker_fast_2"]


def test_plan_command_prints_the_tree_and_json() -> None:
    res = run_cli("plan", "--config", str(PRODUCTION))
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0] == "Total RAM: 1130.0 GB (memory.total_gb)"
    assert lines[1] == "├── HOT Tier: 536.4 GB (47%) - always resident"
    assert "│   ├── architect_coding: 271.0 GB (declared)" in lines
    assert "│   ├── embedder (6x): 4.0 GB (declared, 670.0 MB each)" in lines
    assert any(line.startswith("├── KV Cache: 458.0 GB (41%)") for line in lines)
    assert any(line.startswith("└── OS + Buffers: 135.6 GB (12%)") for line in lines)
    data = json.loads(run_cli("plan", "--config", str(PRODUCTION), "--json", "--total-gb", "500").stdout)
    assert data["total_from"] == "--total-gb" and data["fits"] is False
    assert data["overflow_bytes"] == data["required_bytes"] - 500 * GB > 0


def test_declared_sizes_stand_in_only_for_absent_files(tmp_path: Path, tiny_model: Path) -> None:
    cfg = load_config(
        "servers:\n"
        f"  here: {{model: {tiny_model}, port: 8080, ram_gb: 50}}\n"
        f"  gone: {{model: {tmp_path}/absent.gguf, port: 8081, ram_gb: 2}}\n"
        f"  unknown: {{model: {tmp_path}/absent.gguf, port: 8082, tier: warm}}\n"
    )
    plan = memory.build_plan(cfg, total_gb=100)
    assert plan.sources() == {"measured": [], "read": ["here"], "declared": ["gone"], "unknown": ["unknown"]}
    tree = memory.render_tree(plan)
    assert "gone: 2.0 GB (declared)" in tree and "here: " in tree and "(read: weights" in tree
    assert "unknown: ? (size unknown: model file is absent; declare ram_gb)" in tree


def test_memory_config_errors_name_the_key() -> None:
    with pytest.raises(ConfigError, match="memory: give 'os_reserve_gb' or 'os_reserve_pct', not both"):
        load_config("memory: {os_reserve_gb: 8, os_reserve_pct: 10}\n")
    with pytest.raises(ConfigError, match=r"memory\.totl_gb: unknown key"):
        load_config("memory: {totl_gb: 8}\n")


# --- start refuses an over-budget plan -------------------------------------------------------


def over_budget_config(tmp_path: Path, model: Path) -> Path:
    (port,) = free_ports(1)
    cfg = {
        "servers": {"big": {"model": str(model), "port": port, "ctx_size": 512, "threads": 1}},
        "memory": {"total_gb": 0.002, "os_reserve_gb": 0.001},  # 2 MB: the tiny model needs ~2.6 MB
        "api": {"enabled": False},
    }
    path = tmp_path / "over.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_start_refuses_an_over_budget_plan_before_starting_anything(tmp_path: Path, tiny_model: Path) -> None:
    cfg = over_budget_config(tmp_path, tiny_model)
    state = tmp_path / "state"
    res = run_cli("start", "--config", str(cfg), "--state-dir", str(state))
    assert res.returncode == OverBudget.exit_code == 6, res.stderr
    assert "├── HOT Tier:" in res.stderr and "✗ OVER BUDGET" in res.stderr
    assert "does not fit" in res.stderr and "nothing was started" in res.stderr and "--ignore-memory" in res.stderr
    assert StateStore(state).read() == {} and not (state / "logs").exists()

    try:  # the same plan starts with --ignore-memory (so the refusal above was the memory check)
        res = run_cli("start", "--ignore-memory", "--json", "--config", str(cfg), "--state-dir", str(state))
        assert res.returncode == 0, res.stderr
        assert "warning: the memory plan does not fit" in res.stderr and "starting anyway" in res.stderr
        res = run_cli("status", "--json", "--config", str(cfg), "--state-dir", str(state))
        (row,) = json.loads(res.stdout)["instances"]
        assert row["status"] == "healthy" and row["estimate_bytes"] > 0 and row["measured_bytes"] > 0
        assert "EST" in run_cli("status", "--config", str(cfg), "--state-dir", str(state)).stdout
    finally:
        run_cli("stop", "--all", "--config", str(cfg), "--state-dir", str(state))
        for rec in StateStore(state).read().values():
            if (proc := process_of(rec)) is not None:
                proc.kill()


# --- admission of WARM instances -------------------------------------------------------------


def admission_stack(tmp_path: Path) -> Stack:
    text = (
        "servers:\n"
        f"  hot: {{model: {tmp_path}/a.gguf, port: 9001, ram_gb: 4}}\n"
        f"  w1: {{model: {tmp_path}/a.gguf, port: 9002, tier: warm, ram_gb: 1}}\n"
        f"  w2: {{model: {tmp_path}/a.gguf, port: 9003, tier: warm, ram_gb: 1}}\n"
        f"  w3: {{model: {tmp_path}/a.gguf, port: 9004, tier: warm, ram_gb: 1}}\n"
        f"  cold: {{model: {tmp_path}/a.gguf, port: 9005, tier: cold, ram_gb: 3}}\n"
        "memory: {min_free_gb: 0.5}\n"
    )
    return Stack(load_config(text), tmp_path / "state", None)


def spec_of(stack: Stack, name: str) -> Any:
    (spec,) = stack.specs([name])
    return spec


IDLE = [
    memory.IdleInstance("hot", "hot", Tier.HOT, last_request_at=1.0),  # the oldest, and never evicted
    memory.IdleInstance("cold", "cold", Tier.COLD, last_request_at=2.0),  # started by hand: never evicted
    memory.IdleInstance("w2", "w2", Tier.WARM, last_request_at=30.0),
    memory.IdleInstance("w3", "w3", Tier.WARM, last_request_at=20.0),
]


def test_admission_fits_without_evicting(tmp_path: Path) -> None:
    stack = admission_stack(tmp_path)
    a = memory.admit(stack.cfg, stack.store.dir, spec_of(stack, "w1"), IDLE, available_bytes=int(1.5 * GB))
    assert a.verdict is memory.Verdict.FITS and a.evict == () and a.admitted
    assert (a.needed_bytes, a.keep_free_bytes, a.source) == (GB, GB // 2, memory.Source.DECLARED)


def test_admission_evicts_idle_warm_instances_least_recently_used_first(tmp_path: Path) -> None:
    stack = admission_stack(tmp_path)
    a = memory.admit(stack.cfg, stack.store.dir, spec_of(stack, "w1"), IDLE, available_bytes=int(0.9 * GB))
    assert a.verdict is memory.Verdict.FITS_AFTER_EVICTION and a.evict == ("w3",)  # w3 idle longest
    a = memory.admit(stack.cfg, stack.store.dir, spec_of(stack, "w1"), IDLE, available_bytes=int(0.2 * GB))
    assert a.evict == ("w3", "w2") and a.freed_bytes == 2 * GB
    assert "stopping w3, w2" in a.reason and a.http_status == 200
    # A measured size of the idle instance counts instead of its estimate.
    small = [memory.IdleInstance("w3", "w3", Tier.WARM, 20.0, resident_bytes=GB // 10), *IDLE[2:3]]
    a = memory.admit(stack.cfg, stack.store.dir, spec_of(stack, "w1"), small, available_bytes=int(1.3 * GB))
    assert a.evict == ("w3", "w2")


def test_admission_refuses_with_a_reason_and_never_evicts_hot_or_cold(tmp_path: Path) -> None:
    stack = admission_stack(tmp_path)
    a = memory.admit(stack.cfg, stack.store.dir, spec_of(stack, "w1"), IDLE[:2], available_bytes=int(1.2 * GB))
    assert a.verdict is memory.Verdict.REFUSED and a.evict == () and not a.admitted
    assert a.http_status == 503
    assert "not enough memory to start w1: it needs 1.0 GB (declared), 1.2 GB is available" in a.reason
    assert "no idle WARM instance can be stopped" in a.reason and "still 300.0 MB short" in a.reason
    with pytest.raises(OverBudget, match="not enough memory to start w1") as info:
        a.raise_if_refused()
    assert info.value.http_status == 503
    small = [memory.IdleInstance(i.name, i.component, i.tier, i.last_request_at, GB // 10) for i in IDLE]
    a = memory.admit(stack.cfg, stack.store.dir, spec_of(stack, "w1"), small, available_bytes=0)
    assert a.verdict is memory.Verdict.REFUSED and a.evict == ()
    assert "stopping every idle WARM instance (w3, w2) would free 200.0 MB, still 1.3 GB short" in a.reason


def test_admission_uses_the_measured_size(tmp_path: Path) -> None:
    stack = admission_stack(tmp_path)
    store = memory.MeasurementStore.in_dir(stack.store.dir)
    store.put(memory.measurement_key(stack.cfg, "w1"), "w1", memory.Measurement(3 * GB, {}, "now"))
    a = memory.admit(stack.cfg, stack.store.dir, spec_of(stack, "w1"), [], available_bytes=2 * GB)
    assert a.verdict is memory.Verdict.REFUSED and a.source is memory.Source.MEASURED
    assert a.needed_bytes == 3 * GB


def test_recorded_memory_survives_the_state_file(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    rec = make_record("r", 1, 8080, "now", None, "log", extra={"memory": {"estimate_bytes": 5, "measured_bytes": 7}})
    store.put(rec)
    assert memory.recorded(store.read()["server_8080"]) == (5, 7)
    assert memory.recorded(make_record("r", 1, 8081, "now", None, "log")) == (None, None)


def test_measure_reads_this_run_from_the_end_of_a_long_log(tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    old = f"{memory.START_MARKER}old\nload_tensors:   CPU_Mapped model buffer size =   999.00 MiB\n"
    log.write_text(old + "x" * (memory.LOG_TAIL_BYTES + 10) + "\n")
    with log.open("a") as fh:
        fh.write(f"{memory.START_MARKER}new\nllama_kv_cache:        CPU KV buffer size =     1.00 MiB\n")
    me = psutil.Process()
    rec = make_record("r", me.pid, 8080, "now", None, str(log), create_time=me.create_time())
    m = memory.measure(LOCAL, rec)
    assert m.buffers == {"kv": MIB} and m.rss_bytes > 0
    assert m.resident_bytes == m.rss_bytes  # this test process is larger than 1 MiB
