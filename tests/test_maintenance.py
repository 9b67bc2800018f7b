"""The state DB over months: schema upgrades, pruning, backups, event seqs (store level,
real SQLite files; the live-dispatcher side is in test_operate.py)."""

from __future__ import annotations

import os
import shutil
import sqlite3
import stat
import time
from pathlib import Path
from typing import Any

import pytest

from swarm import journal as jn
from swarm import maintenance, report
from swarm.errors import InputError, StateError
from swarm.state import SCHEMA_VERSION, Store

FIXTURE = Path(__file__).parent / "fixtures" / "state-v2.db"  # made by schema 2's code
ACTIVE = "run-20261203-184048-352c7a"  # cut off by a kill -9 while `second` ran
FINISHED = {"run-20261203-184047-9ff7e1": "completed", "run-20261203-184048-1724da": "rolled_back"}


def rows(db: Path | str, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    con = sqlite3.connect(db)
    try:
        return con.execute(sql, params).fetchall()
    finally:
        con.close()


def content(db: Path | str, run_ids: list[str] | None = None) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every run table (optionally of some runs only), comparable."""
    out = {}
    for t, order in (("runs", "run_id"), ("tasks", "task_id"), ("attempts", "token"),
                     ("events", "seq"), ("rollbacks", "run_id, symbol")):
        cols = "token, task_id, run_id, attempt, node, started_at, outcome, exit_code, " \
               "result, error" if t == "attempts" else "*"
        where = ""
        if run_ids is not None:
            where = f" WHERE run_id IN ({', '.join('?' * len(run_ids))})"
        out[t] = rows(db, f"SELECT {cols} FROM {t}{where} ORDER BY {order}",
                      tuple(run_ids or ()))
    return out


@pytest.fixture
def old_db(tmp_path: Path) -> Path:
    db = tmp_path / "state.db"
    shutil.copy(FIXTURE, db)
    os.chmod(db, 0o600)
    return db


def test_durations_are_read_and_bad_ones_named() -> None:
    assert maintenance.parse_duration("30d") == 30 * 86400
    assert maintenance.parse_duration("12h") == 12 * 3600
    assert maintenance.parse_duration("1d12h") == 36 * 3600
    assert maintenance.parse_duration(" 90m ") == 5400
    assert maintenance.parse_duration("500ms") == 0.5
    assert maintenance.parse_duration("2w") == 14 * 86400
    for bad in ("", "30", "30x", "-1d", "0s", "d", "1d 2h", "1.5.2h"):
        with pytest.raises(InputError, match="--older-than: not a duration") as e:
            maintenance.parse_duration(bad, "--older-than")
        assert repr(bad) in str(e.value)


async def test_a_schema_2_database_opens_with_every_run_intact(old_db: Path) -> None:
    before = content(FIXTURE)
    store = await Store.open(old_db)
    try:
        assert await store.unfinished_runs() == [ACTIVE]
        loaded = await store.load_run(ACTIVE)
        assert loaded is not None
        states = {r.name: r.state for r in loaded[1]}
        assert states == {"first": "completed", "second": "running", "third": "pending"}
        for run_id, status in FINISHED.items():
            rec = await store.run(run_id)
            assert rec is not None and rec["status"] == status
            rows_ = await store.report_rows(run_id)
            assert rows_ is not None
            rep = report.build(rows_["run"], rows_["tasks"], rows_["attempts"],
                               rows_["events"], rows_["nodes"], time.time())
            assert rep["status"] == status and rep["symbols"]
        assert store.last_seq == 40  # events go on from the journal's last seq
        seqs = await store.write([jn.NodeLeft(time.time(), node="w1", node_id="x",
                                              reason="test", running=0)])
        assert list(seqs) == [41]
    finally:
        await store.close()
    after = content(old_db)
    # Every row is as it was, but the attempt the crash cut off, closed as lost.
    lost = [a for a in after["attempts"] if a[6] == "lost"]
    assert [a[1] for a in lost] == [f"{ACTIVE}/second"]
    # Tasks grew the (empty) checkpoint and progress columns of long-running symbols.
    width = len(before["tasks"][0])
    assert all(set(r[width:]) == {None} for r in after["tasks"])
    after["tasks"] = [r[:width] for r in after["tasks"]]
    assert {t: v for t, v in after.items() if t not in ("attempts", "events")} == {
        t: v for t, v in before.items() if t not in ("attempts", "events")}
    assert [a[:6] for a in after["attempts"]] == [a[:6] for a in before["attempts"]]
    assert after["events"][:40] == before["events"]
    assert rows(old_db, "SELECT value FROM meta WHERE key = 'schema_version'") == [
        (str(SCHEMA_VERSION),)]
    assert rows(old_db, "PRAGMA auto_vacuum") == [(2,)]  # incremental from now on
    # The copy beside it, made first: schema 2, as it was, only its owner may read it.
    backups = list(old_db.parent.glob("state.db.schema2-*.bak"))
    assert len(backups) == 1
    assert stat.S_IMODE(backups[0].stat().st_mode) == 0o600
    assert rows(backups[0], "SELECT value FROM meta WHERE key = 'schema_version'") == [("2",)]
    assert content(backups[0]) == before


async def test_a_current_database_is_not_backed_up_again(tmp_path: Path) -> None:
    for _ in range(2):
        store = await Store.open(tmp_path / "s.db")
        await store.close()
    assert list(tmp_path.glob("*.bak")) == []


async def test_a_newer_or_foreign_file_is_refused_and_left_alone(tmp_path: Path) -> None:
    newer = tmp_path / "newer.db"
    shutil.copy(FIXTURE, newer)
    with sqlite3.connect(newer) as con:
        con.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    foreign = tmp_path / "foreign.db"
    with sqlite3.connect(foreign) as con:
        con.execute("CREATE TABLE invoices (id INTEGER PRIMARY KEY, total REAL)")
    text = tmp_path / "notes.db"
    text.write_text("this is not a database\n" * 10)
    cases = [(newer, "schema version 99 was written by a newer swarm"),
             (foreign, "not a swarm state database (it has no schema version; its tables: "
                       "invoices)"),
             (text, "not a swarm state database (not an SQLite file at all)")]
    for path, message in cases:
        data = path.read_bytes()
        with pytest.raises(StateError, match=message.replace("(", r"\(").replace(")", r"\)")):
            await Store.open(path)
        assert path.read_bytes() == data  # not touched
    assert list(tmp_path.glob("*.bak")) == []


def test_the_journal_of_a_run_that_is_not_finished_cannot_be_deleted(old_db: Path) -> None:
    con = sqlite3.connect(old_db)
    try:
        for sql in ("DELETE FROM events WHERE run_id = ?", "UPDATE events SET kind = 'x'"
                    " WHERE run_id = ?"):
            with pytest.raises(sqlite3.IntegrityError, match="append-only"):
                con.execute(sql, (ACTIVE,) if "?" in sql else ())
    finally:
        con.close()


async def test_prune_removes_finished_runs_whole_and_nothing_of_an_active_one(
        old_db: Path) -> None:
    store = await Store.open(old_db)  # upgraded to the current schema first
    try:
        wf_ok = {"a": "internal", "b": "internal"}
        expected = await store._expected_durations("fixture-ok", wf_ok, 1000.0)
    finally:
        await store.close()
    active = content(old_db, [ACTIVE])
    future = time.time() + 86400
    dry = maintenance.prune(str(old_db), 3600, dry_run=True, now=future)
    assert dry.runs == 2 and dry.rows["events"] > 0
    assert content(old_db, list(FINISHED))["runs"]  # a dry run removes nothing
    # The run that finished last is younger than the cutoff: kept.
    newest = max(FINISHED, key=lambda r: rows(old_db, "SELECT finished_at FROM runs WHERE "
                                                      "run_id = ?", (r,))[0][0])
    cutoff_just_before = rows(old_db, "SELECT finished_at FROM runs WHERE run_id = ?",
                              (newest,))[0][0]
    only_old = maintenance.prune(str(old_db), time.time() - cutoff_just_before + 0.0001)
    assert only_old.runs == 1
    result = maintenance.prune(str(old_db), 3600, now=future)
    assert result.runs == 1 and result.rows["runs"] == 1
    gone = content(old_db, list(FINISHED))
    assert all(not v for v in gone.values())  # whole: no row of theirs is left
    assert content(old_db, [ACTIVE]) == active
    # What the scheduler orders by survives, in aggregate.
    store = await Store.open(old_db)
    try:
        assert await store._expected_durations("fixture-ok", wf_ok, 1000.0) == expected
        assert await store.unfinished_runs() == [ACTIVE]
    finally:
        await store.close()


async def test_prune_gives_the_space_back(tmp_path: Path) -> None:
    db = tmp_path / "big.db"
    store = await Store.open(db)
    blob = "x" * 2000
    try:
        t0 = time.time() - 10 * 86400
        for i in range(40):
            run_id = f"run-{i}"
            symbols = [{"name": f"s{j}", "dispatch": "internal"} for j in range(50)]
            ts = t0 + i * 10
            batch: list[jn.Record] = [jn.RunStarted(
                ts, run_id, manifest={"symbols": symbols}, workflow="big", version="1",
                hash=f"h{i}", symbols=len(symbols), on_failure="rollback", mode="rolling")]
            for j in range(50):
                tid = f"{run_id}/s{j}"
                token = i * 1000 + j + 1
                batch += [
                    jn.SymbolStarted(ts + 1, run_id, tid, f"s{j}", "w", 1, token=token,
                                     node_id="w#1"),
                    jn.AttemptFinished(ts + 2, run_id, tid, f"s{j}", "w", 1, token=token,
                                       ok=True, output=blob, error="", exit_code=0,
                                       timed_out=False, duration_ms=5.0, stderr=blob,
                                       stdout_truncated=False, stderr_truncated=False),
                    jn.SymbolCompleted(ts + 2, run_id, tid, f"s{j}", "w", 1, output=blob,
                                       duration_ms=5.0)]
            # The last 4 runs finished today; the rest 10 days ago.
            end = time.time() if i >= 36 else ts + 3
            batch.append(jn.RunCompleted(end, run_id, status="completed", counts={},
                                         duration=end - ts))
            await store.write(batch)
    finally:
        await store.close()
    result = maintenance.prune(str(db), 86400)
    assert result.runs == 36 and result.rows["tasks"] == 36 * 50
    assert result.bytes_after < 0.25 * result.bytes_before, result
    assert maintenance.file_bytes(str(db)) == result.bytes_after
    assert rows(db, "SELECT COUNT(*) FROM runs") == [(4,)]
    assert rows(db, "PRAGMA integrity_check") == [("ok",)]


async def test_seqs_are_never_given_twice_even_after_a_prune(tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    store = await Store.open(db)
    try:
        first = await store.write([jn.NodeLeft(1.0, node="w", node_id="x", reason="r",
                                               running=0) for _ in range(3)])
        assert list(first) == [1, 2, 3]
        second = await store.write([
            jn.RunStarted(2.0, "r1", manifest={"symbols": []}, workflow="w", version="1",
                          hash="h", symbols=0, on_failure="rollback", mode="rolling"),
            jn.RunCompleted(3.0, "r1", status="completed", counts={}, duration=1.0)])
        assert list(second) == [4, 5]
    finally:
        await store.close()
    assert maintenance.prune(str(db), 1).runs == 1  # the events 4 and 5 are gone
    store = await Store.open(db)
    try:
        assert list(await store.write([jn.NodeLeft(4.0, node="w", node_id="x", reason="r",
                                                   running=0)])) == [6]
    finally:
        await store.close()


def test_a_backup_is_private_checked_and_never_overwrites(old_db: Path, tmp_path: Path
                                                          ) -> None:
    os.umask(0o022)
    dest = tmp_path / "copy.db"
    result = maintenance.backup(str(old_db), str(dest))
    assert result.integrity == "ok" and result.runs == 3 and result.active_runs == 1
    assert result.bytes == dest.stat().st_size > 0
    assert stat.S_IMODE(dest.stat().st_mode) == 0o600
    assert content(dest) == content(old_db)
    with pytest.raises(InputError, match="exists already"):
        maintenance.backup(str(old_db), str(dest))
    with pytest.raises(InputError, match="no such state database"):
        maintenance.backup(str(tmp_path / "missing.db"), str(tmp_path / "x.db"))
