"""The state DB's group commit: small batches commit on the caller's thread, big ones on
the writer's; either way a batch is stored whole or not at all."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest

from swarm import journal as jn
from swarm.errors import StateBusy, StateError, StateLocked
from swarm.events import Tick
from swarm.state import Store
from swarm.stimuli import Stimulus

pytestmark = [pytest.mark.timeout(60)]


def node_joined(i: int) -> jn.NodeJoined:
    return jn.NodeJoined(1.0 + i, node=f"w{i}", node_id=f"w{i}#1", capabilities=["internal"],
                         slots=4, labels={})


def rows(db: Path, sql: str) -> list[tuple[object, ...]]:
    with sqlite3.connect(db) as con:
        return con.execute(sql).fetchall()


@pytest.mark.parametrize("size", [1, 8, 9, 500])
async def test_a_batch_is_stored_whole_whatever_its_size(tmp_path: Path, size: int) -> None:
    store = await Store.open(tmp_path / "s.db")
    try:
        await store.write([node_joined(i) for i in range(size)])
        # Read back through another connection: committed, not just written.
        assert rows(tmp_path / "s.db", "SELECT COUNT(*) FROM nodes") == [(size,)]
        assert rows(tmp_path / "s.db", "SELECT COUNT(*) FROM events") == [(size,)]
        # A batch that fails half-way leaves nothing of itself behind.
        started = jn.RunStarted(
            2.0, run_id="r1", workflow="w", version="1", hash="h", symbols=1,
            on_failure="rollback", mode="rolling",
            manifest={"symbols": [{"name": "a", "dispatch": "internal"}]})
        bad = [started, started]  # the same run twice: the second insert fails
        with pytest.raises(StateError, match="UNIQUE constraint failed") as failed:
            await store.write([*(node_joined(i) for i in range(size, 2 * size)), *bad,
                               *(node_joined(i) for i in range(2 * size, 3 * size))])
        assert not isinstance(failed.value, StateBusy)  # not worth trying again
        assert rows(tmp_path / "s.db", "SELECT COUNT(*) FROM nodes") == [(size,)]
        assert rows(tmp_path / "s.db", "SELECT COUNT(*) FROM runs") == [(0,)]
        await store.write([node_joined(3 * size)])  # and the store goes on
        assert rows(tmp_path / "s.db", "SELECT COUNT(*) FROM nodes") == [(size + 1,)]
    finally:
        await store.close()


V1_SCHEMA = '''
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
INSERT INTO meta VALUES ('schema_version', '1');
CREATE TABLE nodes (
    node_id TEXT PRIMARY KEY, name TEXT NOT NULL, capabilities TEXT NOT NULL,
    slots INTEGER NOT NULL, labels TEXT NOT NULL, status TEXT NOT NULL,
    joined_at REAL NOT NULL, left_at REAL, reason TEXT);
CREATE TABLE tasks (
    task_id TEXT PRIMARY KEY, run_id TEXT NOT NULL, symbol TEXT NOT NULL, kind TEXT NOT NULL,
    parent TEXT, dispatch TEXT NOT NULL, position INTEGER NOT NULL, state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0, losses INTEGER NOT NULL DEFAULT 0, node TEXT,
    token INTEGER, due_at REAL, started_at REAL, finished_at REAL, result TEXT, error TEXT,
    deps TEXT);
CREATE TABLE attempts (
    token INTEGER PRIMARY KEY, task_id TEXT NOT NULL, run_id TEXT NOT NULL,
    attempt INTEGER NOT NULL, node TEXT, started_at REAL NOT NULL, finished_at REAL,
    outcome TEXT NOT NULL, exit_code INTEGER, duration_ms REAL, result TEXT, error TEXT,
    stderr TEXT, truncated INTEGER NOT NULL DEFAULT 0);
CREATE INDEX attempts_by_task ON attempts (task_id);
INSERT INTO attempts (token, task_id, run_id, attempt, node, started_at, finished_at, outcome)
    VALUES (2, 'r/a', 'r', 1, 'w', 10.0, 11.0, 'ok'), (1, 'r/b', 'r', 1, 'w', 9.0, NULL,
    'running');
'''


async def test_a_schema_1_database_is_upgraded_in_place(tmp_path: Path) -> None:
    db = tmp_path / "old.db"
    with sqlite3.connect(db) as con:
        con.executescript(V1_SCHEMA)
    store = await Store.open(db)
    try:
        await store.write([jn.SymbolStarted(20.0, "r", "r/c", "c", "w", 1, token=-(1 << 62),
                                            node_id="w#1")])
    finally:
        await store.close()
    assert rows(db, "SELECT value FROM meta WHERE key = 'schema_version'") == [("4",)]
    # Kept in the order they started, the random token stored as it is; the attempt the
    # crash cut off is closed as lost at the last sign of life (none: its own start).
    assert rows(db, "SELECT token, outcome, finished_at FROM attempts ORDER BY id") == [
        (1, "lost", 9.0), (2, "ok", 11.0), (-(1 << 62), "running", None)]
    assert "node_id" in {r[1] for r in rows(db, "PRAGMA table_info(tasks)")}
    assert "seen_at" in {r[1] for r in rows(db, "PRAGMA table_info(nodes)")}


async def test_a_node_that_leaves_and_rejoins_in_one_commit_is_connected(
        tmp_path: Path) -> None:
    store = await Store.open(tmp_path / "s.db")
    try:
        await store.write([node_joined(1)])
        await store.write([jn.NodeLeft(5.0, node="w1", node_id="w1#1", reason="replaced",
                                       running=0), node_joined(1)])
    finally:
        await store.close()
    assert rows(tmp_path / "s.db", "SELECT status, joined_at, left_at FROM nodes") == [
        ("connected", 2.0, None)]


async def test_one_writer_per_state_db_and_readers_beside_it(tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    first = await Store.open(db)
    try:
        with pytest.raises(StateLocked, match=rf"in use by another dispatcher \(host .*, PID "
                                              rf"{os.getpid()}, since 20"):
            await Store.open(db)
        await first.write([node_joined(1)])
        reader = await Store.open_readonly(db)  # report, backup, plan --db: no lock needed
        try:
            assert (await reader.counts())["nodes"] == 1
            with pytest.raises(StateError, match="read-only"):
                await reader.write([node_joined(2)])
        finally:
            await reader.close()
    finally:
        await first.close()
    second = await Store.open(db)  # the lock went with the first
    await second.close()


async def test_a_commit_blocked_by_another_process_is_reported_as_worth_retrying(
        tmp_path: Path) -> None:
    store = await Store.open(tmp_path / "s.db")
    other = sqlite3.connect(tmp_path / "s.db", isolation_level=None)
    try:
        await store._writer.call(lambda con: con.execute("PRAGMA busy_timeout=50"))
        other.execute("BEGIN EXCLUSIVE")
        with pytest.raises(StateBusy) as busy:
            await store.write([node_joined(1)])
        assert busy.value.why == "locked by another process"
        other.execute("COMMIT")
        await store.write([node_joined(1)])  # the same batch, once the lock is gone
        assert rows(tmp_path / "s.db", "SELECT COUNT(*) FROM nodes") == [(1,)]
    finally:
        other.close()
        await store.close()


async def test_a_schema_3_database_gains_the_stimuli_table(tmp_path: Path) -> None:
    db = tmp_path / "v3.db"
    store = await Store.open(db)
    await store.write([node_joined(1)])
    await store.close()
    with sqlite3.connect(db) as con:  # as schema 3 left it: no stimuli kept
        con.execute("DROP TABLE stimuli")
        con.execute("UPDATE meta SET value = '3' WHERE key = 'schema_version'")
    store = await Store.open(db)
    try:
        assert store.last_stimulus == 0
    finally:
        await store.close()
    assert rows(db, "SELECT value FROM meta WHERE key = 'schema_version'") == [("4",)]
    assert rows(db, "SELECT COUNT(*) FROM stimuli") == [(0,)]
    assert rows(db, "SELECT COUNT(*) FROM nodes") == [(1,)]
    assert len(list(tmp_path.glob("v3.db.schema3-*.bak"))) == 1


async def test_only_the_most_recent_stimuli_are_kept(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("swarm.state.STIMULI_KEPT", 10)
    monkeypatch.setattr("swarm.state.STIMULI_TRIM", 5)
    db = tmp_path / "s.db"
    store = await Store.open(db)
    try:
        for i in range(1, 41):  # one stimulus and the entry it caused per commit
            await store.write([node_joined(i)], [Stimulus(i, 1, Tick(float(i)), 0, 1)])
        assert store.last_stimulus == 40
    finally:
        await store.close()
    kept = rows(db, "SELECT id, first_seq, entries FROM stimuli ORDER BY id")
    assert 10 <= len(kept) < 15 and kept[-1] == (40, 40, 1)
    assert [k[0] for k in kept] == list(range(41 - len(kept), 41))
    store = await Store.open(db)  # numbering goes on after a restart
    try:
        assert store.last_stimulus == 40
    finally:
        await store.close()
