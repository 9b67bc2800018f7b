"""The journal's records: one frozen dataclass per kind of state change.

The scheduler core makes them; the state store turns them into rows, the dispatcher into
events for its clients, and clients (results, console) read them back, each by type
(`match rec: case SymbolCompleted(): ...`). Their two encodings are one and the same:
`KIND` (the `kind` column of the events table, the `kind` of a wire event) and `data()`
(the JSON `data` column, the wire event's `data`), with the header fields (ts, run_id,
task_id, symbol, node, attempt) as columns of their own. `decode` is the way back.

Rules of this module:
- A record's data fields are its JSON keys, in the order they are written; a field made
  with `omitted()` is left out of the data while it holds its default (as it always was).
- A kind, once journaled, keeps its meaning: DBs written by earlier versions are read by
  later ones. A kind this version does not know decodes as `Unknown`, unchanged; a field
  an event lacks decodes as None (so decoded records are typed as made, not as checked).
- Nothing here reads or writes anything: encoding is a dict, decoding a constructor call.
"""

from __future__ import annotations

from dataclasses import KW_ONLY, MISSING, dataclass, field, fields
from enum import StrEnum
from typing import Any, ClassVar, TypeVar

from .tasks import RunState


class Kind(StrEnum):
    """Every kind of journal record (and `stream.gap`, which only the wire carries)."""

    RUN_STARTED = "run.started"
    RUN_RESTORED = "run.restored"
    RUN_PAUSED = "run.paused"
    RUN_RESUMED = "run.resumed"
    RUN_CANCELLING = "run.cancelling"
    RUN_HALTING = "run.halting"
    RUN_WAVE_COMPLETED = "run.wave_completed"
    RUN_ROLLING_BACK = "run.rolling_back"
    RUN_ROLLBACK_REQUESTED = "run.rollback_requested"
    RUN_COMPLETED = "run.completed"
    RUN_FAILED = "run.failed"
    RUN_ROLLED_BACK = "run.rolled_back"
    RUN_CANCELLED = "run.cancelled"
    RUN_DEADLINE_EXCEEDED = "run.deadline_exceeded"
    ROLLBACK_CREATED = "rollback.created"
    ROLLBACK_COMPLETED = "rollback.completed"
    SYMBOL_QUEUED = "symbol.queued"
    SYMBOL_WAITING = "symbol.waiting"
    SYMBOL_UNBLOCKED = "symbol.unblocked"
    SYMBOL_STARTED = "symbol.started"
    SYMBOL_ADOPTED = "symbol.adopted"
    SYMBOL_ORPHANED = "symbol.orphaned"
    SYMBOL_RETRYING = "symbol.retrying"
    SYMBOL_COMPLETED = "symbol.completed"
    SYMBOL_FAILED = "symbol.failed"
    SYMBOL_SKIPPED = "symbol.skipped"
    SYMBOL_CANCELLED = "symbol.cancelled"
    SYMBOL_ROLLED_BACK = "symbol.rolled_back"
    SYMBOL_PROGRESS = "symbol.progress"
    SYMBOL_CHECKPOINTED = "symbol.checkpointed"
    SYMBOL_CHECKPOINT_REJECTED = "symbol.checkpoint_rejected"
    SYMBOL_CHECKPOINT_DROPPED = "symbol.checkpoint_dropped"
    ATTEMPT_FINISHED = "attempt.finished"
    ATTEMPT_LOST = "attempt.lost"
    RESULT_DROPPED = "result.dropped"
    CLAIM_REFUSED = "claim.refused"
    NODE_JOINED = "node.joined"
    NODE_DRAINING = "node.draining"
    NODE_LOST = "node.lost"
    NODE_LEFT = "node.left"
    DISPATCHER_STALLED = "dispatcher.stalled"
    STREAM_GAP = "stream.gap"  # the wire only: events a slow client missed


