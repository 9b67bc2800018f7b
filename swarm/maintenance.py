"""Keeping a state DB for months: schema upgrades (with a backup beside the file first),
retention (pruning finished runs and giving the space back), and online backups.

Everything here works on a `sqlite3.Connection` of its own or on the writer's during
start-up, never on the dispatcher's event loop: a prune or a backup of a large DB takes
seconds, and the dispatcher must keep serving meanwhile. In WAL mode a reader (a backup)
never blocks the writer, and a prune writes in short transactions that the dispatcher's
group commits wait for (busy_timeout), one at a time.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sqlite3
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any

from .errors import InputError, StateError
from .tasks import RUN_FINAL, RunState

log = logging.getLogger("swarm.maintenance")

FINAL_RUN_STATES = tuple(s.value for s in RunState if s in RUN_FINAL)
# Tables whose rows belong to one run (each has a `run_id` column), deleted with it. A
# table added for runs (checkpoints) is one more name here.
RUN_TABLES = ("attempts", "events", "rollbacks", "run_rollbacks", "tasks")
PRUNE_CHUNK_ROWS = 20_000  # rows per prune transaction: group commits wait for no longer
VACUUM_STEP_PAGES = 2_000  # pages returned to the file system per transaction (8 MB)
BUSY_TIMEOUT_MS = 10_000
SQLITE_MAGIC = b"SQLite format 3\x00"
PRUNABLE_SCHEMA = 3  # the first schema whose journal lets finished runs go

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)")


def parse_duration(text: str, what: str = "duration") -> float:
    """Seconds from `30d`, `12h`, `90m`, `45s`, `500ms`, `1w`, or sums like `1d12h`.
    InputError naming `what` and the text otherwise (zero and negatives included)."""
    s = text.strip().lower()
    pos, total = 0, 0.0
    for m in _DURATION.finditer(s):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
    if not s or pos != len(s) or total <= 0:
        raise InputError(f"{what}: not a duration: {text!r} (use e.g. 30d, 12h, 90m, 45s)")
    return total


def _files(path: str) -> list[str]:
    return [path, path + "-wal", path + "-shm"]


def file_bytes(path: str) -> int:
    """The DB file and its WAL: what the state takes on disk."""
    total = 0
    for name in _files(path)[:2]:
        with contextlib.suppress(FileNotFoundError):
            total += os.stat(name).st_size
    return total


def create_private(path: str) -> None:
    """An empty file only its owner may read (backups hold every parameter and output);
    InputError if it exists already: a backup never overwrites anything."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        raise InputError(f"{path}: exists already; a backup never overwrites a file") from None
    except OSError as e:
        raise InputError(f"{path}: cannot create: {e.strerror or e}") from None
    os.fchmod(fd, 0o600)  # os.open's mode is masked by the umask; this is not
    os.close(fd)


# --- schema versions ------------------------------------------------------------------


def check_file(path: str) -> None:
    """Refuse, before SQLite touches it, a file that is not an SQLite database at all."""
    try:
        with open(path, "rb") as f:
            head = f.read(len(SQLITE_MAGIC))
    except FileNotFoundError:
        return
    except OSError as e:
        raise StateError(f"{path}: cannot read the state database: {e.strerror or e}"
                         ) from None
    if head and head != SQLITE_MAGIC:
        raise StateError(f"{path}: not a swarm state database (not an SQLite file at all); "
                         "point state_db_path / --db at the dispatcher's database")


