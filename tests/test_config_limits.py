"""The stack file's limits: what used to pass ``config check`` and then crash ``start``, or
crash the loader itself, is a ConfigError naming the key path (or the place in the file),
and every message stays small whatever the file holds.

Everything here is fast: YAML strings, files in tmp_path, and a few short CLI runs.
"""

from __future__ import annotations

import subprocess
import textwrap
import time
import types
import typing
from pathlib import Path
from typing import Annotated, Any

import pytest
from pydantic import BaseModel

from conftest import MODELFLEET
from modelfleet import config as config_module
from modelfleet.config import (
    MAX_MESSAGE_BYTES,
    Range,
    StackConfig,
    load_config,
    load_config_file,
)
from modelfleet.errors import ConfigError

SOURCE = "/srv/stacks/stack.yaml"
SERVER = "servers:\n  a: {model: m.gguf, port: 8080, %s}\n"
SERVICE = "services:\n  s: {command: [svc, --port, '{port}'], port: 8088, %s}\n"


def load(text: str) -> StackConfig:
    return load_config(textwrap.dedent(text), SOURCE)


def config_error(text: str) -> str:
    with pytest.raises(ConfigError) as info:
        load(text)
    msg = str(info.value)
    assert len(msg.encode()) <= MAX_MESSAGE_BYTES
    return msg


def check_cli(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([MODELFLEET, "config", "check", str(path)], capture_output=True, text=True, timeout=60)


# --------------------------------------------------------------------------- bytes and text


def test_non_utf8_bytes_name_the_file_and_the_offset(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"servers:\n  a: {model: caf\xe9.gguf, port: 8080}\n")
    with pytest.raises(ConfigError) as info:
        load_config_file(path)
    msg = str(info.value)
    assert str(path) in msg and "not UTF-8" in msg
    assert "offset 25" in msg and "0xe9" in msg and "line 2" in msg


def test_config_check_reports_non_utf8_without_a_traceback(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_bytes(b"\xff\xfename: x\n")
    res = check_cli(path)
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr and "not UTF-8" in res.stderr and "offset 0" in res.stderr


def test_utf8_with_a_byte_order_mark_loads(tmp_path: Path) -> None:
    path = tmp_path / "bom.yaml"
    path.write_bytes("\ufeffname: café\n".encode())
    with pytest.raises(ConfigError, match="not a valid name"):  # é is not a name character; decoding worked
        load_config_file(path)
    path.write_bytes("\ufeffservers:\n  a: {model: café.gguf, port: 8080}\n".encode())
    assert load_config_file(path).servers["a"].model == "café.gguf"


def test_a_huge_file_is_refused_before_it_is_parsed(tmp_path: Path) -> None:
    path = tmp_path / "huge.yaml"
    path.write_bytes(b"# " + b"x" * (2 * 1024 * 1024) + b"\n")
    with pytest.raises(ConfigError, match="more than 1048576 bytes"):
        load_config_file(path)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("servers: 2001-13-01\n", "cannot be read as a timestamp"),
        ("name: 0000-01-01\n", "cannot be read as a timestamp"),
        ("api: {port: !!int ''}\n", "cannot be read as a int"),
        ("api: {port: !!float abc}\n", "cannot be read as a float"),
        ("name: " + "9" * 5000 + "\n", "more than 64 characters"),  # int() refuses > 4300 digits
        ("name: " + "1:" * 3000 + "1\n", "more than 64 characters"),  # base-60: quadratic to convert
        ("{[1]: 2}\n", "found unhashable key"),
        ("servers: {a: !!binary AAE=}\n", "!!binary"),
    ],
)
def test_values_yaml_cannot_convert_are_config_errors(text: str, expected: str) -> None:
    assert expected in config_error(text)


def test_merge_keys_work() -> None:
    cfg = load(
        """
        servers:
          a: &common {model: m.gguf, port: 8080, threads: 4, ctx_size: 4096}
          b:
            <<: *common
            port: 8081
        """
    )
    assert cfg.servers["b"].threads == 4 and cfg.servers["b"].port == 8081


def test_a_key_given_twice_is_still_refused() -> None:
    assert "key 'port' is given twice" in config_error("servers:\n  a: {model: m, port: 1, port: 2}\n")


# --------------------------------------------------------------------------- depth and aliases


