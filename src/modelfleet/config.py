"""The stack file: pydantic models, the loader and every cross-field rule.

A stack file describes llama-server servers (model, port or replica ports, tier,
roles, slots and llama-server options), auxiliary services (any command with a
``{port}`` placeholder and a health path), role aliases, the task-type routing table
and the worker-pool settings. Every error names its key path and what is allowed:
``servers.coder.port: 8081 is already used by servers.worker``.
"""

from __future__ import annotations

import os
import re
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from modelfleet.errors import ConfigError
from modelfleet.paths import cached_dev_model

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
BUILTIN_DEV_MODEL = "builtin:smollm2-135m-instruct"
API_COMPONENT = "orchestrator"
PACKAGE_DATA = Path(__file__).resolve().parent / "data"

Port = Annotated[int, Field(ge=1, le=65535)]
Name = Annotated[str, Field(pattern=NAME_PATTERN, max_length=64)]


class Tier(StrEnum):
    """Memory tier: HOT starts with the stack, WARM on demand, COLD only by hand."""

    HOT = "hot"
    WARM = "warm"
    COLD = "cold"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Draft(Strict):
    """Speculative decoding with a small draft model (``--spec-draft-model``)."""

    model: str
    max: int = Field(default=16, ge=1, le=256)
    min: int = Field(default=0, ge=0, le=256)
    ram_gb: float | None = Field(default=None, ge=0)


LookupMode = Literal["ngram-simple", "ngram-map-k", "ngram-map-k4v", "ngram-mod", "ngram-cache"]
Pooling = Literal["none", "mean", "cls", "last", "rank"]
CacheType = Literal["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1"]
LoadMode = Literal["auto", "none", "mmap", "mlock", "mmap+mlock", "dio"]


class Embeddings(Strict):
    """Embeddings mode (``--embeddings``) with an optional pooling type."""

    pooling: Pooling | None = None


class Component(Strict):
    """What llama-server servers and auxiliary services have in common."""

    port: Port | None = None
    ports: list[Port] | None = None
    replicas: int | None = Field(default=None, ge=1, le=64)
    host: str = "127.0.0.1"
    tier: Tier = Tier.HOT
    roles: list[Name] = Field(default_factory=list)
    env: dict[str, str] = Field(default_factory=dict)
    health_timeout_s: float | None = Field(default=None, gt=0, le=3600)
    cooldown_s: float = Field(default=0.0, ge=0, le=600)
    ram_gb: float | None = Field(default=None, ge=0)

    @model_validator(mode="after")
    def _one_way_to_give_ports(self) -> Component:
        if (self.port is None) == (self.ports is None):
            raise ValueError("give exactly one of 'port' (with optional 'replicas') or 'ports'")
        if self.ports is not None:
            if not self.ports:
                raise ValueError("'ports' must list at least one port")
            if self.replicas is not None and self.replicas != len(self.ports):
                raise ValueError(f"'replicas: {self.replicas}' does not match the {len(self.ports)} 'ports'")
        if self.port is not None and self.port + (self.replicas or 1) - 1 > 65535:
            raise ValueError("replica ports run past 65535")
        return self

    def instance_ports(self) -> list[int]:
        """The port of every replica, in order."""
        if self.ports is not None:
            return list(self.ports)
        assert self.port is not None
        return [self.port + i for i in range(self.replicas or 1)]


