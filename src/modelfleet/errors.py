"""The one exception family modelfleet raises.

Every error carries the exit code the CLI uses and, where it applies, the HTTP status
the API answers with. Messages are sentences that name the thing and say what to do.
"""

from __future__ import annotations


class FleetError(Exception):
    """Base of every error modelfleet reports to a user."""

    exit_code = 1
    http_status = 500


class ConfigError(FleetError):
    """The stack file is invalid; the message names each key path at fault."""

    exit_code = 2
    http_status = 400


class UsageError(FleetError):
    """The command line asks for something that does not exist or does not fit."""

    exit_code = 2
    http_status = 400


class BinaryError(FleetError):
    """llama-server is missing, cannot run, or cannot honour an option."""

    exit_code = 3


class StartupError(FleetError):
    """An instance could not be started (port taken, missing file, early exit)."""

    exit_code = 4
    http_status = 503


class HealthTimeout(StartupError):
    """An instance did not become healthy within its timeout."""


class StateError(FleetError):
    """The state file could not be read or written."""

    exit_code = 5


class NoSuchRole(UsageError):
    """A requested role, alias or task type does not exist."""

    http_status = 404


class OverBudget(FleetError):
    """The memory plan does not fit, or a WARM instance does not fit in the memory available now."""

    exit_code = 6
    http_status = 503
