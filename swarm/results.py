"""What a client gets back about runs: the result of a finished run, live progress
updates, and the tracker that turns a run's events into progress (shared by
`Client.watch` and the CLI's live display)."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, SupportsIndex, overload

from . import journal as jn
from .journal import FINAL_RUN_EVENTS
from .protocol import Event
from .tasks import RUN_FINAL, TERMINAL, RunState, TaskState

FINAL_RUN_STATES = RUN_FINAL
# What ends following a run: its end, or the end of a rollback requested after it ended.
END_EVENTS = FINAL_RUN_EVENTS | {jn.Kind.ROLLBACK_COMPLETED}


@dataclass(frozen=True, slots=True)
class SymbolOutcome:
    symbol: str
    kind: str  # main | rollback
    state: str
    node: str | None
    attempts: int
    duration: float | None  # seconds from its first start to its end
    output: Any
    error: str | None
    parent: str | None = None  # for a rollback: the symbol it undid


class SymbolOutcomes(tuple[SymbolOutcome, ...]):
    """A run's symbol outcomes in order (rollbacks after their symbols); also a lookup by
    name: `result.symbols["greet"]` is the outcome of symbol `greet` (not its rollback)."""

    __slots__ = ()

    @overload
    def __getitem__(self, key: SupportsIndex) -> SymbolOutcome: ...
    @overload
    def __getitem__(self, key: slice) -> tuple[SymbolOutcome, ...]: ...
    @overload
    def __getitem__(self, key: str) -> SymbolOutcome: ...

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, str):
            for s in self:
                if s.symbol == key and s.kind == "main":
                    return s
            raise KeyError(key)
        return super().__getitem__(key)

    def __contains__(self, key: object) -> bool:
        if isinstance(key, str):
            return any(s.symbol == key and s.kind == "main" for s in self)
        return super().__contains__(key)

    def get(self, name: str, default: SymbolOutcome | None = None) -> SymbolOutcome | None:
        for s in self:
            if s.symbol == name and s.kind == "main":
                return s
        return default

    def names(self) -> list[str]:
        return [s.symbol for s in self if s.kind == "main"]


@dataclass(frozen=True, slots=True)
class RunResult:
    """A run's record: its status and every symbol's outcome."""

    run_id: str
    workflow: str
    version: str
    status: str
    started_at: float
    finished_at: float | None
    symbols: SymbolOutcomes
    # A rollback requested after the run ended (`swarm rollback`) is a phase of its own:
    # `status` and `finished_at` stay the run's outcome. None: no such rollback.
    rollback_status: str | None = None  # rolling_back | rolled_back | failed
    rollback_finished_at: float | None = None

    @property
    def ok(self) -> bool:
        return self.status == RunState.COMPLETED

    @property
    def id(self) -> str:
        return self.run_id

    @property
    def duration(self) -> float | None:
        """Seconds from the run's start to its end; None while it runs."""
        return None if self.finished_at is None else self.finished_at - self.started_at

    @property
    def total_tasks(self) -> int:
        """Symbols of the run (rollbacks not counted), as the original's result counts."""
        return sum(1 for s in self.symbols if s.kind == "main")

    @property
    def completed_tasks(self) -> int:
        return sum(1 for s in self.symbols
                   if s.kind == "main" and s.state == TaskState.COMPLETED)

    @property
    def done(self) -> bool:
        return self.status in FINAL_RUN_STATES

    def symbol(self, name: str) -> SymbolOutcome:
        for s in self.symbols:
            if s.symbol == name and s.kind == "main":
                return s
        raise KeyError(name)

    @classmethod
    def from_record(cls, rec: dict[str, Any]) -> RunResult:
        return cls(
            run_id=rec["run_id"], workflow=rec["workflow"], version=rec["version"],
            status=rec["status"], started_at=rec["created_at"], finished_at=rec["finished_at"],
            rollback_status=rec.get("rollback_status"),
            rollback_finished_at=rec.get("rollback_finished_at"),
            symbols=SymbolOutcomes(SymbolOutcome(
                symbol=t["symbol"], kind=t["kind"], state=t["state"], node=t["node"],
                attempts=t["attempts"],
                duration=(t["finished_at"] - t["started_at"]
                          if t["finished_at"] and t["started_at"] else None),
                output=t["result"], error=t["error"], parent=t["parent"])
                for t in rec["tasks"]))


@dataclass(frozen=True, slots=True)
class RunUpdate:
    """One step of a run as it happens (what `Client.watch` yields)."""

    run_id: str
    status: str
    completed: int  # main symbols that reached an end state
    total: int
    eta: float | None  # seconds, from the rate so far
    running: tuple[str, ...]  # symbols running now
    recent: tuple[Event, ...]  # the latest events, newest last
    event: Event | None  # the event behind this update
    # Symbols that no connected worker can run, each with the reason (symbol.waiting).
    waiting: tuple[tuple[str, str], ...] = ()
    # Running symbols that reported progress: (symbol, fraction or None, message).
    progress: tuple[tuple[str, float | None, str], ...] = ()

    @property
    def percentage(self) -> float:
        return 100.0 * self.completed / self.total if self.total else 100.0

    @property
    def done(self) -> bool:
        return self.status in FINAL_RUN_STATES


