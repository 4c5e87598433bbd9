"""One instance identity; specs, records, views and status rows derive from it."""

from __future__ import annotations

import dataclasses

from conftest import make_record
from modelfleet.config import Tier
from modelfleet.hooks import InstanceView
from modelfleet.instance import Identity, Kind, local_url, reach_host
from modelfleet.spec import InstanceSpec
from modelfleet.stack import Status, StatusRow


def _ident(**more: object) -> Identity:
    base: dict[str, object] = {
        "component": "embedder",
        "index": 2,
        "replicas": 6,
        "port": 8092,
        "host": "0.0.0.0",
        "kind": Kind.LLAMA_SERVER,
        "tier": Tier.HOT,
        "roles": ("embed",),
    }
    return Identity(**(base | more))  # type: ignore[arg-type]


def test_names_keys_and_urls_are_one_rule() -> None:
    ident = _ident()
    assert (ident.name, ident.key, ident.base_url) == ("embedder[2]", "server_8092", "http://127.0.0.1:8092")
    assert _ident(replicas=1, index=0).name == "embedder"
    assert local_url("::", 1) == "http://127.0.0.1:1" and local_url("10.1.2.3", 5) == "http://10.1.2.3:5"
    assert local_url("::1", 7) == "http://[::1]:7"


def test_every_view_of_an_instance_carries_the_same_identity() -> None:
    ident = _ident()
    spec = InstanceSpec.extend(ident, argv=("llama-server",))
    rec = make_record(**{f.name: getattr(ident, f.name) for f in dataclasses.fields(Identity)})
    view = InstanceView.extend(rec, model_path=None, embeddings=True)
    row = StatusRow.extend(spec, pid=None, status=Status.STOPPED, model="m")
    for derived in (spec, rec, view, row):
        assert derived.identity() == ident and derived.name == "embedder[2]"
    assert view.url == ident.base_url
    assert row.to_json()["name"] == "embedder[2]" and row.to_json()["tier"] == "hot"


def test_a_wildcard_bind_on_another_node_is_reached_at_the_node_address() -> None:
    assert reach_host("0.0.0.0", "10.0.0.5") == "10.0.0.5" and reach_host("::", "10.0.0.5") == "10.0.0.5"
    assert reach_host("0.0.0.0") == "127.0.0.1"  # this machine: loopback
    assert reach_host("127.0.0.1", "10.0.0.5") == "127.0.0.1"  # bound to loopback: only that way in
    far = make_record(host="0.0.0.0", node="n1", extra={"node_address": "10.0.0.5"})
    assert far.base_url == "http://10.0.0.5:8080" and far.handle.address == "10.0.0.5"
    assert make_record(host="0.0.0.0").base_url == "http://127.0.0.1:8080"
    view = InstanceView.extend(far, node_address=far.node_address)
    assert view.url == "http://10.0.0.5:8080"
