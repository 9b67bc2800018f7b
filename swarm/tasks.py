"""The scheduler's in-memory state: tasks, runs and nodes, and the tables that say how a
task's and a run's state may change. Only `swarm.core` changes these objects."""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from .errors import SwarmError
from .events import NodeConnected
from .model import RollbackSpec, Symbol, Workflow


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


RUN_FINAL = frozenset({RunState.COMPLETED, RunState.FAILED, RunState.ROLLED_BACK,
                       RunState.CANCELLED})


class IllegalTransition(SwarmError):
    """The scheduler tried a move its tables forbid: a bug in swarm, not in the input."""


class Refused(IllegalTransition):
    """A request the run's state does not allow now (pause a paused run, roll back a run
    with nothing to undo): raised before anything changed, and answered to the caller."""


class Task:
    __slots__ = ("id", "run", "name", "kind", "spec", "state", "attempts", "losses", "waiting",
                 "dependents", "deps", "node", "token", "due", "first_start", "key",
                 "parent", "orphan", "resources", "requires", "level", "holding", "owner",
                 "blocked", "wait_due", "checkpoint", "heard_at")

    def __init__(self, run: Run, name: str, kind: str, spec: Symbol | RollbackSpec,
                 parent: Task | None = None) -> None:
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

    @property
    def dispatch(self) -> str:
        return self.spec.dispatch

    @property
    def retries(self) -> int | None:
        return self.spec.retries


class Run:
    __slots__ = ("id", "workflow", "seq", "state", "tasks", "rollbacks", "unfinished",
                 "failed", "halted", "rollback_failed", "rollback_phase", "started", "hash",
                 "paused", "parked", "cancelled", "waves", "wave", "by_level", "undo",
                 "undo_started", "counts", "deadline_at")

    def __init__(self, run_id: str, workflow: Workflow, seq: int, now: float) -> None:
        self.id = run_id
        self.workflow = workflow
        self.seq = seq
        self.state = RunState.RUNNING
        self.tasks: dict[str, Task] = {}
        self.rollbacks: list[Task] = []
        # Its tasks (main and rollback) per state, kept as they move: `swarm status` and
        # the dashboard read them without walking 100,000 tasks on the event loop.
        self.counts: dict[TaskState, int] = dict.fromkeys(TaskState, 0)
        self.unfinished = 0  # tasks (main and rollback) not yet terminal
        self.failed = False
        self.halted = False  # no new main symbols start
        self.rollback_failed = False
        self.rollback_phase = False
        self.started = now
        self.hash = workflow.content_hash
        self.paused = False  # ready tasks wait in `parked` instead of starting
        self.parked: list[Task] = []
        self.cancelled = False
        self.waves = workflow.mode == "waves"  # a barrier between levels
        self.wave = 0  # the level running now (waves mode)
        self.by_level: list[list[Task]] = []
        # A rollback requested after the run ended is a phase of its own: the outcome it
        # ended with (kept, never rewritten) and when the phase began.
        self.undo: RunState | None = None
        self.undo_started = 0.0
        # When the run's `deadline` passes: from its start, so a restart keeps it.
        self.deadline_at = (now + workflow.deadline / 1000
                            if workflow.deadline is not None else None)


class Node:
    __slots__ = ("id", "name", "caps", "slots", "labels", "running", "last_seen", "draining",
                 "seq", "suspect", "assigned", "order")

    def __init__(self, ev: NodeConnected, seq: int) -> None:
        self.id = ev.node_id
        self.name = ev.name
        self.caps = frozenset(ev.capabilities)
        self.slots = ev.slots
        self.labels = dict(ev.labels)
        self.running: dict[int, Task] = {}
        self.last_seen = ev.now
        self.draining = False
        self.seq = seq
        self.suspect: set[int] = set()  # missing from the last heartbeat's running list
        self.assigned = 0  # assignments sent on this connection
        self.order: dict[int, int] = {}  # running token -> its number among `assigned`

    @property
    def free(self) -> int:
        return 0 if self.draining else self.slots - len(self.running)