class ServerConfig(Component):
    """One llama-server model server."""

    model: str
    parallel: int = Field(default=1, ge=1, le=256)
    ctx_size: int | None = Field(default=None, ge=0)
    threads: int | None = Field(default=None, ge=1)
    threads_http: int | None = Field(default=None, ge=1)
    batch_size: int | None = Field(default=None, ge=1)
    args: list[str] = Field(default_factory=list)
    load_mode: LoadMode | None = None
    draft: Draft | None = None
    lookup: LookupMode | None = None
    moe_active_experts: int | None = Field(default=None, ge=1, le=256)
    mmproj: str | None = None
    embeddings: Embeddings | None = None
    cache_type_k: CacheType | None = None
    cache_type_v: CacheType | None = None
    large: bool | None = None
    slot_save: bool = False  # --slot-save-path <state dir>/slots/<port>: lets checkpoints save the KV cache

    @field_validator("args")
    @classmethod
    def _args_are_argv(cls, v: list[str]) -> list[str]:
        for a in v:
            if a.split("=", 1)[0] in MANAGED_FLAGS:
                raise ValueError(f"'{a}' is set by modelfleet; use the matching config key instead")
        return v

    @property
    def is_vision(self) -> bool:
        return self.mmproj is not None

    def effective_health_timeout_s(self) -> float:
        """Vision servers load a projector too, so they get longer by default."""
        if self.health_timeout_s is not None:
            return self.health_timeout_s
        return 300.0 if self.is_vision else 120.0


class ServiceConfig(Component):
    """An auxiliary HTTP service: any command with a ``{port}`` placeholder."""

    command: list[str] = Field(min_length=1)
    health_path: str = "/health"
    cwd: str | None = None

    @field_validator("health_path")
    @classmethod
    def _path_is_absolute(cls, v: str) -> str:
        if not v.startswith("/"):
            raise ValueError("must start with '/', for example '/health'")
        return v

    def effective_health_timeout_s(self) -> float:
        return self.health_timeout_s if self.health_timeout_s is not None else 60.0


class WorkerPoolConfig(Strict):
    """When WARM capacity grows and shrinks (the seed's WorkerPoolConfig)."""

    expansion_threshold: int = Field(default=4, ge=1)
    warm_timeout_s: float = Field(default=300.0, gt=0)


class ApiConfig(Strict):
    """The front door (the seed's orchestrator API)."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: Port = 8000
    api_key: str | None = Field(default=None, min_length=1)
    admin_key: str | None = Field(default=None, min_length=1)
    max_body_bytes: int = Field(default=16 * 1024 * 1024, ge=1024)
    queue_max: int = Field(default=64, ge=0)
    queue_wait_s: float = Field(default=30.0, gt=0)
    request_timeout_s: float = Field(default=600.0, gt=0)
    drain_timeout_s: float = Field(default=30.0, ge=0)
    stop_grace_s: float = Field(default=10.0, ge=0)
    start_wait_s: float = Field(default=300.0, gt=0)
    health_timeout_s: float = Field(default=30.0, gt=0)


class MonitorConfig(Strict):
    """Liveness probing and self-healing, done by the front door."""

    interval_s: float = Field(default=2.0, gt=0)
    probe_timeout_s: float = Field(default=2.0, gt=0)
    failures_to_eject: int = Field(default=3, ge=1)
    restart_budget: int = Field(default=5, ge=0)
    restart_window_s: float = Field(default=600.0, gt=0)
    backoff_initial_s: float = Field(default=1.0, ge=0)
    backoff_max_s: float = Field(default=60.0, ge=0)


class StartConfig(Strict):
    """How ``start`` orders launches."""

    large_model_gb: float = Field(default=4.0, ge=0)


class LogsConfig(Strict):
    """Rotation of every component's log: a copy is kept, then the file is emptied in place."""

    max_mb: float | None = Field(default=256.0, gt=0)  # rotate past this size; null: never
    keep: int = Field(default=3, ge=1)  # copies kept: <log>.1 (newest) .. <log>.<keep>


