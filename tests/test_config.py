"""Tests for the stack file: every validation rule, the examples, path resolution, the
binary-capability checks of ``server_args`` and ``modelfleet config check``.

Everything here is fast: configs are YAML strings, binaries are hand-made
:class:`BinaryInfo` values, and the only processes are short CLI runs.
"""

from __future__ import annotations

import os
import subprocess
import textwrap
from pathlib import Path

import pytest

from conftest import MODELFLEET
from modelfleet import provision
from modelfleet.config import (
    BUILTIN_DEV_MODEL,
    StackConfig,
    Tier,
    load_config,
    load_config_file,
)
from modelfleet.errors import BinaryError, ConfigError
from modelfleet.spec import BinaryInfo, find_llama_server, plan_instances, server_args

ROOT = Path(__file__).resolve().parent.parent
PRODUCTION = ROOT / "examples" / "production.yaml"
DEV = ROOT / "examples" / "dev.yaml"

SOURCE = "/srv/stacks/stack.yaml"


def load(text: str, source: str | None = SOURCE) -> StackConfig:
    return load_config(textwrap.dedent(text), source)


def config_error(text: str, source: str | None = SOURCE) -> str:
    """The message of the ConfigError that loading ``text`` raises."""
    with pytest.raises(ConfigError) as info:
        load(text, source)
    return str(info.value)


# --------------------------------------------------------------------------- basics


def test_minimal_server_gets_defaults() -> None:
    cfg = load(
        """
        servers:
          a: {model: m.gguf, port: 8080}
        """
    )
    srv = cfg.servers["a"]
    assert srv.instance_ports() == [8080]
    assert srv.tier is Tier.HOT
    assert srv.parallel == 1
    assert srv.host == "127.0.0.1"
    assert cfg.api.port == 8000
    assert cfg.worker_pool.expansion_threshold == 4
    assert cfg.worker_pool.warm_timeout_s == 300
    assert cfg.stack_name() == "stack"


def test_empty_file_is_an_empty_stack() -> None:
    cfg = load("")
    assert cfg.servers == {}
    assert cfg.services == {}


def test_replicas_give_consecutive_ports() -> None:
    cfg = load(
        """
        servers:
          emb: {model: m.gguf, port: 9000, replicas: 3}
          pinned: {model: m.gguf, ports: [9100, 9050]}
        """
    )
    assert cfg.servers["emb"].instance_ports() == [9000, 9001, 9002]
    assert cfg.servers["pinned"].instance_ports() == [9100, 9050]


# --------------------------------------------------------------------------- unknown keys


def test_unknown_top_level_key() -> None:
    msg = config_error("serverz: {}\n")
    assert "serverz: unknown key" in msg
    assert SOURCE in msg


def test_unknown_server_key() -> None:
    msg = config_error(
        """
        servers:
          x: {model: m.gguf, port: 8080, bogus: 1}
        """
    )
    assert "servers.x.bogus: unknown key" in msg


def test_unknown_worker_pool_key() -> None:
    msg = config_error("worker_pool: {typo: 3}\n")
    assert "worker_pool.typo: unknown key" in msg


def test_unknown_nested_draft_key() -> None:
    msg = config_error(
        """
        servers:
          x: {model: m.gguf, port: 8080, draft: {model: d.gguf, maximum: 8}}
        """
    )
    assert "servers.x.draft.maximum: unknown key" in msg


def test_unknown_service_key() -> None:
    msg = config_error(
        """
        services:
          s: {command: [x], port: 8080, helth_path: /h}
        """
    )
    assert "services.s.helth_path: unknown key" in msg


def test_source_is_not_a_config_key() -> None:
    msg = config_error("source: elsewhere.yaml\n")
    assert "source: unknown key" in msg


# --------------------------------------------------------------------------- ports


def test_duplicate_port_between_servers() -> None:
    msg = config_error(
        """
        servers:
          a: {model: m.gguf, port: 8080}
          b: {model: m.gguf, port: 8080}
        """
    )
    assert "servers.b.port: 8080 is already used by servers.a.port" in msg


def test_replica_range_collides_with_a_later_server() -> None:
    msg = config_error(
        """
        servers:
          r: {model: m.gguf, port: 8079, replicas: 2}
          a: {model: m.gguf, port: 8080}
        """
    )
    assert "servers.a.port: 8080 is already used by servers.r.port (replica 1)" in msg


