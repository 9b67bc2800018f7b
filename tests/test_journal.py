"""Journal records and their encoding: every kind maps 1:1 onto (kind, data) and back,
and what earlier versions wrote still decodes."""

from __future__ import annotations

import dataclasses
import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from swarm import journal as jn

pytestmark = [pytest.mark.timeout(30)]

FIXTURE = Path(__file__).parent / "fixtures" / "state-v2.db"

# A value of each data field's type, as JSON gives it back.
_SAMPLES: dict[str, Any] = {
    "str": "x", "int": 3, "float": 1.5, "bool": True, "Any": {"k": [1, "v"]},
    "dict[str, Any]": {"name": "n", "dispatch": "internal"}, "dict[str, int]": {"ok": 2},
    "dict[str, str]": {"zone": "a"}, "list[str]": ["a", "b"],
}


def _sample(f: dataclasses.Field[Any]) -> Any:
    t = str(f.type).removesuffix(" | None")
    return _SAMPLES[t]


def _full(cls: type[jn.Record]) -> jn.Record:
    """A record of this class with every field set (none left at its default)."""
    header = {f.name for f in dataclasses.fields(jn.Record)}
    data = {f.name: _sample(f) for f in dataclasses.fields(cls) if f.name not in header}
    return cls(2.5, "r1", "r1/a", "a", "w1", 1, **data)


@pytest.mark.parametrize("cls", [jn.KINDS[k] for k in sorted(jn.KINDS)], ids=sorted(jn.KINDS))
def test_every_record_round_trips_through_its_kind_and_data(cls: type[jn.Record]) -> None:
    rec = _full(cls)
    assert rec.kind == cls.KIND and type(rec.kind) is str
    data = json.loads(json.dumps(rec.data))  # as the events table and the wire carry it
    back = jn.decode(rec.kind, rec.ts, rec.run_id, rec.task_id, rec.symbol, rec.node,
                     rec.attempt, data)
    assert type(back) is cls and back == rec
    assert back.data == rec.data


def test_every_kind_has_one_record_class() -> None:
    assert set(jn.KINDS) == set(jn.Kind)
    assert all(jn.KINDS[k].KIND is k for k in jn.Kind)


def test_fields_left_at_their_default_stay_out_of_the_data_as_they_always_did() -> None:
    assert jn.SymbolQueued(1.0, "r", "r/a", "a").data == {}
    assert jn.SymbolQueued(1.0, "r", "r/a", "a", reason="retry").data == {"reason": "retry"}
    done = jn.SymbolCompleted(1.0, "r", "r/a", "a", output=None, duration_ms=4.0)
    assert list(done.data) == ["output", "duration_ms"]
    failed = jn.SymbolFailed(1.0, "r", "r/a", "a", error="e", reason="why", retryable=False)
    assert list(failed.data) == ["error", "reason", "retryable"]
    started = jn.RunStarted(1.0, "r", workflow="w", version="1", hash="h", symbols=0,
                            on_failure="rollback", mode="rolling", manifest={"symbols": []})
    assert "resumed_from" not in started.data and "manifest" not in started.lean_data()


def test_an_unknown_kind_decodes_as_it_came_and_a_missing_field_as_none() -> None:
    rec = jn.decode("symbol.teleported", 1.0, "r", "r/a", "a", data={"pct": 50})
    assert isinstance(rec, jn.Unknown) and rec.kind == "symbol.teleported"
    assert rec.data == {"pct": 50}
    partial = jn.decode("symbol.started", 1.0, "r", "r/a", "a", data={"extra": 1})
    assert isinstance(partial, jn.SymbolStarted) and partial.token is None


def test_every_event_of_a_schema_2_database_decodes_to_its_record() -> None:
    with sqlite3.connect(FIXTURE) as con:
        rows = con.execute("SELECT kind, ts, run_id, task_id, symbol, node, attempt, data"
                           " FROM events ORDER BY seq").fetchall()
    assert rows
    for kind, ts, run_id, task_id, symbol, node, attempt, data in rows:
        stored = json.loads(data)
        rec = jn.decode(kind, ts, run_id, task_id, symbol, node, attempt, stored)
        assert type(rec) is jn.KINDS[kind], kind
        # Encoded again, it is the row it came from (data the events table leaves out,
        # attempt.finished's output, comes back as its default).
        again = rec.lean_data("output") if kind == jn.Kind.ATTEMPT_FINISHED else rec.lean_data()
        assert again == stored, kind
