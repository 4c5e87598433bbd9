"""The stack file: pydantic models, the loader and every cross-field rule.

A stack file describes llama-server servers (model, port or replica ports, tier,
roles, slots and llama-server options), auxiliary services (any command with a
``{port}`` placeholder and a health path), role aliases, the task-type routing table
and the worker-pool settings. Every error names its key path and what is allowed:
``servers.coder.port: 8081 is already used by servers.worker``.

The loader refuses, as a ConfigError, anything that would only fail later: bytes that
are not UTF-8, nesting deeper than :data:`MAX_DEPTH`, aliases that expand past
:data:`MAX_NODES` values, NUL characters (no argv, environment or path can hold one),
numbers outside their sane range. Every message is bounded (:data:`MAX_MESSAGE_BYTES`),
whatever the file holds.
"""

from __future__ import annotations

import ipaddress
import os
import re
import reprlib
from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    GetCoreSchemaHandler,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import core_schema

from modelfleet.errors import ConfigError
from modelfleet.paths import cached_dev_model

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
BUILTIN_DEV_MODEL = "builtin:smollm2-135m-instruct"
API_COMPONENT = "orchestrator"
PACKAGE_DATA = Path(__file__).resolve().parent / "data"

#: Limits on what a stack file may hold; a real one is a few kB with a few hundred values.
MAX_FILE_BYTES = 1024 * 1024
MAX_DEPTH = 64  # nesting of mappings and lists, aliases expanded
MAX_NODES = 100_000  # values, an alias counting as everything it names each time it is used
MAX_EXPANDED_CHARS = 16 * 1024 * 1024  # text of every scalar, aliases expanded
MAX_NUMBER_CHARS = 64  # digits of one number: more is no sane setting and slow to convert
MAX_MESSAGE_BYTES = 8192  # a ConfigError's message, whole
MAX_PROBLEMS = 50  # problems listed in one message
MAX_VALUE_REPR = 200  # an offending value, as shown in a message

MIN_SECONDS = 0.05  # the smallest interval or timeout: below it a loop only burns a core
HOUR = 3600.0
DAY = 86400.0
MAX_GB = 1_000_000.0  # a petabyte: any memory size past it is a typo
MAX_TOKENS = 1 << 26  # context and batch sizes, in tokens
MAX_THREADS = 4096
MAX_COUNT = 1_000_000  # queue lengths, thresholds, budgets


@dataclass(frozen=True)
class Range:
    """``Annotated`` metadata: a number within bounds, never a boolean; the error says the range."""

    lo: float
    hi: float
    unit: str = ""
    lo_open: bool = False  # lo itself is not allowed
    hi_open: bool = False  # hi itself is not allowed

    def describe(self) -> str:
        if not (self.lo_open or self.hi_open):
            return f"must be from {_num(self.lo)} to {_num(self.hi)}{self.unit}"
        low = f"more than {_num(self.lo)}" if self.lo_open else f"at least {_num(self.lo)}"
        high = f"less than {_num(self.hi)}" if self.hi_open else f"at most {_num(self.hi)}"
        return f"must be {low} and {high}{self.unit}"

    def _check(self, value: float) -> float:
        above = value > self.lo if self.lo_open else value >= self.lo
        below = value < self.hi if self.hi_open else value <= self.hi
        if not (above and below):  # NaN fails both
            raise ValueError(self.describe())
        return value

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> core_schema.CoreSchema:
        checked = core_schema.no_info_after_validator_function(self._check, handler(source))
        return core_schema.no_info_before_validator_function(_not_a_boolean, checked)


def _not_a_boolean(value: Any) -> Any:
    if isinstance(value, bool):  # YAML's true/yes/on would otherwise pass as 1
        raise ValueError("must be a number, not true or false")
    return value


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else repr(float(x))


Port = Annotated[int, Range(1, 65535)]
Name = Annotated[str, Field(pattern=NAME_PATTERN, max_length=64)]
Interval = Annotated[float, Range(MIN_SECONDS, DAY, " seconds")]  # loops, waits and windows
Timeout = Annotated[float, Range(MIN_SECONDS, HOUR, " seconds")]  # one probe, load or hook
Grace = Annotated[float, Range(0, HOUR, " seconds")]  # 0: no wait at all
Gigabytes = Annotated[float, Range(0, MAX_GB, " GB")]
Count = Annotated[int, Range(1, MAX_COUNT)]
Threads = Annotated[int, Range(1, MAX_THREADS)]
Tokens = Annotated[int, Range(1, MAX_TOKENS, " tokens")]

