"""The scheduler's in-memory state: tasks, runs and nodes, and the tables that say how a
task's and a run's state may change. Only `swarm.core` changes these objects, and only
inside `Scheduler.handle`, where every write is logged (`swarm.undo`) so that an event
that raises leaves them as they were."""

from __future__ import annotations

import operator
import signal
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from . import undo
from .errors import SwarmError
from .model import RollbackSpec, Symbol, Workflow

if TYPE_CHECKING:  # events imports the journal, which imports these states
    from .events import NodeConnected


class TaskState(StrEnum):
    PENDING = "pending"  # waiting for dependencies
    READY = "ready"  # queued for a worker
    RUNNING = "running"
    RETRYING = "retrying"  # failed, waiting for its retry timer
    COMPLETED = "completed"
    FAILED = "failed"
    SKIPPED = "skipped"  # never started: a dependency failed or the run halted
    ROLLED_BACK = "rolled_back"  # completed, then undone by its rollback
    CANCELLED = "cancelled"  # stopped (or never started) because its run was cancelled


TERMINAL = frozenset({TaskState.COMPLETED, TaskState.FAILED, TaskState.SKIPPED,
                      TaskState.ROLLED_BACK, TaskState.CANCELLED})

TASK_TRANSITIONS: dict[TaskState, frozenset[TaskState]] = {
    TaskState.PENDING: frozenset({TaskState.READY, TaskState.SKIPPED, TaskState.CANCELLED}),
    # READY -> FAILED: no connected worker could run it within its `wait_for_worker`.
    TaskState.READY: frozenset({TaskState.RUNNING, TaskState.SKIPPED, TaskState.CANCELLED,
                                TaskState.FAILED}),
    TaskState.RUNNING: frozenset({TaskState.COMPLETED, TaskState.FAILED, TaskState.RETRYING,
                                  TaskState.READY, TaskState.CANCELLED}),
    TaskState.RETRYING: frozenset({TaskState.READY, TaskState.SKIPPED, TaskState.FAILED,
                                   TaskState.RUNNING, TaskState.CANCELLED}),
    TaskState.COMPLETED: frozenset({TaskState.ROLLED_BACK}),
    TaskState.FAILED: frozenset(),
    TaskState.SKIPPED: frozenset(),
    TaskState.ROLLED_BACK: frozenset(),
    TaskState.CANCELLED: frozenset(),
}


class RunState(StrEnum):
    RUNNING = "running"
    ROLLING_BACK = "rolling_back"
    COMPLETED = "completed"
    FAILED = "failed"
    ROLLED_BACK = "rolled_back"
    CANCELLED = "cancelled"
    # A status of the store and the wire only: the core keeps a paused run RUNNING (and
    # its `paused` flag set).
    PAUSED = "paused"


RUN_FINAL = frozenset({RunState.COMPLETED, RunState.FAILED, RunState.ROLLED_BACK,
                       RunState.CANCELLED})
# The run statuses of the store that are not over yet.
RUN_ACTIVE = frozenset({RunState.RUNNING, RunState.ROLLING_BACK, RunState.PAUSED})


def sql_list(*states: StrEnum) -> str:
    """States as an SQL list literal, e.g. `('completed', 'rolled_back')`: the queries of
    the stores spell the vocabulary through this, never by hand. (Enum values only: no
    user data goes into SQL text.)"""
    return "(" + ", ".join(f"'{s.value}'" for s in sorted(states)) + ")"


class NodeState(StrEnum):
    """A node's status in the store (draining is a flag of a connected node)."""

    CONNECTED = "connected"
    LOST = "lost"  # gone without saying so: silent past heartbeat_timeout, or disconnected
    LEFT = "left"  # gone after draining


class AttemptOutcome(StrEnum):
    RUNNING = "running"
    OK = "ok"
    FAILED = "failed"
    TIMEOUT = "timeout"
    LOST = "lost"  # its worker was lost (or forgot it)


