"""The state database (SQLite through aiosqlite): nodes, runs, tasks, attempts, the
append-only event journal and the rollback symbols of completed symbols.

The scheduler's journal records are the only way anything is written. `Store.write`
turns a batch of them into one transaction (group commit): inserts first, then the
updates of each row merged into one statement, then the journal rows in order.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import os
import secrets
import socket
import sqlite3
import statistics
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import aiosqlite

from . import journal as jn
from . import maintenance
from .core import TaskRecord
from .errors import StateBusy, StateError, StateLocked
from .journal import Record
from .stimuli import KEPT as STIMULI_KEPT
from .stimuli import TRIM_EVERY as STIMULI_TRIM
from .stimuli import Stimulus
from .stimuli import encode as encode_stimulus
from .tasks import (
    RUN_ACTIVE,
    RUN_FINAL,
    AttemptOutcome,
    NodeState,
    RunState,
    TaskState,
    sql_list,
)

log = logging.getLogger("swarm.state")

# 2: random attempt tokens (rows keyed by `id`), tasks.node_id; 3: finished runs may be
# pruned (events trigger, durations kept in aggregate, incremental vacuum); 4: the recent
# stimuli of the scheduler, kept with the journal for replay (swarm.stimuli)
SCHEMA_VERSION = 4
DEFAULT_DURATION_MS = 1000.0  # expected duration of a symbol with no history at all
# SQLite's primary result codes of a write that may succeed if tried again: another
# process holds a lock (BUSY, LOCKED), the disk is full (FULL) or failed (IOERR).
RETRYABLE_CODES = {5: "locked by another process", 6: "locked",
                   13: "disk full", 10: "I/O error"}
# The vocabulary as SQL list literals, for the queries below.
_DONE = sql_list(TaskState.COMPLETED, TaskState.ROLLED_BACK)  # a main symbol's work is done
_ACTIVE = sql_list(*RUN_ACTIVE)

DURATIONS_TTL = 5.0  # seconds a workflow's expected durations are reused
DURATIONS_KEPT = 64  # workflows whose expected durations are kept

SCHEMA = f"""
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS nodes (
    node_id TEXT PRIMARY KEY, name TEXT NOT NULL, capabilities TEXT NOT NULL,
    slots INTEGER NOT NULL, labels TEXT NOT NULL, status TEXT NOT NULL,
    joined_at REAL NOT NULL, left_at REAL, reason TEXT, seen_at REAL);
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY, workflow TEXT NOT NULL, version TEXT NOT NULL,
    manifest_hash TEXT NOT NULL, manifest TEXT NOT NULL, on_failure TEXT NOT NULL,
    mode TEXT NOT NULL, status TEXT NOT NULL, created_at REAL NOT NULL, finished_at REAL);
CREATE TABLE IF NOT EXISTS tasks (
    -- node: where the latest attempt ran or runs (every attempt is in `attempts`)
    task_id TEXT PRIMARY KEY, run_id TEXT NOT NULL, symbol TEXT NOT NULL, kind TEXT NOT NULL,
    parent TEXT, dispatch TEXT NOT NULL, position INTEGER NOT NULL, state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0, losses INTEGER NOT NULL DEFAULT 0, node TEXT,
    token INTEGER, due_at REAL, started_at REAL, finished_at REAL, result TEXT, error TEXT,
    deps TEXT, node_id TEXT,
    -- the latest committed checkpoint (JSON) and the latest progress report of the symbol
    checkpoint TEXT, checkpoint_at REAL, progress REAL, message TEXT);
CREATE INDEX IF NOT EXISTS tasks_by_run ON tasks (run_id, position);
-- Tokens are random (unguessable); rows are kept in the order attempts started (`id`)
-- and found by (task_id, attempt), never by token: an index of random keys would make
-- every group commit write pages all over it (W1 at 100,000 symbols lost 15% to that).
CREATE TABLE IF NOT EXISTS attempts (
    id INTEGER PRIMARY KEY, token INTEGER NOT NULL, task_id TEXT NOT NULL,
    run_id TEXT NOT NULL,
    attempt INTEGER NOT NULL, node TEXT, started_at REAL NOT NULL, finished_at REAL,
    outcome TEXT NOT NULL, exit_code INTEGER, duration_ms REAL, result TEXT, error TEXT,
    stderr TEXT, truncated INTEGER NOT NULL DEFAULT 0);
CREATE INDEX IF NOT EXISTS attempts_by_task ON attempts (task_id);
CREATE INDEX IF NOT EXISTS attempts_by_run ON attempts (run_id);
CREATE INDEX IF NOT EXISTS runs_by_workflow ON runs (workflow, created_at);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, ts REAL NOT NULL, kind TEXT NOT NULL,
    run_id TEXT, task_id TEXT, symbol TEXT, node TEXT, attempt INTEGER, data TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS events_by_run ON events (run_id, seq);
CREATE TRIGGER IF NOT EXISTS events_no_update BEFORE UPDATE ON events
    BEGIN SELECT RAISE(ABORT, 'the event journal is append-only'); END;
-- The one sanctioned deletion: a finished run removed whole by a prune (maintenance.py).
-- A condition, not a trigger dropped and made again by the prune: no DDL on a live DB
-- (it would make every connection prepare its statements again), and the journal of a
-- run that is not finished stays untouchable, by anyone, at all times.
CREATE TRIGGER IF NOT EXISTS events_delete_finished_runs_only BEFORE DELETE ON events
    WHEN OLD.run_id IS NULL OR COALESCE((SELECT status FROM runs WHERE run_id = OLD.run_id),
        '') NOT IN {sql_list(*RUN_FINAL)}
    BEGIN SELECT RAISE(ABORT, 'the event journal is append-only'); END;