_HOSTNAME = re.compile(r"(?=.{1,253}$)[\w-]{1,63}(\.[\w-]{1,63})*\.?", re.ASCII)
_VISIBLE_ASCII = re.compile(r"[\x21-\x7e]+")


def _check_host(v: str) -> str:
    """An IP address or a host name: it goes into a bind call and into every probe's URL."""
    if v in ("", "::"):  # wildcard binds, probed on loopback
        return v
    try:
        ip = ipaddress.ip_address(v)
    except ValueError:
        if not _HOSTNAME.fullmatch(v):
            raise ValueError(f"{_short(v)} is not an IP address or host name (letters, digits, '-' and '.')") from None
        return v
    if ip.version == 6:  # probe URLs are built as http://HOST:PORT, which an IPv6 literal breaks
        raise ValueError(f"{_short(v)}: IPv6 addresses other than '::' are not supported; use an IPv4 address")
    return v


def _check_key(v: str | None) -> str | None:
    """A bearer token: it travels in an HTTP header, so visible ASCII only."""
    if v is not None and not _VISIBLE_ASCII.fullmatch(v):
        raise ValueError("must be visible ASCII characters only (no spaces, control characters or non-ASCII)")
    return v


class Tier(StrEnum):
    """Memory tier: HOT starts with the stack, WARM on demand, COLD only by hand."""

    HOT = "hot"
    WARM = "warm"
    COLD = "cold"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class Draft(Strict):
    """Speculative decoding with a small draft model (``--spec-draft-model``)."""

    model: str
    max: Annotated[int, Range(1, 256)] = 16
    min: Annotated[int, Range(0, 256)] = 0
    ram_gb: Gigabytes | None = None


LookupMode = Literal["ngram-simple", "ngram-map-k", "ngram-map-k4v", "ngram-mod", "ngram-cache"]
Pooling = Literal["none", "mean", "cls", "last", "rank"]
CacheType = Literal["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1"]
LoadMode = Literal["auto", "none", "mmap", "mlock", "mmap+mlock", "dio"]


class Embeddings(Strict):
    """Embeddings mode (``--embeddings``) with an optional pooling type."""

    pooling: Pooling | None = None


# Node labels as Ray reads them (Kubernetes label syntax): a key is an optional DNS prefix and '/',
# then a name; a name or value is at most 63 letters, digits, '-', '_' or '.', starting and ending
# with a letter or digit.
_LABEL_NAME = r"[A-Za-z0-9](?:[A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?"
_LABEL_KEY = re.compile(rf"(?=[^/]{{1,253}}/)?(?:{_LABEL_NAME}(?:\.{_LABEL_NAME})*/)?{_LABEL_NAME}")
# A selector value: `value`, `!value` (any other), `in(a, b)`, `!in(a, b)`.
_LABEL_SELECTOR = re.compile(rf"!?{_LABEL_NAME}|!?in\(\s*{_LABEL_NAME}(?:\s*,\s*{_LABEL_NAME})*\s*\)")
_LABEL_HELP = "a value, '!value' (any other value), 'in(a, b)' or '!in(a, b)'"
_NAME_HELP = "at most 63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit"


def _label_key(v: str) -> str:
    if not _LABEL_KEY.fullmatch(v):
        raise ValueError(f"not a node label name: {_NAME_HELP}, after an optional prefix like 'example.com/'")
    return v


def _label_text(v: Any) -> Any:
    if isinstance(v, bool | float):  # YAML's true/on/1.0 would not read back as written
        raise ValueError("YAML reads this as a number or true/false, not text: put the label value in quotes")
    return str(v) if isinstance(v, int) else v


def _label_selector(v: str) -> str:
    """Checked, and written as Ray 2.60 reads it: ``in(a, b)`` becomes ``in(a,b)`` (Ray keeps the
    space as part of the next value, so ``in(a, b)`` would ask for ' b')."""
    if not _LABEL_SELECTOR.fullmatch(v):
        raise ValueError(f"not a label selector: give {_LABEL_HELP}, each value {_NAME_HELP}")
    if "(" not in v:
        return v
    head, inner = v.split("(", 1)
    return f"{head}({','.join(part.strip() for part in inner.rstrip(')').split(','))})"