class ErrorCode(StrEnum):
    """Why an attempt or a symbol failed, in swarm's own words (a backend's own failures
    are `EXIT_<n>` and `SIGNAL_<NAME>`: see `exit` and `signal`)."""

    TIMEOUT = "TIMEOUT"  # the attempt outlived its timeout
    HUNG = "HUNG"  # the attempt stopped making progress
    WORKER_LOST = "WORKER_LOST"  # its worker went away too many times
    CANCELLED = "CANCELLED"  # its run was cancelled
    UNDELIVERABLE = "UNDELIVERABLE"  # no worker could be given it (too big, none capable)

    @staticmethod
    def exit(status: int) -> str:
        """The code of a backend that exited with `status` (a negative one: its signal)."""
        return ErrorCode.signal(-status) if status < 0 else f"EXIT_{status}"

    @staticmethod
    def signal(signum: int) -> str:
        """The code of a backend killed by signal `signum`: `SIGNAL_KILL`, `SIGNAL_TERM`."""
        try:
            name = signal.Signals(signum).name.removeprefix("SIG")
        except ValueError:
            name = str(signum)
        return f"SIGNAL_{name}"


class RunPhase(StrEnum):
    """Where a run is in its life: the scheduler's view, finer than `RunState` (what users
    see). Each phase says what may start: main symbols, rollbacks, or nothing new."""

    RUNNING = "running"
    PAUSED = "paused"  # ready symbols are set aside until it resumes
    FAILING = "failing"  # a symbol failed for good, on_failure=continue: the rest goes on
    FAILING_PAUSED = "failing_paused"
    HALTING = "halting"  # a symbol failed for good: no new main symbol starts
    CANCELLING = "cancelling"  # cancelled: attempts abandoned, nothing new starts
    ROLLING_BACK = "rolling_back"  # undoing completed symbols after a failure
    CANCEL_ROLLING_BACK = "cancel_rolling_back"  # undoing them after `cancel --rollback`
    # A rollback requested after the run ended: the outcome it goes back to is kept.
    UNDOING_COMPLETED = "undoing_completed"
    UNDOING_FAILED = "undoing_failed"
    COMPLETED = "completed"
    FAILED = "failed"
    ROLLED_BACK = "rolled_back"
    CANCELLED = "cancelled"


class RunStep(StrEnum):
    """What moves a run from one phase to another."""

    FAIL = "fail"  # a main symbol failed for good, and on_failure is continue
    HALT = "halt"  # a main symbol failed for good (on_failure halt or rollback), or the
    # run's deadline passed
    PAUSE = "pause"
    RESUME = "resume"
    CANCEL = "cancel"
    ROLL_BACK = "roll_back"  # its rollback phase begins
    UNDO = "undo"  # a rollback requested after it ended
    FINISH = "finish"  # nothing is left to do, and no rollback of its phase failed
    FINISH_FAILED = "finish_failed"  # nothing is left to do, and a rollback failed


_P, _S = RunPhase, RunStep
_LIVE = (_P.RUNNING, _P.PAUSED, _P.FAILING, _P.FAILING_PAUSED, _P.HALTING, _P.ROLLING_BACK)

