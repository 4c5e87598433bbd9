"""The installed ``modelfleet`` command, run as a subprocess, end to end."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

import psutil
import pytest
import yaml

from conftest import MODELFLEET, free_ports, process_of
from modelfleet.state import StateStore


def run(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([MODELFLEET, *args], capture_output=True, text=True, timeout=timeout)


def exited(pid: int) -> bool:
    """Gone, or a zombie that init has not reaped yet: either way it no longer runs."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.fixture
def state_dir(tmp_path: Path) -> Iterator[Path]:
    """A state dir whose stack is stopped (through the CLI) at teardown."""
    d = tmp_path / "state"
    yield d
    if (d / "orchestrator_state.json").exists():
        for cfg in tmp_path.glob("*.yaml"):
            run("stop", "--all", "--config", str(cfg), "--state-dir", str(d))
            break
    for rec in StateStore(d).read().values():  # belt and braces: nothing may survive
        proc = process_of(rec)
        if proc is not None:
            proc.kill()


def dev_config_on_free_ports(tmp_path: Path) -> Path:
    """The built-in dev stack, moved to free ports so tests never collide."""
    data = yaml.safe_load(resources.files("modelfleet").joinpath("data/dev.yaml").read_text())
    srv, api = free_ports(2)
    data["servers"]["smollm2"]["port"] = srv
    data["api"]["port"] = api
    path = tmp_path / "dev.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.dev_model
def test_dev_stack_end_to_end(tmp_path: Path, state_dir: Path, dev_model: Path) -> None:
    cfg = str(dev_config_on_free_ports(tmp_path))
    res = run("start", "--config", cfg, "--state-dir", str(state_dir))
    assert res.returncode == 0, res.stderr
    assert "ready in" in res.stderr
    assert "healthy" in res.stdout and "SmolLM2-135M-Instruct" in res.stdout

    res = run("chat", "--config", cfg, "--state-dir", str(state_dir), "--role", "code_impl", "Say hello.")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip(), "the model answered nothing"
    assert "code_impl -> worker_coder served by smollm2 via the front door" in res.stderr

    res = run("status", "--json", "--config", cfg, "--state-dir", str(state_dir))
    rows = {r["name"]: r for r in json.loads(res.stdout)["instances"]}
    assert rows["smollm2"]["status"] == "healthy" and rows["smollm2"]["pid"]
    assert rows["orchestrator"]["status"] == "healthy"
    assert rows["smollm2"]["in_flight"] == 0 and rows["smollm2"]["routing"] == "ready"  # the front door's view
    assert rows["smollm2"]["prompt_evaluated"] > 0  # from the chat's timings
    table = run("status", "--config", cfg, "--state-dir", str(state_dir)).stdout
    assert "CACHED" in table and "% of " in table
    pids = [rows["smollm2"]["pid"], rows["orchestrator"]["pid"]]

    res = run("stop", "--all", "--config", cfg, "--state-dir", str(state_dir))
    assert res.returncode == 0 and "stopped 2 instance(s)" in res.stdout
    assert all(exited(pid) for pid in pids)
    after = json.loads(run("status", "--json", "--config", cfg, "--state-dir", str(state_dir)).stdout)["instances"]
    assert {r["status"] for r in after} == {"stopped"}


def test_concurrent_starts_share_one_stack(tmp_path: Path, state_dir: Path, tiny_model: Path) -> None:
    a, b = free_ports(2)
    cfg = tmp_path / "stack.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "servers": {
                    "one": {"model": str(tiny_model), "port": a, "ctx_size": 256, "threads": 1},
                    "two": {"model": str(tiny_model), "port": b, "ctx_size": 256, "threads": 1},
                },
                "api": {"enabled": False},
            }
        )
    )
    args = [MODELFLEET, "start", "--config", str(cfg), "--state-dir", str(state_dir)]
    procs = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    results = [p.communicate(timeout=180) for p in procs]
    assert all(p.returncode == 0 for p in procs), results
    records = StateStore(state_dir).read()
    assert sorted(r.port for r in records.values()) == sorted([a, b])
    live = [r for r in records.values() if process_of(r) is not None]
    assert len(live) == 2
    # Exactly one process listens on each port: the later commands kept what the first started.
    for port in (a, b):
        listeners = {
            c.pid for c in psutil.net_connections("inet") if c.status == psutil.CONN_LISTEN and c.laddr.port == port
        }
        assert len(listeners) == 1
    assert sum("already running" in err for _, err in results) == 2


