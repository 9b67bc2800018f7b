"""What goes into the scheduler core (events) and what comes out (commands).

Events carry the time they happened (`now`, seconds since the epoch): the core never
reads a clock. Commands are either journal records (`journal.Record`: state changes to
persist, then publish) or messages for a node, which the shell sends only after the
journal entries before them are committed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .journal import Record
from .model import Workflow
from .protocol import CheckpointKept, ProgressReport, TaskAssignment, TaskResult

# --- events (in) ----------------------------------------------------------------------

# Every event carries the id of the stimulus it is: the shell numbers what it feeds the
# core, and keeps the recent ones with the journal (swarm.stimuli), so that a run can be
# replayed. Keyword-only, after the event's own fields; 0 for an event not numbered.


@dataclass(frozen=True, slots=True)
class NodeConnected:
    node_id: str
    name: str
    capabilities: tuple[str, ...]
    slots: int
    now: float
    labels: dict[str, str] = field(default_factory=dict)
    running: tuple[int, ...] = ()  # attempt tokens it still runs (after a reconnect)
    stimulus_id: int = field(default=0, kw_only=True)


@dataclass(frozen=True, slots=True)
class NodeDisconnected:
    node_id: str
    now: float
    graceful: bool = False  # it said it was draining: its leftovers are not "lost"
    stimulus_id: int = field(default=0, kw_only=True)


@dataclass(frozen=True, slots=True)
class NodeHeartbeat:
    node_id: str
    now: float
    running: tuple[int, ...] | None = None  # the attempts the worker says it runs
    # How many assignments the worker had received on this connection when it sent the
    # heartbeat: only attempts assigned up to then can be missing from `running`.
    assigned: int | None = None
    stimulus_id: int = field(default=0, kw_only=True)


@dataclass(frozen=True, slots=True)
class NodeDraining:
    node_id: str
    now: float
    stimulus_id: int = field(default=0, kw_only=True)


@dataclass(frozen=True, slots=True)
class RunSubmitted:
    run_id: str
    workflow: Workflow
    now: float
    reuse: dict[str, Any] = field(default_factory=dict)  # symbol -> output, done before
    resumed_from: str | None = None
    durations: dict[str, float] = field(default_factory=dict)  # expected ms per symbol
    stimulus_id: int = field(default=0, kw_only=True)


@dataclass(frozen=True, slots=True)
class TaskRecord:
    """A task as the state DB has it, to rebuild a run."""

    name: str
    kind: str  # main | rollback
    state: str
    attempts: int = 0
    losses: int = 0
    token: int = 0
    due: float | None = None
    first_start: float | None = None
    parent: str | None = None  # rollback: the symbol it undoes
    after: tuple[str, ...] = ()  # rollback: symbols whose rollbacks come first
    node_id: str = ""  # the node that holds (or held) the attempt `token`
    checkpoint: Any = None  # the last committed checkpoint (None: none)


@dataclass(frozen=True, slots=True)
class RunRestored:
    run_id: str
    workflow: Workflow
    status: str
    started: float
    tasks: tuple[TaskRecord, ...]
    now: float
    # A rollback requested after the run ended: its phase's status ("" if none was) and
    # when it began. The run's own `status` stays the outcome it ended with.
    rollback: str = ""
    rollback_started: float = 0.0
    stimulus_id: int = field(default=0, kw_only=True)


@dataclass(frozen=True, slots=True)
class RollbackRequested:
    run_id: str
    now: float
    stimulus_id: int = field(default=0, kw_only=True)


@dataclass(frozen=True, slots=True)
class RunPaused:
    run_id: str
    now: float
    stimulus_id: int = field(default=0, kw_only=True)


@dataclass(frozen=True, slots=True)
class RunResumed:
    run_id: str
    now: float
    stimulus_id: int = field(default=0, kw_only=True)


@dataclass(frozen=True, slots=True)
class RunCancelled:
    run_id: str
    now: float
    rollback: bool = False
    stimulus_id: int = field(default=0, kw_only=True)


@dataclass(frozen=True, slots=True)
class ResultsReceived:
    node_id: str
    results: tuple[TaskResult, ...]
    now: float
    stimulus_id: int = field(default=0, kw_only=True)


@dataclass(frozen=True, slots=True)
class ProgressReceived:
    """Progress reports and checkpoints from a worker's running attempts."""

    node_id: str
    reports: tuple[ProgressReport, ...]
    now: float
    stimulus_id: int = field(default=0, kw_only=True)


@dataclass(frozen=True, slots=True)
class Tick:
    now: float
    stalled: float = 0.0  # seconds the shell itself was late (a stall): no node is to blame
    stimulus_id: int = field(default=0, kw_only=True)


Event = (NodeConnected | NodeDisconnected | NodeHeartbeat | NodeDraining | RunSubmitted
         | ResultsReceived | Tick | RunRestored | RollbackRequested | RunPaused | RunResumed
         | RunCancelled | ProgressReceived)

# --- commands (out) -------------------------------------------------------------------


# A state change to persist, then publish: one record class per kind (see journal.py).
Journal = Record


@dataclass(frozen=True, slots=True)
class Assign:
    node_id: str
    tasks: tuple[TaskAssignment, ...]


@dataclass(frozen=True, slots=True)
class Ack:
    node_id: str
    tokens: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Abandon:
    node_id: str
    tokens: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class KeepAck:
    """Tell a worker which checkpoints were kept (or why not): sent after the commit."""

    node_id: str
    items: tuple[CheckpointKept, ...]


@dataclass(frozen=True, slots=True)
class CloseNode:
    node_id: str
    reason: str


Command = Journal | Assign | Ack | Abandon | CloseNode | KeepAck
