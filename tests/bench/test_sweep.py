"""The concurrency sweep: statistics and the decision rule on recorded numbers (the seed's
among them), the CSV, ``--apply`` on a commented file, the plot, and real sweeps of a tiny
generated model through the library and the installed CLI, interrupted ones included."""

from __future__ import annotations

import csv
import dataclasses
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import psutil
import pytest

from conftest import MODELFLEET, StackFactory, free_ports, process_of
from modelfleet.bench.sweep import (
    CSV_COLUMNS,
    PLOT_MISSING,
    BatchResult,
    CsvLog,
    Decision,
    DecisionRule,
    LevelStats,
    RequestResult,
    Sweep,
    SweepPlan,
    SweepResult,
    apply_parallel,
    compare,
    decide,
    edit_parallel,
    level_stats,
    parse_levels,
    percentile,
    read_csv,
    read_prompts,
    render_markdown,
    stats_from_csv,
    write_plot,
)
from modelfleet.config import load_config
from modelfleet.errors import ConfigError, UsageError
from modelfleet.launcher import LocalLauncher
from modelfleet.spec import InstanceSpec


def lv(parallel: int, tps: float, p95_s: float, **kw: object) -> LevelStats:
    """A measured level as the seed reported it: aggregate TPS and p95 latency."""
    fields: dict[str, object] = {
        "requests": 5 * parallel,
        "generated_tokens": int(tps * 10),
        "wall_s": 10.0,
        "aggregate_tps": tps,
        "p50_latency_s": p95_s * 0.8,
        "p95_latency_s": p95_s,
        **kw,
    }
    return LevelStats(parallel, **fields)  # type: ignore[arg-type]


def req(
    batch: int, index: int, latency_s: float, tokens: int = 100, phase: str = "measured", **kw: object
) -> RequestResult:
    return RequestResult(2, phase, batch, index, latency_s, generated_tokens=tokens, **kw)  # type: ignore[arg-type]


# --- statistics ------------------------------------------------------------------


def test_percentile_interpolates_linearly_like_numpy() -> None:
    assert percentile([5, 1, 4, 2, 3], 50) == 3
    assert percentile([1, 2, 3, 4, 5], 95) == pytest.approx(4.8)
    assert percentile([7.0], 95) == 7.0
    assert percentile([], 95) == 0.0


def test_level_stats_on_recorded_requests_ignores_warmup_and_failed_requests() -> None:
    batches = [
        BatchResult(2, "warmup", 0, 50.0, (req(0, 0, 40.0, phase="warmup"), req(0, 1, 50.0, phase="warmup"))),
        BatchResult(2, "measured", 0, 2.0, (req(0, 0, 1.0, ttft_s=0.1), req(0, 1, 2.0, ttft_s=0.3))),
        BatchResult(2, "measured", 1, 3.0, (req(1, 0, 2.5, ttft_s=0.2), req(1, 1, 3.0, ttft_s=0.4))),
        BatchResult(2, "measured", 2, 1.0, (req(2, 0, 0.5, tokens=0, error="HTTP 500: boom"),)),
    ]
    s = level_stats(2, batches)
    assert (s.requests, s.errors, s.generated_tokens) == (5, 1, 400)
    assert s.wall_s == 6.0
    assert s.aggregate_tps == pytest.approx(400 / 6.0)
    assert s.per_request_tps == pytest.approx((100 / 1.0 + 100 / 2.0 + 100 / 2.5 + 100 / 3.0) / 4)
    assert s.p50_latency_s == pytest.approx(2.25)
    assert s.p95_latency_s == pytest.approx(2.925)  # between 2.5 and 3.0 at 85%
    assert s.p50_ttft_s == pytest.approx(0.25)
    assert s.first_error == "HTTP 500: boom"
    assert not s.measurable  # a level where requests failed is never a candidate


def test_compare_measures_against_the_lowest_measurable_level() -> None:
    levels = compare([lv(4, 30.0, 20.0), lv(1, 10.0, 10.0), lv(2, 22.1, 13.3)])
    assert [x.parallel for x in levels] == [1, 2, 4]
    assert [x.p95_multiplier for x in levels] == pytest.approx([1.0, 1.33, 2.0])
    assert [x.tps_gain for x in levels] == pytest.approx([0.0, 1.21, 2.0])
    failed_first = compare([LevelStats(1, failure="did not start"), lv(2, 20.0, 5.0), lv(4, 30.0, 10.0)])
    assert failed_first[0].p95_multiplier is None
    assert [x.p95_multiplier for x in failed_first[1:]] == pytest.approx([1.0, 2.0])