@pytest.mark.parametrize(
    "text",
    [
        "x: " + "[" * 1000 + "]" * 1000 + "\n",
        "x: " + "{a: " * 1000 + "1" + "}" * 1000 + "\n",
        "".join("  " * i + "k:\n" for i in range(1000)),
        "".join("  " * i + "-\n" for i in range(1000)),
    ],
    ids=["flow-lists", "flow-maps", "block-maps", "block-lists"],
)
def test_deep_nesting_is_refused(text: str) -> None:
    msg = config_error(text)
    assert "nested deeper than 64 levels" in msg and "line" in msg


def test_nesting_within_the_bound_is_parsed() -> None:
    msg = config_error("x: " + "[" * 60 + "]" * 60 + "\n")
    assert "x: unknown key" in msg


BILLION_LAUGHS = """\
a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]
servers: &i [*h,*h,*h,*h,*h,*h,*h,*h,*h]
"""


def test_billion_laughs_is_refused_quickly_with_a_short_message() -> None:
    started = time.monotonic()
    msg = config_error(BILLION_LAUGHS)
    assert time.monotonic() - started < 2
    assert "aliases expand to more than 100000 values" in msg
    assert len(msg) < 1000


def test_aliases_nesting_too_deep_are_refused() -> None:
    text = "x: &a " + "[" * 40 + "1" + "]" * 40 + "\ny: " + "[" * 40 + "*a" + "]" * 40 + "\n"
    assert "aliases nest the document deeper than 64 levels" in config_error(text)


def test_an_alias_inside_what_it_names_is_refused() -> None:
    assert "an alias refers to the mapping or list that contains it" in config_error("servers: &a [*a]\n")
    assert "contains it" in config_error("servers: &a {x: *a}\n")


def test_ordinary_aliases_are_fine() -> None:
    cfg = load(
        """
        servers:
          a: {model: &m /models/x.gguf, port: 8080, roles: &r [r1]}
          b: {model: *m, port: 8081, roles: [r2]}
        pools: *r
        """
    )
    assert cfg.servers["b"].model == "/models/x.gguf" and cfg.pools == ["r1"]


# --------------------------------------------------------------------------- bounded messages


def test_a_huge_offending_value_is_cut_in_the_message() -> None:
    msg = config_error(f"name: '{'x ' * 200_000}'\n")
    assert msg.count("x") < 300 and "..." in msg and "name:" in msg


def test_a_huge_key_is_cut_in_the_message() -> None:
    msg = config_error(f"servers:\n  '{'k' * 100_000}': {{model: m, port: 8080}}\n")
    assert msg.count("k") < 500


def test_many_problems_are_counted_not_all_listed() -> None:
    text = "servers:\n" + "".join(f"  s{i}: {{model: m, port: {70000 + i}}}\n" for i in range(3000))
    msg = config_error(text)
    assert "servers.s0.port: must be from 1 to 65535 (got 70000)" in msg
    assert "and 2950 more problems" in msg


def test_a_huge_duplicate_key_is_cut_in_the_message() -> None:
    key = "k" * 100_000
    msg = config_error(f"? '{key}'\n: 1\n? '{key}'\n: 2\n")  # explicit keys: implicit ones stop at 1024
    assert "given twice" in msg and msg.count("k") < 500


# --------------------------------------------------------------------------- what `start` needs


