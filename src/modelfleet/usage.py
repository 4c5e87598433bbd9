"""What an answer says it cost: tokens generated, prompt tokens evaluated and served from cache.

Read once per answer, from its tail (a whole JSON answer, or a stream's last events), by
one scan for OpenAI's ``usage.completion_tokens`` and llama-server's ``timings``
(``predicted_n``, ``prompt_n``, ``cache_n``); the metrics, the page's feed and the request
log all take the same :class:`Usage`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_FIELDS = re.compile(rb'"(completion_tokens|predicted_n|tokens_predicted|cache_n|prompt_n)"\s*:\s*(\d+)')
_GENERATED = frozenset({b"completion_tokens", b"predicted_n", b"tokens_predicted"})


@dataclass(frozen=True, slots=True)
class Usage:
    """The last figure of each kind in the tail; None where the answer did not say."""

    generated: int | None = None
    cached: int | None = None
    evaluated: int | None = None


def usage_of(tail: bytes) -> Usage:
    """The usage in the end of an answer (the last value of each field wins, as a stream repeats them)."""
    generated = cached = evaluated = None
    for name, value in _FIELDS.findall(tail):
        n = int(value)
        if name in _GENERATED:
            generated = n
        elif name == b"cache_n":
            cached = n
        else:
            evaluated = n
    return Usage(generated, cached, evaluated)
