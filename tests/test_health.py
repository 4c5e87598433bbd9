"""One reading of a health answer, for the CLI and the front door alike."""

from __future__ import annotations

from modelfleet.health import Health, classify
from modelfleet.stack import Status


def test_classify() -> None:
    assert classify(200) is Health.HEALTHY
    assert classify(503) is Health.LOADING  # llama-server while it loads its model
    assert classify(500) is Health.UNHEALTHY and classify(404) is Health.UNHEALTHY
    assert classify(None, connected=False) is Health.DOWN  # refused: nothing listens
    assert classify(None) is Health.UNHEALTHY  # timed out or answered garbage


def test_status_shows_what_a_probe_says() -> None:
    assert Status.of(Health.HEALTHY) is Status.HEALTHY
    assert Status.of(Health.LOADING) is Status.LOADING
    assert Status.of(Health.DOWN) is Status.UNHEALTHY
