"""What to run: the llama-server binary and one spec per instance of the config.

* :func:`find_llama_server` locates the binary (config, ``$MODELFLEET_LLAMA_SERVER``,
  PATH, then the project's cache).
* :func:`probe_binary` reads the flags the binary accepts from ``--help`` once and
  caches them by binary, so options it can't honour are refused at config time
  instead of killing a server at start (this llama.cpp removed ``--mlock``,
  ``--no-mmap`` and ``--draft-max``; passing one is fatal).
* :func:`plan_instances` builds one :class:`InstanceSpec` (argv, env, log file) per
  replica; a :class:`~modelfleet.launcher.Launcher` runs it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from modelfleet import paths
from modelfleet.config import API_COMPONENT, ServerConfig, ServiceConfig, StackConfig, Tier
from modelfleet.errors import BinaryError, ConfigError
from modelfleet.fileutil import write_atomic
from modelfleet.instance import Identity, Kind

ENV_BINARY = "MODELFLEET_LLAMA_SERVER"
SERVICE_SLOTS = 64  # auxiliary services declare no slots; let them take many requests
DEFAULT_THREADS_HTTP = 32  # the bundled HTTP pool stalls under connection bursts with the default

# Removed flags of this llama.cpp and the config key that replaces each.
_REPLACEMENTS = {
    "--mlock": "load_mode: mmap+mlock",
    "--no-mmap": "load_mode: none",
    "--draft-max": "draft: {max: N}",
    "--draft-min": "draft: {min: N}",
    "--draft": "draft: {max: N}",
    "--lookup": "lookup: ngram-simple (or another ngram-* mode)",
    "-md": "draft: {model: FILE}",
    "--model-draft": "draft: {model: FILE}",
}


@dataclass(frozen=True)
class BinaryInfo:
    """What a llama-server binary is and which flags it accepts."""

    path: str
    version: str
    flags: frozenset[str]
    removed: dict[str, str] = field(default_factory=dict)

    def accepts(self, flag: str) -> bool:
        return flag in self.flags


def find_llama_server(cfg: StackConfig | None = None) -> Path:
    """Locate llama-server: config, ``$MODELFLEET_LLAMA_SERVER``, PATH, the project's cache."""
    tried: list[str] = []
    candidates: list[tuple[str, Path]] = []
    if cfg is not None and cfg.llama_server:
        candidates.append(("config 'llama_server'", cfg.resolve_path(cfg.llama_server)))
    if os.environ.get(ENV_BINARY):
        candidates.append((f"${ENV_BINARY}", Path(os.environ[ENV_BINARY]).expanduser()))
    on_path = shutil.which("llama-server")
    if on_path:
        candidates.append(("PATH", Path(on_path)))
    candidates.append(("cache", paths.cached_llama_server()))
    for origin, path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return path
        tried.append(f"{origin}: {path}")
        if origin != "cache" and origin != "PATH":
            # An explicit choice that does not exist is an error, not a reason to fall through.
            raise BinaryError(f"llama-server named by {origin} does not exist or is not executable: {path}")
    raise BinaryError(
        "llama-server was not found (looked at " + "; ".join(tried) + "). "
        "Run `modelfleet setup` to build it into the cache, or set $MODELFLEET_LLAMA_SERVER."
    )


