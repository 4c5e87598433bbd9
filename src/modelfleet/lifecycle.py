"""The lifecycle of one instance inside the front door: its states and the moves between them.

::

    STOPPED ──start──▶ STARTING ──healthy──▶ READY ──probes fail──▶ EJECTED
       ▲                  │                   │  ▲────probe ok─────────┘
       │                  │ failed (HOT)      │ idle, evicted, admin stop
       │                  ▼                   ▼
       │               BACKOFF ◀──crashed── READY/EJECTED        DRAINING ──▶ STOPPING ──▶ STOPPED
       │                  │ timer                                 (in-flight requests end first)
       │                  └──▶ STARTING
       └── any state ──▶ FAILED (restart budget spent; an admin start or stop leaves it)

Adopting a running process (a front door that starts on a live stack, an instance a
CLI started) moves STOPPED to EJECTED: it is up, and its first good probe makes it
READY. Every move goes through :meth:`modelfleet.fleet.Fleet.move`, which checks the
move against :data:`TRANSITIONS` (and, where the caller says so, the state it expects
to find), so no code path can put an instance in a state it cannot be in.
"""

from __future__ import annotations

from enum import StrEnum


class State(StrEnum):
    STOPPED = "stopped"  # configured, no process
    STARTING = "starting"  # a start of ours is under way: admission, launch, health wait, hooks
    READY = "ready"  # up and in rotation
    EJECTED = "ejected"  # up, out of rotation until a probe answers (probes failing, or just adopted)
    DRAINING = "draining"  # out of rotation, waiting for in-flight requests to end before a stop
    STOPPING = "stopping"  # its process is being stopped
    BACKOFF = "backoff"  # crashed or failed to start; restarting after a delay
    FAILED = "failed"  # restart budget spent; not restarted until someone asks


S = State
TRANSITIONS: dict[State, frozenset[State]] = {
    S.STOPPED: frozenset({S.STARTING, S.EJECTED, S.BACKOFF, S.FAILED}),
    S.STARTING: frozenset({S.READY, S.STOPPED, S.BACKOFF, S.STOPPING, S.FAILED}),
    S.READY: frozenset({S.EJECTED, S.DRAINING, S.STOPPING, S.STOPPED, S.BACKOFF, S.FAILED}),
    S.EJECTED: frozenset({S.READY, S.DRAINING, S.STOPPING, S.STOPPED, S.BACKOFF, S.FAILED}),
    S.DRAINING: frozenset({S.STOPPING, S.FAILED}),
    S.STOPPING: frozenset({S.STOPPED, S.FAILED}),
    S.BACKOFF: frozenset({S.STARTING, S.STOPPED, S.STOPPING, S.FAILED}),
    S.FAILED: frozenset({S.STOPPED, S.STARTING}),
}

#: Up, and owned by no operation of the front door: probes and the state-file sync apply.
UP = frozenset({S.READY, S.EJECTED})
#: An operation of the front door owns the instance: the state-file sync leaves it alone.
BUSY = frozenset({S.STARTING, S.DRAINING, S.STOPPING, S.BACKOFF})


def allowed(old: State, new: State) -> bool:
    return new in TRANSITIONS[old]