LabelKey = Annotated[str, AfterValidator(_label_key)]
LabelSelector = Annotated[str, BeforeValidator(_label_text), AfterValidator(_label_selector)]


class NodeSelector(Strict):
    """Where the instances of a component may run with ``placement: ray``.

    ``node: big_box`` is short for ``node: {resource: big_box}``: a Ray resource the node
    must have (``ray start --resources '{"big_box": 1}'``, or ``node:<ip>``).
    ``labels`` are node labels it must match (``ray start --labels zone=a,disk=ssd``), each
    with Ray's label selector syntax: ``zone: a``, ``zone: '!a'``, ``zone: in(a, b)``.
    """

    resource: str | None = Field(default=None, min_length=1, max_length=256)
    labels: dict[LabelKey, LabelSelector] = Field(default_factory=dict, max_length=64)

    @model_validator(mode="after")
    def _says_something(self) -> NodeSelector:
        if self.resource is None and not self.labels:
            raise ValueError("give 'resource' (a Ray resource the node must have), 'labels' (node labels), or both")
        return self

    def describe(self) -> str:
        """``big_box``, ``labels zone=a``, ``big_box, labels zone=a, disk=ssd``."""
        parts = [self.resource] if self.resource else []
        if self.labels:
            parts.append("labels " + format_labels(self.labels))
        return ", ".join(parts)


def format_labels(labels: dict[str, str]) -> str:
    """Node labels or label selectors as messages and the plan show them: ``disk=ssd, zone=a``."""
    return ", ".join(f"{k}={v}" for k, v in sorted(labels.items()))


def _node_selector(v: Any) -> Any:
    """``node: NAME`` (a Ray resource) is short for ``node: {resource: NAME}``."""
    if isinstance(v, str):
        if not v:
            raise ValueError(
                "must name a Ray resource (node: big_box) or be a mapping (node: {labels: {zone: a}}), not empty"
            )
        return {"resource": v}
    if v is not None and not isinstance(v, dict | NodeSelector):
        raise ValueError(
            "must name a Ray resource (node: big_box) or be a mapping of 'resource' and 'labels' "
            f"(node: {{labels: {{zone: a}}}}), not a {type(v).__name__}"
        )
    return v