# --- the decision rule: the seed's own numbers -------------------------------------


def test_seed_frontdoor_gains_121_percent_at_p95_multiplier_1_33_so_parallel_2() -> None:
    d = decide([lv(1, 10.0, 10.0), lv(2, 22.1, 13.3)])
    assert d.parallel == 2
    assert d.reason == "+121% aggregate TPS, p95 multiplier 1.33"
    assert d.summary == "parallel 2: +121% aggregate TPS, p95 multiplier 1.33"


def test_seed_coder_p95_multiplier_1_98_keeps_1() -> None:
    d = decide([lv(1, 10.0, 10.0), lv(2, 17.0, 19.8)])
    assert d.parallel == 1
    assert d.reason == "c=2 rejected: p95 multiplier 1.98 ≥ 1.5"
    assert d.summary.startswith("keep parallel 1: ")


def test_seed_worker_p95_multiplier_1_505_and_up_keeps_1() -> None:
    d = decide([lv(1, 10.0, 10.0), lv(2, 19.0, 15.05), lv(4, 30.0, 31.0)])
    assert d.parallel == 1
    # Three decimals near the limit, so 1.505 does not print as a misleading 1.50.
    assert "c=2 rejected: p95 multiplier 1.505 ≥ 1.5" in d.reason
    assert "c=4 rejected: p95 multiplier 3.10 ≥ 1.5" in d.reason


def test_multiplier_exactly_at_the_limit_is_rejected() -> None:
    assert decide([lv(1, 10.0, 10.0), lv(2, 20.0, 15.0)]).parallel == 1


def test_a_level_that_gains_too_little_is_rejected() -> None:
    d = decide([lv(1, 10.0, 10.0), lv(2, 10.5, 11.0)])
    assert d.parallel == 1
    assert d.reason == "c=2 rejected: aggregate TPS +5% < +10%"


def test_the_largest_accepted_level_wins_and_larger_rejections_are_named() -> None:
    assert decide([lv(1, 10.0, 10.0), lv(2, 15.0, 11.0), lv(4, 20.0, 14.0)]).parallel == 4
    d = decide([lv(1, 10.0, 10.0), lv(2, 15.0, 11.0), lv(4, 20.0, 16.0)])
    assert d.parallel == 2
    assert d.reason == "+50% aggregate TPS, p95 multiplier 1.10; c=4 rejected: p95 multiplier 1.60 ≥ 1.5"
    assert d.verdicts == {1: "baseline", 2: "accepted", 4: "p95 multiplier 1.60 ≥ 1.5"}


def test_failed_and_erroring_levels_are_never_chosen() -> None:
    d = decide([lv(1, 10.0, 10.0), lv(2, 30.0, 10.0, errors=1, first_error="HTTP 500"), LevelStats(4, failure="OOM")])
    assert d.parallel == 1
    assert "c=2 rejected: 1 of 10 requests failed (HTTP 500)" in d.reason
    assert "c=4 rejected: failed: OOM" in d.reason
    nothing = decide([LevelStats(1, failure="port taken")])
    assert nothing.parallel is None and "port taken" in nothing.summary


def test_the_rule_is_configurable() -> None:
    coder = [lv(1, 10.0, 10.0), lv(2, 17.0, 19.8)]
    assert decide(coder, DecisionRule(max_p95_multiplier=2.0)).parallel == 2
    assert decide(coder, DecisionRule(max_p95_multiplier=2.0, min_tps_gain=0.8)).parallel == 1
    with pytest.raises(UsageError, match=r"above 1\.0"):
        DecisionRule(max_p95_multiplier=1.0)


# --- inputs ----------------------------------------------------------------------


def test_parse_levels_sorts_and_dedupes_and_names_bad_values() -> None:
    assert parse_levels("4, 1,2,2") == (1, 2, 4)
    for bad in ("", "0", "x", "1,300", "2.5"):
        with pytest.raises(UsageError, match="--parallel"):
            parse_levels(bad)


