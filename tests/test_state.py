"""The state DB's group commit: small batches commit on the caller's thread, big ones on
the writer's; either way a batch is stored whole or not at all."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from swarm import state
from swarm.events import Journal
from swarm.state import Store

pytestmark = [pytest.mark.timeout(60)]


def node_joined(i: int) -> Journal:
    return Journal("node.joined", 1.0 + i, node=f"w{i}", data={
        "node_id": f"w{i}#1", "capabilities": ["internal"], "slots": 4, "labels": {}})


def rows(db: Path, sql: str) -> list[tuple[object, ...]]:
    with sqlite3.connect(db) as con:
        return con.execute(sql).fetchall()


@pytest.mark.parametrize("size", [1, state.INLINE_COMMIT, state.INLINE_COMMIT + 1, 500])
async def test_a_batch_is_stored_whole_on_either_path(tmp_path: Path, size: int) -> None:
    store = await Store.open(tmp_path / "s.db")
    try:
        await store.write([node_joined(i) for i in range(size)])
        # Read back through another connection: committed, not just written.
        assert rows(tmp_path / "s.db", "SELECT COUNT(*) FROM nodes") == [(size,)]
        assert rows(tmp_path / "s.db", "SELECT COUNT(*) FROM events") == [(size,)]
        # A batch that fails half-way leaves nothing of itself behind.
        started = Journal("run.started", 2.0, run_id="r1", data={
            "workflow": "w", "version": "1", "hash": "h", "on_failure": "rollback",
            "mode": "rolling", "manifest": {"symbols": [{"name": "a", "dispatch": "internal"}]}})
        bad = [started, started]  # the same run twice: the second insert fails
        with pytest.raises(sqlite3.IntegrityError):
            await store.write([*(node_joined(i) for i in range(size, 2 * size)), *bad,
                               *(node_joined(i) for i in range(2 * size, 3 * size))])
        assert rows(tmp_path / "s.db", "SELECT COUNT(*) FROM nodes") == [(size,)]
        assert rows(tmp_path / "s.db", "SELECT COUNT(*) FROM runs") == [(0,)]
        await store.write([node_joined(3 * size)])  # and the store goes on
        assert rows(tmp_path / "s.db", "SELECT COUNT(*) FROM nodes") == [(size + 1,)]
    finally:
        await store.close()
