"""The one exception tree modelfleet raises.

Every error a user can meet is a :class:`FleetError`. Each class says what the CLI
exits with (``exit_code``), what the front door answers (``http_status``, OpenAI's
error ``type``, and ``retry_after`` seconds where waiting helps) and who failed
(``source``: the front door itself, or the backend behind it). Messages are sentences
that name the thing at fault and say what to do.

Foreign exceptions are mapped to this tree once at each edge: the CLI's ``main``, the
front door's one error handler (``api.error_response``) and the upstream client.

    FleetError                      exit 1  HTTP 500
    ├── ConfigError                 exit 2  HTTP 400   the stack file is invalid
    ├── UsageError                  exit 2  HTTP 400   the command or request asks for what is not there
    │   ├── NoSuchRole                      HTTP 404
    │   └── NoSuchCheckpoint                HTTP 404
    ├── BinaryError                 exit 3             llama-server missing or unable to honour an option
    ├── SetupError                  exit 3             `modelfleet setup` could not download or build
    ├── StartupError                exit 4  HTTP 503   an instance could not start
    │   ├── HealthTimeout                               ... not healthy in time
    │   └── HookError                                   ... a required init hook failed
    ├── StateError                  exit 5             the state file is unreadable or malformed
    ├── OverBudget                  exit 6  HTTP 503   the memory plan or a WARM start does not fit
    ├── CheckpointError             exit 7  HTTP 409   a checkpoint is damaged or cannot be applied
    ├── HookFailure                                    raised inside a built-in hook (recorded, not fatal)
    ├── IllegalTransition                   HTTP 500   an instance was moved against the lifecycle table
    ├── Unavailable                         HTTP 503   nothing can take the request now
    │   ├── QueueFull                       HTTP 429   every slot busy and the waiting line full
    │   ├── QueueTimeout                    HTTP 503   no slot came free in time
    │   └── NoBackend                       HTTP 503   nothing ready and nothing can start
    ├── UpstreamError                       HTTP 502   the backend failed (source: backend)
    │   ├── ConnectFailed                               refused before any byte: safe to retry elsewhere
    │   ├── Stale                                       a kept-alive connection it had closed: safe to retry
    │   ├── Garbled                                     answered bytes that are not HTTP: safe to retry
    │   ├── Unsendable                      HTTP 400   the request cannot be written as HTTP (source: frontdoor)
    │   ├── BrokenOff                                   failed after its answer began
    │   └── UpstreamTimeout                 HTTP 504   silent past the read timeout
    └── ApiError                            any        an HTTP error the front door answers as it is
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

OPENAI_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    499: "invalid_request_error",
    502: "upstream_error",
    503: "unavailable_error",
    504: "timeout_error",
}


class FleetError(Exception):
    """Base of every error modelfleet reports to a user."""

    exit_code = 1
    http_status = 500
    retry_after: int | None = None
    source = "frontdoor"

    @property
    def status(self) -> int:
        return self.http_status

    @property
    def headers(self) -> dict[str, str]:
        return {} if self.retry_after is None else {"Retry-After": str(self.retry_after)}

    def body(self) -> dict[str, Any]:
        """The error in OpenAI's shape, plus who failed."""
        status = self.status
        return {
            "error": {
                "message": str(self),
                "type": OPENAI_TYPES.get(status, "server_error"),
                "code": status,
                "source": self.source,
            }
        }


class ConfigError(FleetError):
    """The stack file is invalid; the message names each key path at fault."""

    exit_code = 2
    http_status = 400


class UsageError(FleetError):
    """The command line or request asks for something that does not exist or does not fit."""

    exit_code = 2
    http_status = 400


class NoSuchRole(UsageError):
    """A requested role, alias or task type does not exist."""

    http_status = 404


class NoSuchCheckpoint(UsageError):
    """No checkpoint has that id."""

    http_status = 404


class BinaryError(FleetError):
    """llama-server is missing, cannot run, or cannot honour an option."""

    exit_code = 3


class SetupError(FleetError):
    """``modelfleet setup`` could not download, unpack or build what it needs."""

    exit_code = 3


class StartupError(FleetError):
    """An instance could not be started (port taken, missing file, early exit)."""

    exit_code = 4
    http_status = 503


class HealthTimeout(StartupError):
    """An instance did not become healthy within its timeout."""


class HookError(StartupError):
    """A required hook failed; what the start launched has been stopped."""


class StateError(FleetError):
    """The state file could not be read or written, or holds an entry that makes no sense."""

    exit_code = 5


class OverBudget(FleetError):
    """The memory plan does not fit, or a WARM instance does not fit in the memory available now."""

    exit_code = 6
    http_status = 503
    retry_after = 30


class CheckpointError(FleetError):
    """A checkpoint is damaged, or cannot be created or restored."""

    exit_code = 7
    http_status = 409


class HookFailure(FleetError):
    """Raised by a built-in hook; the message names the instances that failed."""


class IllegalTransition(FleetError):
    """An instance was asked to move between lifecycle states the table does not allow."""


class Unavailable(FleetError):
    """Nothing can take the request now; retrying later may help."""

    http_status = 503
    retry_after = 5


class QueueFull(Unavailable):
    """Every slot is busy and the waiting line is full."""

    http_status = 429
    retry_after = 1


class QueueTimeout(Unavailable):
    """A request waited its whole allowance without getting a slot."""


class NoBackend(Unavailable):
    """Nothing can serve the role now (all failed or stopped, and nothing can start)."""

    retry_after = 10


class UpstreamError(FleetError):
    """The backend failed to answer."""

    http_status = 502
    source = "backend"


class ConnectFailed(UpstreamError):
    """The connection was refused or could not be made: nothing was sent."""


class Stale(UpstreamError):
    """A kept-alive connection turned out closed before any byte of the answer: safe to retry."""


class Garbled(UpstreamError):
    """What came back before a response's headers was not HTTP (nothing was answered): safe to retry."""


class Unsendable(UpstreamError):
    """The request cannot be written as HTTP (a target or header HTTP cannot carry); nothing was sent."""

    http_status = 400
    source = "frontdoor"


class BrokenOff(UpstreamError):
    """The backend's answer began and then broke off (a dead backend, garbage bytes)."""


class UpstreamTimeout(UpstreamError, TimeoutError):
    """The backend was silent past the read timeout."""

    http_status = 504


class ApiError(FleetError):
    """An HTTP error the front door answers as it is (auth, bad body, wrong method...)."""

    def __init__(
        self,
        status: int,
        message: str,
        kind: str | None = None,
        source: str = "frontdoor",
        retry_after: int | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self._status = status
        self.kind = kind or OPENAI_TYPES.get(status, "server_error")
        self.source = source
        self.retry_after = retry_after
        self._headers = dict(headers or {})

    @property
    def status(self) -> int:
        return self._status

    @property
    def headers(self) -> dict[str, str]:
        return {**self._headers, **super().headers}

    def body(self) -> dict[str, Any]:
        out = super().body()
        out["error"]["type"] = self.kind
        return out


def gist(exc: BaseException) -> str:
    """A multi-line error in one line: its first, and the one after when the first ends in ':'
    (``nothing was started:`` is followed by the reason)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
    return f"{lines[0]} {lines[1]}" if lines[0].endswith(":") and len(lines) > 1 else lines[0]