def test_replica_range_collides_with_an_earlier_server() -> None:
    msg = config_error(
        """
        servers:
          a: {model: m.gguf, port: 8080}
          r: {model: m.gguf, port: 8079, replicas: 2}
        """
    )
    assert "servers.r.port (replica 1): 8080 is already used by servers.a.port" in msg


def test_duplicate_port_between_ports_lists() -> None:
    msg = config_error(
        """
        servers:
          a: {model: m.gguf, ports: [9000, 9001]}
          b: {model: m.gguf, ports: [9002, 9001]}
        """
    )
    assert "servers.b.ports: 9001 is already used by servers.a.ports" in msg


def test_server_port_collides_with_api_port() -> None:
    msg = config_error(
        """
        api: {port: 8000}
        servers:
          a: {model: m.gguf, port: 8000}
        """
    )
    assert "servers.a.port: 8000 is already used by api.port" in msg


def test_default_api_port_is_reserved_too() -> None:
    msg = config_error(
        """
        servers:
          a: {model: m.gguf, port: 7999, replicas: 2}
        """
    )
    assert "servers.a.port (replica 1): 8000 is already used by api.port" in msg


def test_disabled_api_frees_its_port() -> None:
    cfg = load(
        """
        api: {enabled: false}
        servers:
          a: {model: m.gguf, port: 8000}
        """
    )
    assert cfg.servers["a"].instance_ports() == [8000]


def test_duplicate_port_between_server_and_service() -> None:
    msg = config_error(
        """
        servers:
          a: {model: m.gguf, port: 8080}
        services:
          s: {command: [svc, --port, "{port}"], port: 8080}
        """
    )
    assert "services.s.port: 8080 is already used by servers.a.port" in msg


def test_every_port_collision_is_reported() -> None:
    msg = config_error(
        """
        servers:
          a: {model: m.gguf, port: 8080}
          b: {model: m.gguf, port: 8080}
          c: {model: m.gguf, port: 8000}
        """
    )
    assert "servers.b.port: 8080 is already used by servers.a.port" in msg
    assert "servers.c.port: 8000 is already used by api.port" in msg


def test_port_and_ports_both_given() -> None:
    msg = config_error(
        """
        servers:
          a: {model: m.gguf, port: 8080, ports: [8081]}
        """
    )
    assert "servers.a:" in msg
    assert "give exactly one of 'port' (with optional 'replicas') or 'ports'" in msg


def test_neither_port_nor_ports_given() -> None:
    msg = config_error(
        """
        services:
          s: {command: [svc]}
        """
    )
    assert "services.s:" in msg
    assert "give exactly one of 'port' (with optional 'replicas') or 'ports'" in msg


def test_empty_ports_list() -> None:
    msg = config_error(
        """
        servers:
          a: {model: m.gguf, ports: []}
        """
    )
    assert "servers.a:" in msg
    assert "'ports' must list at least one port" in msg


def test_replicas_not_matching_ports() -> None:
    msg = config_error(
        """
        servers:
          a: {model: m.gguf, ports: [9000, 9001], replicas: 3}
        """
    )
    assert "servers.a:" in msg
    assert "'replicas: 3' does not match the 2 'ports'" in msg


def test_replicas_matching_ports_is_fine() -> None:
    cfg = load(
        """
        servers:
          a: {model: m.gguf, ports: [9000, 9001], replicas: 2}
        """
    )
    assert cfg.servers["a"].instance_ports() == [9000, 9001]


def test_replica_ports_past_65535() -> None:
    msg = config_error(
        """
        servers:
          a: {model: m.gguf, port: 65535, replicas: 2}
        """
    )
    assert "servers.a:" in msg
    assert "replica ports run past 65535" in msg


def test_port_out_of_range() -> None:
    msg = config_error(
        """
        servers:
          a: {model: m.gguf, port: 70000}
        """
    )
    assert "servers.a.port:" in msg
    assert "65535" in msg


# --------------------------------------------------------------------------- roles, pools, aliases, routing


def test_role_served_by_two_servers_needs_pools() -> None:
    msg = config_error(
        """
        servers:
          a: {model: m.gguf, port: 8080, roles: [worker]}
          b: {model: m.gguf, port: 8081, roles: [worker]}
        """
    )
    assert "servers.b.roles: 'worker' is also served by servers.a" in msg
    assert "pools:" in msg


def test_role_served_by_server_and_service_needs_pools() -> None:
    msg = config_error(
        """
        servers:
          a: {model: m.gguf, port: 8080, roles: [retrieval]}
        services:
          s: {command: [svc], port: 8081, roles: [retrieval]}
        """
    )
    assert "services.s.roles: 'retrieval' is also served by servers.a" in msg
    assert "pools:" in msg