class Component(Strict):
    """What llama-server servers and auxiliary services have in common."""

    port: Port | None = None
    ports: list[Port] | None = Field(default=None, max_length=64)
    replicas: Annotated[int, Range(1, 64)] | None = None
    host: str = "127.0.0.1"
    tier: Tier = Tier.HOT
    roles: list[Name] = Field(default_factory=list)
    env: dict[str, str] = Field(default_factory=dict)
    health_timeout_s: Timeout | None = None
    cooldown_s: Annotated[float, Range(0, 600, " seconds")] = 0.0
    ram_gb: Gigabytes | None = None
    # With `placement: ray`: where it may run (a Ray resource the node must have, node labels it must
    # match; see NodeSelector), and custom Ray resources each instance holds.
    node: Annotated[NodeSelector | None, BeforeValidator(_node_selector)] = None
    resources: dict[str, Annotated[float, Range(0, MAX_COUNT)]] = Field(default_factory=dict)

    @field_validator("host")
    @classmethod
    def _host(cls, v: str) -> str:
        return _check_host(v)

    @field_validator("env")
    @classmethod
    def _env_is_an_environment(cls, v: dict[str, str]) -> dict[str, str]:
        for name, value in v.items():
            if not name or "=" in name or "\0" in name:
                raise ValueError(
                    f"{_short(name)} is not an environment variable name: it must be non-empty, without '=' or NUL"
                )
            if "\0" in value:
                raise ValueError(f"{_short(name)}: the value holds a NUL character, which no environment can")
        return v

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
    parallel: Annotated[int, Range(1, 256)] = 1
    ctx_size: Annotated[int, Range(0, MAX_TOKENS, " tokens (0: the model's own)")] | None = None
    threads: Threads | None = None
    threads_http: Threads | None = None
    batch_size: Tokens | None = None
    args: list[str] = Field(default_factory=list)
    load_mode: LoadMode | None = None
    draft: Draft | None = None
    lookup: LookupMode | None = None
    moe_active_experts: Annotated[int, Range(1, 256)] | None = None
    mmproj: str | None = None
    embeddings: Embeddings | None = None
    cache_type_k: CacheType | None = None
    cache_type_v: CacheType | None = None
    large: bool | None = None
    slot_save: bool = False  # --slot-save-path <state dir>/slots/<port>: lets checkpoints save the KV cache
    # The front door picks the slot of each completion request (id_slot: the idle slot holding most of
    # its prefix) and the server moves slot contents through its RAM prompt cache on every change of
    # conversation (--slot-prompt-similarity 1). None: on when the server is in a prefix-routed pool.
    pin_slots: bool | None = None

    @field_validator("args")
    @classmethod
    def _args_are_argv(cls, v: list[str]) -> list[str]:
        for a in v:
            if "\0" in a:
                raise ValueError(f"{_short(a)} holds a NUL character, which no command line can")
            if a.split("=", 1)[0] in MANAGED_FLAGS:
                raise ValueError(f"{_short(a)} is set by modelfleet; use the matching config key instead")
        return v

    @property
    def is_vision(self) -> bool:
        return self.mmproj is not None

    @model_validator(mode="after")
    def _pinning(self) -> ServerConfig:
        if self.pin_slots and self.embeddings is not None:
            raise ValueError("pin_slots: an embedding server has no conversations to keep; remove pin_slots")
        if self.pin_slots and _sets_similarity(self.args):
            raise ValueError(
                "pin_slots sets --slot-prompt-similarity itself; remove it from args (or set pin_slots: false)"
            )
        return self

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

    @field_validator("command")
    @classmethod
    def _command_is_argv(cls, v: list[str]) -> list[str]:
        if not v[0].strip():
            raise ValueError("the first item must name the program to run")
        for a in v:
            if "\0" in a:
                raise ValueError(f"{_short(a)} holds a NUL character, which no command line can")
        return v

    @field_validator("health_path")
    @classmethod
    def _path_is_absolute(cls, v: str) -> str:
        if not v.startswith("/"):
            raise ValueError("must start with '/', for example '/health'")
        if len(v) > 2048 or not _VISIBLE_ASCII.fullmatch(v):
            raise ValueError(
                "must be a URL path of visible ASCII characters (no spaces, CR/LF or other control "
                "characters, at most 2048), for example '/health'"
            )
        return v

    def effective_health_timeout_s(self) -> float:
        return self.health_timeout_s if self.health_timeout_s is not None else 60.0


class WorkerPoolConfig(Strict):
    """When WARM capacity grows and shrinks (the seed's WorkerPoolConfig)."""

    expansion_threshold: Count = 4
    warm_timeout_s: Interval = 300.0
    # Servers with `slot_save: true`: save each slot's KV cache when a WARM instance is stopped
    # for idleness or reloaded, and restore it before the new process takes traffic.
    keep_kv: bool = True
    kv_keep_mb: Annotated[float, Range(1, 1_000_000, " MB")] = 1024.0  # per server; oldest files dropped


