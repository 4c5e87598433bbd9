"""Choosing the launcher from ``placement:``; what a stack file may say about it."""

from __future__ import annotations

import sys

import pytest

from modelfleet.config import load_config
from modelfleet.errors import ConfigError
from modelfleet.launcher import LocalLauncher
from modelfleet.placement import launcher_for


def test_local_is_the_default() -> None:
    cfg = load_config("servers: {}\n")
    assert cfg.placement.kind == "local"
    assert isinstance(launcher_for(cfg), LocalLauncher)


def test_a_bad_placement_names_the_key_and_what_is_allowed() -> None:
    with pytest.raises(ConfigError, match=r"placement.kind"):
        load_config("placement: {kind: kubernetes}\n")
    with pytest.raises(ConfigError, match=r"servers.a.resources.ram_gb"):
        load_config("servers: {a: {model: m.gguf, port: 9000, resources: {ram_gb: -1}}}\n")


def test_ray_placement_without_ray_installed_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "modelfleet.ray_launcher", None)  # as if `ray` were not installed
    cfg = load_config("placement: {kind: ray, address: auto}\n")
    with pytest.raises(ConfigError, match=r"pip install 'modelfleet\[ray\]'"):
        launcher_for(cfg)


def test_the_namespace_defaults_to_the_stack_name() -> None:
    assert (
        load_config("name: prod\nplacement: {kind: ray}\n").placement.effective_namespace("prod") == "modelfleet-prod"
    )


def test_following_a_remote_log_yields_only_what_is_new() -> None:
    from modelfleet.ray_launcher import _after

    assert _after("", "a\nb\n") == "a\nb\n"
    assert _after("a\nb\n", "a\nb\n") == ""
    assert _after("a\nb\n", "a\nb\nc\n") == "c\n"
    assert _after("x" * 2000 + "tail\n", "x" * 1500 + "tail\nnew\n") == "new\n"  # the window moved on
    assert _after("old\n", "rotated\n") == "rotated\n"  # emptied and rewritten: all of it