@pytest.mark.parametrize("bad", ["²", "١", "1,٣", "𝟐", "-1", "+2", "9" * 5000])
def test_parse_levels_takes_only_ascii_whole_numbers(bad: str) -> None:
    """'²' and '١' pass str.isdigit(), which int() then refuses with a ValueError."""
    with pytest.raises(UsageError, match="is not a slot count") as info:
        parse_levels(bad)
    assert len(str(info.value)) < 200


def test_prompt_file_gives_one_prompt_per_paragraph(tmp_path: Path) -> None:
    f = tmp_path / "prompts.txt"
    f.write_text("first prompt\non two lines\n\n\nsecond prompt\n")
    assert read_prompts(f) == ("first prompt\non two lines", "second prompt")
    f.write_text("\n  \n")
    with pytest.raises(UsageError, match="no prompt"):
        read_prompts(f)


# --- the CSV ---------------------------------------------------------------------


def test_csv_appends_after_its_header_and_refuses_a_foreign_file(tmp_path: Path) -> None:
    path = tmp_path / "s.csv"
    for run in ("run-a", "run-b"):
        log = CsvLog(path, run, "srv", 512)
        log.batch(BatchResult(2, "measured", 0, 1.5, (req(0, 0, 1.0), req(0, 1, 1.5))))
        log.close()
    rows = list(csv.reader(path.open()))
    assert tuple(rows[0]) == CSV_COLUMNS and len(rows) == 5  # one header, then 2 rows per run
    batches, _ = read_csv(path)  # the last run by default
    assert len(batches) == 1 and batches[0].wall_s == 1.5 and len(batches[0].requests) == 2
    other = tmp_path / "other.csv"
    other.write_text("a,b\n1,2\n")
    with pytest.raises(UsageError, match="choose another --csv"):
        CsvLog(other, "run", "srv", 512)


# --- --apply ---------------------------------------------------------------------

STACK_FILE = textwrap.dedent(
    """\
    # Production stack. Edited by hand; keep the comments.
    name: prod

    servers:
      frontdoor:
        model: /models/frontdoor.gguf   # 30B MoE
        port: 8080
        roles: [frontdoor]
        parallel: 1       # set by the last sweep
        ctx_size: 8192    # total, split across slots

      # The coder has no parallel key: it runs the default.
      coder:
        model: "/models/coder.gguf"
        port: 8081
        ctx_size: 16384
        roles:
          - coder_escalation
    """
)


def changed_lines(before: str, after: str) -> list[tuple[str, str]]:
    a, b = before.splitlines(), after.splitlines()
    assert len(a) == len(b)
    return [(x, y) for x, y in zip(a, b, strict=True) if x != y]


def test_apply_replaces_only_the_values_keeping_comments_and_layout(tmp_path: Path) -> None:
    path = tmp_path / "stack.yaml"
    path.write_text(STACK_FILE)
    changes = apply_parallel(path, "frontdoor", 2, 16384)
    after = path.read_text()
    assert [str(c) for c in changes] == [
        "servers.frontdoor.parallel: 1 → 2",
        "servers.frontdoor.ctx_size: 8192 → 16384",
    ]
    assert changed_lines(STACK_FILE, after) == [
        ("    parallel: 1       # set by the last sweep", "    parallel: 2       # set by the last sweep"),
        ("    ctx_size: 8192    # total, split across slots", "    ctx_size: 16384    # total, split across slots"),
    ]
    cfg = load_config(after)
    assert (cfg.servers["frontdoor"].parallel, cfg.servers["frontdoor"].ctx_size) == (2, 16384)


def test_apply_inserts_a_missing_parallel_under_model(tmp_path: Path) -> None:
    path = tmp_path / "stack.yaml"
    path.write_text(STACK_FILE)
    changes = apply_parallel(path, "coder", 4, 65536)
    after = path.read_text()
    assert [str(c) for c in changes] == ["servers.coder.parallel: (unset) → 4", "servers.coder.ctx_size: 16384 → 65536"]
    lines = after.splitlines()
    i = lines.index('    model: "/models/coder.gguf"')
    assert lines[i + 1] == "    parallel: 4"
    assert after.replace("    parallel: 4\n", "").replace("65536", "16384") == STACK_FILE
    assert load_config(after).servers["coder"].parallel == 4


