"""`swarm debug replay DB [RUN]`: rebuild the scheduler from the stimuli kept in a state DB
and check that it journals what the journal says, entry by entry.

Each session (one dispatcher's life, see `swarm.stimuli`) whose first stimulus is still
kept is replayed from an empty scheduler: every stimulus is handed to `Scheduler.handle`
with the attempt tokens it drew then, and the journal entries it gives must equal the
events it caused in the DB (kind, time, run, task, symbol, node, attempt, data as
stored). The first difference is reported with its stimulus; with RUN, only that run's
entries are compared. Read-only: a dispatcher may be running on the DB.
"""

from __future__ import annotations

import json
import sqlite3
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .core import Journal, Scheduler, SchedulerConfig
from .errors import InputError
from .manifest import workflow_from_dict
from .model import Workflow
from .stimuli import Forgotten, SessionStarted, decode, scheduler_kwargs
from .tasks import Refused

_FIELDS = ("kind", "ts", "run_id", "task_id", "symbol", "node", "attempt", "data")


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a replay found: sessions replayed and skipped, stimuli and entries checked,
    and the first divergence (None if everything matched)."""

    sessions: int
    skipped: int  # sessions whose start is no longer kept
    stimuli: int
    entries: int
    divergence: str | None = None


class _Diverged(Exception):
    pass


class _Tokens:
    """The token source of a replayed scheduler: the tokens the stimulus drew, in order."""

    def __init__(self) -> None:
        self.left: deque[int] = deque()

    def __call__(self) -> int:
        if not self.left:
            raise _Diverged("the scheduler drew more attempt tokens than it did then")
        return self.left.popleft()


def _row(e: Journal) -> dict[str, Any]:
    """A journal entry as the journal stores it (bulky fields and outputs elsewhere)."""
    data = e.lean_data("output") if e.kind == "attempt.finished" else e.lean_data()
    return {"kind": e.kind, "ts": e.ts, "run_id": e.run_id, "task_id": e.task_id,
            "symbol": e.symbol, "node": e.node, "attempt": e.attempt,
            "data": json.loads(json.dumps(data, default=str))}


def _differs(want: dict[str, Any], got: dict[str, Any]) -> str | None:
    for f in _FIELDS:
        if want[f] != got[f]:
            return f"{f}: the journal has {want[f]!r}, the replay {got[f]!r}"
    return None


def _show(r: dict[str, Any]) -> str:
    where = " ".join(str(r[k]) for k in ("run_id", "symbol", "node") if r[k] is not None)
    return f"{r['kind']} {where}".strip()


class _Replay:
    def __init__(self, con: sqlite3.Connection, run_id: str | None) -> None:
        self.con = con
        self.run_id = run_id
        self.workflows: dict[str, Workflow] = {}
        self.stimuli = self.entries = 0

    def workflow(self, run_id: str) -> Workflow:
        if run_id not in self.workflows:
            row = self.con.execute("SELECT manifest FROM runs WHERE run_id = ?",
                                   (run_id,)).fetchone()
            if row is None:
                raise _Diverged(f"run {run_id}'s manifest is no longer in the DB (pruned): "
                                "what follows cannot be replayed")
            self.workflows[run_id] = workflow_from_dict(json.loads(row[0]),
                                                        source=f"<run {run_id}>")
        return self.workflows[run_id]

    def journal(self, first: int, count: int) -> list[dict[str, Any]]:
        rows = self.con.execute(
            "SELECT kind, ts, run_id, task_id, symbol, node, attempt, data FROM events"
            " WHERE seq >= ? AND seq < ? ORDER BY seq", (first, first + count)).fetchall()
        return [{**dict(zip(_FIELDS, r, strict=True)), "data": json.loads(r[7])} for r in rows]

    def session(self, rows: list[tuple[Any, ...]]) -> None:
        tokens = _Tokens()
        core: Scheduler | None = None
        lazy = _Lazy(self)
        for sid, kind, body, first_seq, count in rows:
            try:
                event, drawn = decode(sid, kind, body, lazy)
            except _Diverged as e:
                raise _Diverged(f"stimulus {sid} ({kind}): {e}") from None
            self.stimuli += 1
            if isinstance(event, SessionStarted):
                core = Scheduler(SchedulerConfig(**scheduler_kwargs(event.config),
                                                 token_source=tokens))
                continue
            assert core is not None
            if isinstance(event, Forgotten):
                core.forget_finished()
                continue
            tokens.left = deque(drawn)
            try:
                out = [_row(c) for c in core.handle(event) if isinstance(c, Journal)]
            except Refused:
                out = []
            except _Diverged as e:
                raise _Diverged(f"stimulus {sid} ({kind}): {e}") from None
            if tokens.left:
                raise _Diverged(f"stimulus {sid} ({kind}): the scheduler drew "
                                f"{len(drawn) - len(tokens.left)} attempt tokens, not "
                                f"{len(drawn)} as it did then")
            self.check(sid, kind, self.journal(first_seq, count), out, count)

    def check(self, sid: int, kind: str, want: list[dict[str, Any]], got: list[dict[str, Any]],
              count: int) -> None:
        if len(want) != count:
            raise _Diverged(f"stimulus {sid} ({kind}): {count - len(want)} of its {count} "
                            "journal entries are no longer in the DB (pruned)")
        if self.run_id is not None:
            want = [r for r in want if r["run_id"] == self.run_id]
            got = [r for r in got if r["run_id"] == self.run_id]
        for i, (w, g) in enumerate(zip(want, got, strict=False)):
            why = _differs(w, g)
            if why is not None:
                raise _Diverged(f"stimulus {sid} ({kind}), its entry {i + 1} ({_show(w)}): "
                                f"{why}")
        if len(want) != len(got):
            extra = got[len(want)] if len(got) > len(want) else want[len(got)]
            raise _Diverged(f"stimulus {sid} ({kind}): the journal has {len(want)} entries, "
                            f"the replay {len(got)} (first unmatched: {_show(extra)})")
        self.entries += len(want)


class _Lazy(dict[str, Workflow]):
    """Workflows by run id, read from the DB when a stimulus needs one."""

    def __init__(self, replay: _Replay) -> None:
        super().__init__()
        self.replay = replay

    def __missing__(self, run_id: str) -> Workflow:
        return self.replay.workflow(run_id)


def _sessions(con: sqlite3.Connection) -> Iterator[tuple[int, list[tuple[Any, ...]]]]:
    rows: list[tuple[Any, ...]] = []
    session = None
    for s, *row in con.execute("SELECT session, id, kind, body, first_seq, entries FROM"
                               " stimuli ORDER BY id"):
        if s != session and rows:
            assert session is not None
            yield session, rows
            rows = []
        session = s
        rows.append(tuple(row))
    if rows:
        assert session is not None
        yield session, rows


def replay(path: str, run_id: str | None = None) -> Outcome:
    """Replay every session of the DB whose start is kept (see the module docstring)."""
    if not Path(path).is_file():
        raise InputError(f"{path}: no such state database")
    con = sqlite3.connect(f"file:{Path(path).resolve()}?mode=ro", uri=True)
    try:
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master")}
        if "stimuli" not in tables:
            raise InputError(f"{path}: keeps no stimuli (written before schema 4); start a "
                             "dispatcher on it once, then replay what it does")
        if run_id is not None and con.execute("SELECT 1 FROM runs WHERE run_id = ?",
                                              (run_id,)).fetchone() is None:
            raise InputError(f"{path}: no run {run_id!r}")
        r = _Replay(con, run_id)
        sessions = skipped = 0
        for session, rows in _sessions(con):
            if rows[0][0] != session:  # its start went with the oldest stimuli
                skipped += 1
                continue
            sessions += 1
            try:
                r.session(rows)
            except _Diverged as e:
                return Outcome(sessions, skipped, r.stimuli, r.entries,
                               f"session {session}: {e}")
        return Outcome(sessions, skipped, r.stimuli, r.entries)
    finally:
        con.close()