CREATE TABLE IF NOT EXISTS rollbacks (
    run_id TEXT NOT NULL, symbol TEXT NOT NULL, spec TEXT NOT NULL,
    completed_at REAL NOT NULL, rolled_back_at REAL, PRIMARY KEY (run_id, symbol));
-- A rollback requested after a run ended (`swarm rollback`): a phase of its own, so the
-- run's status and finished_at keep the outcome it ended with. The latest phase per run.
CREATE TABLE IF NOT EXISTS run_rollbacks (
    run_id TEXT PRIMARY KEY, status TEXT NOT NULL, requested_at REAL NOT NULL,
    finished_at REAL);
-- Median durations of pruned runs, so that priorities do not forget them: per symbol of a
-- workflow, and per backend under workflow ''.
CREATE TABLE IF NOT EXISTS durations (
    workflow TEXT NOT NULL, symbol TEXT NOT NULL, dispatch TEXT NOT NULL, ms REAL NOT NULL,
    samples INTEGER NOT NULL, kept_at REAL NOT NULL, PRIMARY KEY (workflow, symbol));
-- What the scheduler was fed, in order (swarm.stimuli), the most recent ones only: each
-- with the events of the journal it caused (`entries` of them from seq `first_seq`),
-- written in the same commit. `session` is the id of its dispatcher's first stimulus.
CREATE TABLE IF NOT EXISTS stimuli (
    id INTEGER PRIMARY KEY, session INTEGER NOT NULL, kind TEXT NOT NULL,
    first_seq INTEGER NOT NULL, entries INTEGER NOT NULL, body BLOB NOT NULL);