def test_role_served_by_two_servers_with_pools_is_fine() -> None:
    cfg = load(
        """
        servers:
          a: {model: m.gguf, port: 8080, roles: [worker]}
          b: {model: m.gguf, port: 8081, roles: [worker]}
        pools: [worker]
        """
    )
    assert cfg.roles()["worker"] == ["a", "b"]


def test_pool_no_server_serves() -> None:
    msg = config_error(
        """
        servers:
          a: {model: m.gguf, port: 8080, roles: [worker]}
        pools: [worker, ghost]
        """
    )
    assert "pools[1]: 'ghost' is not a role any server or service serves" in msg


def test_alias_pointing_nowhere() -> None:
    msg = config_error(
        """
        servers:
          a: {model: m.gguf, port: 8080, roles: [worker]}
        aliases:
          legacy: ghost
        """
    )
    assert "aliases.legacy: 'ghost' is not a role" in msg
    assert "known roles: worker" in msg


def test_alias_shadowing_a_role() -> None:
    msg = config_error(
        """
        servers:
          a: {model: m.gguf, port: 8080, roles: [worker, coder]}
        aliases:
          worker: coder
        """
    )
    assert "aliases.worker: 'worker' is already a role; an alias must be a new name" in msg


def test_alias_to_a_role_is_fine() -> None:
    cfg = load(
        """
        servers:
          a: {model: m.gguf, port: 8080, roles: [worker_coder]}
        aliases:
          worker_code: worker_coder
        """
    )
    assert cfg.aliases == {"worker_code": "worker_coder"}


def test_task_type_mapped_to_unknown_role() -> None:
    msg = config_error(
        """
        servers:
          a: {model: m.gguf, port: 8080, roles: [worker]}
        task_types:
          refactor: ghost
        """
    )
    assert "task_types.refactor: 'ghost' is not a role or alias" in msg
    assert "known roles: worker" in msg


def test_task_type_mapped_to_an_alias_is_fine() -> None:
    cfg = load(
        """
        servers:
          a: {model: m.gguf, port: 8080, roles: [worker_coder]}
        aliases:
          worker_code: worker_coder
        task_types:
          refactor: worker_code
          test_gen: worker_coder
        """
    )
    assert cfg.task_types == {"refactor": "worker_code", "test_gen": "worker_coder"}


def test_task_type_named_like_a_role() -> None:
    msg = config_error(
        """
        servers:
          a: {model: m.gguf, port: 8080, roles: [worker, coder]}
        task_types:
          worker: coder
        """
    )
    assert "task_types.worker: 'worker' is already a role or alias name" in msg


def test_default_role_unknown() -> None:
    msg = config_error(
        """
        default_role: ghost
        servers:
          a: {model: m.gguf, port: 8080, roles: [frontdoor]}
        """
    )
    assert "default_role: 'ghost' is not a role" in msg
    assert "known roles: frontdoor" in msg


def test_default_role_may_be_an_alias() -> None:
    cfg = load(
        """
        default_role: front
        servers:
          a: {model: m.gguf, port: 8080, roles: [frontdoor]}
        aliases:
          front: frontdoor
        """
    )
    assert cfg.default_role == "front"


def test_known_roles_of_an_empty_stack() -> None:
    msg = config_error("default_role: ghost\n")
    assert "default_role: 'ghost' is not a role; known roles: (none)" in msg


def test_cross_field_errors_are_all_reported() -> None:
    msg = config_error(
        """
        default_role: ghost
        servers:
          a: {model: m.gguf, port: 8080, roles: [worker]}
          b: {model: m.gguf, port: 8080, roles: [worker]}
        aliases:
          old: nowhere
        """
    )
    for part in ("servers.b.port", "'worker' is also served by", "aliases.old", "default_role"):
        assert part in msg


# --------------------------------------------------------------------------- names, tiers, args, services


@pytest.mark.parametrize(
    ("text", "where", "bad"),
    [
        ("servers:\n  'bad name': {model: m.gguf, port: 8080}\n", "servers.bad name", "bad name"),
        ("servers:\n  a: {model: m.gguf, port: 8080, roles: ['-x']}\n", "servers.a.roles[0]", "-x"),
        ("services:\n  '.hidden': {command: [x], port: 8080}\n", "services..hidden", ".hidden"),
        ("servers:\n  a: {model: m.gguf, port: 8080, roles: [r]}\naliases:\n  'a/b': r\n", "aliases.a/b", "a/b"),
        ("name: 'my stack'\n", "name", "my stack"),
        ("default_role: 'front door'\n", "default_role", "front door"),
    ],
)
def test_invalid_names(text: str, where: str, bad: str) -> None:
    msg = config_error(text)
    assert f"{where}" in msg
    assert f"{bad!r} is not a valid name" in msg
    assert "letters, digits, '_', '.', '-'" in msg