class ApiConfig(Strict):
    """The front door (the seed's orchestrator API)."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: Port = 8000
    api_key: str | None = Field(default=None, min_length=1, max_length=4096)
    admin_key: str | None = Field(default=None, min_length=1, max_length=4096)
    max_body_bytes: Annotated[int, Range(1024, 1 << 30, " bytes")] = 16 * 1024 * 1024
    queue_max: Annotated[int, Range(0, MAX_COUNT)] = 64
    queue_wait_s: Interval = 30.0
    request_timeout_s: Interval = 600.0
    drain_timeout_s: Annotated[float, Range(0, DAY, " seconds")] = 30.0
    stop_grace_s: Grace = 10.0
    start_wait_s: Interval = 300.0
    health_timeout_s: Timeout = 30.0
    # Cache-aware routing (affinity.py): the header that names a conversation (else the body's `user`),
    # and e in "never over (1 + e) times the pool's mean load".
    session_header: str | None = Field(default="X-Session-Id", min_length=1, max_length=128)
    prefix_load_factor: Annotated[float, Range(0, 100)] = 0.25
    # Prefix sharing (share.py): a system prompt this long (characters) that a prefix-routed pool's
    # replicas with `slot_save` do not hold yet is evaluated once and restored into their idle slots.
    # 0: never.
    share_prefix_min_chars: Annotated[int, Range(0, MAX_COUNT, " characters")] = 2000

    @field_validator("host")
    @classmethod
    def _host(cls, v: str) -> str:
        return _check_host(v)

    @field_validator("session_header")
    @classmethod
    def _header_name(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+", v):
            raise ValueError(f"{_short(v)} is not an HTTP header name (letters, digits and '-'), e.g. X-Session-Id")
        return v

    @field_validator("api_key", "admin_key")
    @classmethod
    def _keys_are_tokens(cls, v: str | None) -> str | None:
        return _check_key(v)


class MonitorConfig(Strict):
    """Liveness probing and self-healing, done by the front door."""

    interval_s: Interval = 2.0
    probe_timeout_s: Timeout = 2.0
    failures_to_eject: Annotated[int, Range(1, 1000)] = 3
    restart_budget: Annotated[int, Range(0, MAX_COUNT)] = 5
    restart_window_s: Interval = 600.0
    backoff_initial_s: Interval = 1.0
    backoff_max_s: Interval = 60.0

    @model_validator(mode="after")
    def _backoff_grows(self) -> MonitorConfig:
        if self.backoff_max_s < self.backoff_initial_s:
            raise ValueError(
                f"backoff_max_s ({_num(self.backoff_max_s)}) is less than backoff_initial_s "
                f"({_num(self.backoff_initial_s)})"
            )
        return self


class StartConfig(Strict):
    """How ``start`` orders launches."""

    large_model_gb: Gigabytes = 4.0


class LogsConfig(Strict):
    """Rotation of every component's log: a copy is kept, then the file is emptied in place."""

    # rotate past this size (at least 1 KiB); null: never
    max_mb: Annotated[float, Range(1 / 1024, 1 << 24, " MB")] | None = 256.0
    keep: Annotated[int, Range(1, 1000)] = 3  # copies kept: <log>.1 (newest) .. <log>.<keep>


class MemoryConfig(Strict):
    """The memory budget that ``plan`` prints and ``start`` and WARM admission enforce."""

    total_gb: Annotated[float, Range(0, MAX_GB, " GB", lo_open=True)] | None = None  # default: this machine's RAM
    os_reserve_gb: Gigabytes | None = None
    os_reserve_pct: Annotated[float, Range(0, 100, " percent", hi_open=True)] | None = None  # default: 12
    # per instance; default: from the model's shape
    compute_buffer_mb: Annotated[float, Range(0, MAX_GB * 1024, " MB")] | None = None
    min_free_gb: Gigabytes = 1.0  # left free when a WARM instance is admitted
    log_buffers: bool = True  # llama-server logs at verbosity 4, which prints its buffer sizes

    @model_validator(mode="after")
    def _one_reserve(self) -> MemoryConfig:
        if self.os_reserve_gb is not None and self.os_reserve_pct is not None:
            raise ValueError("give 'os_reserve_gb' or 'os_reserve_pct', not both")
        return self


HookBuiltin = Literal["embed_warmup", "generate_warmup"]
Routing = Literal["least_busy", "prefix"]
HookEvent = Literal["start", "instance_up"]
_HOOK_CALL = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*")


class HookConfig(Strict):
    """One init hook: a built-in warm-up or a user function named ``module:function``."""

    name: Name
    builtin: HookBuiltin | None = None
    call: str | None = None
    timeout_s: Timeout = 60.0
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
            raise ValueError(f"{_short(v)} is not 'module:function' (for example 'mypkg.hooks:seed')")
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


SIMILARITY_FLAGS = frozenset({"-sps", "--slot-prompt-similarity"})


def _sets_similarity(args: list[str]) -> bool:
    return any(a.split("=", 1)[0] in SIMILARITY_FLAGS for a in args)