"""

TABLES = ("nodes", "runs", "tasks", "attempts", "events", "rollbacks", "run_rollbacks")


_ENCODE = json.JSONEncoder(separators=(",", ":"), default=str).encode  # built once


def _json(value: Any) -> str:
    if value is None:  # most outputs and many events' data: the common cases, for free
        return "null"
    return "{}" if value == {} else _ENCODE(value)


class _Batch:
    """Rows to insert and per-row column updates, merged so each row is written once."""

    def __init__(self, seq: int = 0) -> None:
        self.seq = seq  # the last event seq given out; the next event gets seq + 1
        self.inserts: dict[str, list[tuple[Any, ...]]] = {}
        self.updates: dict[str, dict[Any, dict[str, Any]]] = {}
        self.late: dict[str, list[tuple[Any, ...]]] = {}  # after the merged updates
        self.events: list[tuple[Any, ...]] = []

    def insert(self, sql: str, row: tuple[Any, ...]) -> None:
        self.inserts.setdefault(sql, []).append(row)

    def update(self, table: str, key: Any, **cols: Any) -> None:
        self.updates.setdefault(table, {}).setdefault(key, {}).update(cols)

    def statements(self) -> Iterator[tuple[str, list[tuple[Any, ...]]]]:
        """Each statement with its rows, in the order they must run."""
        yield from self.inserts.items()
        for table, rows_by_key in self.updates.items():
            groups: dict[tuple[str, ...], list[tuple[Any, ...]]] = {}
            for key, cols in rows_by_key.items():
                keys = key if type(key) is tuple else (key,)  # attempts: (task_id, attempt)
                groups.setdefault(tuple(cols), []).append((*cols.values(), *keys))
            for names, rows in groups.items():
                sets = ", ".join(f"{n} = ?" for n in names)
                yield f"UPDATE {table} SET {sets} WHERE {_KEYS[table]}", rows
        yield from self.late.items()
        yield _INSERT_EVENT, self.events


# How an updated row is found, per table (attempts by a pair: see the schema).
_KEYS = {"tasks": "task_id = ?", "attempts": "task_id = ? AND attempt = ?",
         "runs": "run_id = ?", "nodes": "node_id = ?", "run_rollbacks": "run_id = ?"}
_INSERT_EVENT = ("INSERT INTO events (seq, ts, kind, run_id, task_id, symbol, node, attempt,"
                 " data) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)")

_INSERT_STIMULUS = ("INSERT INTO stimuli (id, session, kind, body, first_seq, entries)"
                    " VALUES (?, ?, ?, ?, ?, ?)")
_INSERT_TASK = ("INSERT OR IGNORE INTO tasks (task_id, run_id, symbol, kind, parent, dispatch,"
                " position, state, deps) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)")
_INSERT_ATTEMPT = ("INSERT INTO attempts (token, task_id, run_id, attempt, node, started_at,"
                   f" outcome) VALUES (?, ?, ?, ?, ?, ?, '{AttemptOutcome.RUNNING}')")
# Journal kinds that set a run's or a node's status, and the status they set. (Rows get
# states as plain strings: sqlite binds a str subclass through an adapter lookup.)
_RUN_STATUS = {jn.Kind.RUN_COMPLETED: RunState.COMPLETED.value,
               jn.Kind.RUN_FAILED: RunState.FAILED.value,
               jn.Kind.RUN_ROLLED_BACK: RunState.ROLLED_BACK.value,
               jn.Kind.RUN_CANCELLED: RunState.CANCELLED.value,
               jn.Kind.RUN_ROLLING_BACK: RunState.ROLLING_BACK.value,
               jn.Kind.RUN_PAUSED: RunState.PAUSED.value}
_NODE_GONE = {jn.Kind.NODE_LOST: NodeState.LOST.value, jn.Kind.NODE_LEFT: NodeState.LEFT.value}
# A run's row with its requested rollback phase, if any (see run_rollbacks).
_RUN_ROW = ("SELECT r.*, rb.status AS rollback_status,"
            " rb.requested_at AS rollback_requested_at,"
            " rb.finished_at AS rollback_finished_at FROM runs r"
            " LEFT JOIN run_rollbacks rb ON rb.run_id = r.run_id")


def _apply(b: _Batch, e: Record) -> None:
    """One record's rows (by its type), and its events row."""
    data = e.data
    match e:
        case jn.SymbolQueued():
            if e.reason:  # requeued (a retry, a lost worker): a due time it had is over
                b.update("tasks", e.task_id, state=TaskState.READY.value, due_at=None)
            else:
                b.update("tasks", e.task_id, state=TaskState.READY.value)
        case jn.SymbolStarted():
            cols: dict[str, Any] = {"state": TaskState.RUNNING.value, "attempts": e.attempt,
                                    "node": e.node, "token": e.token, "due_at": None,
                                    "node_id": e.node_id}
            if e.attempt == 1:
                cols["started_at"] = e.ts
            b.update("tasks", e.task_id, **cols)
            b.insert(_INSERT_ATTEMPT, (e.token, e.task_id, e.run_id, e.attempt, e.node, e.ts))
        case jn.AttemptFinished():
            outcome = (AttemptOutcome.OK if e.ok else
                       AttemptOutcome.TIMEOUT if e.timed_out else AttemptOutcome.FAILED).value
            b.update("attempts", (e.task_id, e.attempt), finished_at=e.ts, outcome=outcome,
                     exit_code=e.exit_code, duration_ms=e.duration_ms, result=_json(e.output),
                     error=e.error or None, stderr=e.stderr,
                     truncated=int(e.stdout_truncated or e.stderr_truncated))
            del data["output"]  # the attempts row holds it
        case jn.SymbolCompleted():
            b.update("tasks", e.task_id, state=TaskState.COMPLETED.value, finished_at=e.ts,
                     result=_json(e.output), error=None)
            if e.rollback is not None:
                b.insert("INSERT OR REPLACE INTO rollbacks (run_id, symbol, spec, completed_at)"
                         " VALUES (?, ?, ?, ?)", (e.run_id, e.symbol, _json(e.rollback), e.ts))
        case jn.RunStarted():
            m = e.manifest
            assert m is not None, "a run.started record without its manifest"
            b.insert("INSERT INTO runs (run_id, workflow, version, manifest_hash, manifest,"
                     " on_failure, mode, status, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                     (e.run_id, e.workflow, e.version, e.hash, _json(m), e.on_failure,
                      e.mode, RunState.RUNNING.value, e.ts))
            for i, s in enumerate(m["symbols"]):
                b.insert(_INSERT_TASK, (f"{e.run_id}/{s['name']}", e.run_id, s["name"], "main",
                                        None, s["dispatch"], i, TaskState.PENDING.value, None))
        case jn.RollbackCreated():
            b.insert(_INSERT_TASK, (e.task_id, e.run_id, e.symbol, "rollback", e.parent,
                                    e.spec["dispatch"], -1, TaskState.PENDING.value,
                                    _json(e.after)))
        case jn.SymbolWaiting():  # a ready task's due_at: when its wait_for_worker ends
            b.update("tasks", e.task_id, due_at=e.due)
        case jn.SymbolUnblocked():
            b.update("tasks", e.task_id, due_at=None)
        case jn.RunRollbackRequested():
            b.insert("INSERT OR REPLACE INTO run_rollbacks (run_id, status, requested_at,"
                     " finished_at) VALUES (?, ?, ?, NULL)",
                     (e.run_id, RunState.ROLLING_BACK.value, e.ts))
        case jn.RollbackCompleted():
            b.update("run_rollbacks", e.run_id, status=e.status, finished_at=e.ts)
        case jn.SymbolOrphaned():
            b.update("tasks", e.task_id, state=TaskState.RETRYING.value, due_at=e.due)
        case jn.SymbolAdopted():
            b.update("tasks", e.task_id, state=TaskState.RUNNING.value, node=e.node,
                     node_id=e.node_id)
            # Closed as lost when the dispatcher restored; it was running all along.
            b.update("attempts", (e.task_id, e.attempt), outcome=AttemptOutcome.RUNNING.value,
                     finished_at=None, error=None)
        case jn.AttemptLost():
            b.update("attempts", (e.task_id, e.attempt), finished_at=e.ts,
                     outcome=AttemptOutcome.LOST.value, error=e.reason)
            b.update("tasks", e.task_id, losses=e.losses)
        case jn.SymbolRetrying():
            b.update("tasks", e.task_id, state=TaskState.RETRYING.value, due_at=e.due,
                     error=e.error)
        case jn.SymbolFailed():
            b.update("tasks", e.task_id, state=TaskState.FAILED.value, finished_at=e.ts,
                     error=e.error)
        case jn.SymbolCancelled():
            b.update("tasks", e.task_id, state=TaskState.CANCELLED.value, finished_at=e.ts)
        case jn.SymbolSkipped():
            b.update("tasks", e.task_id, state=TaskState.SKIPPED.value, finished_at=e.ts,
                     error=e.reason)
        case jn.SymbolRolledBack():
            b.update("tasks", e.task_id, state=TaskState.ROLLED_BACK.value)
            b.late.setdefault("UPDATE rollbacks SET rolled_back_at = ? WHERE run_id = ?"
                              " AND symbol = ?", []).append((e.ts, e.run_id, e.symbol))
        case jn.RunEnded():
            b.update("runs", e.run_id, status=_RUN_STATUS[e.KIND], finished_at=e.ts)
        case jn.RunRollingBack() | jn.RunPaused():
            b.update("runs", e.run_id, status=_RUN_STATUS[e.KIND], finished_at=None)
        case jn.RunResumed():
            b.update("runs", e.run_id, status=e.status,
                     finished_at=e.ts if e.status in RUN_FINAL else None)
        case jn.NodeJoined():
            # A node keeps its id across reconnections: its row keeps its first joined_at,
            # and what changed is an update, merged in journal order with its leavings (a
            # node may leave and come back within one group commit).
            b.insert("INSERT OR IGNORE INTO nodes (node_id, name, capabilities, slots, labels,"
                     " status, joined_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                     (e.node_id, e.node, _json(e.capabilities), e.slots, _json(e.labels),
                      NodeState.CONNECTED.value, e.ts))
            b.update("nodes", e.node_id, name=e.node, capabilities=_json(e.capabilities),
                     slots=e.slots, labels=_json(e.labels), status=NodeState.CONNECTED.value,
                     left_at=None, reason=None, seen_at=e.ts)
        case jn.SymbolCheckpointed():
            cols = {"checkpoint": _json(e.checkpoint), "checkpoint_at": e.ts}
            if e.progress is not None:
                cols["progress"] = e.progress
            if e.message is not None:
                cols["message"] = e.message
            b.update("tasks", e.task_id, **cols)
        case jn.SymbolProgress():
            cols = {}
            if e.progress is not None:
                cols["progress"] = e.progress
            if e.message is not None:
                cols["message"] = e.message
            if cols:
                b.update("tasks", e.task_id, **cols)
        case jn.NodeLost() | jn.NodeLeft():
            b.update("nodes", e.node_id, status=_NODE_GONE[e.KIND], left_at=e.ts,
                     reason=e.reason)
    for k in e._BULKY:
        data.pop(k, None)
    b.seq += 1
    b.events.append((b.seq, e.ts, e.kind, e.run_id, e.task_id, e.symbol, e.node, e.attempt,
                     _json(data)))