class MemoryConfig(Strict):
    """The memory budget that ``plan`` prints and ``start`` and WARM admission enforce."""

    total_gb: float | None = Field(default=None, gt=0)  # default: this machine's RAM
    os_reserve_gb: float | None = Field(default=None, ge=0)
    os_reserve_pct: float | None = Field(default=None, ge=0, lt=100)  # default: 12 (the seed's)
    compute_buffer_mb: float | None = Field(default=None, ge=0)  # per instance; default: from the model's shape
    min_free_gb: float = Field(default=1.0, ge=0)  # left free when a WARM instance is admitted
    log_buffers: bool = True  # llama-server logs at verbosity 4, which prints its buffer sizes

    @model_validator(mode="after")
    def _one_reserve(self) -> MemoryConfig:
        if self.os_reserve_gb is not None and self.os_reserve_pct is not None:
            raise ValueError("give 'os_reserve_gb' or 'os_reserve_pct', not both")
        return self


HookBuiltin = Literal["embed_warmup", "generate_warmup"]
HookEvent = Literal["start", "instance_up"]
_HOOK_CALL = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*")


class HookConfig(Strict):
    """One init hook: a built-in warm-up or a user function named ``module:function``."""

    name: Name
    builtin: HookBuiltin | None = None
    call: str | None = None
    timeout_s: float = Field(default=60.0, gt=0, le=3600)
    required: bool = False
    applies_to: list[Name] | None = None  # component names; None = every component
    on: list[HookEvent] | None = Field(default=None, min_length=1)

    @model_validator(mode="before")
    @classmethod
    def _on_is_not_a_boolean(cls, data: Any) -> Any:
        # YAML 1.1 (PyYAML) reads an unquoted `on:` key as the boolean True.
        if isinstance(data, dict) and True in data and "on" not in data:
            data = {("on" if k is True else k): v for k, v in data.items()}
        return data

    @field_validator("call")
    @classmethod
    def _call_is_module_function(cls, v: str | None) -> str | None:
        if v is not None and not _HOOK_CALL.fullmatch(v):
            raise ValueError(f"{v!r} is not 'module:function' (for example 'mypkg.hooks:seed')")
        return v

    @model_validator(mode="after")
    def _one_kind(self) -> HookConfig:
        if (self.builtin is None) == (self.call is None):
            raise ValueError("give exactly one of 'builtin' (embed_warmup, generate_warmup) or 'call' (mod:function)")
        return self

    def events(self) -> list[HookEvent]:
        """``on``; by default built-ins also warm instances that come up later, user hooks run at start."""
        if self.on is not None:
            return list(self.on)
        return ["start", "instance_up"] if self.builtin else ["start"]


#: Flags modelfleet sets itself from config keys; ``args`` may not repeat them.
MANAGED_FLAGS = frozenset(
    {
        *("-m", "--model", "--port", "--host", "-np", "--parallel", "-c", "--ctx-size", "-t", "--threads"),
        *("-a", "--alias", "--metrics", "--embedding", "--embeddings", "--pooling", "-mm", "--mmproj"),
        *("-md", "--model-draft", "--spec-draft-model", "--spec-type", "--spec-draft-n-max", "--spec-draft-n-min"),
        *("--load-mode", "-lm", "--threads-http", "--log-colors", "-ctk", "--cache-type-k", "-ctv", "--cache-type-v"),
        "--slot-save-path",
    }
)