class PlacementConfig(Strict):
    """Where instances run: this machine, or the nodes of a Ray cluster (``modelfleet[ray]``)."""

    kind: Literal["local", "ray"] = "local"
    address: str = Field(default="auto", min_length=1, max_length=1024)  # auto | host:port | ray://host:10001
    namespace: Name | None = None  # default: modelfleet-<stack name>
    memory_resource: Name = "ram_gb"  # the custom resource each node declares its RAM in, in GB
    place_timeout_s: Timeout = 10.0  # how long Ray may take to find room before a start is refused

    def effective_namespace(self, stack_name: str | None) -> str:
        return self.namespace or f"modelfleet-{stack_name or 'default'}"


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
    # How a pool chooses among its instances; default: prefix for pools of more than one instance.
    routing: dict[Name, Routing] = Field(default_factory=dict)
    worker_pool: WorkerPoolConfig = Field(default_factory=WorkerPoolConfig)
    api: ApiConfig = Field(default_factory=ApiConfig)
    monitor: MonitorConfig = Field(default_factory=MonitorConfig)
    start: StartConfig = Field(default_factory=StartConfig)
    memory: MemoryConfig = Field(default_factory=MemoryConfig)
    logs: LogsConfig = Field(default_factory=LogsConfig)
    placement: PlacementConfig = Field(default_factory=PlacementConfig)
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
        errs.extend(
            f"routing.{role}: '{role}' is not a role; known roles: {valid}"
            for role in self.routing
            if role not in roles
        )
        return errs

    def pool_routing(self, role: str, instances: int) -> Routing:
        """How the pool of ``role`` picks among its ``instances``: as configured, else prefix when there is a choice."""
        return self.routing.get(role, "prefix" if instances > 1 else "least_busy")

    def pins_slots(self, name: str) -> bool:
        """Whether the front door picks the slot of each completion request to server ``name``:
        as configured, else when one of its roles routes by prefix (and its args leave slot choice alone)."""
        srv = self.servers[name]
        if srv.pin_slots is not None:
            return srv.pin_slots
        if srv.embeddings is not None or _sets_similarity(srv.args):
            return False
        comps = self.components()
        return any(
            self.pool_routing(role, sum(len(comps[c].instance_ports()) for c in names)) == "prefix"
            for role, names in self.roles().items()
            if role in srv.roles
        )

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


_MERGE_TAGS = ("tag:yaml.org,2002:merge", "tag:yaml.org,2002:value")


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (YAML keeps the last), nesting
    deeper than MAX_DEPTH, more than MAX_NODES values (aliases expanded), and numbers or dates
    Python cannot convert, each as a YAMLError with the place in the file."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0
        self._composed = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        self._composed += 1
        if self._composed > MAX_NODES:
            raise yaml.composer.ComposerError(
                None, None, f"more than {MAX_NODES} values; a stack file needs far fewer", self._mark()
            )
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise yaml.composer.ComposerError(None, None, f"nested deeper than {MAX_DEPTH} levels", self._mark())
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def _mark(self) -> yaml.Mark:
        mark: yaml.Mark = self.peek_event().start_mark  # type: ignore[no-untyped-call]
        return mark

    def construct_document(self, node: yaml.Node) -> Any:
        _measure(node)
        return super().construct_document(node)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            seen: set[Any] = set()
            for key_node, _ in node.value:
                if key_node.tag in _MERGE_TAGS:  # `<<: *base` merges; later keys override it
                    continue
                key = self.construct_object(key_node, deep=deep)
                try:
                    hash(key)
                except TypeError:
                    raise yaml.constructor.ConstructorError(
                        "while constructing a mapping", node.start_mark, "found unhashable key", key_node.start_mark
                    ) from None
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {_short(key)} is given twice in one mapping", key_node.start_mark
                    )
                seen.add(key)
        return super().construct_mapping(node, deep)


def _scalar_constructor(name: str) -> Any:
    """SafeConstructor's int, float or timestamp constructor, bounded and with its errors as YAMLErrors."""
    base = getattr(yaml.constructor.SafeConstructor, name)

    def construct(loader: _UniqueKeyLoader, node: yaml.ScalarNode) -> Any:
        text = str(node.value)
        if len(text) > MAX_NUMBER_CHARS:
            raise yaml.constructor.ConstructorError(
                None, None, f"a number or date of more than {MAX_NUMBER_CHARS} characters", node.start_mark
            )
        try:
            return base(loader, node)
        except (ValueError, TypeError, IndexError, OverflowError) as exc:
            raise yaml.constructor.ConstructorError(
                None, None, f"{_short(text)} cannot be read as a {node.tag.rsplit(':', 1)[-1]} ({exc})", node.start_mark
            ) from None

    return construct