# Per symbol of the workflow (names as a JSON array), the median duration of its
# successful attempts in the workflow's last 10 runs (two middle values averaged).
_OWN_MEDIANS = """
WITH h AS (
    SELECT t.symbol AS symbol, a.duration_ms AS ms FROM attempts a
    JOIN tasks t ON t.task_id = a.task_id
    WHERE a.run_id IN (SELECT run_id FROM runs WHERE workflow = ?
                       ORDER BY created_at DESC LIMIT 10)
      AND a.outcome = 'ok' AND t.kind = 'main'
      AND t.symbol IN (SELECT value FROM json_each(?))),
r AS (
    SELECT symbol, ms, ROW_NUMBER() OVER (PARTITION BY symbol ORDER BY ms) AS i,
           COUNT(*) OVER (PARTITION BY symbol) AS n FROM h)
SELECT symbol, AVG(ms) AS ms FROM r WHERE i IN ((n + 1) / 2, (n + 2) / 2) GROUP BY symbol
"""


def _estimate(ms: float) -> float:
    """A median as an estimate: two significant digits, at least 1 ms. Finer differences
    are noise, and ordering by noise shuffles a fan-out of equal symbols: the order they
    start in is the order their rows are written, and a shuffled order spreads every
    group commit over the whole run's pages (W1 at 100,000 symbols ran at two thirds of
    its rate once history existed)."""
    if ms <= 1.0:
        return 1.0
    return float(f"{ms:.2g}")