@pytest.mark.parametrize(
    ("text", "where", "expected"),
    [
        (SERVER % "env: {'A=B': x}", "servers.a.env", "'A=B' is not an environment variable name"),
        (SERVER % "env: {'': x}", "servers.a.env", "'' is not an environment variable name"),
        (SERVER % 'env: {"A\\0": x}', "servers.a.env", "NUL"),
        (SERVER % 'env: {A: "x\\0y"}', "servers.a.env.A", "NUL"),
        (SERVICE % 'env: {"B=": "1"}', "services.s.env", "is not an environment variable name"),
        (SERVICE % 'health_path: "/health\\r\\nX-Evil: 1"', "services.s.health_path", "CR/LF"),
        (SERVICE % 'health_path: "/he alth"', "services.s.health_path", "no spaces"),
        (SERVICE % 'health_path: "/h\\t"', "services.s.health_path", "control"),
        (SERVICE % "health_path: health", "services.s.health_path", "must start with '/'"),
        (SERVER % 'args: [--flag, "a\\0b"]', "servers.a.args", "NUL"),
        ('services:\n  s: {command: ["x\\0", "{port}"], port: 8088}\n', "services.s.command", "NUL"),
        ("services:\n  s: {command: ['  '], port: 8088}\n", "services.s.command", "must name the program"),
        (SERVER % 'mmproj: "p\\0.gguf"', "servers.a.mmproj", "NUL"),
        ('servers:\n  a: {model: "m\\0.gguf", port: 8080}\n', "servers.a.model", "NUL"),
        ('llama_server: "/bin/ll\\0"\n', "llama_server", "NUL"),
        ('state_dir: "/var/\\0"\n', "state_dir", "NUL"),
        ('servers:\n  a: {model: "\\ud800", port: 8080}\n', "servers.a.model", "lone surrogate"),
        (SERVER % "host: 'a b'", "servers.a.host", "is not an IP address or host name"),
        (SERVER % "host: 'evil/x'", "servers.a.host", "is not an IP address or host name"),
        (SERVER % "host: '::1'", "servers.a.host", "IPv6"),
        ("api: {host: 'x:1'}\n", "api.host", "is not an IP address or host name"),
        ("api: {api_key: 'a b'}\n", "api.api_key", "visible ASCII"),
        ('api: {admin_key: "k\\n"}\n', "api.admin_key", "visible ASCII"),
    ],
)
def test_what_start_cannot_use_is_refused_at_load(text: str, where: str, expected: str) -> None:
    msg = config_error(text)
    line = next((ln for ln in msg.splitlines() if ln.strip().startswith(where)), None)
    assert line is not None, msg
    assert expected in line, msg


@pytest.mark.parametrize(
    "fields",
    ["host: localhost", "host: 0.0.0.0", "host: '::'", "host: gpu-node-1.internal", "host: my_service"],
)
def test_usual_hosts_are_fine(fields: str) -> None:
    load(SERVER % fields)


def test_config_check_refuses_what_would_crash_start(tmp_path: Path) -> None:
    path = tmp_path / "stack.yaml"
    path.write_text(
        "servers:\n  a: {model: m.gguf, port: 18080, env: {'X=Y': '1'}}\n"
        'services:\n  s: {command: [svc], port: 18088, health_path: "/h\\r\\n"}\n'
        "api: {enabled: false}\n"
    )
    res = check_cli(path)
    assert res.returncode == 2, res.stdout + res.stderr
    assert "servers.a.env" in res.stderr and "services.s.health_path" in res.stderr


# --------------------------------------------------------------------------- numbers


def _ranged_fields(model: type[BaseModel], prefix: str = "") -> list[tuple[str, Range]]:
    """Every numeric field of ``model`` and its sections, with the Range it is annotated with (or fail).

    Models inside dicts and lists (servers, services, hooks) are walked by the caller, with their key.
    """
    out: list[tuple[str, Range]] = []
    for name, info in model.model_fields.items():
        path = f"{prefix}{name}"
        annotation = info.rebuild_annotation()
        ranges = _ranges(annotation)
        if ranges:
            out.extend((path, r) for r in ranges)
        elif {int, float} & set(_leaves(annotation)):
            pytest.fail(f"{path} is a number without a Range")
        for member in _members(annotation):
            if isinstance(member, type) and issubclass(member, BaseModel):
                out.extend(_ranged_fields(member, path + "."))
    return out


