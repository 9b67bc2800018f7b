"""The scheduler's rules for long-running symbols (issue #14): checkpoints and progress
reports of running attempts, hang detection (`heartbeat_timeout`) and run deadlines.

A part of `swarm.core.Scheduler` (mixed in), kept apart so that core.py stays about
scheduling. Its rules are the core's: no I/O, no clock reads, every change journaled;
the shell commits the journal entries before it sends what follows them (`KeepAck`).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from typing import TYPE_CHECKING

from . import journal as jn
from . import undo
from .events import Abandon, Command, KeepAck, ProgressReceived
from .progress import (
    HUNG,
    MAX_MESSAGE,
    OPTED_OUT,
    RUN_DEADLINE,
    STALE,
    checkpoint_size,
    fraction,
    too_big,
)
from .protocol import CheckpointKept, TaskResult
from .tasks import RUN_FINAL, TERMINAL, Node, Run, RunState, RunStep, Task, TaskState, touch

if TYPE_CHECKING:
    from .core import SchedulerConfig
    from .placement import Placement


class LongRunning:
    """Checkpoints, progress, hangs and run deadlines: methods of the Scheduler."""

    if TYPE_CHECKING:  # what they use of the Scheduler
        config: SchedulerConfig
        _nodes: dict[str, Node]
        _by_token: dict[int, Task]
        _place: Placement
        _out: list[Command]
        _seq: itertools.count[int]
        _hang_timers: list[tuple[float, int, Task, int]]
        _deadlines: list[tuple[float, int, Run]]

        def _journal(self, record: jn.Record) -> None: ...

        def _finish_attempt(self, task: Task, r: TaskResult, node: str,
                            now: float) -> None: ...

        def _skip(self, tasks: Iterable[Task], now: float, reason: str) -> None: ...

        def _check_run(self, run: Run, now: float) -> None: ...


    def _long_running_due(self) -> list[float]:
        """The next hang timer's and run deadline's due times (for `next_deadline`)."""
        times = []
        hangs = self._hang_timers
        while hangs and (hangs[0][2].token != hangs[0][3]
                         or hangs[0][2].state is not TaskState.RUNNING):
            undo.heappop(hangs)  # that attempt ended: its timer is void
        if hangs:
            times.append(hangs[0][0])
        while self._deadlines and self._deadlines[0][2].state in RUN_FINAL:
            undo.heappop(self._deadlines)
        if self._deadlines:
            times.append(self._deadlines[0][0])
        return times

    def _long_running_tick(self, now: float) -> None:
        """The hang timers and run deadlines that are due."""
        while self._hang_timers and self._hang_timers[0][0] <= now:
            _, _, task, token = undo.heappop(self._hang_timers)
            self._check_hang(task, token, now)
        while self._deadlines and self._deadlines[0][0] <= now:
            self._run_deadline(undo.heappop(self._deadlines)[2], now)

    def _on_progress(self, ev: ProgressReceived) -> None:
        """Reports of running attempts. A checkpoint is kept (and journaled) only from the
        attempt that holds the task's current token, like a result; the worker hears of
        its fate (`KeepAck`) only after that is committed."""
        node = self._nodes.get(ev.node_id)
        if node is not None:
            node.last_seen = ev.now
        acks = []
        for r in ev.reports:
            task = self._by_token.get(r.token)
            wants_ack = r.checkpoint is not None or r.oversize > 0
            if (task is None or task.token != r.token or task.owner != ev.node_id
                    or task.state in TERMINAL):
                if wants_ack:  # fenced off: a late report of an attempt that was replaced
                    self._journal(jn.SymbolCheckpointDropped(
                        ev.now, task.run.id if task else None, task.id if task else None,
                        task.name if task else None, node.name if node else None,
                        token=r.token, reason=STALE))
                    acks.append(CheckpointKept(r.token, r.seq, STALE))
                continue
            touch(task)
            task.heard_at = ev.now
            progress = fraction(r.progress)  # a peer's NaN or 7.5 becomes sense
            message = r.message[:MAX_MESSAGE] if r.message else None
            head = (ev.now, task.run.id, task.id, task.name, node.name if node else None,
                    task.attempts)
            if not wants_ack:
                self._journal(jn.SymbolProgress(*head, token=r.token, progress=progress,
                                                message=message))
                continue
            size = r.oversize or checkpoint_size(r.checkpoint)
            error = (OPTED_OUT if not getattr(task.spec, "checkpoint", True)
                     else too_big(size, self.config.max_checkpoint_size))
            if error:
                self._journal(jn.SymbolCheckpointRejected(
                    *head, token=r.token, progress=progress, message=message, size=size,
                    error=error))
            else:
                task.checkpoint = r.checkpoint
                self._journal(jn.SymbolCheckpointed(
                    *head, token=r.token, progress=progress, message=message, size=size,
                    checkpoint=r.checkpoint))
            acks.append(CheckpointKept(r.token, r.seq, error))
        if acks:
            self._out.append(KeepAck(ev.node_id, tuple(acks)))

    def _watch_hang(self, task: Task, now: float) -> None:
        """A running attempt of a symbol with a `heartbeat_timeout` starts being watched."""
        touch(task)
        task.heard_at = now
        limit = getattr(task.spec, "heartbeat_timeout", None)
        if limit is not None:
            undo.heappush(self._hang_timers,
                           (now + limit / 1000, next(self._seq), task, task.token))

    def _check_hang(self, task: Task, token: int, now: float) -> None:
        """A hang timer is due: the attempt is hung unless it reported meanwhile. A hung
        attempt is abandoned (its worker terminates the backend's process group) and
        judged like a timeout: retried while retries remain."""
        if task.state is not TaskState.RUNNING or task.token != token or task.node is None:
            return
        limit = getattr(task.spec, "heartbeat_timeout", None) or 0
        due = task.heard_at + limit / 1000
        if due > now:
            undo.heappush(self._hang_timers, (due, next(self._seq), task, token))
            return
        node = task.node
        self._place.vacate(node, token, node.id in self._nodes)
        touch(task)
        task.node = None
        self._out.append(Abandon(node.id, (token,)))
        self._finish_attempt(task, TaskResult(token=token, task_id=task.id, ok=False,
                                              error=HUNG.format(ms=limit), timed_out=True),
                             node.name, now)

    def _run_deadline(self, run: Run, now: float) -> None:
        """The run's `deadline` passed: running symbols are stopped and fail, nothing new
        starts, and the run's `on_failure` applies (rollbacks still run: they restore)."""
        if run.state is not RunState.RUNNING or run.cancelled or all(
                t.state in TERMINAL for t in run.tasks.values()):
            return  # it ended, rolls back already, or fired before a restart
        self._journal(jn.RunDeadlineExceeded(now, run.id, deadline=run.workflow.deadline or 0,
                                             reason=RUN_DEADLINE))
        run.parked.clear()
        if not run.halted:  # whatever its on_failure: nothing new starts after a deadline
            run.move(RunStep.HALT)
            self._journal(jn.RunHalting(now, run.id, cause=RUN_DEADLINE,
                                        policy=run.workflow.on_failure))
        self._skip([t for t in run.tasks.values()
                    if t.state in (TaskState.PENDING, TaskState.READY, TaskState.RETRYING)],
                   now, RUN_DEADLINE)
        for task in [t for t in run.tasks.values() if t.state is TaskState.RUNNING]:
            node = task.node
            assert node is not None
            self._place.vacate(node, task.token, node.id in self._nodes)
            touch(task)
            task.node = None
            self._out.append(Abandon(node.id, (task.token,)))
            self._finish_attempt(task, TaskResult(token=task.token, task_id=task.id, ok=False,
                                                  error=RUN_DEADLINE, retryable=False),
                                 node.name, now)
        self._check_run(run, now)