def test_name_too_long() -> None:
    msg = config_error(f"servers:\n  {'a' * 65}: {{model: m.gguf, port: 8080}}\n")
    assert f"servers.{'a' * 65}" in msg
    assert "64" in msg


def test_tier_not_allowed() -> None:
    msg = config_error(
        """
        servers:
          a: {model: m.gguf, port: 8080, tier: lukewarm}
        """
    )
    assert "servers.a.tier:" in msg
    assert "'hot', 'warm' or 'cold'" in msg
    assert "lukewarm" in msg


def test_tiers_parse() -> None:
    cfg = load(
        """
        servers:
          a: {model: m.gguf, port: 8080, tier: warm}
        services:
          s: {command: [x], port: 8081, tier: cold}
        """
    )
    assert cfg.servers["a"].tier is Tier.WARM
    assert cfg.services["s"].tier is Tier.COLD


@pytest.mark.parametrize("args", [["--port", "9000"], ["--port=9000"], ["-m", "other.gguf"], ["--threads", "4"]])
def test_args_may_not_set_managed_flags(args: list[str]) -> None:
    msg = config_error(f"servers:\n  a: {{model: m.gguf, port: 8080, args: {args!r}}}\n")
    assert "servers.a.args:" in msg
    assert f"'{args[0]}' is set by modelfleet; use the matching config key instead" in msg


def test_args_with_unmanaged_flags_are_fine() -> None:
    cfg = load(
        """
        servers:
          a: {model: m.gguf, port: 8080, args: [--temp, "0.2", --seed, "-1"]}
        """
    )
    assert cfg.servers["a"].args == ["--temp", "0.2", "--seed", "-1"]


def test_health_path_needs_a_leading_slash() -> None:
    msg = config_error(
        """
        services:
          s: {command: [svc], port: 8080, health_path: health}
        """
    )
    assert "services.s.health_path: must start with '/', for example '/health'" in msg


def test_service_needs_a_command() -> None:
    msg = config_error(
        """
        services:
          s: {command: [], port: 8080}
        """
    )
    assert "services.s.command:" in msg


def test_server_needs_a_model() -> None:
    msg = config_error(
        """
        servers:
          a: {port: 8080}
        """
    )
    assert "servers.a.model: required key is missing" in msg


@pytest.mark.parametrize("kind", ["servers", "services"])
def test_orchestrator_is_a_reserved_name(kind: str) -> None:
    body = "{model: m.gguf, port: 8080}" if kind == "servers" else "{command: [svc], port: 8080}"
    msg = config_error(f"{kind}:\n  orchestrator: {body}\n")
    assert f"{kind}.orchestrator: 'orchestrator' is reserved for the front door" in msg


def test_service_named_like_a_server() -> None:
    msg = config_error(
        """
        servers:
          a: {model: m.gguf, port: 8080}
        services:
          a: {command: [svc], port: 8081}
        """
    )
    assert "services.a: the name is already used by servers.a" in msg


def test_enum_like_options_list_allowed_values() -> None:
    msg = config_error(
        """
        servers:
          a: {model: m.gguf, port: 8080, load_mode: mlock-all, embeddings: {pooling: max}}
        """
    )
    assert "servers.a.load_mode:" in msg
    assert "'mmap+mlock'" in msg
    assert "servers.a.embeddings.pooling:" in msg
    assert "'cls'" in msg


# --------------------------------------------------------------------------- file-level errors


def test_invalid_yaml() -> None:
    msg = config_error("servers: [\n")
    assert msg.startswith(f"{SOURCE}: not valid YAML")


def test_invalid_yaml_without_source() -> None:
    msg = config_error("servers: {a: [}\n", source=None)
    assert msg.startswith("<config>: not valid YAML")


def test_top_level_list() -> None:
    msg = config_error("- a\n- b\n")
    assert f"{SOURCE}: the top level must be a mapping" in msg


def test_top_level_scalar() -> None:
    msg = config_error("just text\n")
    assert "the top level must be a mapping" in msg


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config_file(tmp_path / "nope.yaml")