RUN_TRANSITIONS: dict[tuple[RunPhase, RunStep], RunPhase] = {
    (_P.RUNNING, _S.FAIL): _P.FAILING,
    (_P.RUNNING, _S.HALT): _P.HALTING,
    (_P.RUNNING, _S.PAUSE): _P.PAUSED,
    (_P.RUNNING, _S.FINISH): _P.COMPLETED,
    (_P.PAUSED, _S.FAIL): _P.FAILING_PAUSED,
    (_P.PAUSED, _S.HALT): _P.HALTING,  # halting sets ready symbols aside anyway
    (_P.PAUSED, _S.RESUME): _P.RUNNING,
    (_P.PAUSED, _S.FINISH): _P.COMPLETED,  # its last attempts ended while it was paused
    (_P.FAILING, _S.FAIL): _P.FAILING,
    (_P.FAILING, _S.HALT): _P.HALTING,  # its run deadline passed
    (_P.FAILING, _S.PAUSE): _P.FAILING_PAUSED,
    (_P.FAILING, _S.FINISH): _P.FAILED,
    (_P.FAILING_PAUSED, _S.FAIL): _P.FAILING_PAUSED,
    (_P.FAILING_PAUSED, _S.HALT): _P.HALTING,
    (_P.FAILING_PAUSED, _S.RESUME): _P.FAILING,
    (_P.FAILING_PAUSED, _S.FINISH): _P.FAILED,
    (_P.HALTING, _S.HALT): _P.HALTING,
    (_P.HALTING, _S.FAIL): _P.HALTING,  # (on_failure continue, past its run deadline)
    (_P.HALTING, _S.ROLL_BACK): _P.ROLLING_BACK,
    (_P.HALTING, _S.FINISH): _P.FAILED,
    (_P.CANCELLING, _S.ROLL_BACK): _P.CANCEL_ROLLING_BACK,
    (_P.CANCELLING, _S.FINISH): _P.CANCELLED,
    (_P.ROLLING_BACK, _S.FINISH): _P.ROLLED_BACK,
    (_P.ROLLING_BACK, _S.FINISH_FAILED): _P.FAILED,
    (_P.CANCEL_ROLLING_BACK, _S.FINISH): _P.CANCELLED,
    (_P.CANCEL_ROLLING_BACK, _S.FINISH_FAILED): _P.CANCELLED,
    (_P.COMPLETED, _S.UNDO): _P.UNDOING_COMPLETED,
    (_P.FAILED, _S.UNDO): _P.UNDOING_FAILED,
    # The phase's own outcome is journaled (`rollback.completed`); the run's stays.
    (_P.UNDOING_COMPLETED, _S.FINISH): _P.COMPLETED,
    (_P.UNDOING_COMPLETED, _S.FINISH_FAILED): _P.COMPLETED,
    (_P.UNDOING_FAILED, _S.FINISH): _P.FAILED,
    (_P.UNDOING_FAILED, _S.FINISH_FAILED): _P.FAILED,
    **{(p, _S.CANCEL): _P.CANCELLING for p in _LIVE},
}

# What users see of each phase (`swarm status` shows the paused ones as "paused").
RUN_STATE_OF: dict[RunPhase, RunState] = {
    **dict.fromkeys((_P.RUNNING, _P.PAUSED, _P.FAILING, _P.FAILING_PAUSED, _P.HALTING,
                     _P.CANCELLING), RunState.RUNNING),
    **dict.fromkeys((_P.ROLLING_BACK, _P.CANCEL_ROLLING_BACK, _P.UNDOING_COMPLETED,
                     _P.UNDOING_FAILED), RunState.ROLLING_BACK),
    _P.COMPLETED: RunState.COMPLETED, _P.FAILED: RunState.FAILED,
    _P.ROLLED_BACK: RunState.ROLLED_BACK, _P.CANCELLED: RunState.CANCELLED,
}
_PAUSED = frozenset({_P.PAUSED, _P.FAILING_PAUSED})
_FAILED = frozenset({_P.FAILING, _P.FAILING_PAUSED, _P.HALTING, _P.ROLLING_BACK})
_HALTED = frozenset({_P.HALTING, _P.CANCELLING, _P.ROLLING_BACK, _P.CANCEL_ROLLING_BACK,
                     _P.UNDOING_COMPLETED, _P.UNDOING_FAILED})
_ROLLBACK = frozenset({_P.ROLLING_BACK, _P.CANCEL_ROLLING_BACK, _P.UNDOING_COMPLETED,
                       _P.UNDOING_FAILED})