class _Writer:
    """The one connection that writes, on a thread of its own: a group commit is one hop
    to that thread and back, however many statements it holds (aiosqlite would make a hop
    of each statement)."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="swarm-state")
        self._con: sqlite3.Connection | None = None

    async def call(self, fn: Callable[[sqlite3.Connection], Any]) -> Any:
        def run() -> Any:
            assert self._con is not None
            return fn(self._con)

        return await asyncio.get_running_loop().run_in_executor(self._pool, run)

    async def open(self, path: str, synchronous: str) -> None:
        def connect() -> None:
            try:
                con = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            except sqlite3.Error as e:
                raise StateError(f"{path}: cannot open state database: {e}") from None
            try:
                _init(con, path, synchronous)
            except BaseException as e:
                con.close()
                if isinstance(e, sqlite3.DatabaseError):
                    raise StateError(f"{path}: not a usable swarm state database: {e}"
                                     ) from None
                raise
            self._con = con

        await asyncio.get_running_loop().run_in_executor(self._pool, connect)

    async def close(self) -> None:
        if self._con is not None:
            await self.call(lambda con: con.close())
        self._pool.shutdown(wait=True)


def _init(con: sqlite3.Connection, path: str, synchronous: str) -> None:
    # Short: a commit held up by another process's lock is tried again by the dispatcher,
    # which says so after the first wait (swarm.dispatcher._write).
    con.execute("PRAGMA busy_timeout=1000")
    # Only takes effect on a new file (before its first table): prunes give space back.
    con.execute("PRAGMA auto_vacuum=INCREMENTAL")
    # Before anything writes: a newer or foreign file is refused untouched.
    found = maintenance.stored_version(con, path, SCHEMA_VERSION)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute(f"PRAGMA synchronous={synchronous.upper()}")
    version = SCHEMA_VERSION if found is None else found
    if version < SCHEMA_VERSION:
        maintenance.backup_beside(con, path, version)
    con.execute("BEGIN IMMEDIATE")
    try:
        if version < 2:
            _upgrade_to_2(con)
        if version < 3:
            maintenance.upgrade_to_3(con)
        for stmt in _statements(SCHEMA):
            con.execute(stmt)
        _add_progress_columns(con)
        con.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('schema_version', ?)",
                    (str(SCHEMA_VERSION),))
        # The key node secrets are derived from (see Store.node_key): made once per DB, so
        # workers keep their identity across dispatcher restarts.
        con.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('node_key', ?)",
                    (secrets.token_hex(32),))
        # Attempts still `running` were cut off by a crash: close them at the dispatcher's
        # last sign of life, so that busy time in reports is real. One whose worker comes
        # back and adopts it is reopened (symbol.adopted).
        con.execute("UPDATE attempts SET outcome = ?, error = 'the dispatcher stopped',"
                    " finished_at = MAX(started_at, COALESCE((SELECT MAX(ts) FROM events),"
                    " started_at)) WHERE outcome = ?",
                    (AttemptOutcome.LOST.value, AttemptOutcome.RUNNING.value))
        con.execute("COMMIT")
    except BaseException:
        if con.in_transaction:
            con.execute("ROLLBACK")
        raise
    if version < 3:
        maintenance.use_incremental_vacuum(con)


def _add_progress_columns(con: sqlite3.Connection) -> None:
    """Checkpoint and progress columns of tasks, added to a file made before they existed.
    Additive, so no schema version: an older swarm reads the file as it always did."""
    have = {r[1] for r in con.execute("PRAGMA table_info(tasks)")}
    for name, kind in (("checkpoint", "TEXT"), ("checkpoint_at", "REAL"),
                       ("progress", "REAL"), ("message", "TEXT")):
        if name not in have:
            con.execute(f"ALTER TABLE tasks ADD COLUMN {name} {kind}")


def _upgrade_to_2(con: sqlite3.Connection) -> None:
    """Schema 1 -> 2 (inside the caller's transaction): attempts keyed by a row id of their
    own instead of their (then sequential) token; tasks remember their attempt's node id."""
    tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    if "attempts" in tables:
        con.execute("ALTER TABLE attempts RENAME TO attempts_v1")
        con.execute("DROP INDEX IF EXISTS attempts_by_task")
        con.execute("DROP INDEX IF EXISTS attempts_by_run")
    if "nodes" in tables and "seen_at" not in {
            r[1] for r in con.execute("PRAGMA table_info(nodes)")}:
        con.execute("ALTER TABLE nodes ADD COLUMN seen_at REAL")  # its latest join
    if "tasks" in tables and "node_id" not in {
            r[1] for r in con.execute("PRAGMA table_info(tasks)")}:
        con.execute("ALTER TABLE tasks ADD COLUMN node_id TEXT")
    for stmt in _statements(SCHEMA):
        con.execute(stmt)
    if "attempts" in tables:
        con.execute("INSERT INTO attempts (token, task_id, run_id, attempt, node, started_at,"
                    " finished_at, outcome, exit_code, duration_ms, result, error, stderr,"
                    " truncated) SELECT token, task_id, run_id, attempt, node, started_at,"
                    " finished_at, outcome, exit_code, duration_ms, result, error, stderr,"
                    " truncated FROM attempts_v1 ORDER BY token")
        con.execute("DROP TABLE attempts_v1")


def _create_private(path: str) -> bool:
    """Create the DB file 0600 before SQLite does (SQLite would use 0644 minus the umask);
    False if it exists already. SQLite gives its -wal and -shm files the DB file's mode."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        return False
    os.fchmod(fd, 0o600)  # the mode of os.open is masked by the umask: this one is not
    os.close(fd)
    return True


def _check_private(path: str, created: bool) -> None:
    """The DB and its -wal/-shm hold every parameter and output: only their owner may read
    them. Ours are made 0600; an operator's own file is left alone, with a warning."""
    loose: list[str] = []
    for name in (path, path + "-wal", path + "-shm"):
        try:
            mode = os.stat(name).st_mode & 0o777
        except FileNotFoundError:
            continue
        if not mode & 0o077:
            continue
        if created:
            os.chmod(name, 0o600)
        else:
            loose.append(f"{name} (mode {mode:04o})")
    if loose:
        log.warning("state database files accessible to other users: %s. They hold every "
                    "parameter and output of every run: chmod 600 them", ", ".join(loose))


def _commit(con: sqlite3.Connection, batch: _Batch) -> None:
    con.execute("BEGIN IMMEDIATE")
    try:
        for sql, rows in batch.statements():
            con.executemany(sql, rows)
        con.execute("COMMIT")
    except BaseException:
        if con.in_transaction:
            con.execute("ROLLBACK")
        raise


def _lock(path: str) -> int:
    """One dispatcher per state DB: an exclusive flock on `PATH.lock`, held as long as the
    process lives (the kernel drops it with the process, so a `kill -9` leaves no stale
    lock). It names its holder for whoever is refused. Readers take no lock."""
    lock_path = path + ".lock"
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            holder = json.loads(os.pread(fd, 4096, 0) or b"{}")
        except ValueError:
            holder = {}
        os.close(fd)
        since = holder.get("since")
        when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(since)) if isinstance(
            since, (int, float)) else "an unknown time"
        raise StateLocked(
            f"{path}: in use by another dispatcher (host {holder.get('host', '?')}, PID "
            f"{holder.get('pid', '?')}, since {when}); stop it first, or use another --db"
        ) from None
    except BaseException:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                              "since": time.time()}).encode(), 0)
    return fd


