"""Readiness waits and health probes.

llama-server binds its port before loading the model and answers 503
``{"error":{"message":"Loading model"}}`` on every route until the model is loaded,
then ``/health`` turns 200. So: connection refused = not listening yet, 503 =
loading, 200 = ready. We poll every 50 ms (the seed polled every 2 s), and every
wait also watches the child: a server that exits while loading fails at once with
its exit code and the last lines of its log.
"""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

import httpx

from modelfleet.errors import HealthTimeout, StartupError

POLL_INTERVAL_S = 0.05
PROBE_TIMEOUT_S = 2.0


class Health(StrEnum):
    """What one probe of an instance says."""

    HEALTHY = "healthy"
    LOADING = "loading"
    UNHEALTHY = "unhealthy"
    DOWN = "down"  # nothing answers on the port


def classify(status: int | None, connected: bool = True) -> Health:
    """The one reading of a health answer, for the CLI and the front door alike.

    ``status`` is the HTTP status, or None when no answer came (``connected`` False: the
    connection was refused or dropped; True: it timed out or answered garbage).
    200 is ready; 503 is llama-server loading its model; anything else is unhealthy.
    """
    if status is None:
        return Health.UNHEALTHY if connected else Health.DOWN
    if status == 200:
        return Health.HEALTHY
    if status == 503:
        return Health.LOADING
    return Health.UNHEALTHY


def probe(url: str, client: httpx.Client | None = None, timeout_s: float = PROBE_TIMEOUT_S) -> Health:
    """One GET of a health URL, classified."""
    try:
        resp = httpx.get(url, timeout=timeout_s) if client is None else client.get(url, timeout=timeout_s)
    except (httpx.ConnectError, httpx.RemoteProtocolError):
        return classify(None, connected=False)
    except httpx.HTTPError:
        return classify(None)
    return classify(resp.status_code)


def probe_many(urls: list[str], timeout_s: float = PROBE_TIMEOUT_S) -> list[Health]:
    """Probe several URLs concurrently; the answer keeps the order of ``urls``."""
    if not urls:
        return []
    with (
        httpx.Client(timeout=timeout_s) as client,
        concurrent.futures.ThreadPoolExecutor(max_workers=min(16, len(urls))) as pool,
    ):
        return list(pool.map(lambda u: probe(u, client, timeout_s), urls))


@dataclass
class Waiter:
    """Watches one starting instance until it is ready, exits, or times out."""

    label: str
    url: str
    timeout_s: float
    exit_code: Callable[[], int | None]
    log_tail: Callable[[], str] = lambda: ""
    stage: Callable[[], str | None] = lambda: None  # the loading stage its log shows, when known
    started: float = 0.0
    last: Health = Health.DOWN

    def __post_init__(self) -> None:
        self.started = time.monotonic()

    @property
    def elapsed_s(self) -> float:
        return time.monotonic() - self.started

    def check(self, client: httpx.Client) -> bool:
        """One step: True when ready; raises when the process exited or time ran out."""
        code = self.exit_code()
        if code is not None:
            raise StartupError(f"{self.label} exited with code {code} while loading.\n" + self.log_tail())
        self.last = probe(self.url, client, timeout_s=1.0)
        if self.last is Health.HEALTHY:
            return True
        if self.elapsed_s > self.timeout_s:
            raise HealthTimeout(
                f"{self.label} was not healthy after {self.timeout_s:.0f} s (last: {self.last.value}); "
                "raise its health_timeout_s or check the log.\n" + self.log_tail()
            )
        return False


def wait_all(
    waiters: list[Waiter],
    on_progress: Callable[[list[Waiter], Waiter | None], None] | None = None,
) -> None:
    """Poll every waiter until all are ready; the first failure raises at once."""
    pending = list(waiters)
    with httpx.Client() as client:
        while pending:
            for w in list(pending):
                if w.check(client):
                    pending.remove(w)
                    if on_progress:
                        on_progress(pending, w)
            if pending:
                if on_progress:
                    on_progress(pending, None)
                time.sleep(POLL_INTERVAL_S)