class StackConfig(Strict):
    """A whole stack file."""

    name: Name | None = None
    llama_server: str | None = None
    state_dir: str | None = None
    default_role: Name | None = None
    servers: dict[Name, ServerConfig] = Field(default_factory=dict)
    services: dict[Name, ServiceConfig] = Field(default_factory=dict)
    aliases: dict[Name, Name] = Field(default_factory=dict)
    task_types: dict[Name, Name] = Field(default_factory=dict)
    pools: list[Name] = Field(default_factory=list)
    worker_pool: WorkerPoolConfig = Field(default_factory=WorkerPoolConfig)
    api: ApiConfig = Field(default_factory=ApiConfig)
    monitor: MonitorConfig = Field(default_factory=MonitorConfig)
    start: StartConfig = Field(default_factory=StartConfig)
    memory: MemoryConfig = Field(default_factory=MemoryConfig)
    logs: LogsConfig = Field(default_factory=LogsConfig)
    hooks: list[HookConfig] | None = None  # None: warm up the embedders, if any; [] = no hooks

    # Where the file was read from; relative paths resolve against its folder.
    source: str | None = Field(default=None, exclude=True)
    # The built-in dev stack: read from the package's own file, which is never written.
    builtin: bool = Field(default=False, exclude=True)

    def writable_source(self) -> str | None:
        """The stack file that restore and `sweep --apply` may write, if any."""
        return None if self.builtin else self.source

    @model_validator(mode="after")
    def _cross_rules(self) -> StackConfig:
        errors = [
            *self._check_names(),
            *self._check_ports(),
            *self._check_roles(),
            *self._check_routing(),
            *self._check_hooks(),
        ]
        if errors:
            raise _CrossFieldErrors(errors)
        return self

    def components(self) -> dict[str, ServerConfig | ServiceConfig]:
        """Servers then services, by name."""
        return {**self.servers, **self.services}

    def roles(self) -> dict[str, list[str]]:
        """Role -> names of the components that serve it, in config order."""
        out: dict[str, list[str]] = {}
        for name, comp in self.components().items():
            for role in comp.roles:
                out.setdefault(role, []).append(name)
        return out

    def _check_names(self) -> list[str]:
        errs = []
        for name in self.services:
            if name in self.servers:
                errs.append(f"services.{name}: the name is already used by servers.{name}")
        for name in self.components():
            if name == API_COMPONENT:
                errs.append(f"{_kind(self, name)}.{name}: '{API_COMPONENT}' is reserved for the front door")
        return errs

    def _check_ports(self) -> list[str]:
        errs: list[str] = []
        seen: dict[int, str] = {}
        if self.api.enabled:
            seen[self.api.port] = "api.port"
        for name, comp in self.components().items():
            key = "ports" if comp.ports is not None else "port"
            for i, port in enumerate(comp.instance_ports()):
                where = f"{_kind(self, name)}.{name}.{key}"
                if comp.replicas and comp.ports is None and i:
                    where += f" (replica {i})"
                if port in seen:
                    errs.append(f"{where}: {port} is already used by {seen[port]}")
                else:
                    seen[port] = where
        return errs

    def _check_roles(self) -> list[str]:
        errs: list[str] = []
        for role, servers in self.roles().items():
            if len(servers) > 1 and role not in self.pools:
                first, *others = servers
                errs.extend(
                    f"{_kind(self, o)}.{o}.roles: '{role}' is also served by {_kind(self, first)}.{first}; "
                    "list it under 'pools:' if they form one pool"
                    for o in others
                )
        for i, role in enumerate(self.pools):
            if role not in self.roles():
                errs.append(f"pools[{i}]: '{role}' is not a role any server or service serves")
        for alias in self.aliases:
            if alias in self.roles():
                errs.append(f"aliases.{alias}: '{alias}' is already a role; an alias must be a new name")
        return errs

    def _check_routing(self) -> list[str]:
        errs = []
        roles = self.roles()
        valid = ", ".join(sorted(roles)) or "(none)"
        for alias, target in self.aliases.items():
            if target not in roles:
                errs.append(f"aliases.{alias}: '{target}' is not a role; known roles: {valid}")
        for task, target in self.task_types.items():
            if target not in roles and target not in self.aliases:
                errs.append(f"task_types.{task}: '{target}' is not a role or alias; known roles: {valid}")
            if task in roles or task in self.aliases:
                errs.append(f"task_types.{task}: '{task}' is already a role or alias name")
        if self.default_role is not None and self.default_role not in roles and self.default_role not in self.aliases:
            errs.append(f"default_role: '{self.default_role}' is not a role; known roles: {valid}")
        return errs

    def _check_hooks(self) -> list[str]:
        errs: list[str] = []
        first: dict[str, int] = {}
        comps = self.components()
        for i, hook in enumerate(self.hooks or []):
            if hook.name in first:
                errs.append(f"hooks[{i}].name: '{hook.name}' is already used by hooks[{first[hook.name]}]")
            first.setdefault(hook.name, i)
            errs.extend(
                f"hooks[{i}].applies_to: '{c}' is not a server or service; known: {', '.join(comps) or '(none)'}"
                for c in hook.applies_to or []
                if c not in comps
            )
        return errs

    def effective_hooks(self) -> list[HookConfig]:
        """The hooks to run: ``hooks:`` as given, or by default the embedder warm-up when there are embedders."""
        if self.hooks is not None:
            return list(self.hooks)
        if any(s.embeddings is not None for s in self.servers.values()):
            return [HookConfig(name="embed_warmup", builtin="embed_warmup")]
        return []

    # --- paths --------------------------------------------------------------

    def base_dir(self) -> Path:
        return Path(self.source).resolve().parent if self.source else Path.cwd()

    def resolve_path(self, value: str) -> Path:
        """Expand ``~``, ``$VARS`` and the built-in dev model; resolve against the file's folder."""
        if value == BUILTIN_DEV_MODEL:
            return cached_dev_model()
        p = Path(os.path.expandvars(value)).expanduser()
        return p if p.is_absolute() else self.base_dir() / p

    def stack_name(self) -> str:
        if self.name:
            return self.name
        return Path(self.source).stem if self.source else "default"


