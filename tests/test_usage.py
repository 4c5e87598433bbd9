"""What an answer says it cost, read once from its tail (no processes)."""

from __future__ import annotations

from modelfleet.usage import Usage, usage_of

STREAM_TAIL = (
    b'data: {"choices":[{"delta":{"content":"hi"}}]}\n\n'
    b'data: {"choices":[],"usage":{"completion_tokens":7,"prompt_tokens":20},'
    b'"timings":{"cache_n":15,"prompt_n":5,"predicted_n":7}}\n\ndata: [DONE]\n\n'
)


def test_usage_is_read_from_a_whole_answer_or_a_streams_last_events() -> None:
    assert usage_of(STREAM_TAIL) == Usage(generated=7, cached=15, evaluated=5)
    whole = b'{"choices":[{"message":{"content":"x"}}],"usage":{"completion_tokens":3},"timings":{"prompt_n":9}}'
    assert usage_of(whole) == Usage(generated=3, cached=None, evaluated=9)


def test_absent_figures_stay_unknown_and_the_last_of_each_wins() -> None:
    assert usage_of(b"") == Usage()
    assert usage_of(b'truncated ..."cache_n":4,"prompt_n":1}') == Usage(None, 4, 1)
    repeated = b'"timings":{"prompt_n":3,"cache_n":0}}\n\n"timings":{"prompt_n":5,"cache_n":2,"predicted_n":9}'
    assert usage_of(repeated) == Usage(generated=9, cached=2, evaluated=5)
    # A value in the text of the answer is not a field: only "name": number counts.
    assert usage_of(b'{"content":"prompt_n is 44"}') == Usage()