def test_apply_leaves_the_file_alone_when_nothing_changes(tmp_path: Path) -> None:
    path = tmp_path / "stack.yaml"
    path.write_text(STACK_FILE)
    before = path.stat().st_mtime_ns
    assert apply_parallel(path, "frontdoor", 1, 8192) == []
    assert apply_parallel(path, "coder", 1, 16384) == []  # parallel 1 is the default: no line is added
    assert path.read_text() == STACK_FILE and path.stat().st_mtime_ns == before


def test_apply_refuses_what_it_cannot_edit_safely(tmp_path: Path) -> None:
    flow = "servers:\n  tiny: {model: /m.gguf, port: 8080}\n"
    with pytest.raises(ConfigError, match="flow style"):
        edit_parallel(flow, "tiny", 2)
    assert edit_parallel("servers:\n  tiny: {model: /m.gguf, port: 8080, parallel: 1}\n", "tiny", 2)[0] == (
        "servers:\n  tiny: {model: /m.gguf, port: 8080, parallel: 2}\n"
    )
    with pytest.raises(ConfigError, match=r"servers\.nosuch is not a mapping"):
        edit_parallel(STACK_FILE, "nosuch", 2)


# --- the plot --------------------------------------------------------------------


def recorded_result() -> SweepResult:
    levels = compare([lv(1, 10.0, 10.0), lv(2, 22.1, 13.3), lv(4, 30.0, 25.0)])
    return SweepResult("frontdoor", 8080, 1, 8192, 8192, levels, decide(levels), run="r")


def test_plot_is_a_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    path = tmp_path / "plots" / "sweep.png"
    assert write_plot(recorded_result(), path) is None
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_says_how_to_get_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    path = tmp_path / "sweep.png"
    assert write_plot(recorded_result(), path) == PLOT_MISSING
    assert "modelfleet[plot]" in PLOT_MISSING and not path.exists()


def test_report_has_the_command_the_table_the_decision_and_a_noise_warning() -> None:
    result = recorded_result()
    quiet = render_markdown(result, SweepPlan("frontdoor", (1, 2, 4)), DecisionRule(), "modelfleet sweep frontdoor")
    assert "```bash\nmodelfleet sweep frontdoor\n```" in quiet
    assert "| 2 | 10 | 0 | 22.1 |" in quiet and "| 4 | 20 | 0 | 30.0 |" in quiet
    assert "| frontdoor | 8080 | **2** (was 1) | +121% aggregate TPS, p95 multiplier 1.33; c=4 rejected: " in quiet
    assert "noisy" not in quiet
    cores = os.cpu_count() or 1
    busy = dataclasses.replace(result, load_before=(float(cores), 1.0, 1.0))
    assert f"already {cores:.2f} on {cores} cores" in render_markdown(busy, SweepPlan("frontdoor"), DecisionRule(), "")


# --- real sweeps of a tiny model -------------------------------------------------


def tiny_yaml(model: Path, port: int, parallel: int = 1, ctx_size: int = 512) -> str:
    return (
        "# the tiny test stack\n"
        "servers:\n"
        "  tiny:\n"
        f"    model: {model}   # random weights\n"
        f"    port: {port}\n"
        f"    parallel: {parallel}\n"
        f"    ctx_size: {ctx_size}  # total\n"
        "    threads: 1\n"
        "api:\n"
        "  enabled: false\n"
    )


FAST = {"warmup_batches": 1, "batches": 2, "max_tokens": 8}


def llama_processes(marker: str) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter():
        try:
            if "llama-server" in p.name() and any(marker in a for a in p.cmdline()):
                found.append(p)
        except psutil.Error:
            pass
    return found