def test_errors_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("servers:\n  a: {model: m.gguf, port: 8080, bogus: 1}\n")
    with pytest.raises(ConfigError) as info:
        load_config_file(path)
    assert str(path.resolve()) in str(info.value)
    assert "servers.a.bogus: unknown key" in str(info.value)


# --------------------------------------------------------------------------- the examples

PRODUCTION_TASK_TYPES = {
    "explore": "worker_explore",
    "summarize": "worker_explore",
    "understand": "worker_explore",
    "code_impl": "worker_coder",
    "refactor": "worker_coder",
    "test_gen": "worker_coder",
    "boilerplate": "worker_fast",
    "transform": "worker_fast",
}


def test_production_example_has_the_seed_topology() -> None:
    cfg = load_config_file(PRODUCTION)
    server_ports = sorted(p for srv in cfg.servers.values() for p in srv.instance_ports())
    assert server_ports == [*range(8080, 8088), *range(8090, 8096), 8102, 8112]
    service_ports = sorted(p for svc in cfg.services.values() for p in svc.instance_ports())
    assert service_ports == [8088, 8089, 9001]
    assert cfg.api.enabled
    assert cfg.api.port == 8000

    assert cfg.servers["frontdoor"].parallel == 2
    roles = cfg.roles()
    (summarizer,) = roles["worker_summarize"]
    for name in ("coder_escalation", summarizer, "architect_general", "architect_coding", "ingest_long_context"):
        assert cfg.servers[name].parallel == 1, name

    assert cfg.aliases == {"worker_code": "worker_coder"}
    assert cfg.task_types == PRODUCTION_TASK_TYPES
    assert cfg.worker_pool.expansion_threshold == 4
    assert cfg.worker_pool.warm_timeout_s == 300
    assert cfg.default_role == "frontdoor"


def test_production_example_tiers_pools_and_options() -> None:
    cfg = load_config_file(PRODUCTION)
    warm = {name for name, comp in cfg.components().items() if comp.tier is Tier.WARM}
    assert warm == {"worker_fast_1", "worker_fast_2"}
    assert set(cfg.pools) == {"worker_fast", "worker_coder"}
    assert cfg.roles()["worker_coder"] == ["worker_fast_1", "worker_fast_2"]
    embedder = cfg.servers["embedder"]
    assert embedder.instance_ports() == list(range(8090, 8096))
    assert embedder.embeddings is not None
    assert embedder.embeddings.pooling == "cls"
    assert cfg.servers["worker_vision"].is_vision
    assert cfg.servers["architect_general"].load_mode == "mmap+mlock"
    assert cfg.servers["coder_escalation"].draft is not None
    assert cfg.servers["coder_escalation"].lookup == "ngram-simple"
    assert cfg.services["document_formalizer"].effective_health_timeout_s() == 180


def test_dev_example_serves_the_production_routing() -> None:
    dev = load_config_file(DEV)
    prod = load_config_file(PRODUCTION)
    assert dev.aliases == prod.aliases
    assert dev.task_types == PRODUCTION_TASK_TYPES
    assert dev.default_role == "frontdoor"
    assert dev.worker_pool == prod.worker_pool
    assert set(dev.roles()) <= set(prod.roles())
    for target in [*dev.task_types.values(), *dev.aliases.values(), dev.default_role]:
        assert target in dev.roles() or target in dev.aliases
    assert dev.servers["smollm2"].model == BUILTIN_DEV_MODEL
    assert dev.api.port == 18000


# --------------------------------------------------------------------------- paths


def test_resolve_path_expands_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    cfg = load("{}\n", str(tmp_path / "stack.yaml"))
    assert cfg.resolve_path("~/models/m.gguf") == tmp_path / "home" / "models" / "m.gguf"