for _tag, _name in (("int", "construct_yaml_int"), ("float", "construct_yaml_float")):
    _UniqueKeyLoader.add_constructor(f"tag:yaml.org,2002:{_tag}", _scalar_constructor(_name))
_UniqueKeyLoader.add_constructor("tag:yaml.org,2002:timestamp", _scalar_constructor("construct_yaml_timestamp"))


def _measure(root: yaml.Node) -> None:
    """Refuse a document whose aliases expand too far: deeper than MAX_DEPTH, more than
    MAX_NODES values or MAX_EXPANDED_CHARS of text, or an alias inside what it names.

    An alias is the very node it names, so a few lines can stand for billions of values
    ("billion laughs"); each node is measured once and its size reused.
    """
    sizes: dict[int, tuple[int, int, int]] = {}  # id(node) -> (values, chars, height)
    open_: set[int] = set()

    def walk(node: yaml.Node, depth: int) -> tuple[int, int, int]:
        key = id(node)
        if key in open_:
            raise yaml.composer.ComposerError(
                None, None, "an alias refers to the mapping or list that contains it", node.start_mark
            )
        if key not in sizes:
            if depth > MAX_DEPTH:
                raise yaml.composer.ComposerError(
                    None, None, f"aliases nest the document deeper than {MAX_DEPTH} levels", node.start_mark
                )
            if isinstance(node, yaml.ScalarNode):
                sizes[key] = (1, len(node.value), 1)
            else:
                children = node.value if isinstance(node, yaml.SequenceNode) else [n for kv in node.value for n in kv]
                values, chars, height = 1, 0, 0
                open_.add(key)
                for child in children:
                    v, c, h = walk(child, depth + 1)
                    values, chars, height = values + v, chars + c, max(height, h)
                    if values > MAX_NODES or chars > MAX_EXPANDED_CHARS:
                        raise yaml.composer.ComposerError(
                            None,
                            None,
                            f"its aliases expand to more than {MAX_NODES} values or {MAX_EXPANDED_CHARS} characters "
                            "(an alias counts as everything it names, each time it is used)",
                            node.start_mark,
                        )
                open_.discard(key)
                sizes[key] = (values, chars, height + 1)
        size = sizes[key]
        if depth + size[2] - 1 > MAX_DEPTH:
            raise yaml.composer.ComposerError(
                None, None, f"aliases nest the document deeper than {MAX_DEPTH} levels", node.start_mark
            )
        return size

    walk(root, 1)


