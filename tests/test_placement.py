"""Choosing the launcher from ``placement:``; what a stack file may say about it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from modelfleet.config import load_config
from modelfleet.errors import ConfigError
from modelfleet.launcher import LocalLauncher
from modelfleet.memory import GB
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


NODE = "placement: {kind: ray}\nservers:\n  a:\n    model: m.gguf\n    port: 9000\n    node: %s\n"


def test_node_is_a_resource_name_or_a_mapping_of_resource_and_labels() -> None:
    short = load_config(NODE % "big_box").servers["a"].node
    assert short is not None and (short.resource, short.labels) == ("big_box", {})
    full = load_config(NODE % "{resource: big_box, labels: {zone: a, rack: 12, disk: 'in(ssd, nvme)', spot: '!yes'}}")
    sel = full.servers["a"].node
    assert sel is not None and sel.resource == "big_box"
    assert sel.labels == {"zone": "a", "rack": "12", "disk": "in(ssd,nvme)", "spot": "!yes"}
    # Ray 2.60 would read the space in 'in(ssd, nvme)' as part of ' nvme': the config drops it.
    assert sel.labels["disk"] == "in(ssd,nvme)"
    assert sel.describe() == "big_box, labels disk=in(ssd,nvme), rack=12, spot=!yes, zone=a"
    labelled = load_config(NODE % "{labels: {example.com/zone: a}}").servers["a"].node
    assert labelled is not None and labelled.resource is None and labelled.labels == {"example.com/zone": "a"}


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("''", "servers.a.node: must name a Ray resource (node: big_box) or be a mapping"),
        ("[a]", "servers.a.node: must name a Ray resource (node: big_box) or be a mapping of 'resource' and 'labels'"),
        ("{}", "servers.a.node: give 'resource' (a Ray resource the node must have), 'labels' (node labels), or both"),
        ("{labels: {zone: a}, zones: b}", "servers.a.node.zones: unknown key"),
        ("{labels: {zone: true}}", "servers.a.node.labels.zone: YAML reads this as a number or true/false"),
        ("{labels: {zone: 'a b'}}", "servers.a.node.labels.zone: not a label selector: give a value, '!value'"),
        ("{labels: {zone: 'in(a,'}}", "servers.a.node.labels.zone: not a label selector"),
        ("{labels: {zone: '(a,b)'}}", "servers.a.node.labels.zone: not a label selector"),
        ("{labels: {'-zone': a}}", "servers.a.node.labels.-zone: not a node label name"),
        ("{labels: {'x' : '" + "v" * 64 + "'}}", "servers.a.node.labels.x: not a label selector"),
    ],
)
def test_a_bad_node_selector_names_its_key_path_and_the_fix(value: str, expected: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(NODE % value)
    assert expected in str(err.value)


def test_label_selectors_match_as_ray_reads_them() -> None:
    from modelfleet.ray_launcher import label_match

    node = {"zone": "a", "disk": "ssd"}
    assert (
        label_match(node, {}) and label_match(node, {"zone": "a"}) and label_match(node, {"zone": "a", "disk": "ssd"})
    )
    assert not label_match(node, {"zone": "b"}) and not label_match(node, {"rack": "1"})
    assert label_match(node, {"zone": "!b"}) and not label_match(node, {"zone": "!a"})
    assert label_match(node, {"rack": "!1"})  # a negative term matches a node without the label
    assert label_match(node, {"disk": "in(nvme,ssd)"}) and not label_match(node, {"disk": "in(nvme,hdd)"})
    assert label_match(node, {"disk": "!in(nvme,hdd)"}) and not label_match(node, {"disk": "!in(ssd)"})


def test_an_instance_asks_for_its_node_resource_and_labels() -> None:
    from modelfleet.ray_launcher import RayLauncher
    from modelfleet.stack import Stack

    cfg = load_config(NODE % "{resource: big_box, labels: {zone: a}}")
    (spec,) = Stack(cfg, Path("/nonexistent"), None).specs(["a"])
    ask = RayLauncher(cfg).ask(cfg, spec)
    assert ask.labels == {"zone": "a"} and ask.resources.get("big_box") == 0.001
    assert ask.describe().endswith("; labels zone=a")


def test_warm_admission_counts_only_the_nodes_an_instance_may_run_on(monkeypatch: pytest.MonkeyPatch) -> None:
    from modelfleet.ray_launcher import NodeInfo, RayLauncher
    from modelfleet.stack import Stack

    cfg = load_config(NODE % "{resource: big_box, labels: {zone: a}}")
    (spec,) = Stack(cfg, Path("/nonexistent"), None).specs(["a"])
    launcher = RayLauncher(cfg)
    mem = launcher.resource
    nodes = [
        NodeInfo("n1", "10.0.0.1", {mem: 64.0}, {mem: 60.0, "big_box": 1.0}, {"zone": "b"}),  # wrong zone
        NodeInfo("n2", "10.0.0.2", {mem: 64.0}, {mem: 50.0}, {"zone": "a"}),  # no big_box
        NodeInfo("n3", "10.0.0.3", {mem: 16.0}, {mem: 6.0, "big_box": 1.0}, {"zone": "a"}),
    ]
    monkeypatch.setattr(launcher, "nodes", lambda: nodes)
    assert launcher.available_bytes() == 60 * GB  # the machine-wide view: any node
    assert launcher.available_for(cfg, spec) == 6 * GB  # only n3 can take it
    nodes.pop()
    assert launcher.available_for(cfg, spec) == 0