def stored_version(con: sqlite3.Connection, path: str, current: int) -> int | None:
    """The schema version the DB says it has; None for a new, empty DB. StateError for
    a DB of a newer swarm, or an SQLite file that is not a swarm state DB."""
    tables = {r[0] for r in con.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'")}
    if not tables:
        return None
    row = None
    if "meta" in tables:
        row = con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    if row is None or not str(row[0]).isdigit():
        shown = ", ".join(sorted(tables)[:6]) + (", ..." if len(tables) > 6 else "")
        raise StateError(f"{path}: an SQLite database, but not a swarm state database (it "
                         f"has no schema version; its tables: {shown}); swarm does not "
                         "change it. Point state_db_path / --db at another file")
    version = int(row[0])
    if version > current:
        raise StateError(f"{path}: schema version {version} was written by a newer swarm; "
                         f"this one understands up to {current}. Upgrade swarm, or start "
                         "on the backup made before that upgrade (*.schema*.bak beside it)")
    return version


def backup_beside(con: sqlite3.Connection, path: str, version: int) -> str:
    """A copy of the DB next to it before an upgrade changes it (0600, never overwritten):
    `state.db.schema2-20260101-120000.bak`. An upgrade that goes wrong, or a swarm
    rolled back to the previous release, starts again from that copy."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    dest = f"{path}.schema{version}-{stamp}.bak"
    n = 1
    while os.path.exists(dest):
        n += 1
        dest = f"{path}.schema{version}-{stamp}.{n}.bak"
    create_private(dest)
    target = sqlite3.connect(dest)
    try:
        con.backup(target)
    finally:
        target.close()
    log.warning("upgrading the state database %s from schema %d; a copy of it as it was is "
                "in %s", path, version, dest)
    return dest


def upgrade_to_3(con: sqlite3.Connection) -> None:
    """Schema 2 -> 3 (inside the caller's transaction, before the schema is created):
    the journal may lose the events of a finished run (pruning) but nothing else; the
    durations of pruned runs are kept in aggregate (the `durations` table)."""
    con.execute("DROP TRIGGER IF EXISTS events_no_delete")


def use_incremental_vacuum(con: sqlite3.Connection) -> None:
    """Let a prune give space back to the file system (PRAGMA incremental_vacuum). A DB
    made before schema 3 switches once, by a VACUUM: a rewrite of the whole file, that
    needs as much free disk again. Outside any transaction."""
    if con.execute("PRAGMA auto_vacuum").fetchone()[0] == 2:
        return
    t0 = time.monotonic()
    con.execute("PRAGMA auto_vacuum=INCREMENTAL")
    con.execute("VACUUM")
    log.warning("state database rewritten once for incremental vacuum in %.1f s",
                time.monotonic() - t0)


# --- pruning --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PruneResult:
    """What a prune removed (or would remove, `dry_run`), and the space it gave back."""

    older_than: float  # seconds
    cutoff: float  # runs that finished before this time (epoch seconds) were removed
    dry_run: bool
    runs: int
    rows: dict[str, int] = field(default_factory=dict)  # per table, the runs row included
    bytes_before: int = 0
    bytes_after: int = 0
    seconds: float = 0.0

    @property
    def freed_bytes(self) -> int:
        return max(0, self.bytes_before - self.bytes_after)

    def to_dict(self) -> dict[str, Any]:
        return {"older_than": self.older_than, "cutoff": self.cutoff, "dry_run": self.dry_run,
                "runs": self.runs, "rows": dict(self.rows),
                "rows_total": sum(self.rows.values()), "bytes_before": self.bytes_before,
                "bytes_after": self.bytes_after, "freed_bytes": self.freed_bytes,
                "seconds": self.seconds}


def connect(path: str) -> sqlite3.Connection:
    """A connection of its own to an existing state DB, for maintenance."""
    if not os.path.isfile(path):
        raise InputError(f"{path}: no such state database")
    check_file(path)
    con = sqlite3.connect(path, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000)
    con.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    return con


_FINAL = ", ".join(f"'{s}'" for s in FINAL_RUN_STATES)

# Per symbol of one workflow, the median of its successful attempts' durations in the
# workflow's last 10 runs: what Store.expected_durations would answer right now.
_KEEP_OWN = """
WITH last AS (SELECT run_id FROM runs WHERE workflow = :wf ORDER BY created_at DESC LIMIT 10),
h AS (SELECT t.symbol AS symbol, t.dispatch AS dispatch, a.duration_ms AS ms FROM attempts a
      JOIN tasks t ON t.task_id = a.task_id
      WHERE a.run_id IN last AND a.outcome = 'ok' AND t.kind = 'main'),
r AS (SELECT symbol, dispatch, ms, ROW_NUMBER() OVER (PARTITION BY symbol ORDER BY ms) AS i,
             COUNT(*) OVER (PARTITION BY symbol) AS n FROM h)
INSERT OR REPLACE INTO durations (workflow, symbol, dispatch, ms, samples, kept_at)
SELECT :wf, symbol, MAX(dispatch), AVG(ms), MAX(n), :now FROM r
WHERE i IN ((n + 1) / 2, (n + 2) / 2) GROUP BY symbol
"""
# Per backend, the median of its last 2000 successful attempts (the scheduler's fallback
# for a symbol without history), kept under the workflow name ''.
_KEEP_BACKEND = """
WITH h AS (SELECT a.duration_ms AS ms FROM attempts a JOIN tasks t ON t.task_id = a.task_id
           WHERE a.outcome = 'ok' AND t.dispatch = :d ORDER BY a.id DESC LIMIT 2000),
r AS (SELECT ms, ROW_NUMBER() OVER (ORDER BY ms) AS i, COUNT(*) OVER () AS n FROM h)
INSERT OR REPLACE INTO durations (workflow, symbol, dispatch, ms, samples, kept_at)
SELECT '', :d, :d, AVG(ms), MAX(n), :now FROM r WHERE i IN ((n + 1) / 2, (n + 2) / 2)
HAVING COUNT(*) > 0
"""


def _candidates(con: sqlite3.Connection, cutoff: float, protected: Collection[str]
                ) -> list[tuple[str, int]]:
    """Finished runs older than the cutoff, oldest first, each with its task count (a
    measure of its rows)."""
    rows = con.execute(
        f"SELECT r.run_id, (SELECT COUNT(*) FROM tasks t WHERE t.run_id = r.run_id)"
        f" FROM runs r WHERE r.status IN ({_FINAL}) AND r.finished_at IS NOT NULL"
        f" AND r.finished_at < ? ORDER BY r.finished_at", (cutoff,)).fetchall()
    return [(rid, n) for rid, n in rows if rid not in protected]


def _count(con: sqlite3.Connection, run_ids: list[str]) -> dict[str, int]:
    marks = ", ".join("?" * len(run_ids))
    out = {t: con.execute(f"SELECT COUNT(*) FROM {t} WHERE run_id IN ({marks})",
                          run_ids).fetchone()[0] for t in RUN_TABLES}
    out["runs"] = len(run_ids)
    return out


def _delete_chunk(con: sqlite3.Connection, run_ids: list[str], cutoff: float, now: float
                  ) -> dict[str, int]:
    """Remove these runs whole, in one transaction, if they are still finished."""
    con.execute("BEGIN IMMEDIATE")
    try:
        marks = ", ".join("?" * len(run_ids))
        # Read again under the write lock: a run may have been asked to roll back since.
        ids = [r[0] for r in con.execute(
            f"SELECT run_id FROM runs WHERE run_id IN ({marks}) AND status IN ({_FINAL})"
            " AND finished_at < ?", (*run_ids, cutoff))]
        if not ids:
            con.execute("COMMIT")
            return {}
        marks = ", ".join("?" * len(ids))
        for (wf,) in con.execute(f"SELECT DISTINCT workflow FROM runs WHERE run_id IN ({marks})",
                                 ids).fetchall():
            recent = con.execute(
                f"SELECT COUNT(*) FROM (SELECT run_id FROM runs WHERE workflow = ? ORDER BY"
                f" created_at DESC LIMIT 10) WHERE run_id IN ({marks})", (wf, *ids)).fetchone()[0]
            if recent:  # the history the scheduler orders by loses runs: keep its medians
                con.execute(_KEEP_OWN, {"wf": wf, "now": now})
        for (d,) in con.execute(f"SELECT DISTINCT dispatch FROM tasks WHERE run_id IN ({marks})",
                                ids).fetchall():
            con.execute(_KEEP_BACKEND, {"d": d, "now": now})
        removed = {}
        for t in RUN_TABLES:  # before `runs`: the events trigger checks the run's status
            removed[t] = con.execute(f"DELETE FROM {t} WHERE run_id IN ({marks})", ids).rowcount
        removed["runs"] = con.execute(f"DELETE FROM runs WHERE run_id IN ({marks})",
                                      ids).rowcount
        con.execute("COMMIT")
        return removed
    except BaseException:
        if con.in_transaction:
            con.execute("ROLLBACK")
        raise


def give_back_space(con: sqlite3.Connection) -> None:
    """Free pages back to the file system, a few MB per transaction, then the WAL."""
    if con.execute("PRAGMA auto_vacuum").fetchone()[0] == 2:
        while con.execute("PRAGMA freelist_count").fetchone()[0] > 0:
            con.execute(f"PRAGMA incremental_vacuum({VACUUM_STEP_PAGES})").fetchall()
    # Writes the WAL into the DB and empties it; a reader in the middle of a query may
    # keep part of it until the next checkpoint: that is fine, only less is measured.
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()


def prune(path: str, older_than: float, *, dry_run: bool = False, now: float | None = None,
          protected: Collection[str] = (), pruning: set[str] | None = None,
          con: sqlite3.Connection | None = None) -> PruneResult:
    """Remove the runs that finished more than `older_than` seconds ago, whole (their rows
    in RUN_TABLES and `runs`), then give the space back. Active runs are never touched,
    nor the runs in `protected` (those the dispatcher holds in memory). The ids of a
    chunk are in `pruning` while it is deleted, so that the dispatcher does not load them."""
    t0 = time.monotonic()
    now = time.time() if now is None else now
    cutoff = now - older_than
    own = con is None
    con = connect(path) if con is None else con
    try:
        from .state import SCHEMA_VERSION  # state imports this module

        version = stored_version(con, path, SCHEMA_VERSION)
        if version is not None and version < PRUNABLE_SCHEMA:
            raise StateError(f"{path}: schema version {version} cannot be pruned; open it "
                             "once with this swarm (a dispatcher, or `swarm prune --db`) to "
                             "upgrade it")
        before = file_bytes(path)
        candidates = _candidates(con, cutoff, protected)
        if dry_run:
            ids = [rid for rid, _ in candidates]
            rows = _count(con, ids) if ids else {}
            return PruneResult(older_than, cutoff, True, len(ids), rows, before, before,
                               time.monotonic() - t0)
        totals: dict[str, int] = {}
        chunk: list[str] = []
        weight = 0
        for i, (rid, n) in enumerate(candidates):
            chunk.append(rid)
            weight += n * 4 + 1  # a task has about one attempt and two events
            if weight < PRUNE_CHUNK_ROWS and i < len(candidates) - 1:
                continue
            if pruning is not None:
                pruning.update(chunk)
            try:
                for t, k in _delete_chunk(con, chunk, cutoff, now).items():
                    totals[t] = totals.get(t, 0) + k
            finally:
                if pruning is not None:
                    pruning.difference_update(chunk)
            chunk, weight = [], 0
        if totals:
            give_back_space(con)
        runs = totals.get("runs", 0)
        return PruneResult(older_than, cutoff, False, runs, totals, before, file_bytes(path),
                           time.monotonic() - t0)
    finally:
        if own:
            con.close()


# --- backups --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BackupResult:
    path: str
    bytes: int
    integrity: str
    schema_version: int
    runs: int
    active_runs: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "bytes": self.bytes, "integrity": self.integrity,
                "schema_version": self.schema_version, "runs": self.runs,
                "active_runs": self.active_runs, "seconds": self.seconds}


def backup(path: str, dest: str) -> BackupResult:
    """A consistent copy of the state DB at `dest` (0600; never over an existing file),
    taken while the dispatcher writes: `VACUUM INTO` reads one snapshot (WAL readers do
    not block the writer) and writes it compact. Then checked with integrity_check."""
    t0 = time.monotonic()
    dest = os.path.abspath(dest)
    if not os.path.isdir(os.path.dirname(dest)):
        raise InputError(f"{dest}: its folder does not exist")
    con = connect(path)
    try:
        create_private(dest)
        try:
            con.execute("VACUUM INTO ?", (dest,))
        except sqlite3.Error as e:
            os.unlink(dest)
            raise StateError(f"{dest}: the backup failed: {e}") from None
    finally:
        con.close()
    fd = os.open(dest, os.O_RDONLY)
    try:
        os.fsync(fd)  # a backup is for the day the disk under the DB dies
    finally:
        os.close(fd)
    return check_backup(dest, time.monotonic() - t0)


def check_backup(dest: str, seconds: float = 0.0) -> BackupResult:
    """What a backup holds, after PRAGMA integrity_check; StateError if it is damaged."""
    chk = sqlite3.connect(f"file:{dest}?mode=ro", uri=True)
    try:
        problems = [r[0] for r in chk.execute("PRAGMA integrity_check").fetchall()]
        if problems != ["ok"]:
            raise StateError(f"{dest}: the copy is damaged: {'; '.join(problems[:5])}")
        version = int(chk.execute("SELECT value FROM meta WHERE key = 'schema_version'"
                                  ).fetchone()[0])
        runs, active = chk.execute(
            f"SELECT COUNT(*), COALESCE(SUM(status NOT IN ({_FINAL})), 0) FROM runs").fetchone()
    finally:
        chk.close()
    return BackupResult(dest, os.stat(dest).st_size, "ok", version, runs, active, seconds)


# --- retention ------------------------------------------------------------------------


def retention_period(retention: float) -> float:
    """How often automatic retention runs: a tenth of the retention, 1 minute to 1 hour."""
    return min(3600.0, max(60.0, retention / 10))


async def retention_loop(retention: float, run_prune: Callable[[], Any]) -> None:
    """Prune now and then every `retention_period`, for as long as the dispatcher runs.
    A failed prune is logged and tried again next time: retention never stops serving."""
    import asyncio

    while True:
        try:
            result = await run_prune()
            if result.runs:
                log.info("retention: removed %d runs (%d rows) finished before %s; %d bytes "
                         "given back", result.runs, sum(result.rows.values()),
                         time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(result.cutoff)),
                         result.freed_bytes)
        except Exception as e:  # the next round tries again
            log.warning("retention: prune failed: %s", e)
        await asyncio.sleep(retention_period(retention))


__all__ = ["BackupResult", "PruneResult", "backup", "parse_duration", "prune",
           "retention_loop"]