# Data keys other tables hold and followers do not need: the events table and the wire
# leave them out (see `lean_data`).
# A checkpoint's data lives in its task's row (the latest only): the journal and the event
# stream say that and when one was kept, not the up to 256 KiB of each.
BULKY = frozenset({"manifest", "stderr", "checkpoint"})
_OMIT = {"omit": True}


def omitted(default: Any = None) -> Any:
    """A data field left out of the data while it holds `default`."""
    return field(default=default, metadata=_OMIT)


@dataclass(frozen=True, slots=True)
class Record:
    """A state change: persisted, then published. The header fields are columns of the
    events table and fields of a wire event; the subclass's own fields are its data."""

    KIND: ClassVar[Kind]
    kind: ClassVar[str]  # KIND as a plain str (what rows and wire events carry)
    _DATA: ClassVar[tuple[str, ...]] = ()  # data field names, in order
    _OMITS: ClassVar[tuple[tuple[str, Any], ...]] = ()  # (name, default) left out at default
    _BULKY: ClassVar[frozenset[str]] = frozenset()
    _REQUIRED: ClassVar[tuple[str, ...]] = ()  # data fields without a default

    ts: float
    run_id: str | None = None
    task_id: str | None = None
    symbol: str | None = None
    node: str | None = None
    attempt: int | None = None

    @property
    def data(self) -> dict[str, Any]:
        """The data as journaled: every data field, but those left out at their default."""
        d = {k: getattr(self, k) for k in self._DATA}
        for k, default in self._OMITS:
            if d[k] == default:
                del d[k]
        return d

    def lean_data(self, *also: str) -> dict[str, Any]:
        """The data without its bulky fields (the manifest, stderr: other tables hold
        them, and followers do not need them), nor `also`."""
        d = self.data
        for k in self._BULKY.union(also) if also else self._BULKY:
            d.pop(k, None)
        return d


@dataclass(frozen=True, slots=True)
class RunScoped(Record):
    """A record about a run."""

    run_id: str


@dataclass(frozen=True, slots=True)
class TaskScoped(RunScoped):
    """A record about one task (a symbol, or a symbol's rollback) of a run."""

    task_id: str
    symbol: str


KINDS: dict[str, type[Record]] = {}
R = TypeVar("R", bound=type[Record])


def _record(cls: R) -> R:
    """Register a record class under its KIND and note which fields are its data."""
    header = {f.name for f in fields(Record)}
    own = [f for f in fields(cls) if f.name not in header]
    cls._DATA = tuple(f.name for f in own)
    cls._OMITS = tuple((f.name, f.default) for f in own if f.metadata.get("omit"))
    cls._BULKY = BULKY.intersection(cls._DATA)
    cls._REQUIRED = tuple(f.name for f in own if f.default is MISSING
                          and f.default_factory is MISSING)
    cls.kind = cls.KIND.value
    assert cls.KIND not in KINDS, cls.KIND
    KINDS[cls.KIND] = cls
    return cls


# --- runs -------------------------------------------------------------------------------


@_record
@dataclass(frozen=True, slots=True)
class RunStarted(RunScoped):
    KIND = Kind.RUN_STARTED
    _: KW_ONLY
    workflow: str
    version: str
    hash: str
    symbols: int
    on_failure: str
    mode: str
    manifest: dict[str, Any] | None = None  # bulky: the runs table holds it
    resumed_from: str | None = omitted()


@_record
@dataclass(frozen=True, slots=True)
class RunRestored(RunScoped):
    KIND = Kind.RUN_RESTORED
    _: KW_ONLY
    status: str


@_record
@dataclass(frozen=True, slots=True)
class RunPaused(RunScoped):
    KIND = Kind.RUN_PAUSED


@_record
@dataclass(frozen=True, slots=True)
class RunResumed(RunScoped):
    KIND = Kind.RUN_RESUMED
    _: KW_ONLY
    status: str


@_record
@dataclass(frozen=True, slots=True)
class RunCancelling(RunScoped):
    KIND = Kind.RUN_CANCELLING
    _: KW_ONLY
    rollback: bool


