"""Benchmarks that tune the fleet: the concurrency sweep (:mod:`modelfleet.bench.sweep`)."""

from __future__ import annotations

from modelfleet.bench.sweep import (
    Decision,
    DecisionRule,
    LevelStats,
    RequestResult,
    Sweep,
    SweepPlan,
    SweepResult,
    apply_parallel,
    decide,
    level_stats,
    write_plot,
)

__all__ = [
    "Decision",
    "DecisionRule",
    "LevelStats",
    "RequestResult",
    "Sweep",
    "SweepPlan",
    "SweepResult",
    "apply_parallel",
    "decide",
    "level_stats",
    "write_plot",
]