def _members(annotation: Any) -> list[Any]:
    """The types a field may hold, through Annotated and unions (not into containers)."""
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _members(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        return [m for a in typing.get_args(annotation) for m in _members(a)]
    return [annotation]


def _leaves(annotation: Any) -> list[Any]:
    """Every plain type inside an annotation, containers included, models not entered."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is Annotated:
        return _leaves(args[0])
    return [annotation] if not args else [leaf for a in args for leaf in _leaves(a)]


def _ranges(annotation: Any) -> list[Range]:
    found = []
    if typing.get_origin(annotation) is Annotated:
        found = [m for m in annotation.__metadata__ if isinstance(m, Range)]
    return found + [r for arg in typing.get_args(annotation) for r in _ranges(arg)]


def _placed(path: str, value: str) -> str:
    """YAML that sets ``path`` (like ``servers.a.draft.max``) to ``value`` in an otherwise valid file."""
    for prefix, head in (
        ("servers.a.", "servers:\n  a: {model: m.gguf"),
        ("services.s.", "services:\n  s: {command: [x]"),
    ):
        if path.startswith(prefix):
            key = path.removeprefix(prefix)
            if key.startswith("draft."):
                return SERVER % f"draft: {{model: d.gguf, {key.removeprefix('draft.')}: {value}}}"
            if key == "ports":
                return f"{head}, ports: [{value}]}}\n"
            if key == "port":
                return f"{head}, port: {value}}}\n"
            if key == "resources":  # a mapping of names to numbers: each value has the range
                return f"{head}, port: 8080, resources: {{x: {value}}}}}\n"
            return f"{head}, port: 8080, {key}: {value}}}\n"
    if path.startswith("hooks[0]."):
        return f"hooks:\n  - {{name: h, builtin: embed_warmup, {path.removeprefix('hooks[0].')}: {value}}}\n"
    section, key = path.split(".")
    return f"{section}: {{{key}: {value}}}\n"


def _all_ranged_fields() -> dict[str, Range]:
    fields = dict(_ranged_fields(StackConfig))
    fields.update(_ranged_fields(config_module.ServerConfig, "servers.a."))
    fields.update(_ranged_fields(config_module.ServiceConfig, "services.s."))
    fields.update(_ranged_fields(config_module.HookConfig, "hooks[0]."))
    return fields


def _cases() -> list[tuple[str, str, str]]:
    """(key path, YAML value, what the message must say) for each number: below, above, NaN, inf, a boolean."""
    cases = []
    for path, r in sorted(_all_ranged_fields().items()):
        below = "0" if r.lo_open or r.lo >= 1 else "-1" if r.lo == 0 else "1.0e-300"
        cases += [(path, below, r.describe()), (path, str(int(r.hi) * 10 + 1), r.describe())]
        cases += [
            (path, ".nan", "finite number"),
            (path, "-.inf", "finite number"),
            (path, "true", "not true or false"),
        ]
    return cases


def test_every_number_in_the_stack_file_has_a_range() -> None:
    fields = _all_ranged_fields()
    expected = {"monitor.interval_s", "api.port", "servers.a.parallel", "servers.a.draft.max", "hooks[0].timeout_s"}
    assert expected <= set(fields)
    for path, r in fields.items():
        assert r.hi < float("inf"), path
        waits = ("interval_s", "backoff_initial_s", "backoff_max_s", "probe_timeout_s", "health_timeout_s", "wait_s")
        if path.endswith(waits) or path == "hooks[0].timeout_s":
            assert r.lo >= 0.05, path


@pytest.mark.parametrize(("path", "value", "expected"), _cases())
def test_every_number_out_of_range_is_refused_with_the_range(path: str, value: str, expected: str) -> None:
    text = _placed(path, value)
    with pytest.raises(ConfigError) as info:
        load_config(text, SOURCE)
    msg = str(info.value)
    where = path.replace(".ports", ".ports[0]").replace(".resources", ".resources.x") + ":"
    line = next((ln.strip() for ln in msg.splitlines() if ln.strip().startswith(where)), None)
    assert line is not None, (text, msg)
    assert expected in line, (text, line)


def test_tiny_interval_no_longer_passes() -> None:
    msg = config_error("monitor: {interval_s: 1.0e-300}\n")
    assert "monitor.interval_s: must be from 0.05 to 86400 seconds (got 1e-300)" in msg


def test_backoff_max_must_not_be_below_backoff_initial() -> None:
    msg = config_error("monitor: {backoff_initial_s: 30, backoff_max_s: 5}\n")
    assert "backoff_max_s (5) is less than backoff_initial_s (30)" in msg


def test_numbers_at_their_bounds_are_fine() -> None:
    cfg = load(
        """
        servers:
          a: {model: m.gguf, port: 65535, parallel: 256, ctx_size: 0, threads: 1, cooldown_s: 0}
        monitor: {interval_s: 0.05, probe_timeout_s: 3600, backoff_initial_s: 0.05, backoff_max_s: 86400,
                  restart_budget: 0}
        api: {port: 1, queue_max: 0, drain_timeout_s: 0, stop_grace_s: 0, max_body_bytes: 1024}
        memory: {os_reserve_pct: 99.5, min_free_gb: 0}
        logs: {max_mb: 0.0009765625, keep: 1}
        """
    )
    assert cfg.monitor.interval_s == 0.05 and cfg.servers["a"].port == 65535