@_record
@dataclass(frozen=True, slots=True)
class RunHalting(RunScoped):
    KIND = Kind.RUN_HALTING
    _: KW_ONLY
    cause: str  # the symbol whose failure halts the run
    policy: str


@_record
@dataclass(frozen=True, slots=True)
class RunWaveCompleted(RunScoped):
    KIND = Kind.RUN_WAVE_COMPLETED
    _: KW_ONLY
    wave: int
    of: int
    counts: dict[str, int]


@_record
@dataclass(frozen=True, slots=True)
class RunRollingBack(RunScoped):
    KIND = Kind.RUN_ROLLING_BACK


@_record
@dataclass(frozen=True, slots=True)
class RunRollbackRequested(RunScoped):
    KIND = Kind.RUN_ROLLBACK_REQUESTED
    _: KW_ONLY
    status: str
    rollbacks: int


@dataclass(frozen=True, slots=True)
class RunEnded(RunScoped):
    """A run's end, one kind per final status (`run.completed`, ...)."""

    _: KW_ONLY
    status: str
    counts: dict[str, int]
    duration: float


@_record
@dataclass(frozen=True, slots=True)
class RunCompleted(RunEnded):
    KIND = Kind.RUN_COMPLETED


@_record
@dataclass(frozen=True, slots=True)
class RunFailed(RunEnded):
    KIND = Kind.RUN_FAILED


@_record
@dataclass(frozen=True, slots=True)
class RunRolledBack(RunEnded):
    KIND = Kind.RUN_ROLLED_BACK


@_record
@dataclass(frozen=True, slots=True)
class RunCancelled(RunEnded):
    KIND = Kind.RUN_CANCELLED


RUN_ENDED: dict[str, type[RunEnded]] = {
    RunState.COMPLETED: RunCompleted, RunState.FAILED: RunFailed,
    RunState.ROLLED_BACK: RunRolledBack, RunState.CANCELLED: RunCancelled}
FINAL_RUN_EVENTS = frozenset(cls.KIND for cls in RUN_ENDED.values())


@_record
@dataclass(frozen=True, slots=True)
class RollbackCreated(TaskScoped):
    KIND = Kind.ROLLBACK_CREATED
    _: KW_ONLY
    parent: str
    spec: dict[str, Any]
    after: list[str]  # symbols whose rollbacks come first


@_record
@dataclass(frozen=True, slots=True)
class RollbackCompleted(RunScoped):
    """A rollback requested after the run ended is over; the run keeps its status."""

    KIND = Kind.ROLLBACK_COMPLETED
    _: KW_ONLY
    status: str
    run_status: str
    counts: dict[str, int]
    duration: float


# --- symbols ----------------------------------------------------------------------------


@_record
@dataclass(frozen=True, slots=True)
class SymbolQueued(TaskScoped):
    KIND = Kind.SYMBOL_QUEUED
    _: KW_ONLY
    reason: str = omitted("")  # why it is queued again ("" the first time)


@_record
@dataclass(frozen=True, slots=True)
class SymbolWaiting(TaskScoped):
    KIND = Kind.SYMBOL_WAITING
    _: KW_ONLY
    reason: str
    wait_for_worker: int | None = omitted()
    due: float | None = omitted()


@_record
@dataclass(frozen=True, slots=True)
class SymbolUnblocked(TaskScoped):
    KIND = Kind.SYMBOL_UNBLOCKED


@_record
@dataclass(frozen=True, slots=True)
class SymbolStarted(TaskScoped):
    KIND = Kind.SYMBOL_STARTED
    _: KW_ONLY
    token: int
    node_id: str


@_record
@dataclass(frozen=True, slots=True)
class SymbolAdopted(TaskScoped):
    KIND = Kind.SYMBOL_ADOPTED
    _: KW_ONLY
    node_id: str
    token: int