def _classify(path: str, e: sqlite3.Error) -> StateError:
    code = getattr(e, "sqlite_errorcode", 0) & 0xFF
    if isinstance(e, sqlite3.OperationalError) and code in RETRYABLE_CODES:
        return StateBusy(f"{path}: {e}", RETRYABLE_CODES[code])
    return StateError(f"{path}: cannot write the state database: {e}")


class Store:
    """The state DB. Open with `await Store.open(path)`; all writes go through `write()`,
    reads through a second, read-only connection (WAL lets both work at once)."""

    def __init__(self, db: aiosqlite.Connection, writer: _Writer | None, path: str,
                 lock: int = -1) -> None:
        self._db = db
        self._writer = writer
        self._lock = lock
        self.path = path
        self.write_seconds = 0.0  # total time spent committing, for metrics
        self.writes = 0
        # The seq of the last event committed. The dispatcher is the DB's only writer, so
        # it numbers the events itself and knows each one's seq when it publishes it.
        self.last_seq = 0
        self.last_stimulus = 0  # the id of the last stimulus stored (swarm.stimuli)
        self._stimuli_trimmed = 0  # every stimulus up to this id is gone
        # workflow -> (when, (symbols, default) asked for, expected ms per symbol)
        self._durations: dict[str, tuple[float, tuple[dict[str, str], float],
                                         dict[str, float]]] = {}

    @classmethod
    async def open(cls, path: str | os.PathLike[str], synchronous: str = "FULL") -> Store:
        """The store a dispatcher writes: it holds the DB's lock until `close()`
        (StateLocked if another dispatcher has it)."""
        p = str(path)
        if p == ":memory:":
            raise StateError("the state database must be a file (readers and the writer "
                             "share it)")
        try:
            Path(p).parent.mkdir(parents=True, exist_ok=True)
            maintenance.check_file(p)
            lock = _lock(p)
        except OSError as e:
            raise StateError(f"{p}: cannot open state database: {e}") from None
        writer = _Writer()
        try:
            created = _create_private(p)
            await writer.open(p, synchronous)
            _check_private(p, created)
            db = await aiosqlite.connect(p, isolation_level=None)
            await db.execute("PRAGMA query_only=ON")
        except BaseException as e:
            await writer.close()
            os.close(lock)
            if isinstance(e, (sqlite3.Error, OSError)):
                raise StateError(f"{p}: cannot open state database: {e}") from None
            raise
        db.row_factory = sqlite3.Row
        store = cls(db, writer, p, lock)
        # Never a seq given before, even to events since pruned (AUTOINCREMENT keeps the
        # highest one in sqlite_sequence).
        rows = await store._rows(
            "SELECT MAX(COALESCE((SELECT seq FROM sqlite_sequence WHERE name = 'events'), 0),"
            " COALESCE((SELECT MAX(seq) FROM events), 0)) AS seq")
        store.last_seq = int(rows[0]["seq"])
        rows = await store._rows("SELECT COALESCE(MIN(id) - 1, 0) AS low, COALESCE(MAX(id), 0)"
                                 " AS high FROM stimuli")
        store._stimuli_trimmed, store.last_stimulus = int(rows[0]["low"]), int(rows[0]["high"])
        return store

    @classmethod
    async def open_readonly(cls, path: str | os.PathLike[str]) -> Store:
        """A store to read from, beside a running dispatcher (no lock, no writes)."""
        p = str(path)
        if not Path(p).is_file():
            raise StateError(f"{p}: no such state database")
        try:
            db = await aiosqlite.connect(f"file:{Path(p).resolve()}?mode=ro", uri=True,
                                         isolation_level=None)
        except sqlite3.Error as e:
            raise StateError(f"{p}: cannot open state database: {e}") from None
        db.row_factory = sqlite3.Row
        return cls(db, None, p)

    @property
    def identity(self) -> tuple[int, int] | None:
        """The DB file's (device, inode) now; None if it is gone."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return st.st_dev, st.st_ino

    async def close(self) -> None:
        await self._db.close()
        if self._writer is not None:
            await self._writer.close()
        if self._lock >= 0:
            os.close(self._lock)  # the lock goes with it
            self._lock = -1

    async def write(self, entries: Sequence[Record], stimuli: Sequence[Stimulus] = ()
                    ) -> range:
        """Commit a batch of journal entries in one transaction (group commit); the seqs of
        their events, one per entry, in order."""
        b = _Batch(self.last_seq)
        for e in entries:
            _apply(b, e)
        if not b.events and not stimuli:
            return range(0)
        if self._writer is None:
            raise StateError(f"{self.path}: opened read-only")
        trim = 0
        if stimuli and stimuli[-1].id - self._stimuli_trimmed >= STIMULI_KEPT + STIMULI_TRIM:
            trim = stimuli[-1].id - STIMULI_KEPT  # the oldest go, a few thousand at a time
        first = self.last_seq + 1

        def commit(con: sqlite3.Connection) -> None:
            if stimuli:  # encoded here, off the event loop
                b.inserts[_INSERT_STIMULUS] = [
                    (s.id, s.session, *encode_stimulus(s), first + s.first, s.entries)
                    for s in stimuli]
                if trim:
                    b.late["DELETE FROM stimuli WHERE id <= ?"] = [(trim,)]
            _commit(con, b)

        t0 = time.perf_counter()
        # Always on the writer's thread: a commit waits for its fsync, and for a lock that
        # another process holds (busy_timeout); the event loop must go on meanwhile.
        try:
            await self._writer.call(commit)
        except sqlite3.Error as e:
            raise _classify(self.path, e) from e
        self.write_seconds += time.perf_counter() - t0
        self.writes += 1
        if trim:
            self._stimuli_trimmed = trim
        if stimuli:
            self.last_stimulus = stimuli[-1].id
        seqs = range(self.last_seq + 1, b.seq + 1)
        self.last_seq = b.seq
        return seqs

    async def reclaim(self) -> None:
        """Try to give back the WAL's space (a checkpoint that truncates it): on a full disk
        the WAL may be what fills it. Best effort; errors are the caller's next retry's."""
        if self._writer is None:
            return
        try:
            await self._writer.call(lambda con: con.execute("PRAGMA wal_checkpoint(TRUNCATE)"))
        except sqlite3.Error as e:
            log.debug("checkpoint to reclaim space failed: %s", e)

    async def prune(self, older_than: float, *, dry_run: bool = False,
                    protected: Collection[str] = (), pruning: set[str] | None = None
                    ) -> maintenance.PruneResult:
        """`maintenance.prune` on a connection of its own, in a thread: the writer commits
        meanwhile, waiting for one short prune transaction at a time."""
        return await asyncio.to_thread(maintenance.prune, self.path, older_than,
                                       dry_run=dry_run, protected=protected, pruning=pruning)

    async def backup(self, dest: str) -> maintenance.BackupResult:
        """`maintenance.backup` in a thread: a reader never blocks the writer."""
        return await asyncio.to_thread(maintenance.backup, self.path, dest)

    # --- reads ------------------------------------------------------------------------

    async def _rows(self, sql: str, params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
        return [dict(r) for r in await self._db.execute_fetchall(sql, params)]

    async def node_key(self) -> bytes:
        """The secret node secrets are derived from, made when the DB was created."""
        rows = await self._rows("SELECT value FROM meta WHERE key = 'node_key'")
        return bytes.fromhex(rows[0]["value"])

    async def counts(self) -> dict[str, int]:
        out = {}
        for t in TABLES:
            rows = await self._rows(f"SELECT COUNT(*) AS n FROM {t}")
            out[t] = int(rows[0]["n"])
        return out

    async def symbol_totals(self) -> dict[str, int]:
        """Symbols (not rollbacks) by state over every run the state DB holds."""
        rows = await self._rows("SELECT state, COUNT(*) AS n FROM tasks WHERE kind = 'main'"
                                " GROUP BY state")
        return {str(r["state"]): int(r["n"]) for r in rows}

    async def run(self, run_id: str) -> dict[str, Any] | None:
        rows = await self._rows(
            "SELECT r.run_id, r.workflow, r.version, r.manifest_hash, r.on_failure, r.mode,"
            " r.status, r.created_at, r.finished_at, rb.status AS rollback_status,"
            " rb.requested_at AS rollback_requested_at,"
            " rb.finished_at AS rollback_finished_at FROM runs r"
            " LEFT JOIN run_rollbacks rb ON rb.run_id = r.run_id WHERE r.run_id = ?",
            (run_id,))
        return rows[0] if rows else None

    async def runs(self, limit: int = 20) -> list[dict[str, Any]]:
        return await self._rows(
            "SELECT r.run_id, r.workflow, r.version, r.status, r.created_at, r.finished_at,"
            " (SELECT COUNT(*) FROM tasks t WHERE t.run_id = r.run_id AND t.kind = 'main')"
            " AS total,"
            " (SELECT COUNT(*) FROM tasks t WHERE t.run_id = r.run_id AND t.kind = 'main'"
            f"  AND t.state IN {_DONE}) AS done,"
            " rb.status AS rollback_status, rb.requested_at AS rollback_requested_at,"
            " rb.finished_at AS rollback_finished_at"
            " FROM runs r LEFT JOIN run_rollbacks rb ON rb.run_id = r.run_id"
            " ORDER BY r.created_at DESC LIMIT ?", (limit,))

    async def tasks(self, run_id: str) -> list[dict[str, Any]]:
        rows = await self._rows(
            "SELECT task_id, symbol, kind, parent, dispatch, state, attempts, losses, node,"
            " started_at, finished_at, result, error, checkpoint_at, progress, message"
            " FROM tasks WHERE run_id = ?"
            " ORDER BY kind, position, rowid", (run_id,))
        for r in rows:
            r["result"] = json.loads(r["result"]) if r["result"] is not None else None
        return rows

    async def unfinished_runs(self) -> list[str]:
        rows = await self._rows(f"SELECT run_id FROM runs WHERE status IN {_ACTIVE}"
                                " OR run_id IN (SELECT run_id FROM run_rollbacks WHERE"
                                " status = ?) ORDER BY created_at",
                                (RunState.ROLLING_BACK.value,))
        return [r["run_id"] for r in rows]

    async def load_run(self, run_id: str) -> tuple[dict[str, Any], list[TaskRecord]] | None:
        """A run's row (with its manifest document) and task records, to rebuild it."""
        rows = await self._rows(_RUN_ROW + " WHERE r.run_id = ?", (run_id,))
        if not rows:
            return None
        run = rows[0]
        run["manifest"] = json.loads(run["manifest"])
        tasks = await self._rows(
            "SELECT symbol, kind, parent, state, attempts, losses, token, due_at, started_at,"
            " deps, result, node_id, checkpoint FROM tasks WHERE run_id = ? ORDER BY rowid",
            (run_id,))
        records = [TaskRecord(
            name=t["symbol"], kind=t["kind"], state=t["state"], attempts=t["attempts"],
            losses=t["losses"], token=t["token"] or 0, due=t["due_at"],
            first_start=t["started_at"], parent=t["parent"],
            after=tuple(json.loads(t["deps"])) if t["deps"] else (),
            node_id=t["node_id"] or "",
            checkpoint=json.loads(t["checkpoint"]) if t["checkpoint"] else None) for t in tasks]
        run["outputs"] = {t["symbol"]: json.loads(t["result"]) if t["result"] else None
                          for t in tasks
                          if t["kind"] == "main" and t["state"] == TaskState.COMPLETED}
        return run, records

    async def active_run_by_hash(self, manifest_hash: str) -> str | None:
        rows = await self._rows("SELECT run_id FROM runs WHERE manifest_hash = ? AND status IN"
                                f" {_ACTIVE} ORDER BY created_at DESC LIMIT 1",
                                (manifest_hash,))
        return rows[0]["run_id"] if rows else None

    async def report_rows(self, run_id: str) -> dict[str, Any] | None:
        """Everything `report.build` needs about one run."""
        runs = await self._rows(_RUN_ROW + " WHERE r.run_id = ?", (run_id,))
        if not runs:
            return None
        run = runs[0]
        run["manifest"] = json.loads(run["manifest"])
        end = run["finished_at"] or time.time()
        return {
            "run": run,
            "tasks": await self.tasks(run_id),
            "attempts": await self._rows(
                "SELECT token, task_id, attempt, node, started_at, finished_at, outcome,"
                " duration_ms, exit_code, error, stderr, result, truncated FROM attempts"
                " WHERE run_id = ? ORDER BY id", (run_id,)),
            "events": await self.events(run_id),
            "nodes": await self._rows(
                "SELECT name, slots, joined_at, left_at FROM nodes WHERE joined_at <= ?"
                " AND (left_at IS NULL OR left_at >= ?)", (end, run["created_at"])),
        }

    async def expected_durations(self, workflow: str, symbols: dict[str, str],
                                 default: float = DEFAULT_DURATION_MS) -> dict[str, float]:
        """Expected ms per symbol (name -> dispatch given): the median of that symbol's past
        successful attempts in runs of this workflow, else of its backend's, else `default`.
        Reused for DURATIONS_TTL: medians of the last 10 runs move slowly, and a deploy
        need not wait for the same query again."""
        now = time.monotonic()
        hit = self._durations.get(workflow)
        if hit is not None and now - hit[0] < DURATIONS_TTL and hit[1] == (symbols, default):
            return dict(hit[2])
        found = await self._expected_durations(workflow, symbols, default)
        self._durations.pop(workflow, None)
        if len(self._durations) >= DURATIONS_KEPT:  # forget the longest unused
            del self._durations[next(iter(self._durations))]
        self._durations[workflow] = (now, (dict(symbols), default), found)
        return dict(found)

    async def _expected_durations(self, workflow: str, symbols: dict[str, str],
                                  default: float) -> dict[str, float]:
        # The last 10 runs of this workflow are history enough. The medians are taken in
        # SQL, one row per symbol asked for: a deploy after a run of 100,000 symbols
        # would otherwise pull every one of its attempts into Python.
        names = json.dumps(list(symbols))
        own = {r["symbol"]: r["ms"] for r in await self._rows(_OWN_MEDIANS, (workflow, names))}
        if len(own) < len(symbols):  # what pruned runs knew (kept in aggregate)
            for r in await self._rows(
                    "SELECT symbol, ms FROM durations WHERE workflow = ? AND symbol IN"
                    " (SELECT value FROM json_each(?))", (workflow, names)):
                own.setdefault(r["symbol"], r["ms"])
        by_backend: dict[str, list[float]] = {}
        missing = sorted({d for name, d in symbols.items() if name not in own})
        if missing:  # only the backends of symbols without a history of their own
            marks = ", ".join("?" * len(missing))
            for r in await self._rows(
                    "SELECT t.dispatch AS dispatch, a.duration_ms AS ms FROM attempts a"
                    " JOIN tasks t ON t.task_id = a.task_id WHERE a.outcome = 'ok'"
                    f" AND t.dispatch IN ({marks}) ORDER BY a.id DESC LIMIT 2000",
                    tuple(missing)):
                by_backend.setdefault(r["dispatch"], []).append(r["ms"])
        backend = {k: statistics.median(v) for k, v in by_backend.items()}
        if missing and len(backend) < len(missing):
            marks = ", ".join("?" * len(missing))
            for r in await self._rows(f"SELECT symbol, ms FROM durations WHERE workflow = ''"
                                      f" AND symbol IN ({marks})", tuple(missing)):
                backend.setdefault(r["symbol"], r["ms"])
        return {name: _estimate(own[name] if name in own else backend.get(dispatch, default))
                for name, dispatch in symbols.items()}

    async def runs_by_status(self) -> dict[str, int]:
        rows = await self._rows("SELECT status, COUNT(*) AS n FROM runs GROUP BY status")
        return {r["status"]: int(r["n"]) for r in rows}

    async def events(self, run_id: str, since: int = 0) -> list[dict[str, Any]]:
        """A run's journal in order; only the events after seq `since` if given."""
        rows = await self._rows(
            "SELECT seq, ts, kind, run_id, task_id, symbol, node, attempt, data FROM events"
            " WHERE run_id = ? AND seq > ? ORDER BY seq", (run_id, since))
        for r in rows:
            r["data"] = json.loads(r["data"])
        return rows


def _statements(script: str) -> list[str]:
    """Split the schema into statements (triggers contain semicolons of their own)."""
    out, buf = [], []
    for line in script.strip().splitlines():
        buf.append(line)
        text = "\n".join(buf).strip()
        if text.endswith(";") and (not text.upper().startswith("CREATE TRIGGER")
                                   or text.upper().endswith("END;")):
            out.append(text)
            buf = []
    return out