_UNDO = {_P.UNDOING_COMPLETED: RunState.COMPLETED, _P.UNDOING_FAILED: RunState.FAILED}


class IllegalTransition(SwarmError):
    """The scheduler tried a move its tables forbid: a bug in swarm, not in the input."""


class Refused(IllegalTransition):
    """A request the run's state does not allow now (pause a paused run, roll back a run
    with nothing to undo): raised before anything changed, and answered to the caller."""


_TASK_FIELDS = ("id", "run", "name", "kind", "spec", "state", "attempts", "losses", "waiting",
                "dependents", "deps", "node", "token", "due", "first_start", "key", "parent",
                "orphan", "resources", "requires", "level", "holding", "owner", "blocked",
                "wait_due", "checkpoint", "heard_at", "sent")
_task_fields = operator.attrgetter(*_TASK_FIELDS)


class Task:
    """A symbol (or a rollback) of a run. Its writes are not logged one by one, which
    would cost more than the rest of a task's life in the core: the scheduler calls
    `touch(task)` before it first changes a task in a transaction, and all its fields
    are logged at once (tests check that nothing is written untouched)."""

    __slots__ = (*_TASK_FIELDS, "tx")

    def __init__(self, run: Run, name: str, kind: str, spec: Symbol | RollbackSpec,
                 parent: Task | None = None) -> None:
        # The transaction that last logged its fields. A new task needs no logging: only
        # containers the undo log restores lead to it.
        self.tx = undo.serial
        self.run = run
        run.counts[TaskState.PENDING] += 1
        self.name = name
        self.kind = kind  # "main" | "rollback"
        self.id = f"{run.id}/{name}" if kind == "main" else f"{run.id}/{parent.name}/rollback"  # type: ignore[union-attr]
        self.spec = spec
        self.parent = parent
        self.state = TaskState.PENDING
        self.attempts = 0
        self.losses = 0
        self.waiting = 0  # dependencies not yet completed
        self.deps: list[Task] = []
        self.dependents: list[Task] = []
        self.node: Node | None = None
        self.token = 0
        self.due = 0.0
        self.first_start: float | None = None
        self.key: tuple[Any, ...] = ()
        self.orphan = 0  # token of an attempt whose worker was lost; its result is welcome
        # Exclusive (or counted) locks held while it runs, and the worker labels it needs.
        self.resources: tuple[str, ...] = getattr(spec, "resources", ())
        self.requires: dict[str, str] = getattr(spec, "requires", {})
        self.level = 0  # its wave: 0 without dependencies, else 1 + its deepest dependency's
        self.holding = False  # it holds its resources now
        # The node id the attempt `token` was given to: only that node may report its
        # result or adopt it after a reconnection, whoever else knows the token.
        self.owner = ""
        # Why no connected worker can run it ("" while some can): one waiting episode.
        self.blocked = ""
        self.wait_due: float | None = None  # when its `wait_for_worker` runs out
        self.checkpoint: Any = None  # the last committed checkpoint, for its next attempt
        self.heard_at = 0.0  # its running attempt's start or latest report (hang detection)
        # Its attempt's number among the assignments sent to its node (0: adopted): only a
        # heartbeat sent after the worker received it may leave the attempt out.
        self.sent = 0

    @property
    def dispatch(self) -> str:
        return self.spec.dispatch

    @property
    def retries(self) -> int | None:
        return self.spec.retries


def _restore_task(task: Task, values: tuple[Any, ...], _: Any) -> None:
    for name, value in zip(_TASK_FIELDS, values, strict=True):
        setattr(task, name, value)


def touch(task: Task) -> None:
    """Log all of a task's fields before its first change in a transaction."""
    log = undo.entries
    if log is not None and task.tx != undo.serial:
        log.append((_restore_task, task, _task_fields(task), None))
        task.tx = undo.serial


