"""Shared fixtures: the real llama-server, tiny generated models, free ports, stacks
that are always stopped, and a final check that no test left a process behind."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from modelfleet import provision
from modelfleet.config import StackConfig, Tier, load_config
from modelfleet.instance import Kind
from modelfleet.launcher import LocalLauncher
from modelfleet.launcher import free_ports as free_ports  # the tests take it from here
from modelfleet.spec import BinaryInfo, find_llama_server, probe_binary
from modelfleet.stack import Stack
from modelfleet.state import InstanceRecord, StateStore
from modelfleet.tinymodel import TinyShape, write_tiny_llama

#: The installed console script, run as a subprocess by the end-to-end tests.
MODELFLEET = str(Path(sys.executable).parent / "modelfleet")


def stack_cli(folder: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run the installed CLI on the stack in ``folder`` (``stack.yaml``, ``state/``).

    ``folder`` is on PYTHONPATH, so user hook modules a test writes there import.
    """
    env = {**os.environ, "PYTHONPATH": str(folder)}
    cmd = [MODELFLEET, *args, "--config", str(folder / "stack.yaml"), "--state-dir", str(folder / "state")]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)


@pytest.fixture
def cli_stack(tmp_path: Path) -> Iterator[Path]:
    """A stack driven through the CLI in ``tmp_path``; stopped at teardown, stragglers killed."""
    yield tmp_path
    stack_cli(tmp_path, "stop", "--all")
    for rec in StateStore(tmp_path / "state").read().values():
        proc = process_of(rec)
        if proc is not None:
            proc.kill()


LOCAL = LocalLauncher()


def process_of(rec: InstanceRecord) -> psutil.Process | None:
    """The live process a record describes, or None when it is gone or its pid was reused."""
    return LOCAL.process(rec.handle)


def make_record(
    role: str = "r",
    pid: int = 1,
    port: int = 8080,
    started_at: str = "now",
    model_path: str | None = None,
    log_file: str = "log",
    **more: object,
) -> InstanceRecord:
    """A state record for tests: the seed's fields first, the identity filled in."""
    ident: dict[str, object] = {
        "component": role,
        "index": 0,
        "replicas": 1,
        "host": "127.0.0.1",
        "kind": Kind.LLAMA_SERVER,
        "tier": Tier.HOT,
        "roles": (role,),
    }
    ident.update(more)
    return InstanceRecord(
        pid=pid,
        port=port,
        started_at=started_at,
        model_path=model_path,
        log_file=log_file,
        **ident,  # type: ignore[arg-type]
    )


def free_port() -> int:
    """A port the OS says is free right now, on loopback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def llama_server() -> BinaryInfo:
    """The real llama-server; the test setup (`modelfleet setup`) must have built it."""
    try:
        return probe_binary(find_llama_server())
    except Exception as exc:  # pragma: no cover - a broken setup, reported clearly
        pytest.fail(f"llama-server is not available ({exc}); run `bash scripts/bootstrap.sh` first")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight llama GGUF that loads in milliseconds."""
    return write_tiny_llama(tmp_path_factory.mktemp("models") / "tiny.gguf", TinyShape())


@pytest.fixture(scope="session")
def long_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model with a long trained context: a generation that outlasts the test's patience."""
    return write_tiny_llama(tmp_path_factory.mktemp("models") / "long.gguf", TinyShape(n_ctx_train=65536))


@pytest.fixture(scope="session")
def dev_model() -> Path:
    path = provision.cached_dev_model()
    if not path.is_file():  # pragma: no cover
        pytest.fail(f"the dev model is missing at {path}; run `bash scripts/bootstrap.sh` first")
    return path


StackFactory = Callable[..., Stack]


@pytest.fixture
def make_stack(tmp_path: Path, llama_server: BinaryInfo) -> Iterator[StackFactory]:
    """Build Stacks from YAML text; every one is stopped at teardown."""
    made: list[Stack] = []

    def factory(yaml_text: str, state_dir: Path | None = None, **kwargs: object) -> Stack:
        cfg = config_from(yaml_text, tmp_path)
        stack = Stack(cfg, state_dir or tmp_path / "state", llama_server, stop_grace_s=5.0, **kwargs)  # type: ignore[arg-type]
        made.append(stack)
        return stack

    yield factory
    for stack in made:
        stack.stop()


def config_from(yaml_text: str, base: Path) -> StackConfig:
    """Write YAML text to ``base/stack.yaml`` and load it (relative paths resolve there).

    The front door is off unless the text configures ``api:``, so tests never touch port 8000.
    """
    text = textwrap.dedent(yaml_text)
    if not any(line.startswith("api:") for line in text.splitlines()):
        text += "\napi: {enabled: false}\n"
    path = base / "stack.yaml"
    path.write_text(text)
    return load_config(text, str(path))


def _ours(proc: psutil.Process, marker: str) -> bool:
    try:
        return any(marker in part for part in proc.cmdline())
    except psutil.Error:
        return False


@pytest.fixture(scope="session", autouse=True)
def private_stack_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Every test (and every CLI it runs) registers stacks in a temp dir, never in the real home."""
    root = tmp_path_factory.mktemp("state-root")
    old = os.environ.get("MODELFLEET_STATE_ROOT")
    os.environ["MODELFLEET_STATE_ROOT"] = str(root)
    yield root
    if old is None:
        os.environ.pop("MODELFLEET_STATE_ROOT", None)
    else:
        os.environ["MODELFLEET_STATE_ROOT"] = old


@pytest.fixture(scope="session", autouse=True)
def no_orphans(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """After the whole run, no process started from this run's temp dirs may survive."""
    base = str(tmp_path_factory.getbasetemp())
    yield
    leftovers = [p for p in psutil.process_iter() if p.pid != os.getpid() and _ours(p, base)]
    described = []
    for p in leftovers:
        with contextlib.suppress(psutil.Error):
            described.append(f"{p.pid} {' '.join(p.cmdline()[:4])}")
            p.kill()
    assert not leftovers, "tests left processes running: " + "; ".join(described)