def load_config(text: str, source: str | None = None) -> StackConfig:
    """Parse and validate a stack file's text; raise ConfigError naming every problem."""
    where = source or "<config>"
    if len(text) > MAX_FILE_BYTES:
        raise _error(f"{where}: {len(text)} characters is more than a stack file may hold ({MAX_FILE_BYTES})")
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as exc:
        raise _error(f"{where}: not valid YAML: {exc}") from None
    except (ValueError, TypeError, IndexError, OverflowError) as exc:  # a constructor's own failure
        raise _error(f"{where}: not valid YAML: a value cannot be read ({exc})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise _error(f"{where}: the top level must be a mapping of keys (servers:, services:, ...)")
    for internal in ("source", "builtin"):
        if internal in data:
            raise _error(f"{where}: {internal}: unknown key")
    unusable = list(_unusable_values(data))
    if unusable:
        raise _error(_listing(f"{where} is not a valid stack file:", unusable))
    try:
        return StackConfig.model_validate({**data, "source": source})
    except ValidationError as exc:
        raise _error(_format(where, exc)) from None


def load_config_file(path: str | os.PathLike[str]) -> StackConfig:
    """Read and validate a stack file (UTF-8, at most MAX_FILE_BYTES)."""
    p = Path(path).expanduser()
    try:
        with p.open("rb") as f:
            raw = f.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise _error(f"cannot read config file {p}: {exc.strerror or exc}") from None
    if len(raw) > MAX_FILE_BYTES:
        raise _error(f"{p}: more than {MAX_FILE_BYTES} bytes; a stack file is a few kB")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise _error(
            f"{p}: not UTF-8 text: byte 0x{raw[exc.start]:02x} at offset {exc.start} (line {line}) "
            "cannot be decoded; save the file as UTF-8"
        ) from None
    cfg = load_config(text, str(p.resolve()))
    if p.resolve().parent == PACKAGE_DATA:  # the built-in dev stack, wherever it is loaded from
        cfg = cfg.model_copy(update={"builtin": True})
    return cfg


def _unusable_values(data: Any) -> Iterator[str]:
    """Strings no process can be given (NUL, lone surrogates) and binary values, anywhere, by key path."""
    stack: list[tuple[str, Any]] = [("", data)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, dict):
            items = list(value.items())
            for k, _ in items:
                if isinstance(k, str) and (problem := _text_problem(k)):
                    yield f"{_join(path, k)}: the key {problem}"
            stack.extend((_join(path, k), v) for k, v in reversed(items))
        elif isinstance(value, list | tuple | set | frozenset):
            stack.extend((f"{path or '(top level)'}[{i}]", v) for i, v in reversed(list(enumerate(value))))
        elif isinstance(value, bytes | bytearray):
            yield f"{path}: a binary value (!!binary) has no place in a stack file"
        elif isinstance(value, str) and (problem := _text_problem(value)):
            yield f"{path}: {_short(value)} {problem}"


def _text_problem(text: str) -> str | None:
    if "\0" in text:
        return "holds a NUL character, which no command line, environment or path can"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "holds a lone surrogate (an escape such as \\ud800), which is not text"
    return None


def _join(path: str, key: Any) -> str:
    part = _key(key)
    return f"{path}.{part}" if path else part


def _key(part: Any) -> str:
    """A key as a path component: as written when short and printable, else its (bounded) repr."""
    if isinstance(part, str) and part.isprintable() and len(part) <= MAX_VALUE_REPR:
        return part
    return _short(part)


_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = MAX_VALUE_REPR
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = _REPR.maxfrozenset = 8
_REPR.maxlevel = 3


def _short(value: Any, limit: int = MAX_VALUE_REPR) -> str:
    """``repr(value)``, bounded: a message shows at most ``limit`` characters of any value."""
    try:
        text = _REPR.repr(value)
    except Exception:  # a value whose repr fails is still named
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _listing(head: str, lines: list[str]) -> str:
    shown = lines[:MAX_PROBLEMS]
    if len(lines) > MAX_PROBLEMS:
        shown.append(f"... and {len(lines) - MAX_PROBLEMS} more problems")
    return head + "\n" + "\n".join(f"  {line}" for line in shown)


def _error(message: str) -> ConfigError:
    """A ConfigError whose message is at most MAX_MESSAGE_BYTES of UTF-8, however big the file."""
    data = message.encode("utf-8", "backslashreplace")
    if len(data) > MAX_MESSAGE_BYTES:
        cut = data[: MAX_MESSAGE_BYTES - 80].decode("utf-8", "ignore")
        message = f"{cut}\n  ... (cut: the whole message was {len(data)} bytes)"
    return ConfigError(message)


def _format(where: str, exc: ValidationError) -> str:
    lines = []
    for err in exc.errors(include_url=False):
        ctx_err = (err.get("ctx") or {}).get("error")
        if isinstance(ctx_err, _CrossFieldErrors):
            lines.extend(ctx_err.errors)
            continue
        path = _loc(err["loc"])
        lines.append(f"{path}: {_message(err)}")
    return _listing(f"{where} is not a valid stack file:", lines)


def _loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif re.fullmatch(r"function-(after|before|wrap|plain)\[.*\]|tagged-union\[.*\]|\[key\]", str(part)):
            continue
        else:
            out += ("." if out else "") + _key(part)
    return out or "(top level)"


def _message(err: Any) -> str:
    kind = err["type"]
    if kind == "extra_forbidden":
        return "unknown key; check the spelling against the documented keys"
    if kind == "missing":
        return "required key is missing"
    if kind == "string_pattern_mismatch":
        allowed = "letters, digits, '_', '.', '-'; starting with a letter or digit"
        return f"{_short(err['input'])} is not a valid name ({allowed})"
    msg = str(err["msg"])
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    if "input" in err and kind not in ("model_type", "dict_type"):
        return f"{msg} (got {_short(err['input'])})"
    return msg