@_record
@dataclass(frozen=True, slots=True)
class SymbolOrphaned(TaskScoped):
    KIND = Kind.SYMBOL_ORPHANED
    _: KW_ONLY
    token: int
    due: float


@_record
@dataclass(frozen=True, slots=True)
class SymbolRetrying(TaskScoped):
    KIND = Kind.SYMBOL_RETRYING
    _: KW_ONLY
    error: str
    due: float
    delay: float


@_record
@dataclass(frozen=True, slots=True)
class SymbolCompleted(TaskScoped):
    KIND = Kind.SYMBOL_COMPLETED
    _: KW_ONLY
    output: Any
    duration_ms: float | None = omitted()
    reused_from: str | None = omitted()  # a resumed run's: the run that did it
    rollback: dict[str, Any] | None = omitted()  # its rollback spec, if it has one


@_record
@dataclass(frozen=True, slots=True)
class SymbolFailed(TaskScoped):
    KIND = Kind.SYMBOL_FAILED
    _: KW_ONLY
    error: str
    reason: str | None = omitted()
    retryable: bool | None = omitted()


@_record
@dataclass(frozen=True, slots=True)
class SymbolSkipped(TaskScoped):
    KIND = Kind.SYMBOL_SKIPPED
    _: KW_ONLY
    reason: str


@_record
@dataclass(frozen=True, slots=True)
class SymbolCancelled(TaskScoped):
    KIND = Kind.SYMBOL_CANCELLED


@_record
@dataclass(frozen=True, slots=True)
class SymbolRolledBack(TaskScoped):
    KIND = Kind.SYMBOL_ROLLED_BACK
    _: KW_ONLY
    rollback: str  # the rollback symbol that undid it


# --- long-running symbols: progress, checkpoints, run deadlines -------------------------


@_record
@dataclass(frozen=True, slots=True)
class SymbolProgress(TaskScoped):
    """A running attempt's progress report (at most one a second is journaled)."""

    KIND = Kind.SYMBOL_PROGRESS
    _: KW_ONLY
    token: int
    progress: float | None = omitted()  # in [0, 1]
    message: str | None = omitted()


@_record
@dataclass(frozen=True, slots=True)
class SymbolCheckpointed(TaskScoped):
    """A checkpoint kept: its task's row holds the data, for the symbol's next attempt."""

    KIND = Kind.SYMBOL_CHECKPOINTED
    _: KW_ONLY
    token: int
    progress: float | None = omitted()
    message: str | None = omitted()
    size: int = 0  # bytes of JSON
    checkpoint: Any = None  # bulky: the tasks row holds the latest


@_record
@dataclass(frozen=True, slots=True)
class SymbolCheckpointRejected(TaskScoped):
    """A checkpoint refused (over max_checkpoint_size, or the symbol opted out): the
    previous one stays."""

    KIND = Kind.SYMBOL_CHECKPOINT_REJECTED
    _: KW_ONLY
    token: int
    progress: float | None = omitted()
    message: str | None = omitted()
    size: int = 0
    error: str = ""


@_record
@dataclass(frozen=True, slots=True)
class SymbolCheckpointDropped(Record):
    """A checkpoint of an attempt that no longer holds its task (fenced by its token), or
    of no attempt known at all (then without a run or a task)."""

    KIND = Kind.SYMBOL_CHECKPOINT_DROPPED
    _: KW_ONLY
    token: int
    reason: str


@_record
@dataclass(frozen=True, slots=True)
class RunDeadlineExceeded(RunScoped):
    KIND = Kind.RUN_DEADLINE_EXCEEDED
    _: KW_ONLY
    deadline: int  # ms, the manifest's
    reason: str


# --- attempts ---------------------------------------------------------------------------


@_record
@dataclass(frozen=True, slots=True)
class AttemptFinished(TaskScoped):
    KIND = Kind.ATTEMPT_FINISHED
    _: KW_ONLY
    token: int
    ok: bool
    output: Any = None  # the attempts table holds it; the events table leaves it out
    error: str = ""
    exit_code: int | None = None
    timed_out: bool = False
    duration_ms: float = 0.0
    stderr: str | None = None  # bulky
    stdout_truncated: bool = False
    stderr_truncated: bool = False


