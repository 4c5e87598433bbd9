"""The state file loader against anything a disk, an editor or a crash can leave: a record,
or a StateError naming the entry; never another exception, never an entry dropped in silence."""

from __future__ import annotations

import contextlib
import json
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import make_record
from modelfleet.errors import StateError
from modelfleet.state import StateStore

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20,
)
GOOD = make_record("m", 4242, 8080, create_time=1.5, argv=("llama-server", "--port", "8080")).to_json()


@contextlib.contextmanager
def _store(raw: str) -> Iterator[StateStore]:
    with tempfile.TemporaryDirectory() as folder:
        store = StateStore(Path(folder))
        store.path.write_text(raw)
        yield store


def _check(raw: dict[str, Any]) -> None:
    with _store(json.dumps(raw)) as store:
        try:
            records = store.read()
        except StateError as exc:
            assert len(str(exc)) < 20_000
            salvage = store.read_salvage()  # what `stop --all` uses: never raises for an object file
            assert set(salvage.records) | set(salvage.unreadable) == set(raw)  # every entry accounted for
            return
        assert set(records) == set(raw)  # nothing dropped


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.text(max_size=12), JSON, max_size=4))
def test_random_entries(raw: dict[str, Any]) -> None:
    _check(raw)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(sorted(GOOD)), JSON)
def test_one_field_of_a_good_entry_replaced(field: str, value: object) -> None:
    _check({"server_8080": {**GOOD, field: value}})


@settings(max_examples=100, deadline=None)
@given(JSON)
def test_any_json_document(raw: object) -> None:
    with _store(json.dumps(raw)) as store, contextlib.suppress(StateError):
        store.read()


def test_a_good_entry_round_trips() -> None:
    with _store(json.dumps({"server_8080": GOOD})) as store:
        assert store.read()["server_8080"].to_json() == GOOD
