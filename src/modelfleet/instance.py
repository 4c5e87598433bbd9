"""What one instance is, defined once.

An instance is one process of a component (a server's replica, a service, the front
door). Its :class:`Identity` (component, index, port, host, node, kind, tier, roles)
is fixed for its life; everything else derives from it:

* :class:`~modelfleet.spec.InstanceSpec`: an identity plus how to start it;
* :class:`~modelfleet.state.InstanceRecord`: an identity plus the process that runs it;
* :class:`~modelfleet.fleet.Instance`: the front door's live view of one (its lifecycle
  state, slots, counters), built on a spec;
* :class:`~modelfleet.hooks.InstanceView`: what a hook sees of one.

The rules that name an instance (``embedder[2]``), key it in the state file
(``server_8090``, the seed's key) and reach it (a wildcard bind is reached on loopback)
are written here and nowhere else.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Self

from modelfleet.config import Tier

LOCAL_NODE = "local"


class Kind(StrEnum):
    """What runs in an instance."""

    LLAMA_SERVER = "llama-server"
    SERVICE = "service"
    API = "api"  # the front door itself, a component of its stack


def instance_key(port: int) -> str:
    """The state file key of the instance on ``port``, as in the seed: ``server_8080``."""
    return f"server_{port}"


WILDCARD_HOSTS = ("0.0.0.0", "::", "")


def local_host(host: str) -> str:
    """How this machine reaches a service bound to ``host``: a wildcard bind is reached on loopback."""
    return "127.0.0.1" if host in WILDCARD_HOSTS else host


def reach_host(host: str, node_address: str = "") -> str:
    """How the front door reaches a service bound to ``host`` on a node at ``node_address`` ("" for this
    machine): a wildcard bind on another node is reached at that node's address."""
    if node_address and host in WILDCARD_HOSTS:
        return node_address
    return local_host(host)


def url_of(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def local_url(host: str, port: int) -> str:
    return url_of(local_host(host), port)


@dataclass(frozen=True)
class Identity:
    """Who an instance is. Specs, records and views extend this; none copies it."""

    component: str
    index: int
    replicas: int
    port: int
    host: str
    kind: Kind
    tier: Tier
    roles: tuple[str, ...]
    node: str = field(default=LOCAL_NODE, kw_only=True)

    @property
    def name(self) -> str:
        """``frontdoor`` for a single instance, ``embedder[2]`` for a replica."""
        return f"{self.component}[{self.index}]" if self.replicas > 1 else self.component

    @property
    def key(self) -> str:
        """The state file key: ``server_8080``."""
        return instance_key(self.port)

    @property
    def reach_host(self) -> str:
        return local_host(self.host)

    @property
    def base_url(self) -> str:
        return local_url(self.host, self.port)

    @property
    def label(self) -> str:
        return f"{self.name} (:{self.port})"

    def identity(self) -> Identity:
        """Just the identity of a spec, record or view."""
        return Identity(**{f.name: getattr(self, f.name) for f in dataclasses.fields(Identity)})

    def same_instance(self, other: Identity) -> bool:
        return self.identity() == other.identity()

    @classmethod
    def extend(cls, ident: Identity, **more: Any) -> Self:
        """An instance of ``cls`` with ``ident``'s identity and the extra fields given."""
        return cls(**{f.name: getattr(ident, f.name) for f in dataclasses.fields(Identity)}, **more)


@dataclass(frozen=True)
class Handle:
    """Enough to find an instance's process again, from any command: where, which pid, born when."""

    node: str
    pid: int
    create_time: float
    log_file: str = ""
    label: str = ""
    ref: str = ""  # the launcher's own name for it (a Ray actor's name); empty for a local process
    address: str = ""  # the node's address, when it is not this machine


IDENTITY_FIELDS = frozenset(f.name for f in dataclasses.fields(Identity))