def _kind(cfg: StackConfig, name: str) -> str:
    return "servers" if name in cfg.servers else "services"


class _CrossFieldErrors(ValueError):
    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (YAML keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is given twice in one mapping", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep)


def load_config(text: str, source: str | None = None) -> StackConfig:
    """Parse and validate a stack file's text; raise ConfigError naming every problem."""
    where = source or "<config>"
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}: not valid YAML: {exc}") from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: the top level must be a mapping of keys (servers:, services:, ...)")
    for internal in ("source", "builtin"):
        if internal in data:
            raise ConfigError(f"{where}: {internal}: unknown key")
    try:
        return StackConfig.model_validate({**data, "source": source})
    except ValidationError as exc:
        raise ConfigError(_format(where, exc)) from exc


def load_config_file(path: str | os.PathLike[str]) -> StackConfig:
    """Read and validate a stack file."""
    p = Path(path).expanduser()
    try:
        text = p.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {p}: {exc.strerror or exc}") from exc
    cfg = load_config(text, str(p.resolve()))
    if p.resolve().parent == PACKAGE_DATA:  # the built-in dev stack, wherever it is loaded from
        cfg = cfg.model_copy(update={"builtin": True})
    return cfg


def _format(where: str, exc: ValidationError) -> str:
    lines = []
    for err in exc.errors(include_url=False):
        ctx_err = (err.get("ctx") or {}).get("error")
        if isinstance(ctx_err, _CrossFieldErrors):
            lines.extend(ctx_err.errors)
            continue
        path = _loc(err["loc"])
        lines.append(f"{path}: {_message(err)}")
    body = "\n".join(f"  {line}" for line in lines)
    return f"{where} is not a valid stack file:\n{body}"


def _loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif re.fullmatch(r"function-after\[.*\]|tagged-union\[.*\]|\[key\]", str(part)):
            continue
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def _message(err: Any) -> str:
    kind = err["type"]
    if kind == "extra_forbidden":
        return "unknown key; check the spelling against the documented keys"
    if kind == "missing":
        return "required key is missing"
    if kind == "string_pattern_mismatch":
        return f"{err['input']!r} is not a valid name (letters, digits, '_', '.', '-'; starting with a letter or digit)"
    msg = str(err["msg"])
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    if "input" in err and kind not in ("model_type", "dict_type"):
        return f"{msg} (got {err['input']!r})"
    return msg
