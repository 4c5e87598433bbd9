"""Property tests of the stack-file loader: whatever the text or bytes, the loader gives a
valid StackConfig or a ConfigError with a short message, never another exception; and a
config it accepts can be turned into command lines and environments a process can take.

Bounded: a few hundred examples per property, well under a minute in all.
"""

from __future__ import annotations

import copy
import os
import tempfile
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from modelfleet.config import StackConfig, load_config, load_config_file
from modelfleet.errors import ConfigError, FleetError
from modelfleet.spec import plan_instances

MAX_MESSAGE = 10 * 1024
FUZZ = settings(
    max_examples=250,
    deadline=None,
    database=None,  # nothing written into the work tree
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
)

VALID = """\
name: fuzz
default_role: front
servers:
  front:
    model: /models/front.gguf
    port: 8081
    host: 127.0.0.1
    roles: [front, coder]
    parallel: 2
    ctx_size: 8192
    threads: 8
    draft: {model: /models/draft.gguf, max: 16, min: 0}
    cache_type_k: q8_0
    load_mode: mmap
    args: [--flash-attn, "on"]
    env: {OMP_NUM_THREADS: "8"}
    health_timeout_s: 120
  workers:
    model: /models/worker.gguf
    port: 8102
    replicas: 2
    tier: warm
    roles: [worker]
    embeddings: {pooling: cls}
    slot_save: false
services:
  search:
    command: [search-server, --port, "{port}", --host, "{host}"]
    port: 8088
    roles: [search]
    health_path: /health
    cwd: /srv
aliases: {code: coder}
task_types: {explore: worker, code_impl: code}
pools: [worker]
worker_pool: {expansion_threshold: 4, warm_timeout_s: 300}
api: {port: 8000, api_key: sk-test, queue_max: 64, queue_wait_s: 30}
monitor: {interval_s: 2, failures_to_eject: 3, restart_budget: 5, backoff_initial_s: 1, backoff_max_s: 60}
memory: {total_gb: 64, os_reserve_pct: 12, min_free_gb: 1}
logs: {max_mb: 256, keep: 3}
hooks:
  - {name: warm, builtin: generate_warmup, timeout_s: 60}
"""
VALID_DATA: dict[str, Any] = yaml.safe_load(VALID)

KEYS = sorted(
    {
        *("servers", "services", "api", "monitor", "memory", "logs", "hooks", "pools", "aliases", "task_types"),
        *("model", "port", "ports", "replicas", "host", "tier", "roles", "env", "args", "command", "health_path"),
        *("parallel", "ctx_size", "threads", "draft", "max", "min", "interval_s", "timeout_s", "name", "builtin"),
        *("cwd", "llama_server", "state_dir", "api_key", "embeddings", "pooling", "on", "<<", "default_role"),
    }
)

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, 1, 8080, 65535, 65536, -1, 10**30]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([1e-300, 0.049, 0.05, 86400.0, 86401.0]),
    st.text(max_size=40),
    st.sampled_from(["", "/health", "a=b", "x\0y", "/h\r\nX: 1", "::1", "0.0.0.0", "{port}", "builtin:smollm2"]),
    st.sampled_from(KEYS),
    st.dates(),
    st.binary(max_size=8),
)
odd_keys = st.sampled_from(["", "A=B", "X\0", "\ud800", "a b", "-x", "source", "builtin", "orchestrator", "x" * 70])
keys = st.one_of(st.sampled_from(KEYS), odd_keys, st.text(max_size=12), st.integers(-3, 3), st.booleans(), st.none())
documents = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=5),
        st.dictionaries(keys, children, max_size=6),
    ),
    max_leaves=40,
)


def check_outcome(load: Any) -> StackConfig | None:
    """Only a StackConfig or a short ConfigError may come out; a StackConfig must plan cleanly."""
    try:
        cfg = load()
    except ConfigError as exc:
        assert len(str(exc).encode("utf-8", "backslashreplace")) < MAX_MESSAGE, str(exc)[:500]
        return None
    assert isinstance(cfg, StackConfig)
    check_plannable(cfg)
    return cfg


def check_plannable(cfg: StackConfig) -> None:
    """What `start` builds from an accepted config: argv and env a process can be given."""
    with tempfile.TemporaryDirectory() as state:
        try:
            specs = plan_instances(cfg, cfg.components(), Path(state), None)
        except FleetError:
            return
    for spec in specs:
        for arg in spec.argv:
            assert "\0" not in arg
            os.fsencode(arg)
        for key, value in spec.env.items():
            assert key and "=" not in key and "\0" not in key and "\0" not in value
            os.fsencode(key), os.fsencode(value)
        assert spec.health_path.startswith("/") and spec.health_path.isprintable() and " " not in spec.health_path
        assert 1 <= spec.port <= 65535 and 0.05 <= spec.health_timeout_s <= 3600