def test_real_sweep_at_parallel_1_and_2_writes_the_csv_and_stops_what_it_started(
    make_stack: StackFactory, tiny_model: Path, tmp_path: Path
) -> None:
    (port,) = free_ports(1)
    stack = make_stack(tiny_yaml(tiny_model, port))
    path = tmp_path / "sweep.csv"
    result = Sweep(stack, SweepPlan("tiny", (1, 2), **FAST), csv_path=path).run()  # type: ignore[arg-type]

    assert [x.parallel for x in result.levels] == [1, 2]
    assert all(x.measurable for x in result.levels)
    assert [x.generated_tokens for x in result.levels] == [8 * 1 * 2, 8 * 2 * 2]  # ignore_eos: exactly max_tokens
    assert result.decision.parallel in (1, 2) and not result.interrupted

    batches, summaries = read_csv(path)
    requests = [r for b in batches for r in b.requests]
    assert len(requests) == (1 + 2) * 1 + (1 + 2) * 2  # warm-up and measured, both levels
    assert {r.generated_tokens for r in requests} == {8}
    assert all(r.prompt_tokens > 0 and r.cached_tokens == 0 for r in requests)  # no prompt cache
    assert all(r.ttft_s is not None and 0 < r.ttft_s <= r.latency_s for r in requests)
    assert [int(s["parallel"]) for s in summaries] == [1, 2]
    for recomputed, reported in zip(stats_from_csv(path), result.levels, strict=True):
        assert recomputed.aggregate_tps == pytest.approx(reported.aggregate_tps, rel=1e-4)
        assert recomputed.p95_latency_s == pytest.approx(reported.p95_latency_s, abs=1e-5)

    # Each level kept the configured per-slot context (512) and really ran that many slots.
    log = (stack.store.logs / f"llama-server-{port}.log").read_text()
    assert "n_slots = 1, n_ctx_slot = 512" in log and "n_slots = 2, n_ctx_slot = 512" in log
    # It was not running before, so the sweep's instance is gone.
    assert stack.store.read() == {} and result.restored.startswith("stopped")
    assert not llama_processes(str(tiny_model))


def test_a_running_server_is_restored_to_its_configured_slots(
    make_stack: StackFactory, tiny_model: Path, tmp_path: Path
) -> None:
    (port,) = free_ports(1)
    stack = make_stack(tiny_yaml(tiny_model, port, parallel=2, ctx_size=1024))
    stack.start(["tiny"])
    before = stack.store.read()[f"server_{port}"]
    result = Sweep(stack, SweepPlan("tiny", (1,), **FAST), csv_path=tmp_path / "s.csv").run()  # type: ignore[arg-type]

    assert result.restored.startswith("restarted with its configured parallel 2")
    after = stack.store.read()[f"server_{port}"]
    assert after.pid != before.pid and process_of(after) is not None
    assert after.argv == before.argv  # --parallel 2 --ctx-size 1024, as configured
    assert httpx.get(f"http://127.0.0.1:{port}/props", timeout=10).json()["total_slots"] == 2


class FailsAtParallel2(LocalLauncher):
    """Starts a process that exits at once instead of llama-server when asked for 2 slots."""

    def spawn(self, spec: InstanceSpec) -> subprocess.Popen[bytes]:
        if "--parallel" in spec.argv and spec.argv[spec.argv.index("--parallel") + 1] == "2":
            spec = dataclasses.replace(spec, argv=(sys.executable, "-c", "import sys; print('no memory'); sys.exit(1)"))
        return super().spawn(spec)


def test_a_level_that_fails_to_start_ends_the_sweep_keeping_the_rows_measured(
    make_stack: StackFactory, tiny_model: Path, tmp_path: Path
) -> None:
    (port,) = free_ports(1)
    stack = make_stack(tiny_yaml(tiny_model, port), launcher=FailsAtParallel2())
    path = tmp_path / "s.csv"
    result = Sweep(stack, SweepPlan("tiny", (1, 2, 4), **FAST), csv_path=path).run()  # type: ignore[arg-type]

    assert [x.parallel for x in result.levels] == [1, 2]  # 4 was not tried after 2 failed
    assert result.levels[0].measurable
    assert "exited with code 1 while loading" in result.levels[1].failure
    assert result.decision == Decision(
        1, 1, f"c=2 rejected: failed: {result.levels[1].failure}", result.decision.verdicts
    )
    batches, summaries = read_csv(path)
    assert {b.parallel for b in batches} == {1} and len(batches) == 3
    assert [(s["parallel"], bool(s["error"])) for s in summaries] == [("1", False), ("2", True)]
    assert stack.store.read() == {} and not llama_processes(str(tiny_model))