def probe_binary(path: Path) -> BinaryInfo:
    """Flags and version of a binary, from ``--help`` and ``--version``, cached by file identity."""
    st = path.stat()
    key = hashlib.sha256(f"{_PROBE_FORMAT}:{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    cache = paths.cache_dir() / "probes" / f"{key}.json"
    try:
        data = json.loads(cache.read_text())
        return BinaryInfo(str(path), data["version"], frozenset(data["flags"]), dict(data["removed"]))
    except (OSError, ValueError, KeyError):
        pass
    flags, removed = _parse_help(_run_help(path))
    info = BinaryInfo(str(path), _run_version(path), flags, removed)
    if not info.flags:
        raise BinaryError(f"{path} --help printed no flags; is it really llama-server?")
    write_atomic(cache, json.dumps({"version": info.version, "flags": sorted(info.flags), "removed": info.removed}))
    return info


def _run_help(path: Path) -> str:
    try:
        res = subprocess.run([str(path), "--help"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BinaryError(f"cannot run {path} --help: {exc}") from exc
    return res.stdout + res.stderr


def _run_version(path: Path) -> str:
    try:
        res = subprocess.run([str(path), "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BinaryError(f"cannot run {path} --version: {exc}") from exc
    m = re.search(r"version:\s*(.+)", res.stdout + res.stderr)
    return m.group(1).strip() if m else "unknown"


# An entry of --help starts a line: "-np,   --parallel N    description". Its flags are the
# leading dash-words joined by ", "; what follows a flag without a comma is its argument.
# Removed flags stay listed, described as "the argument has been removed. use ...", and
# passing one is fatal, so they count as not accepted.
_ENTRY = re.compile(r"^(-[^\s,]+(?:,\s+-[^\s,]+)*)(?:\s\S+)?(?:\s{2,}(.*))?$")
_REMOVED = "the argument has been removed"
_PROBE_FORMAT = 3  # bump when the parser changes, so stale cached probes are ignored


def _parse_help(help_text: str) -> tuple[frozenset[str], dict[str, str]]:
    """(accepted flags, removed flag -> the binary's own advice)."""
    flags: set[str] = set()
    removed: dict[str, str] = {}
    current: list[str] = []
    for line in help_text.splitlines():
        m = _ENTRY.match(line)
        if m:
            names = re.split(r",\s+", m.group(1))
            desc = (m.group(2) or "").strip()
            current = names if desc.startswith(_REMOVED) else []
            for n in names:
                if current:
                    removed[n] = desc
                else:
                    flags.add(n)
        elif current and line.startswith(" ") and not line.strip().startswith("(env:"):
            for n in current:
                removed[n] += " " + line.strip()
        else:
            current = []
    return frozenset(flags), removed


# --- instances ---------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class InstanceSpec(Identity):
    """An instance's identity plus everything needed to start its process."""

    argv: tuple[str, ...]
    env: dict[str, str] = field(default_factory=dict)
    cwd: str | None = None
    log_file: str = ""
    model_path: str | None = None
    health_path: str = "/health"
    health_timeout_s: float = 120.0
    cooldown_s: float = 0.0
    large: bool = False
    required_files: tuple[tuple[str, str], ...] = ()  # (key path, file)
    slot_dir: str | None = None  # --slot-save-path; created before the spawn (llama-server requires it)
    pin_slots: bool = False  # the front door picks each completion request's slot (affinity.SlotMap)

    @property
    def slots(self) -> int:
        """Requests it serves at once: llama-server's ``--parallel``; services and the front door take many."""
        if self.kind is Kind.LLAMA_SERVER and "--parallel" in self.argv:
            i = self.argv.index("--parallel")
            if i + 1 < len(self.argv) and self.argv[i + 1].isdigit():
                return max(1, int(self.argv[i + 1]))
        return SERVICE_SLOTS


def env_digest(env: dict[str, str]) -> dict[str, str]:
    """A short hash of each environment value: enough to tell a changed one, nothing to leak a secret."""
    return {k: hashlib.sha256(v.encode()).hexdigest()[:16] for k, v in sorted(env.items())}


def plan_instances(
    cfg: StackConfig, names: Iterable[str], state_dir: Path, binary: BinaryInfo | None
) -> list[InstanceSpec]:
    """One spec per replica of each named component, in config order."""
    wanted = set(names)
    specs: list[InstanceSpec] = []
    for name, comp in cfg.components().items():
        if name not in wanted:
            continue
        ports = comp.instance_ports()
        for i, port in enumerate(ports):
            if isinstance(comp, ServerConfig):
                specs.append(_server_spec(cfg, name, comp, i, port, len(ports), state_dir, binary))
            else:
                specs.append(_service_spec(cfg, name, comp, i, port, len(ports), state_dir))
    if API_COMPONENT in wanted and cfg.api.enabled:
        specs.append(api_spec(cfg, state_dir))
    return specs


def api_spec(cfg: StackConfig, state_dir: Path) -> InstanceSpec:
    """The front door runs as a component of its stack: ``python -m modelfleet.api``."""
    if not cfg.source or not Path(cfg.source).is_file():
        raise ConfigError("the front door needs the stack file on disk; start it with --config FILE (or --dev)")
    argv = [sys.executable, "-m", "modelfleet.api", "--config", cfg.source, "--state-dir", str(state_dir)]
    return InstanceSpec(
        component=API_COMPONENT,
        index=0,
        replicas=1,
        kind=Kind.API,
        host=cfg.api.host,
        port=cfg.api.port,
        roles=(),
        tier=Tier.HOT,
        argv=tuple(argv),
        log_file=str(state_dir / "logs" / f"{API_COMPONENT}-{cfg.api.port}.log"),
        health_path="/health",
        health_timeout_s=cfg.api.health_timeout_s,
    )


def _server_spec(
    cfg: StackConfig,
    name: str,
    srv: ServerConfig,
    index: int,
    port: int,
    replicas: int,
    state_dir: Path,
    binary: BinaryInfo | None,
) -> InstanceSpec:
    model = cfg.resolve_path(srv.model)
    files = [(f"servers.{name}.model", str(model))]
    if srv.draft:
        files.append((f"servers.{name}.draft.model", str(cfg.resolve_path(srv.draft.model))))
    if srv.mmproj:
        files.append((f"servers.{name}.mmproj", str(cfg.resolve_path(srv.mmproj))))
    argv = [binary.path if binary else "llama-server", *server_args(cfg, name, srv, port, binary)]
    slots = slot_save_dir(state_dir, port) if srv.slot_save else None
    if slots is not None:
        if binary is not None and not binary.accepts("--slot-save-path"):
            raise ConfigError(f"servers.{name}.slot_save: {binary.path} does not accept --slot-save-path")
        argv += ["--slot-save-path", str(slots)]
    return InstanceSpec(
        component=name,
        index=index,
        replicas=replicas,
        kind=Kind.LLAMA_SERVER,
        host=srv.host,
        port=port,
        roles=tuple(srv.roles),
        tier=srv.tier,
        argv=tuple(argv),
        env=dict(srv.env),
        log_file=str(state_dir / "logs" / f"llama-server-{port}.log"),
        model_path=str(model),
        health_path="/health",
        health_timeout_s=srv.effective_health_timeout_s(),
        cooldown_s=srv.cooldown_s,
        large=_is_large(cfg, srv, model),
        required_files=tuple(files),
        slot_dir=str(slots) if slots is not None else None,
        pin_slots=cfg.pins_slots(name) and PIN_FLAG in argv,  # ours: pinning is off when args set the flag
    )


def slot_save_dir(state_dir: Path, port: int) -> Path:
    """Where the instance on ``port`` saves slot KV caches (``POST /slots/{id}?action=save``)."""
    return state_dir / "slots" / str(port)


def _service_spec(
    cfg: StackConfig, name: str, svc: ServiceConfig, index: int, port: int, replicas: int, state_dir: Path
) -> InstanceSpec:
    argv = [a.replace("{port}", str(port)).replace("{host}", svc.host) for a in svc.command]
    return InstanceSpec(
        component=name,
        index=index,
        replicas=replicas,
        kind=Kind.SERVICE,
        host=svc.host,
        port=port,
        roles=tuple(svc.roles),
        tier=svc.tier,
        argv=tuple(argv),
        env=dict(svc.env),
        cwd=str(cfg.resolve_path(svc.cwd)) if svc.cwd else None,
        log_file=str(state_dir / "logs" / f"{name}-{port}.log"),
        model_path=None,
        health_path=svc.health_path,
        health_timeout_s=svc.effective_health_timeout_s(),
        cooldown_s=svc.cooldown_s,
        large=False,
    )


def _is_large(cfg: StackConfig, srv: ServerConfig, model: Path) -> bool:
    if srv.large is not None:
        return srv.large
    size_gb = srv.ram_gb
    if size_gb is None:
        try:
            size_gb = model.stat().st_size / 1e9
        except OSError:
            size_gb = 0.0
    return size_gb >= cfg.start.large_model_gb


PIN_FLAG = "--slot-prompt-similarity"


def server_args(cfg: StackConfig, name: str, srv: ServerConfig, port: int, binary: BinaryInfo | None) -> list[str]:
    """The llama-server arguments for one instance (without the binary itself).

    With ``binary`` known, every flag is checked against what it accepts and an
    option it cannot honour raises ConfigError naming the config key.
    """
    args: list[tuple[str, list[str]]] = []  # (config key, tokens)

    def add(key: str, *tokens: str) -> None:
        args.append((key, list(tokens)))

    add("model", "--model", str(cfg.resolve_path(srv.model)))
    add("host", "--host", srv.host)
    add("port", "--port", str(port))
    add("parallel", "--parallel", str(srv.parallel))
    add("name", "--alias", name)
    add("metrics", "--metrics")
    if binary is None or binary.accepts("--log-colors"):
        add("log", "--log-colors", "off")
    if srv.ctx_size is not None:
        add("ctx_size", "--ctx-size", str(srv.ctx_size))
    if srv.threads is not None:
        add("threads", "--threads", str(srv.threads))
    if srv.threads_http is not None or binary is None or binary.accepts("--threads-http"):
        add(
            "threads_http",
            "--threads-http",
            str(srv.threads_http or max(DEFAULT_THREADS_HTTP, srv.parallel + 4)),
        )
    if srv.batch_size is not None:
        add("batch_size", "--batch-size", str(srv.batch_size))
    if srv.load_mode is not None:
        add("load_mode", "--load-mode", srv.load_mode)
    spec_types = []
    if srv.draft is not None:
        add("draft.model", "--spec-draft-model", str(cfg.resolve_path(srv.draft.model)))
        add("draft.max", "--spec-draft-n-max", str(srv.draft.max))
        add("draft.min", "--spec-draft-n-min", str(srv.draft.min))
        # Without an explicit type the draft is loaded and never used.
        spec_types.append("draft-simple")
    if srv.lookup is not None:
        spec_types.append(srv.lookup)
    if spec_types:
        add("draft" if srv.draft else "lookup", "--spec-type", ",".join(spec_types))
    if srv.moe_active_experts is not None:
        arch = model_architecture(cfg.resolve_path(srv.model)) or "ARCH"
        add("moe_active_experts", "--override-kv", f"{arch}.expert_used_count=int:{srv.moe_active_experts}")
    if srv.mmproj is not None:
        add("mmproj", "--mmproj", str(cfg.resolve_path(srv.mmproj)))
    if srv.embeddings is not None:
        add("embeddings", "--embeddings")
        if srv.embeddings.pooling:
            add("embeddings.pooling", "--pooling", srv.embeddings.pooling)
    if srv.cache_type_k is not None:
        add("cache_type_k", "--cache-type-k", srv.cache_type_k)
    if srv.cache_type_v is not None:
        add("cache_type_v", "--cache-type-v", srv.cache_type_v)
    if cfg.memory.log_buffers and (binary is None or binary.accepts("--verbosity")):
        # libllama logs its buffer sizes at INFO, which llama-server shows from verbosity 4 (trace) up.
        add("memory.log_buffers", "--verbosity", "4")
    if cfg.pins_slots(name) and (srv.pin_slots or binary is None or binary.accepts(PIN_FLAG)):
        # Every slot the front door gives a request is saved to the RAM prompt cache and the best cached
        # prompt loaded: no reuse by similarity, which overwrites a conversation sharing a system prompt.
        add("pin_slots", PIN_FLAG, "1")
    if srv.args:
        add("args", *srv.args)
    if binary is not None:
        _check_flags(name, args, binary)
    return [tok for _, tokens in args for tok in tokens]


def _check_flags(name: str, args: list[tuple[str, list[str]]], binary: BinaryInfo) -> None:
    errors = []
    for key, tokens in args:
        for tok in tokens:
            if not _looks_like_flag(tok):
                continue
            flag = tok.split("=", 1)[0]
            if binary.accepts(flag):
                continue
            hint = _REPLACEMENTS.get(flag)
            fix = f"; use `{hint}` instead" if hint else "; remove it or upgrade llama-server"
            why = f" ({binary.removed[flag]})" if flag in binary.removed else ""
            errors.append(
                f"servers.{name}.{key}: {flag} is not accepted by {binary.path} (version {binary.version}){why}{fix}"
            )
    if errors:
        raise ConfigError("\n".join(errors))


def _looks_like_flag(tok: str) -> bool:
    return tok.startswith("-") and len(tok) > 1 and not re.fullmatch(r"-[\d.]+", tok)


def model_architecture(path: Path) -> str | None:
    """``general.architecture`` from a GGUF header, or None when the file is absent."""
    if not path.is_file():
        return None
    from modelfleet import ggufmeta

    return ggufmeta.architecture(path)