def ended_tasks(tasks: Iterable[dict[str, Any]]) -> list[str]:
    """The ids of the task records (as `Client.run` returns them) that ended."""
    return [t["task_id"] for t in tasks if t["state"] in TERMINAL]


class ProgressTracker:
    """Counts a run's progress from its events: what ended, what runs, at what rate."""

    def __init__(self, run_id: str, total: int, ended: Iterable[str] = (),
                 status: str = RunState.RUNNING, keep: int = 20) -> None:
        self.run_id = run_id
        self.total = total
        # Task ids that ended: an event the snapshot already counted is not counted again.
        self._ended = set(ended)
        self.completed = len(self._ended)
        self.failed = 0
        self.status = status
        self.running: dict[str, tuple[str, str, float]] = {}  # task id -> (symbol, node, since)
        self.waiting: dict[str, tuple[str, str]] = {}  # task id -> (symbol, reason)
        # task id -> (fraction or None, message): what running symbols last reported
        self.said: dict[str, tuple[float | None, str]] = {}
        self.recent: deque[Event] = deque(maxlen=keep)
        self._t0 = time.monotonic()
        self._done0 = self.completed

    def on_event(self, ev: Event) -> bool:
        """Take one event; False if it is not about this run."""
        if ev.run_id != self.run_id:
            return False
        self.recent.append(ev)
        tid = ev.task_id or ""
        match jn.from_event(ev):
            case jn.SymbolWaiting(reason=reason):
                self.waiting[tid] = (ev.symbol or "", "" if reason is None else str(reason))
            case jn.SymbolUnblocked():
                self.waiting.pop(tid, None)
            case jn.SymbolProgress(progress=fraction, message=message) | jn.SymbolCheckpointed(
                    progress=fraction, message=message):
                if tid in self.running:
                    old = self.said.get(tid, (None, ""))
                    self.said[tid] = (fraction if isinstance(fraction, (int, float)) else old[0],
                                      str(message or old[1]))
            case jn.SymbolStarted() | jn.SymbolAdopted():
                self.waiting.pop(tid, None)
                self.running[tid] = (ev.symbol or "", ev.node or "-", ev.ts)
            case (jn.SymbolCompleted() | jn.SymbolFailed() | jn.SymbolSkipped()
                  | jn.SymbolCancelled()) as done:
                self.waiting.pop(tid, None)
                self.running.pop(tid, None)
                self.said.pop(tid, None)
                if not tid.endswith("/rollback") and tid not in self._ended:
                    self._ended.add(tid)
                    self.completed += 1
                    self.failed += isinstance(done, jn.SymbolFailed)
            case jn.SymbolRetrying() | jn.AttemptLost():
                self.waiting.pop(tid, None)
                self.running.pop(tid, None)
                self.said.pop(tid, None)
            case jn.RunEnded() as end:
                self.status = end.kind.removeprefix("run.")
            case jn.RunPaused():
                self.status = RunState.PAUSED
            case jn.RunResumed(status=str(status)) | jn.RunRestored(status=str(status)):
                self.status = status
            case jn.RunRollingBack() | jn.RunRollbackRequested():
                self.status = RunState.ROLLING_BACK
            case jn.RollbackCompleted(status=status):
                self.status = RunState.ROLLED_BACK if status is None else str(status)
        return True

    @property
    def done_fraction(self) -> float:
        """Symbols done, counting running ones by the progress they reported (a long
        symbol halfway through is half done: the ETA need not wait for its end)."""
        return self.completed + sum(f for tid, (f, _) in self.said.items()
                                    if f is not None and not tid.endswith("/rollback"))

    @property
    def rate(self) -> float:
        elapsed = time.monotonic() - self._t0
        return (self.done_fraction - self._done0) / elapsed if elapsed > 0 else 0.0

    @property
    def eta(self) -> float | None:
        rate = self.rate
        left = max(0.0, self.total - self.done_fraction)
        return left / rate if rate > 0 else (0.0 if left == 0 else None)

    def update(self, event: Event | None) -> RunUpdate:
        return RunUpdate(
            run_id=self.run_id, status=self.status, completed=self.completed, total=self.total,
            eta=self.eta, running=tuple(s for s, _, _ in self.running.values()),
            recent=tuple(self.recent), event=event, waiting=tuple(self.waiting.values()),
            progress=tuple((self.running[tid][0], f, m) for tid, (f, m) in self.said.items()
                           if tid in self.running))