# --- the installed CLI ------------------------------------------------------------


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([MODELFLEET, *args], capture_output=True, text=True, timeout=timeout)


def test_cli_sweep_applies_its_recommendation_keeping_comments(tiny_model: Path, tmp_path: Path) -> None:
    (port,) = free_ports(1)
    cfg = tmp_path / "stack.yaml"
    cfg.write_text(tiny_yaml(tiny_model, port))
    out = tmp_path / "results"
    res = run_cli(
        *("sweep", "tiny", "--config", str(cfg), "--state-dir", str(tmp_path / "state"), "--parallel", "1,2"),
        *("--warmup", "1", "--batches", "2", "--max-tokens", "8", "--csv", str(out / "s.csv")),
        *("--report", str(out / "s.md"), "--plot", str(out / "s.png"), "--apply"),
        # A rule every measurable level passes, so the outcome does not depend on timing noise.
        *("--max-p95-multiplier", "1000", "--min-gain", "-1"),
    )
    assert res.returncode == 0, res.stderr
    assert "tiny: parallel 2: " in res.stdout
    assert "servers.tiny.parallel: 1 → 2" in res.stdout and "servers.tiny.ctx_size: 512 → 1024" in res.stdout
    assert cfg.read_text() == tiny_yaml(tiny_model, port, parallel=2, ctx_size=1024)  # comments and all
    report = (out / "s.md").read_text()
    assert "modelfleet sweep tiny --config" in report and "| tiny |" in report and "**2** (was 1)" in report
    assert (out / "s.csv").is_file() and (out / "s.png").is_file()
    assert not llama_processes(str(tiny_model))


def test_cli_refuses_bad_requests_before_starting_anything(tiny_model: Path, tmp_path: Path) -> None:
    (port,) = free_ports(1)
    cfg = tmp_path / "stack.yaml"
    cfg.write_text(tiny_yaml(tiny_model, port))
    state = ("--state-dir", str(tmp_path / "state"))
    cases = [
        (
            ("sweep", "nosuch", "--config", str(cfg), *state),
            "'nosuch' is not a server of this stack; known servers: tiny",
        ),
        (("sweep", "tiny", "--config", str(cfg), "--parallel", "1,0", *state), "--parallel: '0' is not a slot count"),
        (("sweep", "smollm2", "--dev", "--apply", *state), "--apply writes the stack file"),
    ]
    for args, message in cases:
        res = run_cli(*args)
        assert res.returncode == 2 and message in res.stderr, (args, res.stderr)
    assert not (tmp_path / "state" / "logs").exists() or not list((tmp_path / "state" / "logs").iterdir())


def test_ctrl_c_keeps_the_rows_measured_and_stops_the_server(tiny_model: Path, tmp_path: Path) -> None:
    (port,) = free_ports(1)
    cfg = tmp_path / "stack.yaml"
    cfg.write_text(tiny_yaml(tiny_model, port))
    path = tmp_path / "s.csv"
    args = ["sweep", "tiny", "--config", str(cfg), "--state-dir", str(tmp_path / "state"), "--parallel", "1,2"]
    args += ["--warmup", "0", "--batches", "100", "--max-tokens", "32", "--csv", str(path)]
    proc = subprocess.Popen([MODELFLEET, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 90
        while not _has_request_at(path, parallel=2):  # level 1 is done, level 2 is under way
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, "the sweep never reached parallel 2"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, stderr
    assert "interrupted" in stderr
    batches, summaries = read_csv(path)
    assert [s["parallel"] for s in summaries] == ["1"]  # level 2 never finished...
    assert len([b for b in batches if b.parallel == 1]) == 100
    assert any(b.parallel == 2 for b in batches)  # ...but what it measured is kept
    assert stdout.splitlines()[1].split()[0] == "1"  # the table of what was measured
    assert not llama_processes(str(tiny_model))
    assert (
        not (tmp_path / "state" / "orchestrator_state.json").exists()
        or "server_" not in (tmp_path / "state" / "orchestrator_state.json").read_text()
    )


def _has_request_at(path: Path, parallel: int) -> bool:
    if not path.exists():
        return False
    with path.open(newline="") as f:
        return any(r["kind"] == "request" and r["parallel"] == str(parallel) for r in csv.DictReader(f))