def dump(data: Any) -> str:
    return yaml.safe_dump(data, allow_unicode=True, sort_keys=False)


@FUZZ
@given(documents)
def test_random_documents(data: Any) -> None:
    try:
        text = dump(data)
    except yaml.YAMLError:  # PyYAML cannot write it (a key it cannot represent); nothing to load
        return
    check_outcome(lambda: load_config(text, "/fuzz/stack.yaml"))


def _paths(data: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(data, dict):
        for k, v in data.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(data, list):
        for i, v in enumerate(data):
            out += _paths(v, (*prefix, i))
    return out


PATHS = _paths(VALID_DATA)[1:]
# What `start` hands to a process or a socket: mutated more often than the rest.
SENSITIVE = [
    path
    for path in PATHS
    if any(part in ("env", "args", "command", "health_path", "host", "model", "cwd", "api_key") for part in path)
    or (isinstance(path[-1], str) and path[-1].endswith(("_s", "port", "parallel", "replicas")))
]
odd_values = st.sampled_from(["", "A=B", "x\0y", "/h\r\n", "/he alth", "\ud800", "::1", "a b", "h/x", 0, -1, 1e-300])


def _mutate(data: dict[str, Any], path: tuple[Any, ...], action: str, value: Any, key: Any) -> None:
    parent: Any = data
    for part in path[:-1]:
        parent = parent[part]
    last = path[-1]
    if action == "replace":
        parent[last] = value
    elif action == "delete":
        del parent[last]
    elif action == "add" and isinstance(parent[last], dict):
        parent[last][key] = value
    elif action == "add" and isinstance(parent[last], list):
        parent[last].append(value)
    else:
        parent[last] = [parent[last], value]


@FUZZ
@given(
    st.lists(
        st.tuples(
            st.one_of(st.sampled_from(PATHS), st.sampled_from(SENSITIVE)),
            st.sampled_from(["replace", "replace", "delete", "add", "wrap"]),
            st.one_of(documents, odd_values),
            keys,
        ),
        min_size=1,
        max_size=4,
    )
)
def test_mutations_of_a_valid_stack_file(mutations: list[tuple[tuple[Any, ...], str, Any, Any]]) -> None:
    data = copy.deepcopy(VALID_DATA)
    for path, action, value, key in mutations:
        try:
            _mutate(data, path, action, value, key)
        except (KeyError, IndexError, TypeError):  # an earlier mutation removed the way there
            continue
    try:
        text = dump(data)
    except yaml.YAMLError:
        return
    check_outcome(lambda: load_config(text, "/fuzz/stack.yaml"))


def test_the_valid_file_is_valid() -> None:
    cfg = check_outcome(lambda: load_config(VALID, "/fuzz/stack.yaml"))
    assert cfg is not None and len(cfg.servers) == 2


TOKENS = [
    *("[", "]", "{", "}", ":", ": ", "- ", ",", "\n", "\n  ", "  ", "? ", "#", "'", '"', "|", ">", "---", "..."),
    *("&a ", "*a", "&b ", "*b", "<<: ", "!!int ", "!!float ", "!!str ", "!!binary ", "!!set ", "!!map ", "!!omap "),
    *("!!python/object:os.system ", "%YAML 1.1\n", "%TAG ! tag:x,2000:\n", "!x ", "\\0", "\\x00", "\\ud800"),
    *("servers", "port", "8080", "1e-300", ".nan", "2001-13-01", "0x", "0o9", "1:2:3", "~", "null", "true", "=="),
    *("model", "env", "A=B", "health_path", "/h", "\t", "\r", "\ufeff", "é", "\x85", "\u2028"),
]


@FUZZ
@given(st.lists(st.sampled_from(TOKENS), max_size=60))
def test_yaml_token_soup(tokens: list[str]) -> None:
    text = "".join(tokens)
    check_outcome(lambda: load_config(text, "/fuzz/stack.yaml"))


@FUZZ
@given(st.text(max_size=300))
def test_random_text(text: str) -> None:
    check_outcome(lambda: load_config(text, None))


@FUZZ
@given(
    st.one_of(
        st.binary(max_size=300),
        st.tuples(st.integers(0, len(VALID) - 1), st.binary(min_size=1, max_size=6)).map(
            lambda cut: VALID.encode()[: cut[0]] + cut[1] + VALID.encode()[cut[0] + len(cut[1]) :]
        ),
    )
)
def test_random_bytes_in_a_file(raw: bytes) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "stack.yaml"
        path.write_bytes(raw)
        check_outcome(lambda: load_config_file(path))