@_record
@dataclass(frozen=True, slots=True)
class AttemptLost(TaskScoped):
    KIND = Kind.ATTEMPT_LOST
    _: KW_ONLY
    reason: str
    losses: int
    token: int


@_record
@dataclass(frozen=True, slots=True)
class ResultDropped(Record):
    """A stale, duplicate or unknown result; run and task when the token is known."""

    KIND = Kind.RESULT_DROPPED
    _: KW_ONLY
    token: int
    reason: str


@_record
@dataclass(frozen=True, slots=True)
class ClaimRefused(TaskScoped):
    KIND = Kind.CLAIM_REFUSED
    _: KW_ONLY
    token: int
    claim: str  # what the node claimed the attempt with: result | adoption
    node_id: str
    owner: str


# --- nodes and the dispatcher -----------------------------------------------------------


@_record
@dataclass(frozen=True, slots=True)
class NodeJoined(Record):
    KIND = Kind.NODE_JOINED
    _: KW_ONLY
    node_id: str
    capabilities: list[str]
    slots: int
    labels: dict[str, str]


@_record
@dataclass(frozen=True, slots=True)
class NodeDraining(Record):
    KIND = Kind.NODE_DRAINING


@dataclass(frozen=True, slots=True)
class NodeGone(Record):
    _: KW_ONLY
    node_id: str
    reason: str
    running: int  # attempts it was running


@_record
@dataclass(frozen=True, slots=True)
class NodeLost(NodeGone):
    KIND = Kind.NODE_LOST


@_record
@dataclass(frozen=True, slots=True)
class NodeLeft(NodeGone):
    KIND = Kind.NODE_LEFT


@_record
@dataclass(frozen=True, slots=True)
class DispatcherStalled(Record):
    KIND = Kind.DISPATCHER_STALLED
    _: KW_ONLY
    seconds: float
    nodes: int


@_record
@dataclass(frozen=True, slots=True)
class StreamGap(Record):
    """Not journaled: the dispatcher tells a slow client how many events it missed."""

    KIND = Kind.STREAM_GAP
    _: KW_ONLY
    missed: int


@dataclass(frozen=True, slots=True)
class Unknown(Record):
    """A kind this version does not know (written by a newer one), kept as it came."""

    _: KW_ONLY
    name: str
    values: dict[str, Any]

    @property
    def kind(self) -> str:  # type: ignore[override]
        return self.name

    @property
    def data(self) -> dict[str, Any]:
        return dict(self.values)


# --- decoding ---------------------------------------------------------------------------


def decode(kind: str, ts: float, run_id: str | None = None, task_id: str | None = None,
           symbol: str | None = None, node: str | None = None, attempt: int | None = None,
           data: dict[str, Any] | None = None) -> Record:
    """The record a row or a wire event encodes; an unknown kind is `Unknown`. Liberal in
    what it takes, as followers always were: keys the record does not have are dropped,
    and a data field the writer left out (an older version, a hand-made event, the wire's
    lean data) is None."""
    cls = KINDS.get(kind)
    data = data or {}
    if cls is None:
        return Unknown(ts, run_id, task_id, symbol, node, attempt, name=kind, values=data)
    try:
        return cls(ts, run_id, task_id, symbol, node, attempt, **data)
    except TypeError:  # another writer's keys: those known here, None for those missing
        known = dict.fromkeys(cls._REQUIRED)
        known.update((k, v) for k, v in data.items() if k in cls._DATA)
        return cls(ts, run_id, task_id, symbol, node, attempt, **known)


def from_event(ev: Any) -> Record:
    """The record of a wire event (`protocol.Event`)."""
    return decode(ev.kind, ev.ts, ev.run_id, ev.task_id, ev.symbol, ev.node, ev.attempt,
                  ev.data)