def test_resolve_path_expands_variables(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MF_TEST_MODELS", str(tmp_path / "models"))
    cfg = load("{}\n", str(tmp_path / "stack.yaml"))
    assert cfg.resolve_path("$MF_TEST_MODELS/m.gguf") == tmp_path / "models" / "m.gguf"
    assert cfg.resolve_path("${MF_TEST_MODELS}/m.gguf") == tmp_path / "models" / "m.gguf"


def test_resolve_path_relative_to_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stacks = tmp_path / "stacks"
    stacks.mkdir()
    (stacks / "stack.yaml").write_text("servers:\n  a: {model: models/m.gguf, port: 8080}\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = load_config_file(Path("../stacks/stack.yaml"))
    assert cfg.resolve_path(cfg.servers["a"].model) == stacks.resolve() / "models" / "m.gguf"
    assert cfg.resolve_path("../shared/m.gguf").resolve() == (tmp_path / "shared" / "m.gguf").resolve()
    assert cfg.resolve_path("/abs/m.gguf") == Path("/abs/m.gguf")


def test_resolve_path_without_a_source_uses_the_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = load("{}\n", source=None)
    assert cfg.resolve_path("m.gguf") == Path.cwd() / "m.gguf"
    assert cfg.stack_name() == "default"


def test_resolve_path_builtin_dev_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODELFLEET_CACHE_DIR", str(tmp_path / "cache"))
    cfg = load("{}\n")
    resolved = cfg.resolve_path(BUILTIN_DEV_MODEL)
    assert resolved == provision.cached_dev_model()
    assert resolved.is_relative_to(tmp_path / "cache")


# --------------------------------------------------------------------------- server_args vs the binary

# Every flag server_args emits, so only what a test removes is missing.
ALL_FLAGS = frozenset(
    {
        "-m",
        "--model",
        "--host",
        "--port",
        "-np",
        "--parallel",
        "-a",
        "--alias",
        "--metrics",
        "--log-colors",
        "-c",
        "--ctx-size",
        "-t",
        "--threads",
        "--threads-http",
        "--batch-size",
        "--load-mode",
        "--spec-draft-model",
        "--spec-draft-n-max",
        "--spec-draft-n-min",
        "--spec-type",
        "--override-kv",
        "--mmproj",
        "--embeddings",
        "--pooling",
        "--cache-type-k",
        "--cache-type-v",
        "--temp",
        "--seed",
    }
)


def binary(flags: frozenset[str] = ALL_FLAGS) -> BinaryInfo:
    return BinaryInfo(path="/x/llama-server", version="test", flags=flags)


def args_for(server_yaml: str, base: Path, bin_info: BinaryInfo | None = None, name: str = "srv") -> list[str]:
    body = textwrap.indent(textwrap.dedent(server_yaml).strip(), "    ")
    cfg = load(f"servers:\n  {name}:\n{body}\n", str(base / "stack.yaml"))
    srv = cfg.servers[name]
    return server_args(cfg, name, srv, srv.instance_ports()[0], bin_info if bin_info is not None else binary())


def value_of(argv: list[str], flag: str) -> str:
    assert flag in argv, f"{flag} missing from {argv}"
    return argv[argv.index(flag) + 1]


def test_server_args_basics(tmp_path: Path) -> None:
    argv = args_for("{model: m.gguf, port: 8085, parallel: 3, ctx_size: 4096}", tmp_path)
    assert value_of(argv, "--model") == str(tmp_path / "m.gguf")
    assert value_of(argv, "--port") == "8085"
    assert value_of(argv, "--host") == "127.0.0.1"
    assert value_of(argv, "--parallel") == "3"
    assert value_of(argv, "--ctx-size") == "4096"
    assert value_of(argv, "--alias") == "srv"


def test_removed_mlock_flag_points_to_load_mode(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        args_for("{model: m.gguf, port: 8080, args: [--mlock]}", tmp_path, name="big")
    msg = str(info.value)
    assert "servers.big.args:" in msg
    assert "--mlock" in msg
    assert "load_mode" in msg
    assert "/x/llama-server" in msg


def test_load_mode_passes_through(tmp_path: Path) -> None:
    argv = args_for("{model: m.gguf, port: 8080, load_mode: mmap+mlock}", tmp_path)
    assert value_of(argv, "--load-mode") == "mmap+mlock"
    assert "--mlock" not in argv


def test_draft_model_flags(tmp_path: Path) -> None:
    argv = args_for("{model: m.gguf, port: 8080, draft: {model: d.gguf, max: 24, min: 2}}", tmp_path)
    assert value_of(argv, "--spec-draft-model") == str(tmp_path / "d.gguf")
    assert value_of(argv, "--spec-draft-n-max") == "24"
    assert value_of(argv, "--spec-draft-n-min") == "2"
    assert value_of(argv, "--spec-type") == "draft-simple"


def test_draft_defaults(tmp_path: Path) -> None:
    argv = args_for("{model: m.gguf, port: 8080, draft: {model: d.gguf}}", tmp_path)
    assert value_of(argv, "--spec-draft-n-max") == "16"
    assert value_of(argv, "--spec-draft-n-min") == "0"


def test_draft_with_lookup(tmp_path: Path) -> None:
    argv = args_for("{model: m.gguf, port: 8080, draft: {model: d.gguf}, lookup: ngram-simple}", tmp_path)
    assert value_of(argv, "--spec-type") == "draft-simple,ngram-simple"
    assert argv.count("--spec-type") == 1


def test_lookup_alone(tmp_path: Path) -> None:
    argv = args_for("{model: m.gguf, port: 8080, lookup: ngram-mod}", tmp_path)
    assert value_of(argv, "--spec-type") == "ngram-mod"
    assert "--spec-draft-model" not in argv


def test_embeddings_with_pooling(tmp_path: Path) -> None:
    argv = args_for("{model: m.gguf, port: 8080, embeddings: {pooling: cls}}", tmp_path)
    i = argv.index("--embeddings")
    assert argv[i + 1 : i + 3] == ["--pooling", "cls"]


def test_embeddings_without_pooling(tmp_path: Path) -> None:
    argv = args_for("{model: m.gguf, port: 8080, embeddings: {}}", tmp_path)
    assert "--embeddings" in argv
    assert "--pooling" not in argv


def test_moe_active_experts_uses_the_model_architecture(tmp_path: Path, tiny_model: Path) -> None:
    argv = args_for(f"{{model: {tiny_model}, port: 8080, moe_active_experts: 4}}", tmp_path)
    assert value_of(argv, "--override-kv") == "llama.expert_used_count=int:4"


def test_moe_active_experts_without_the_model_file(tmp_path: Path) -> None:
    argv = args_for("{model: absent.gguf, port: 8080, moe_active_experts: 6}", tmp_path)
    assert value_of(argv, "--override-kv").endswith(".expert_used_count=int:6")


def test_binary_without_spec_draft_model(tmp_path: Path) -> None:
    old = binary(ALL_FLAGS - {"--spec-draft-model"})
    with pytest.raises(ConfigError) as info:
        args_for("{model: m.gguf, port: 8080, draft: {model: d.gguf}}", tmp_path, old, name="coder")
    msg = str(info.value)
    assert "servers.coder.draft.model:" in msg
    assert "--spec-draft-model is not accepted by /x/llama-server (version test)" in msg


def test_every_unaccepted_flag_is_reported(tmp_path: Path) -> None:
    old = binary(ALL_FLAGS - {"--pooling", "--load-mode"})
    with pytest.raises(ConfigError) as info:
        args_for("{model: m.gguf, port: 8080, load_mode: none, embeddings: {pooling: mean}}", tmp_path, old)
    msg = str(info.value)
    assert "servers.srv.load_mode: --load-mode" in msg
    assert "servers.srv.embeddings.pooling: --pooling" in msg


def test_negative_numbers_are_not_flags(tmp_path: Path) -> None:
    argv = args_for("{model: m.gguf, port: 8080, args: [--seed, '-1', --temp, '0.5']}", tmp_path)
    assert argv[-4:] == ["--seed", "-1", "--temp", "0.5"]


def test_optional_flags_are_left_out_for_binaries_without_them(tmp_path: Path) -> None:
    argv = args_for("{model: m.gguf, port: 8080}", tmp_path, binary(ALL_FLAGS - {"--log-colors", "--threads-http"}))
    assert "--log-colors" not in argv
    assert "--threads-http" not in argv


def test_no_binary_means_no_checks(tmp_path: Path) -> None:
    body = "{model: m.gguf, port: 8080, args: [--mlock]}"
    cfg = load(f"servers:\n  srv: {body}\n", str(tmp_path / "stack.yaml"))
    argv = server_args(cfg, "srv", cfg.servers["srv"], 8080, None)
    assert "--mlock" in argv


def test_servers_in_a_prefix_pool_pin_slots_unless_told_otherwise(tmp_path: Path) -> None:
    base = """
servers:
  chat: {model: m.gguf, ports: [8101, 8102], roles: [chat]PIN}
  solo: {model: m.gguf, port: 8103, roles: [solo]}
  emb: {model: m.gguf, ports: [8104, 8105], roles: [embed], embeddings: {}}
"""
    cfg = load(base.replace("PIN", ""), str(tmp_path / "stack.yaml"))
    assert [cfg.pins_slots(n) for n in ("chat", "solo", "emb")] == [True, False, False]
    argv = server_args(cfg, "chat", cfg.servers["chat"], 8101, binary(ALL_FLAGS | {"--slot-prompt-similarity"}))
    assert value_of(argv, "--slot-prompt-similarity") == "1"
    assert "--slot-prompt-similarity" not in server_args(cfg, "solo", cfg.servers["solo"], 8103, None)
    # A binary without the flag: an automatic pin is left out, an explicit one is an error naming the key.
    assert "--slot-prompt-similarity" not in server_args(cfg, "chat", cfg.servers["chat"], 8101, binary())
    explicit = load(base.replace("PIN", ", pin_slots: true"), str(tmp_path / "stack.yaml"))
    with pytest.raises(ConfigError, match=r"servers\.chat\.pin_slots: --slot-prompt-similarity is not accepted"):
        server_args(explicit, "chat", explicit.servers["chat"], 8101, binary())
    assert not load(base.replace("PIN", ", pin_slots: false"), "s.yaml").pins_slots("chat")
    assert load(base.replace("PIN", "") + "routing: {chat: least_busy}\n", "s.yaml").pins_slots("chat") is False
    # Slot choice left to the server by the user's own args: no automatic pin, and no explicit one.
    own = base.replace("PIN", ", args: [--slot-prompt-similarity, '0']")
    assert not load(own, "s.yaml").pins_slots("chat")
    (spec, _) = plan_instances(load(own, str(tmp_path / "s.yaml")), ["chat"], tmp_path, None)
    assert "--slot-prompt-similarity" in spec.argv and not spec.pin_slots  # the user's flag: no pinning
    with pytest.raises(ConfigError, match="pin_slots sets --slot-prompt-similarity itself"):
        load(own.replace("args:", "pin_slots: true, args:"), "s.yaml")
    with pytest.raises(ConfigError, match="an embedding server has no conversations"):
        load(base.replace("PIN", "").replace("embeddings: {}", "embeddings: {}, pin_slots: true"), "s.yaml")


# --------------------------------------------------------------------------- the CLI


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([MODELFLEET, *args], capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)


def test_cli_config_check_production() -> None:
    res = run_cli("config", "check", str(PRODUCTION))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "ok" in res.stdout


@pytest.mark.parametrize("example", [PRODUCTION, DEV], ids=["production", "dev"])
def test_cli_config_check_against_the_real_binary(example: Path, tmp_path: Path) -> None:
    """The examples' options are all accepted by the llama-server this project builds.

    A fresh cache dir forces a fresh ``--help`` probe, so a stale cached probe can't hide
    a parser problem.
    """
    try:
        real = find_llama_server()
    except BinaryError:
        pytest.skip("no llama-server installed (run `modelfleet setup`)")
    env = {**os.environ, "MODELFLEET_LLAMA_SERVER": str(real), "MODELFLEET_CACHE_DIR": str(tmp_path / "cache")}
    res = run_cli("config", "check", str(example), env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "options checked against" in " ".join(res.stdout.split())
    assert str(real) in "".join(res.stdout.split())  # rich may wrap a long path


def test_cli_config_check_dev() -> None:
    res = run_cli("config", "check", str(DEV))
    assert res.returncode == 0, res.stdout + res.stderr


def test_cli_config_check_broken_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text(
        "servers:\n"
        "  a: {model: m.gguf, port: 8080}\n"
        "  b: {model: m.gguf, port: 8080}\n"
        "  c: {model: m.gguf, port: 1, tier: x}\n"
    )
    res = run_cli("config", "check", str(path))
    assert res.returncode == 2, res.stdout + res.stderr
    assert "Error:" in res.stderr
    assert "servers.c.tier" in res.stderr


def test_cli_config_check_duplicate_port(tmp_path: Path) -> None:
    path = tmp_path / "dup.yaml"
    path.write_text("servers:\n  a: {model: m.gguf, port: 8080}\n  b: {model: m.gguf, port: 8080}\n")
    res = run_cli("config", "check", str(path))
    assert res.returncode == 2, res.stdout + res.stderr
    assert "Error:" in res.stderr
    assert "servers.b.port: 8080 is already used by servers.a.port" in res.stderr


def test_cli_config_check_missing_file(tmp_path: Path) -> None:
    res = run_cli("config", "check", str(tmp_path / "nope.yaml"))
    assert res.returncode == 2, res.stdout + res.stderr
    assert "Error:" in res.stderr
    assert "nope.yaml" in res.stderr


def test_logs_section_defaults_and_errors() -> None:
    cfg = load("servers: {}\n")
    assert (cfg.logs.max_mb, cfg.logs.keep) == (256.0, 3)
    assert load("logs: {max_mb: null}\n").logs.max_mb is None
    msg = config_error("logs: {max_mb: 0, keep: 0, size: 3}\n")
    assert "logs.max_mb" in msg and "logs.keep" in msg and "logs.size: unknown key" in msg