class Run:
    __slots__ = ("id", "workflow", "seq", "phase", "tasks", "rollbacks", "unfinished",
                 "started", "hash", "parked", "waves", "wave", "by_level", "undo_started",
                 "undo_from", "counts", "deadline_at")
    __setattr__ = undo.tracked_setattr

    def __init__(self, run_id: str, workflow: Workflow, seq: int, now: float) -> None:
        self.id = run_id
        self.workflow = workflow
        self.seq = seq
        self.phase = RunPhase.RUNNING  # moved only by `move`, along RUN_TRANSITIONS
        self.tasks: dict[str, Task] = {}
        self.rollbacks: list[Task] = undo.TList()
        # Its tasks (main and rollback) per state, kept as they move: `swarm status` and
        # the dashboard read them without walking 100,000 tasks on the event loop.
        self.counts: dict[TaskState, int] = dict.fromkeys(TaskState, 0)
        self.unfinished = 0  # tasks (main and rollback) not yet terminal
        self.started = now
        self.hash = workflow.content_hash
        self.parked: list[Task] = undo.TList()  # ready while paused: set aside
        self.waves = workflow.mode == "waves"  # a barrier between levels
        self.wave = 0  # the level running now (waves mode)
        self.by_level: list[list[Task]] = []
        self.undo_started = 0.0  # when a requested rollback phase began
        self.undo_from = 0  # its first rollback in `rollbacks`
        # When the run's `deadline` passes: from its start, so a restart keeps it.
        self.deadline_at = (now + workflow.deadline / 1000
                            if workflow.deadline is not None else None)

    def can(self, step: RunStep) -> bool:
        return (self.phase, step) in RUN_TRANSITIONS

    def move(self, step: RunStep) -> None:
        """Take a step of RUN_TRANSITIONS; any other raises and changes nothing."""
        to = RUN_TRANSITIONS.get((self.phase, step))
        if to is None:
            raise IllegalTransition(f"run {self.id}: cannot {step.value} while "
                                    f"{self.phase.value}")
        self.phase = to

    # What the phase means, for the code that asks:
    @property
    def state(self) -> RunState:
        return RUN_STATE_OF[self.phase]

    @property
    def paused(self) -> bool:
        return self.phase in _PAUSED

    @property
    def failed(self) -> bool:
        """A main symbol failed for good in this run's (unfinished) life."""
        return self.phase in _FAILED

    @property
    def halted(self) -> bool:
        """No new main symbol starts."""
        return self.phase in _HALTED

    @property
    def rollback_phase(self) -> bool:
        return self.phase in _ROLLBACK

    @property
    def cancelled(self) -> bool:
        return self.phase in (RunPhase.CANCELLING, RunPhase.CANCEL_ROLLING_BACK)

    @property
    def undo(self) -> RunState | None:
        """In a requested rollback phase: the outcome the run ended with (and keeps)."""
        return _UNDO.get(self.phase)

    @property
    def rollback_failed(self) -> bool:
        """A rollback of its current phase failed for good."""
        return any(t.state is TaskState.FAILED for t in self.rollbacks[self.undo_from:])


class Node:
    __slots__ = ("id", "name", "caps", "slots", "labels", "running", "last_seen", "draining",
                 "seq", "suspect", "assigned")
    __setattr__ = undo.tracked_setattr

    def __init__(self, ev: NodeConnected, seq: int) -> None:
        self.id = ev.node_id
        self.name = ev.name
        self.caps = frozenset(ev.capabilities)
        self.slots = ev.slots
        self.labels = dict(ev.labels)
        # Not logged (it is a hot path): its tasks say where they run, and the scheduler
        # rebuilds it from them after undoing an event.
        self.running: dict[int, Task] = {}
        self.last_seen = ev.now
        self.draining = False
        self.seq = seq
        self.suspect: set[int] = set()  # missing from the last heartbeat's running list
        self.assigned = 0  # assignments sent on this connection

    @property
    def free(self) -> int:
        return 0 if self.draining else self.slots - len(self.running)