def test_dev_config_loads_and_status_works_without_a_running_stack(tmp_path: Path) -> None:
    res = run("status", "--dev", "--state-dir", str(tmp_path / "s"))
    assert res.returncode == 0, res.stderr
    assert "smollm2" in res.stdout and "stopped" in res.stdout


def test_config_check_of_the_examples(tmp_path: Path) -> None:
    root = Path(__file__).parent.parent
    for name in ("dev.yaml", "production.yaml"):
        res = run("config", "check", str(root / "examples" / name))
        assert res.returncode == 0, res.stderr
        assert "ok:" in res.stdout and "options checked against" in res.stdout


def test_production_start_refuses_listing_missing_files(tmp_path: Path) -> None:
    root = Path(__file__).parent.parent
    res = run("start", "--config", str(root / "examples" / "production.yaml"), "--state-dir", str(tmp_path / "s"))
    assert res.returncode == 4
    assert "nothing was started" in res.stderr
    assert "servers.architect_coding.model" in res.stderr and "servers.embedder.model" in res.stderr
    assert StateStore(tmp_path / "s").read() == {}


@pytest.mark.parametrize(
    ("args", "code", "fragment"),
    [
        (("stop",), 2, "give component names or --all"),
        (("start", "--dev", "nope"), 2, "'nope' is not a server or service of this stack"),
        (("start", "--config", "/nonexistent.yaml"), 2, "cannot read config file /nonexistent.yaml"),
        (("status",), 2, "no stack file"),
        (("start", "--dev", "--config", "x.yaml"), 2, "give --dev or --config, not both"),
    ],
)
def test_bad_arguments_get_clear_errors(
    tmp_path: Path, args: tuple[str, ...], code: int, fragment: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MODELFLEET_CONFIG", raising=False)
    res = subprocess.run(
        [MODELFLEET, *args, *(["--state-dir", str(tmp_path / "s")] if args[0] != "stop" else [])],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert res.returncode == code, (res.stdout, res.stderr)
    assert fragment in res.stderr


def test_dev_stack_config_comes_from_a_file_the_front_door_can_load_but_nothing_writes() -> None:
    """Regression: `start --dev` failed with "the front door needs the stack file on disk"."""
    from modelfleet.cli import load_dev_config
    from modelfleet.config import load_config_file
    from modelfleet.spec import api_spec

    cfg = load_dev_config()
    assert cfg.source is not None and Path(cfg.source).is_file()
    spec = api_spec(cfg, Path("/tmp/state"))
    assert spec.argv[-4:] == ("--config", cfg.source, "--state-dir", "/tmp/state")
    # The package's own file is never a target of restore or `sweep --apply`, however it is loaded.
    assert cfg.writable_source() is None
    assert load_config_file(cfg.source).writable_source() is None


def test_sweep_apply_refuses_the_builtin_dev_stack(tmp_path: Path) -> None:
    res = run("sweep", "smollm2", "--dev", "--apply", "--state-dir", str(tmp_path / "s"))
    assert res.returncode == 2 and "--apply writes the stack file" in res.stderr


@pytest.mark.parametrize("value", ["²", "١", "1,٣", "²,2", "+2", "2.0", "9" * 5000])
def test_sweep_parallel_takes_only_ascii_whole_numbers(tmp_path: Path, value: str) -> None:
    """Regression: '²' and '١' passed str.isdigit() and then int() raised a ValueError traceback."""
    cfg = tmp_path / "stack.yaml"
    cfg.write_text("servers:\n  a: {model: m.gguf, port: 18999}\napi: {enabled: false}\n")
    args = ["sweep", "a", "--parallel", value, "--config", str(cfg), "--state-dir", str(tmp_path / "s")]
    res = subprocess.run([MODELFLEET, *args], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr and "ValueError" not in res.stderr
    bad = next(p for p in value.split(",") if p not in ("1", "2"))
    assert f"--parallel: {bad[:40]!r}"[:50] in res.stderr and "is not a slot count" in res.stderr
    assert not (tmp_path / "s" / "logs").exists(), "nothing was started"
