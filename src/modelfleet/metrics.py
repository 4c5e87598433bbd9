"""Prometheus metrics of the front door, per role and instance."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from modelfleet.capacity import Counters
from modelfleet.lifecycle import State
from modelfleet.router import Router
from modelfleet.usage import Usage

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    """Request-path counters and histograms, plus a collector reading the Router's live state."""

    def __init__(self, router: Router) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        labels = ("role", "instance")
        self.requests = Counter("modelfleet_requests", "Requests answered", (*labels, "code"), registry=self.registry)
        self.errors = Counter("modelfleet_errors", "Requests that failed", ("role", "source"), registry=self.registry)
        self.latency = Histogram(
            "modelfleet_request_seconds",
            "Whole request latency",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.ttft = Histogram(
            "modelfleet_time_to_first_token_seconds",
            "Time to the first byte of the upstream body",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.queue_wait = Histogram(
            "modelfleet_queue_wait_seconds",
            "Time waiting for a slot",
            ("role",),
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.tokens = Counter(
            "modelfleet_tokens_generated",
            "Tokens generated (from llama-server's usage)",
            labels,
            registry=self.registry,
        )
        self.registry.register(_LiveCollector(router))
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}

    def count(self, counters: Counters, role: str, instance: str, usage: Usage) -> None:
        """Tokens generated, and prompt tokens evaluated and served from cache: only what the answer said."""
        if usage.generated is not None:
            self.child(self.tokens, role, instance).inc(usage.generated)
        if usage.evaluated is not None:
            Counters.add(counters.prompt_evaluated, (role, instance), usage.evaluated)
        if usage.cached is not None:
            Counters.add(counters.prompt_cached, (role, instance), usage.cached)

    def child(self, metric: Any, *labels: str) -> Any:
        """``metric.labels(*labels)``, cached: the lookup is on every request's path."""
        key = (id(metric), labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found


class _LiveCollector(Collector):
    def __init__(self, router: Router) -> None:
        self.router = router

    def collect(self) -> Iterator[Metric]:
        r = self.router
        in_flight = GaugeMetricFamily("modelfleet_in_flight", "Requests being served", labels=["role", "instance"])
        health = GaugeMetricFamily(
            "modelfleet_instance_up", "1 when the instance is ready and in rotation", labels=["instance", "state"]
        )
        queued = GaugeMetricFamily("modelfleet_queued", "Requests waiting for a slot", labels=["role"])
        for role, pool in r.pools.items():
            queued.add_metric([role], len(pool.waiting))
            for b in pool.backends:
                in_flight.add_metric([role, b.name], b.in_flight)
        for b in r.fleet:
            health.add_metric([b.name, b.state.value], 1.0 if b.state is State.READY else 0.0)
        yield in_flight
        yield queued
        yield health
        for name, counts, help_text in (
            ("modelfleet_restarts", r.counters.restarts, "Restarts after a crash"),
            ("modelfleet_warm_starts", r.counters.warm_starts, "WARM/COLD instances started by the front door"),
            ("modelfleet_idle_stops", r.counters.idle_stops, "WARM instances stopped after idling"),
            ("modelfleet_evictions", r.counters.evictions, "Idle WARM instances stopped to admit another"),
        ):
            fam = CounterMetricFamily(name, help_text, labels=["instance"])
            for inst, n in counts.items():
                fam.add_metric([inst], n)
            yield fam
        for name, by, help_text in (
            ("modelfleet_prompt_tokens_evaluated", r.counters.prompt_evaluated, "Prompt tokens evaluated (timings)"),
            ("modelfleet_prompt_tokens_cached", r.counters.prompt_cached, "Prompt tokens served from the KV cache"),
        ):
            fam = CounterMetricFamily(name, help_text, labels=["role", "instance"])
            for (role, inst), n in by.items():
                fam.add_metric([role, inst], n)
            yield fam
        sharing = r.sharing.stats
        for name, n, help_text in (
            ("modelfleet_prefix_shares", sharing.seeds, "Shared prefixes evaluated once and restored elsewhere"),
            ("modelfleet_prefix_share_failures", sharing.failed, "Prefix shares given up"),
            ("modelfleet_prefix_share_slots", sharing.slots, "Slots a shared prefix was restored into"),
        ):
            yield CounterMetricFamily(name, help_text, value=n)
        fam = CounterMetricFamily("modelfleet_kv_restores", "Saved KV caches restored", labels=["instance", "result"])
        for (inst, result), n in r.counters.kv_restores.items():
            fam.add_metric([inst, result], n)
        yield fam
