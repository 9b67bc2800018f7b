"""The scheduler: a pure state machine. It decides what runs, when; `placement.py` where.

Rules of this module:
- State changes only through `Scheduler.handle(event) -> list[Command]`.
- No I/O, no asyncio, no clock reads: time arrives inside events (`now`, seconds since
  the epoch) and `next_deadline()` tells the shell when to send the next `Tick`.
- Every state change is announced as a `Journal` command, in order. The shell commits
  journal entries before it carries out any `Send` that follows them, which is what
  makes "a completion is committed before its dependents are released" true.
- Task states move only along `TASK_TRANSITIONS`, runs only along `RUN_TRANSITIONS`;
  anything else is our bug and raises `IllegalTransition`.
- `handle` is all or nothing: an event that raises (an illegal move, a refused request,
  a bug) leaves the core exactly as it was, undone through `swarm.undo`'s log.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from . import journal as jn
from . import plan as planning
from . import undo
from .events import (  # the core's vocabulary, re-exported
    Abandon,
    Ack,
    Assign,
    CloseNode,
    Command,
    Event,
    Journal,
    KeepAck,
    NodeConnected,
    NodeDisconnected,
    NodeDraining,
    NodeHeartbeat,
    ProgressReceived,
    ResultsReceived,
    RollbackRequested,
    RunCancelled,
    RunPaused,
    RunRestored,
    RunResumed,
    RunSubmitted,
    TaskRecord,
    Tick,
)
from .longrun import LongRunning
from .model import DEFAULT_RETRIES, RetryPolicy, Symbol, Workflow
from .placement import Placement
from .progress import DEFAULT_MAX_CHECKPOINT_SIZE
from .protocol import TaskAssignment, TaskResult
from .tasks import (
    RUN_FINAL,
    RUN_TRANSITIONS,
    TASK_TRANSITIONS,
    TERMINAL,
    IllegalTransition,
    Node,
    Refused,
    Run,
    RunPhase,
    RunState,
    RunStep,
    Task,
    TaskState,
    touch,
)


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    heartbeat_timeout: float = 15.0  # seconds
    max_worker_losses: int = 3
    load_balancing: bool = True
    priority_queue: bool = True
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    default_retries: int = DEFAULT_RETRIES  # of a symbol that sets no `retries` of its own
    first_token: int = 1  # without a token source: tokens count up from here (tests)
    # Where attempt tokens come from. The dispatcher draws them at random (64 bits), so a
    # token cannot be guessed; the core stays deterministic without one.
    token_source: Callable[[], int] | None = None
    orphan_grace: float = 15.0  # seconds a restored running attempt waits for its worker
    # Ticks further apart than this while nodes are connected mean the dispatcher itself
    # stalled (it ticks about every second): nobody's silence is judged across a stall.
    stall_after: float = 3.0
    max_checkpoint_size: int = DEFAULT_MAX_CHECKPOINT_SIZE  # bytes of JSON; <= 0: no limit


# --- internal state -------------------------------------------------------------------

# What a task needs of a worker: its backend, or its backend and labels (sorted).
Need = str | tuple[str, tuple[tuple[str, str], ...]]


# Writes of state that other state determines (a run's count of unfinished tasks): not
# logged on the hot path, recomputed by `_rebuild_derived` after a rollback.
_unlogged = object.__setattr__


def _need(task: Task) -> Need:
    return task.dispatch if not task.requires else (
        task.dispatch, tuple(sorted(task.requires.items())))


def _still_waiting(due: float, _seq: int, task: Task) -> bool:
    """A wait_for_worker timer that still counts: its task waits in that same episode."""
    return task.state is TaskState.READY and bool(task.blocked) and task.wait_due == due


def backoff_delay(policy: RetryPolicy, task_id: str, failures: int) -> float:
    """Seconds before retry number `failures` (1-based). Jitter is derived from the task id
    and attempt, so it spreads retries without the core needing a random source."""
    delay = min(policy.max_delay, policy.initial_delay * policy.backoff_factor ** (failures - 1))
    if policy.jitter:
        h = hashlib.blake2b(f"{task_id}#{failures}".encode(), digest_size=4).digest()
        u = int.from_bytes(h, "big") / 0xFFFFFFFF * 2 - 1  # in [-1, 1]
        delay *= 1 + policy.jitter * u
    return max(0.0, delay) / 1000.0


# The phase of a finished run whose rollback was requested, by the outcome it ended with.
_UNDOABLE = {RunState.COMPLETED: RunPhase.UNDOING_COMPLETED,
             RunState.FAILED: RunPhase.UNDOING_FAILED}


class Scheduler(LongRunning):
    """Runs, tasks and nodes, and the rules that move them. See the module docstring."""

    __setattr__ = undo.tracked_setattr  # inside `handle`, every write can be undone

    def __init__(self, config: SchedulerConfig | None = None) -> None:
        self.config = config or SchedulerConfig()
        self._runs: dict[str, Run] = undo.TDict()
        self._nodes: dict[str, Node] = undo.TDict()
        self._place = Placement(load_balancing=self.config.load_balancing,
                                priority_queue=self.config.priority_queue)
        self._by_token: dict[int, Task] = undo.TDict()
        self._timers: list[tuple[float, int, Task]] = []
        self._seq = itertools.count()
        self._run_seq = itertools.count()
        self._node_seq = itertools.count()
        self._next_token = self.config.first_token
        self._out: list[Command] = []
        self._assign: dict[str, list[TaskAssignment]] = {}
        self._liveness_every = min(1.0, self.config.heartbeat_timeout / 4)
        self._liveness_at: float | None = None  # when silent nodes are looked for next
        self._last_tick: float | None = None
        self.refused = 0  # results and adoption claims from a node that does not own them
        self.stalls = 0
        # Can some connected worker run a (backend, labels) need? "" if so, else the reason.
        # Asked once per need, not per symbol: 100,000 ready symbols share a few needs.
        # Cleared as nodes join, leave or drain.
        self._can: dict[Need, str] = undo.TDict()
        self._waiting: dict[Need, dict[str, Task]] = {}  # need -> its tasks waiting now
        self._wait_timers: list[tuple[float, int, Task]] = []  # wait_for_worker expiries
        self._joins = 0  # nodes that ever connected
        # After a restart, workers get `orphan_grace` to reconnect before anything is
        # declared waiting for one: their absence then is the dispatcher's doing.
        self._settle_at: float | None = None
        # Running attempts of symbols with a `heartbeat_timeout`: (due, seq, task, token),
        # pushed again lazily when a report came in meanwhile. Runs with a `deadline`.
        self._hang_timers: list[tuple[float, int, Task, int]] = []
        self._deadlines: list[tuple[float, int, Run]] = []

    # --- public -----------------------------------------------------------------------

    def handle(self, event: Event) -> list[Command]:
        """Apply one event; return what the shell must persist and send, in order.

        All or nothing: if applying the event raises, every change it made is undone
        (see `swarm.undo`) and the exception propagates with the core as it was."""
        self._out = []
        self._assign = {}
        undo.begin()
        try:
            self._apply(event)
            if type(event) is NodeHeartbeat and not self._out:
                undo.commit()
                return []  # the common case, a thousand times a second with many workers
            self._dispatch(getattr(event, "now", 0.0))
        except BaseException:
            undo.rollback()
            self._rebuild_derived()
            self._out = []
            self._assign = {}
            raise
        undo.commit()
        out = self._out
        for nid, tasks in self._assign.items():
            out.append(Assign(nid, tuple(tasks)))
        self._out = []
        self._assign = {}
        return out

    def _apply(self, event: Event) -> None:
        match event:
            case Tick(now=now, stalled=stalled):
                self._on_tick(now, stalled)
            case ResultsReceived():
                self._on_results(event)
            case NodeHeartbeat():
                self._on_heartbeat(event)
            case NodeConnected():
                self._on_connect(event)
            case NodeDisconnected(node_id=nid, now=now, graceful=graceful):
                self._on_node_gone(nid, now, "disconnected", graceful)
            case NodeDraining(node_id=nid, now=now):
                node = self._nodes.get(nid)
                if node is not None:
                    node.draining = True
                    node.last_seen = now
                    self._place.reindex(node)
                    self._journal(jn.NodeDraining(now, node=node.name))
                    self._lost(node, now)
            case RunSubmitted():
                self._on_submit(event)
            case RunRestored():
                self._on_restore(event)
            case RollbackRequested():
                self._on_rollback_request(event)
            case RunPaused() | RunResumed():
                self._on_pause(event)
            case RunCancelled():
                self._on_cancel(event)
            case ProgressReceived():
                self._on_progress(event)
            case _:
                raise IllegalTransition(f"unknown event {event!r}")

    def _rebuild_derived(self) -> None:
        """After a rollback: recompute what other state determines and the undo log
        leaves out (it would cost on every change): counts, who runs what, locks, indexes."""
        tasks = [t for run in self._runs.values()
                 for t in itertools.chain(run.tasks.values(), run.rollbacks)]
        for run in self._runs.values():
            counts = dict.fromkeys(TaskState, 0)
            for t in itertools.chain(run.tasks.values(), run.rollbacks):
                counts[t.state] += 1
            run.counts = counts
            run.unfinished = sum(n for s, n in counts.items() if s not in TERMINAL)
        for node in self._nodes.values():
            running = sorted(((t.token, t) for t in tasks if t.state is TaskState.RUNNING
                              and t.node is node), key=lambda e: (e[1].sent, e[0]))
            node.running = dict(running)  # in the order they were assigned, as before
        self._place.rebuild(self._nodes.values(), tasks)
        self._waiting = {}
        for t in tasks:
            if t.state is TaskState.READY and t.blocked:
                self._waiting.setdefault(_need(t), {})[t.id] = t

    def next_deadline(self) -> float | None:
        """The earliest time at which a `Tick` would change something."""
        times = []
        while self._timers and self._timers[0][2].state is not TaskState.RETRYING:
            undo.heappop(self._timers)
        if self._timers:
            times.append(self._timers[0][0])
        if self._nodes and self._liveness_at is not None:
            times.append(self._liveness_at)
        waits = self._wait_timers
        while waits and not _still_waiting(*waits[0]):
            undo.heappop(waits)
        if waits:
            times.append(waits[0][0])
        if self._settle_at is not None:
            times.append(self._settle_at)
        times.extend(self._long_running_due())
        return min(times) if times else None

    def _new_token(self) -> int:
        source = self.config.token_source
        if source is None:
            token = self._next_token
            self._next_token += 1
            return token
        while True:  # 0 means "none" and a live token is never given twice
            token = source()
            if token and token not in self._by_token:
                return token

    def run_state(self, run_id: str) -> RunState | None:
        run = self._runs.get(run_id)
        return run.state if run else None

    def task_state(self, run_id: str, name: str) -> TaskState | None:
        run = self._runs.get(run_id)
        task = run.tasks.get(name) if run else None
        return task.state if task else None

    def dispatch_of(self, run_id: str | None, symbol: str | None) -> str:
        """The backend of a symbol (or rollback) of a run held in memory; "" if unknown."""
        run = self._runs.get(run_id or "")
        if run is None or symbol is None:
            return ""
        task = run.tasks.get(symbol)
        if task is None:
            task = next((t for t in run.rollbacks if t.name == symbol), None)
        return task.dispatch if task is not None else ""

    def find_active(self, manifest_hash: str) -> str | None:
        """An unfinished run of the manifest with this content hash, if any."""
        for run in self._runs.values():
            if run.state not in RUN_FINAL and run.hash == manifest_hash and run.undo is None:
                return run.id
        return None

    def known_runs(self) -> list[str]:
        """Every run held in memory, finished ones not yet forgotten included."""
        return list(self._runs)

    def active_runs(self) -> list[str]:
        return [r.id for r in self._runs.values() if r.state not in RUN_FINAL]

    def snapshot(self) -> dict[str, Any]:
        """What `swarm status` shows of the live scheduler."""
        counts: dict[str, int] = {s.value: 0 for s in TaskState}
        runs = []
        for run in self._runs.values():  # O(runs): each run keeps its counts per state
            per = {s.value: n for s, n in run.counts.items() if n}
            for state, n in per.items():
                counts[state] += n
            if run.state not in RUN_FINAL:
                runs.append({"run_id": run.id, "workflow": run.workflow.name,
                             "state": (RunState.PAUSED if run.paused else run.state).value,
                             "tasks": per,
                             "total": len(run.tasks), "started": run.started})
        nodes = [{
            "node_id": n.id, "name": n.name, "capabilities": sorted(n.caps), "slots": n.slots,
            "running": len(n.running), "draining": n.draining, "last_seen": n.last_seen,
            "labels": n.labels,
        } for n in sorted(self._nodes.values(), key=lambda n: n.seq)]
        return {"nodes": nodes, "tasks": counts, "runs": runs,
                "waiting_for_capability": self._unrunnable()}

    def _unrunnable(self, most: int = 100) -> list[dict[str, Any]]:
        """Ready symbols that no connected worker could ever run (backend or labels), with
        the reason, and when their `wait_for_worker` runs out (None: never). From the
        index of waiting symbols; only in the grace after a restart, when nothing is
        marked waiting yet, are the ready symbols looked through."""
        out: list[dict[str, Any]] = []
        if self._settle_at is None:
            tasks: Iterable[Task] = (t for waiting in self._waiting.values()
                                     for t in waiting.values())
        else:
            tasks = (t for run in self._runs.values() if run.state not in RUN_FINAL
                     for t in itertools.chain(run.tasks.values(), run.rollbacks)
                     if t.state is TaskState.READY)
        for t in tasks:
            reason = t.blocked or self._reason(_need(t))
            if reason:
                out.append({"run_id": t.run.id, "symbol": t.name, "dispatch": t.dispatch,
                            "requires": dict(t.requires), "reason": reason,
                            "due": t.wait_due})
                if len(out) >= most:
                    break
        return out

    def forget_finished(self) -> None:
        """Drop finished runs from memory (their records stay in the state DB)."""
        for rid in [r.id for r in self._runs.values() if r.state in RUN_FINAL]:
            run = self._runs.pop(rid)
            # Unlink the task graph so that reference counting frees it at once: left as
            # cycles, 100,000 tasks would wait for (and slow down) a full GC pass.
            for t in itertools.chain(run.tasks.values(), run.rollbacks):
                t.deps.clear()
                t.dependents.clear()
                t.parent = None
            run.tasks.clear()
            run.rollbacks.clear()
            run.by_level.clear()
            run.parked.clear()

    def validate(self) -> None:
        """Check the invariants; tests call this after every step."""
        self._place.validate(self._nodes.values(), (
            t for run in self._runs.values()
            for t in itertools.chain(run.tasks.values(), run.rollbacks)))
        for node in self._nodes.values():
            assert len(node.running) <= node.slots, f"{node.name} over its slots"
            for token, task in node.running.items():
                assert task.state is TaskState.RUNNING and task.token == token, task.id
                assert task.node is node, task.id
        for run in self._runs.values():
            unfinished = 0
            for t in itertools.chain(run.tasks.values(), run.rollbacks):
                if t.state not in TERMINAL:
                    unfinished += 1
                if t.state is TaskState.RUNNING:
                    assert t.node is not None and t.node.running.get(t.token) is t, t.id
                if t.state in (TaskState.READY, TaskState.RUNNING, TaskState.COMPLETED):
                    # Rollbacks are best effort: a failed rollback does not hold back the next.
                    done = (TaskState.COMPLETED, TaskState.ROLLED_BACK) + (
                        (TaskState.FAILED,) if t.kind == "rollback" else ())
                    assert all(d.state in done for d in t.deps), \
                        f"{t.id} started before its dependencies"
            assert unfinished == run.unfinished, (run.id, unfinished, run.unfinished)
            per: dict[TaskState, int] = dict.fromkeys(TaskState, 0)
            for t in itertools.chain(run.tasks.values(), run.rollbacks):
                per[t.state] += 1
            assert per == run.counts, (run.id, per, run.counts)
        for need, tasks in self._waiting.items():
            for t in tasks.values():
                assert t.state is TaskState.READY and t.blocked, t.id
                assert _need(t) == need and self._can.get(need), t.id
            if run.state in RUN_FINAL:
                assert unfinished == 0, run.id

    # --- events -----------------------------------------------------------------------

    def _on_submit(self, ev: RunSubmitted) -> None:
        wf = ev.workflow
        run = self._build_run(ev.run_id, wf, ev.now, ev.durations)
        self._journal(jn.RunStarted(
            ev.now, run.id, workflow=wf.name, version=wf.version, hash=run.hash,
            symbols=len(wf.symbols), on_failure=wf.on_failure, mode=wf.mode,
            manifest=wf.to_dict(), resumed_from=ev.resumed_from or None))
        for name, output in ev.reuse.items():
            task = run.tasks[name]
            self._force(task, TaskState.COMPLETED)
            self._journal(jn.SymbolCompleted(
                ev.now, run.id, task.id, task.name, output=output, reused_from=ev.resumed_from,
                rollback=task.spec.rollback.to_dict() if isinstance(task.spec, Symbol)
                and task.spec.rollback is not None else None))
        for task in run.tasks.values():
            task.waiting = sum(1 for d in task.deps if d.state is not TaskState.COMPLETED)
            if task.waiting == 0 and task.state is TaskState.PENDING:
                self._make_ready(task, ev.now)
        self._check_run(run, ev.now)

    def _build_run(self, run_id: str, wf: Workflow, now: float,
                   durations: dict[str, float] | None = None) -> Run:
        """A run's tasks and their dependency links, all pending. Ranks (the remaining path
        to the end of the DAG) are weighted by the expected durations when known."""
        if run_id in self._runs:
            raise Refused(f"run {run_id} is already known")
        run = Run(run_id, wf, next(self._run_seq), now)
        self._runs[run.id] = run
        if run.deadline_at is not None:
            undo.heappush(self._deadlines, (run.deadline_at, next(self._seq), run))
        analysis = planning.analyze(wf, durations or None)
        for index, sym in enumerate(wf.symbols):
            task = Task(run, sym.name, "main", sym)
            if self.config.priority_queue:
                task.key = (-sym.priority, -analysis.rank[sym.name], run.seq, index)
            run.tasks[sym.name] = task
        run.unfinished = len(run.tasks)
        for sym in wf.symbols:
            task = run.tasks[sym.name]
            for dep in sym.dependencies:
                d = run.tasks[dep]
                task.deps.append(d)
                d.dependents.append(task)
        for level, names in enumerate(analysis.levels):
            run.by_level.append([run.tasks[n] for n in names])
            for n in names:
                run.tasks[n].level = level
        return run

    def _on_restore(self, ev: RunRestored) -> None:
        """Rebuild a run from its records (after a dispatcher restart, or to roll it back).
        Attempts that were running are held for `orphan_grace`: their worker may come back
        and report; after that they run again."""
        if not self._joins and self._settle_at is None:  # a restart: workers come back
            self._settle_at = ev.now + self.config.orphan_grace
        run = self._build_run(ev.run_id, ev.workflow, ev.started)
        records = {(r.kind, r.parent if r.kind == "rollback" else r.name): r for r in ev.tasks}
        for task in run.tasks.values():
            rec = records.get(("main", task.name))
            if rec is not None:
                self._restore_task(task, rec, ev.now)
        for rec in ev.tasks:
            if rec.kind != "rollback" or rec.parent not in run.tasks:
                continue
            parent = run.tasks[rec.parent]
            assert isinstance(parent.spec, Symbol) and parent.spec.rollback is not None
            rb = Task(run, parent.spec.rollback.name, "rollback", parent.spec.rollback, parent)
            rb.key = (float("-inf"), run.seq, len(run.rollbacks))
            run.rollbacks.append(rb)
            run.unfinished += 1
            self._restore_task(rb, rec, ev.now)
        by_parent = {rb.parent.name: rb for rb in run.rollbacks if rb.parent is not None}
        for rb in run.rollbacks:
            rec = records[("rollback", rb.parent.name if rb.parent else "")]
            for name in rec.after:
                if name in by_parent:
                    rb.deps.append(by_parent[name])
                    by_parent[name].dependents.append(rb)
        run.phase = self._restored_phase(run, ev)
        if run.undo is not None:
            run.undo_started = ev.rollback_started
        run.wave = min((t.level for t in run.tasks.values() if t.state not in TERMINAL),
                       default=len(run.by_level))
        for task in itertools.chain(run.tasks.values(), run.rollbacks):
            ok = (TaskState.COMPLETED, TaskState.ROLLED_BACK) + (
                (TaskState.FAILED,) if task.kind == "rollback" else ())
            task.waiting = sum(1 for d in task.deps if d.state not in ok)
            if task.state is TaskState.PENDING and task.waiting == 0 and (
                    task.kind == "rollback" or not run.halted):
                self._make_ready(task, ev.now)
        self._journal(jn.RunRestored(ev.now, run.id, status=run.state.value))
        self._check_run(run, ev.now)

    @staticmethod
    def _restored_phase(run: Run, ev: RunRestored) -> RunPhase:
        """The phase a run was in, from its status and its tasks' records."""
        if ev.status in RUN_FINAL:  # a finished run stays finished, unless being undone
            if ev.rollback == RunState.ROLLING_BACK and ev.status in _UNDOABLE:
                return _UNDOABLE[RunState(ev.status)]
            return RunPhase(ev.status)
        if ev.status == RunState.ROLLING_BACK or any(
                rb.parent is not None and rb.parent.state is not TaskState.FAILED
                for rb in run.rollbacks):
            return RunPhase.ROLLING_BACK
        paused = ev.status == RunState.PAUSED
        if any(t.state is TaskState.FAILED for t in run.tasks.values()):
            if run.workflow.on_failure != "continue":
                return RunPhase.HALTING
            return RunPhase.FAILING_PAUSED if paused else RunPhase.FAILING
        return RunPhase.PAUSED if paused else RunPhase.RUNNING

    def _restore_task(self, task: Task, rec: TaskRecord, now: float) -> None:
        state = TaskState(rec.state)
        task.attempts, task.losses, task.token = rec.attempts, rec.losses, rec.token
        task.owner = rec.node_id
        task.first_start = rec.first_start
        task.checkpoint = rec.checkpoint
        if state is TaskState.RUNNING:  # its worker may still report: hold it a while
            self._force(task, TaskState.RETRYING)
            self._place.claim(task)  # and its locks: it may still be running out there
            task.orphan = task.token
            self._by_token[task.token] = task
            task.due = now + self.config.orphan_grace
            undo.heappush(self._timers, (task.due, next(self._seq), task))
            self._journal(jn.SymbolOrphaned(now, task.run.id, task.id, task.name,
                                            attempt=task.attempts, token=task.token,
                                            due=task.due))
        elif state is TaskState.RETRYING:
            self._force(task, state)
            task.due = rec.due if rec.due is not None else now
            undo.heappush(self._timers, (task.due, next(self._seq), task))
        elif state is TaskState.READY:
            self._force(task, state)
            self._place.push(task)
            if rec.due is not None:  # it was waiting for a worker: its due time holds,
                # though never before the workers had their chance to come back
                task.wait_due = max(rec.due, self._settle_at or rec.due)
            self._check_waiting(task, now)
        else:
            self._force(task, state)

    def _on_pause(self, ev: RunPaused | RunResumed) -> None:
        run = self._runs.get(ev.run_id)
        pause = isinstance(ev, RunPaused)
        step = RunStep.PAUSE if pause else RunStep.RESUME
        if run is None or not run.can(step):
            raise Refused(f"run {ev.run_id} cannot be {'paused' if pause else 'resumed'} "
                          f"now{f' (it is {run.phase.value})' if run else ''}")
        run.move(step)
        if pause:
            self._journal(jn.RunPaused(ev.now, run.id))
            return
        self._place.push_all(run.parked)
        self._journal(jn.RunResumed(ev.now, run.id, status=run.state.value))

    def _on_cancel(self, ev: RunCancelled) -> None:
        """Stop a run: running attempts are abandoned (their backends terminated), nothing
        else starts; with `rollback`, completed symbols are then rolled back."""
        run = self._runs.get(ev.run_id)
        if run is None or not run.can(RunStep.CANCEL):
            raise Refused(f"run {ev.run_id} cannot be cancelled now"
                          f"{f' (it is {run.phase.value})' if run else ''}")
        run.move(RunStep.CANCEL)
        run.parked.clear()
        self._journal(jn.RunCancelling(ev.now, run.id, rollback=ev.rollback))
        abandon: dict[str, list[int]] = {}
        for task in itertools.chain(run.tasks.values(), run.rollbacks):
            if task.state in TERMINAL:
                continue
            if task.state is TaskState.RUNNING and task.node is not None:
                self._place.vacate(task.node, task.token, task.node.id in self._nodes)
                abandon.setdefault(task.node.id, []).append(task.token)
                touch(task)
                task.node = None
            self._set(task, TaskState.CANCELLED)
            self._journal(jn.SymbolCancelled(ev.now, run.id, task.id, task.name,
                                              attempt=task.attempts))
        for nid, tokens in abandon.items():
            self._out.append(Abandon(nid, tuple(tokens)))
        if ev.rollback:
            self._start_rollback_phase(run, ev.now)
        self._check_run(run, ev.now)

    def _on_rollback_request(self, ev: RollbackRequested) -> None:
        """Undo a finished run's completed symbols, as a phase of its own: the run's
        status and end stay what they were; the phase ends with `rollback.completed`."""
        run = self._runs.get(ev.run_id)
        if run is None or not run.can(RunStep.UNDO):
            raise Refused(f"run {ev.run_id} cannot be rolled back now")
        targets = self.undoable(run.id)
        if not targets:
            raise Refused(f"run {ev.run_id} has nothing to undo")
        run.undo_started, run.undo_from = ev.now, len(run.rollbacks)
        run.move(RunStep.UNDO)
        assert run.undo is not None
        self._journal(jn.RunRollbackRequested(ev.now, run.id, status=run.undo.value,
                                              rollbacks=len(targets)))
        self._start_rollback_phase(run, ev.now)
        self._check_run(run, ev.now)

    def undoable(self, run_id: str) -> list[str]:
        """The symbols a rollback of this run would undo: completed, with a rollback."""
        run = self._runs.get(run_id)
        if run is None:
            return []
        return [t.name for t in run.tasks.values() if t.state is TaskState.COMPLETED
                and isinstance(t.spec, Symbol) and t.spec.rollback is not None]

    def _on_connect(self, ev: NodeConnected) -> None:
        old = self._nodes.get(ev.node_id)
        if old is not None:  # the same node, reconnected before its old connection ended
            self._on_node_gone(old.id, ev.now, "replaced", True, recheck=False)
        node = Node(ev, next(self._node_seq))
        self._nodes[node.id] = node
        self._joins += 1
        self._place.reindex(node)
        if old is not None:
            self._lost(old, ev.now)  # what the old one could run and this one cannot
        self._gained(node, ev.now)
        if self._liveness_at is None:
            self._liveness_at = ev.now + self._liveness_every
        self._journal(jn.NodeJoined(ev.now, node=node.name, node_id=node.id,
                                    capabilities=sorted(node.caps), slots=node.slots,
                                    labels=node.labels))
        abandon = []
        for token in ev.running:
            task = self._by_token.get(token)
            if task is not None and task.owner != node.id:
                self._refuse(task, token, node, ev.now, "adoption")
                abandon.append(token)
            # A reconnecting worker keeps an attempt only if nobody else took it over.
            elif (task is not None and task.token == token and task.orphan == token
                    and task.state in (TaskState.READY, TaskState.RETRYING)
                    and len(node.running) < node.slots):
                self._set(task, TaskState.RUNNING)
                self._place.claim(task)
                task.node = node
                task.orphan = 0
                self._place.occupy(node, token, task)
                task.sent = 0  # it named the attempt itself: no assignment to await
                self._journal(jn.SymbolAdopted(ev.now, task.run.id, task.id, task.name,
                                               node.name, task.attempts, node_id=node.id,
                                               token=token))
                self._watch_hang(task, ev.now)
            else:
                abandon.append(token)
        if abandon:
            self._out.append(Abandon(node.id, tuple(abandon)))

    def _refuse(self, task: Task, token: int, node: Node, now: float, what: str) -> None:
        """A node claimed an attempt it was never given: dropped, journaled, counted; the
        attempt stays with its owner."""
        self.refused += 1
        self._journal(jn.ClaimRefused(now, task.run.id, task.id, task.name, node.name,
                                      token=token, claim=what, node_id=node.id,
                                      owner=task.owner))

    def _on_node_gone(self, node_id: str, now: float, reason: str, graceful: bool,
                      recheck: bool = True) -> None:
        node = self._nodes.pop(node_id, None)
        if node is None:
            return
        self._place.remove(node)
        self._journal((jn.NodeLeft if graceful else jn.NodeLost)(
            now, node=node.name, node_id=node.id, reason=reason, running=len(node.running)))
        if recheck:  # before its attempts are requeued: those are checked as they queue
            self._lost(node, now)
        for task in list(node.running.values()):
            self._lose(task, node, now, reason, graceful)

    def _lose(self, task: Task, node: Node, now: float, reason: str, graceful: bool) -> None:
        """An attempt whose worker is gone (or forgot it): requeue it, or fail it for good."""
        touch(task)
        self._place.vacate(node, task.token, node.id in self._nodes)
        task.node = None
        run = task.run
        if not graceful:
            task.losses += 1
        self._journal(jn.AttemptLost(now, run.id, task.id, task.name, node.name,
                                     task.attempts, reason=reason, losses=task.losses,
                                     token=task.token))
        if task.losses >= self.config.max_worker_losses:
            self._set(task, TaskState.FAILED)
            self._journal(jn.SymbolFailed(now, run.id, task.id, task.name,
                                          attempt=task.attempts,
                                          error=f"worker lost {task.losses} times"))
            self._failed_for_good(task, now)
        elif run.halted and task.kind == "main":
            self._set(task, TaskState.FAILED)
            self._journal(jn.SymbolFailed(now, run.id, task.id, task.name,
                                          attempt=task.attempts,
                                          error="worker lost while the run was halting"))
            self._failed_for_good(task, now)
        else:
            self._set(task, TaskState.READY)
            task.orphan = task.token
            self._push_ready(task, now, reason="worker lost")
        self._check_run(run, now)

    def _on_heartbeat(self, ev: NodeHeartbeat) -> None:
        node = self._nodes.get(ev.node_id)
        if node is None:
            return
        node.last_seen = ev.now
        if ev.running is None or ev.assigned is None:
            return
        # An attempt the worker no longer reports twice in a row is lost: its result will
        # never come, and without this its slot would be held forever. Only attempts the
        # worker provably had when it sent the heartbeat count: one still on its way (the
        # dispatcher may lag far behind) is not missing.
        reported = set(ev.running)
        running = node.running
        missing = {t for t in running if t not in reported and running[t].sent <= ev.assigned}
        for token in missing & node.suspect:
            self._lose(node.running[token], node, ev.now, "worker forgot the attempt", False)
        node.suspect = missing - node.suspect

    def _on_tick(self, now: float, stalled: float = 0.0) -> None:
        last, self._last_tick = self._last_tick, now
        if self._nodes and (stalled > 0 or (last is not None
                                            and now - last > self.config.stall_after)):
            # The dispatcher itself was not listening: frames may wait unread in its
            # buffers. Every node gets a fresh grace period before it is judged.
            self.stalls += 1
            for node in self._nodes.values():
                node.last_seen = max(node.last_seen, now)
            self._journal(jn.DispatcherStalled(
                now, seconds=round(stalled or now - (last or now), 3), nodes=len(self._nodes)))
        while self._timers and self._timers[0][0] <= now:
            _, _, task = undo.heappop(self._timers)
            if task.state is TaskState.RETRYING:
                self._set(task, TaskState.READY)
                self._push_ready(task, now, reason="retry")
        self._long_running_tick(now)
        if self._settle_at is not None and now >= self._settle_at:
            self._settle_at = None
            self._recheck(now, None)
        waits = self._wait_timers
        while waits and waits[0][0] <= now:
            entry = undo.heappop(waits)
            if _still_waiting(*entry):
                self._give_up_waiting(entry[2], now)
        if self._liveness_at is None or now < self._liveness_at:
            return
        # Checked on a coarse beat rather than per node: with many workers, finding the
        # next expiry would cost a scan of all of them on every event.
        self._liveness_at = now + self._liveness_every
        limit = now - self.config.heartbeat_timeout
        for node in [n for n in self._nodes.values() if n.last_seen < limit]:
            self._out.append(CloseNode(node.id, "no heartbeat"))
            self._on_node_gone(node.id, now, "heartbeat timeout", False)

    def _on_results(self, ev: ResultsReceived) -> None:
        node = self._nodes.get(ev.node_id)
        if node is not None:
            node.last_seen = ev.now
        acks = []
        for r in ev.results:
            acks.append(r.token)
            task = (self._place.vacate(node, r.token, True) if node is not None else None)
            if task is None and node is not None:
                known = self._by_token.get(r.token)
                if known is not None and known.owner != node.id:
                    self._refuse(known, r.token, node, ev.now, "result")
                    continue
                task = self._orphan_result(r.token)
            if task is None:
                # Stale (fenced off), duplicate, or not this node's: acknowledged, dropped.
                known = self._by_token.get(r.token)
                self._journal(jn.ResultDropped(
                    ev.now, known.run.id if known else None, known.id if known else None,
                    known.name if known else None, node.name if node else None,
                    token=r.token, reason="stale or unknown attempt"))
                continue
            touch(task)
            task.node = None
            self._finish_attempt(task, r, node.name, ev.now)  # type: ignore[union-attr]
        self._out.append(Ack(ev.node_id, tuple(acks)))

    def _orphan_result(self, token: int) -> Task | None:
        """The result of an attempt whose worker was lost (or a dispatcher that restarted)
        and that nobody else has taken over yet: the work is done, so it counts."""
        task = self._by_token.get(token)
        if (task is None or task.orphan != token or task.token != token
                or task.state not in (TaskState.READY, TaskState.RETRYING)):
            return None
        self._set(task, TaskState.RUNNING)
        self._place.claim(task)
        task.orphan = 0
        return task

    # --- task lifecycle ---------------------------------------------------------------

    def _finish_attempt(self, task: Task, r: TaskResult, node: str, now: float) -> None:
        run = task.run
        self._by_token.pop(r.token, None)  # a duplicate of this result is dropped
        self._journal(jn.AttemptFinished(
            now, run.id, task.id, task.name, node, task.attempts, token=r.token, ok=r.ok,
            output=r.output, error=r.error, exit_code=r.exit_code, timed_out=r.timed_out,
            duration_ms=r.duration_ms, stderr=r.stderr, stdout_truncated=r.stdout_truncated,
            stderr_truncated=r.stderr_truncated))
        if r.ok:
            self._set(task, TaskState.COMPLETED)
            self._journal(jn.SymbolCompleted(
                now, run.id, task.id, task.name, node, task.attempts, output=r.output,
                duration_ms=r.duration_ms,
                rollback=task.spec.rollback.to_dict() if isinstance(task.spec, Symbol)
                and task.spec.rollback is not None else None))
            if task.kind == "rollback":
                if task.parent is not None and task.parent.state is TaskState.COMPLETED:
                    self._set(task.parent, TaskState.ROLLED_BACK)
                    self._journal(jn.SymbolRolledBack(now, run.id, task.parent.id,
                                                      task.parent.name, rollback=task.name))
                self._release_dependents(task, now)
            elif not run.halted:
                self._release_dependents(task, now)
            self._check_run(run, now)
            return
        error = r.error or "failed"
        delay = backoff_delay(self._policy(task), task.id, task.attempts)
        if self._may_retry(task, r, now + delay):
            self._set(task, TaskState.RETRYING)
            task.due = now + delay
            undo.heappush(self._timers, (task.due, next(self._seq), task))
            self._journal(jn.SymbolRetrying(now, run.id, task.id, task.name, node,
                                            task.attempts, error=error, due=task.due,
                                            delay=delay))
            return
        self._set(task, TaskState.FAILED)
        self._journal(jn.SymbolFailed(now, run.id, task.id, task.name, node, task.attempts,
                                      error=error, retryable=r.retryable))
        self._failed_for_good(task, now)
        self._check_run(run, now)

    def _may_retry(self, task: Task, r: TaskResult, due: float) -> bool:
        if not r.retryable or (task.run.halted and task.kind == "main"):
            return False
        retries = task.retries if task.retries is not None else self.config.default_retries
        if task.attempts > retries:
            return False
        deadline = getattr(task.spec, "deadline", None)
        # The deadline wins over remaining retries: no retry that would start past it.
        return not (deadline is not None and task.first_start is not None
                    and (due - task.first_start) * 1000 >= deadline)

    def _policy(self, task: Task) -> RetryPolicy:
        own = getattr(task.spec, "retry", None)
        return own if own is not None else self.config.retry

    def _failed_for_good(self, task: Task, now: float, ran: bool = True) -> None:
        run = task.run
        if task.kind == "rollback":  # counted by `run.rollback_failed`
            self._release_dependents(task, now)  # later rollbacks still run: best effort
            return
        sym = task.spec
        assert isinstance(sym, Symbol)
        if sym.rollback is not None and ran:  # nothing to undo of what never ran
            self._add_rollback(task, [], now)
        policy = run.workflow.on_failure
        if policy == "continue":
            run.move(RunStep.FAIL)
            self._skip(self._descendants(task), now, f"dependency '{task.name}' failed")
        elif not run.halted:
            run.move(RunStep.HALT)
            self._journal(jn.RunHalting(now, run.id, cause=task.name, policy=policy))
            self._skip([t for t in run.tasks.values()
                        if t.state in (TaskState.PENDING, TaskState.READY, TaskState.RETRYING)],
                       now, f"run halted after '{task.name}' failed")

    def _skip(self, tasks: Iterable[Task], now: float, reason: str) -> None:
        for t in tasks:
            if t.state in (TaskState.PENDING, TaskState.READY, TaskState.RETRYING):
                self._set(t, TaskState.SKIPPED)
                self._journal(jn.SymbolSkipped(now, t.run.id, t.id, t.name, reason=reason))

    @staticmethod
    def _descendants(task: Task) -> list[Task]:
        seen: dict[int, Task] = {}
        stack = list(task.dependents)
        while stack:
            t = stack.pop()
            if id(t) not in seen:
                seen[id(t)] = t
                stack.extend(t.dependents)
        return list(seen.values())

    def _release_dependents(self, task: Task, now: float) -> None:
        for d in task.dependents:
            touch(d)
            d.waiting -= 1
            if d.waiting == 0 and d.state is TaskState.PENDING:
                self._make_ready(d, now)

    def _make_ready(self, task: Task, now: float) -> None:
        if task.run.waves and task.kind == "main" and task.level > task.run.wave:
            return  # waits for its wave: the barrier opens in _advance_waves
        self._set(task, TaskState.READY)
        self._push_ready(task, now)

    def _advance_waves(self, run: Run, now: float) -> None:
        """Waves mode: when every symbol of the running level is done, checkpoint it and
        open the next level, unless something in it failed."""
        while run.wave < len(run.by_level) and all(
                t.state in TERMINAL for t in run.by_level[run.wave]):
            level = run.by_level[run.wave]
            counts: dict[str, int] = {}
            for t in level:
                counts[t.state.value] = counts.get(t.state.value, 0) + 1
            self._journal(jn.RunWaveCompleted(now, run.id, wave=run.wave,
                                              of=len(run.by_level), counts=counts))
            run.wave += 1
            if run.failed:  # a failing wave stops the run before the next wave starts
                self._skip([t for t in run.tasks.values() if t.state is TaskState.PENDING],
                           now, f"wave {run.wave - 1} failed")
                run.wave = len(run.by_level)
                return
            if run.halted or run.wave >= len(run.by_level):
                return
            for t in run.by_level[run.wave]:
                if t.state is TaskState.PENDING and t.waiting == 0:
                    self._make_ready(t, now)

    def _push_ready(self, task: Task, now: float, reason: str = "") -> None:
        self._place.push(task)
        self._journal(jn.SymbolQueued(now, task.run.id, task.id, task.name, reason=reason))
        if self._settle_at is None:  # inline: this runs for every ready symbol
            need = task.dispatch if not task.requires else _need(task)
            why = self._can.get(need)
            if why is None:
                why = self._can[need] = self._why_not(need)
            if why:
                self._begin_wait(task, need, why, now)

    def _add_rollback(self, parent: Task, deps: list[Task], now: float) -> Task:
        sym = parent.spec
        assert isinstance(sym, Symbol) and sym.rollback is not None
        run = parent.run
        rb = Task(run, sym.rollback.name, "rollback", sym.rollback, parent=parent)
        # Rollbacks jump the queue: they restore a consistent state.
        rb.key = (float("-inf"), run.seq, len(run.rollbacks))
        rb.deps = deps
        for d in deps:
            undo.append(d.dependents, rb)
        rb.waiting = len(deps)
        run.rollbacks.append(rb)
        run.unfinished += 1
        self._journal(jn.RollbackCreated(
            now, run.id, rb.id, rb.name, parent=parent.name, spec=sym.rollback.to_dict(),
            after=[d.parent.name for d in deps if d.parent is not None]))
        if rb.waiting == 0:
            self._make_ready(rb, now)
        return rb

    def _start_rollback_phase(self, run: Run, now: float) -> None:
        """Undo completed symbols in reverse dependency order: the rollback of X waits for
        the rollbacks of the nearest completed descendants of X that have one."""
        if run.undo is None:  # a requested rollback leaves the run's status alone
            run.move(RunStep.ROLL_BACK)
            self._journal(jn.RunRollingBack(now, run.id))
        done = [t for t in run.tasks.values() if t.state is TaskState.COMPLETED]
        has_rb = {id(t) for t in done if isinstance(t.spec, Symbol) and t.spec.rollback}
        created: dict[int, Task] = {}
        # Create in reverse topological order so each rollback's predecessors exist.
        order = planning.analyze(run.workflow).order
        for name in reversed(order):
            t = run.tasks[name]
            if id(t) not in has_rb:
                continue
            after: dict[int, Task] = {}
            stack = list(t.dependents)
            seen: set[int] = set()
            while stack:
                d = stack.pop()
                if id(d) in seen:
                    continue
                seen.add(id(d))
                if id(d) in created:
                    after[id(d)] = created[id(d)]
                else:
                    stack.extend(d.dependents)
            created[id(t)] = self._add_rollback(t, list(after.values()), now)

    def _check_run(self, run: Run, now: float) -> None:
        if run.waves and run.state not in RUN_FINAL:
            self._advance_waves(run, now)
        if run.state in RUN_FINAL or run.unfinished:
            return
        if run.undo is not None:
            self._end_undo(run, now)
            return
        if run.phase is RunPhase.HALTING and run.workflow.on_failure == "rollback":
            self._start_rollback_phase(run, now)
            if run.unfinished:
                return
        run.move(RunStep.FINISH_FAILED if run.rollback_phase and run.rollback_failed
                 else RunStep.FINISH)
        final = run.state
        counts: dict[str, int] = {}
        for t in run.tasks.values():
            counts[t.state.value] = counts.get(t.state.value, 0) + 1
        self._journal(jn.RUN_ENDED[final](now, run.id, status=final.value, counts=counts,
                                          duration=now - run.started))

    def _end_undo(self, run: Run, now: float) -> None:
        """A requested rollback phase ended: journaled as its own outcome; the run goes
        back to the outcome it ended with."""
        assert run.undo is not None
        counts: dict[str, int] = {}
        for t in run.rollbacks:
            counts[t.state.value] = counts.get(t.state.value, 0) + 1
        failed = run.rollback_failed
        status = RunState.FAILED if failed else RunState.ROLLED_BACK
        run.move(RunStep.FINISH_FAILED if failed else RunStep.FINISH)
        self._journal(jn.RollbackCompleted(
            now, run.id, status=status.value, run_status=run.state.value, counts=counts,
            duration=now - run.undo_started))

    # --- placement --------------------------------------------------------------------

    def _dispatch(self, now: float) -> None:
        for task, node in self._place.placements(bool(self._nodes)):
            self._start(task, node, now)

    def _start(self, task: Task, node: Node, now: float) -> None:
        self._set(task, TaskState.RUNNING)
        self._place.claim(task)
        task.attempts += 1
        if task.first_start is None:
            task.first_start = now
        if task.token:  # an earlier attempt's token is fenced off now
            self._by_token.pop(task.token, None)
        task.token = self._new_token()
        task.node = node
        task.owner = node.id
        task.wait_due = None  # a restored wait_for_worker due time: no longer waiting
        self._place.occupy(node, task.token, task)
        node.assigned += 1
        task.sent = node.assigned
        self._by_token[task.token] = task
        spec = task.spec
        timeout = spec.timeout
        deadline = getattr(spec, "deadline", None)
        if deadline is not None:  # no attempt may outlive the symbol's deadline
            timeout = max(1, min(timeout, int(deadline - (now - task.first_start) * 1000)))
        self._journal(jn.SymbolStarted(now, task.run.id, task.id, task.name, node.name,
                                       task.attempts, token=task.token, node_id=node.id))
        self._watch_hang(task, now)
        self._assign.setdefault(node.id, []).append(TaskAssignment(
            task_id=task.id, run_id=task.run.id, symbol=task.name, type=spec.type,
            context=spec.context, dispatch=spec.dispatch, parameters=spec.parameters,
            attempt=task.attempts, token=task.token, timeout=timeout, secrets=spec.secrets,
            checkpoint=task.checkpoint if getattr(spec, "checkpoint", True) else None))

    # --- waiting for a worker that can run a symbol -----------------------------------

    def _reason(self, need: Need) -> str:
        found = self._can.get(need)
        if found is None:
            found = self._can[need] = self._why_not(need)
        return found

    def _why_not(self, need: Need) -> str:
        """Why no connected worker (busy or not) can run this need; "" if one can. A
        draining worker takes no new work, so it does not count."""
        dispatch, labels = (need, ()) if isinstance(need, str) else need
        nodes = [n for n in self._nodes.values() if dispatch in n.caps and not n.draining]
        if not nodes:
            return f"no connected worker has backend {dispatch}"
        if labels and not any(all(n.labels.get(k) == v for k, v in labels) for n in nodes):
            wanted = ", ".join(f"{k}={v}" for k, v in labels)
            return f"no connected worker has labels {wanted} with backend {dispatch}"
        return ""

    def _wait_for_worker(self, task: Task) -> int | None:
        """ms the task may wait for a capable worker (a rollback: as its symbol)."""
        sym = task.spec if isinstance(task.spec, Symbol) else (
            task.parent.spec if task.parent is not None else None)
        wf = task.run.workflow
        return wf.wait_for_worker_of(sym) if isinstance(sym, Symbol) else wf.wait_for_worker

    def _begin_wait(self, task: Task, need: Need, reason: str, now: float) -> None:
        """A waiting episode begins: journaled once, with its reason and due time."""
        touch(task)
        task.blocked = reason
        self._waiting.setdefault(need, {})[task.id] = task
        wait = self._wait_for_worker(task)
        if wait is not None:
            if task.wait_due is None:  # else restored: the stored due time holds
                task.wait_due = now + wait / 1000
            undo.heappush(self._wait_timers, (task.wait_due, next(self._seq), task))
        self._journal(jn.SymbolWaiting(now, task.run.id, task.id, task.name, reason=reason,
                                       wait_for_worker=wait,
                                       due=task.wait_due if wait is not None else None))

    def _stop_waiting(self, task: Task) -> None:
        tasks = self._waiting.get(_need(task))
        if tasks is not None:
            tasks.pop(task.id, None)
        task.blocked = ""
        task.wait_due = None

    def _check_waiting(self, task: Task, now: float) -> None:
        """A ready task that did not come through `_push_ready` (restored, rechecked)."""
        if self._settle_at is not None or task.blocked:
            return
        need = _need(task)
        why = self._reason(need)
        if why:
            self._begin_wait(task, need, why, now)
        elif task.wait_due is not None:  # restored as waiting; a worker can run it now
            touch(task)
            task.wait_due = None
            self._journal(jn.SymbolUnblocked(now, task.run.id, task.id, task.name))

    def _gained(self, node: Node, now: float) -> None:
        """A node joined: needs nobody could run may be runnable now. (A runnable need
        stays runnable: its cached answer holds.)"""
        for need, why in list(self._can.items()):
            dispatch = need if isinstance(need, str) else need[0]
            if not why or dispatch not in node.caps:
                continue
            why = self._can[need] = self._why_not(need)
            if why:
                continue
            for t in self._waiting.pop(need, {}).values():
                touch(t)
                t.blocked = ""
                t.wait_due = None
                self._journal(jn.SymbolUnblocked(now, t.run.id, t.id, t.name, node.name))

    def _lost(self, node: Node, now: float) -> None:
        """A node left or drains: needs only it could run make their ready tasks wait."""
        flipped: set[Need] = set()
        for need, why in list(self._can.items()):
            dispatch = need if isinstance(need, str) else need[0]
            if dispatch not in node.caps:
                continue
            now_why = self._can[need] = self._why_not(need)
            if now_why and not why:
                flipped.add(need)
        if flipped:
            self._recheck(now, flipped)

    def _recheck(self, now: float, needs: set[Need] | None) -> None:
        """Look at every ready task (of these needs) for one that waits. Only when what
        workers can run changed: a scan of the tasks, not of the tasks times the nodes."""
        if self._settle_at is not None:
            return
        for run in self._runs.values():
            if run.state in RUN_FINAL:
                continue
            for t in itertools.chain(run.tasks.values(), run.rollbacks):
                if t.state is TaskState.READY and not t.blocked and (
                        needs is None or _need(t) in needs):
                    self._check_waiting(t, now)

    def _give_up_waiting(self, task: Task, now: float) -> None:
        """Its wait_for_worker ran out and still no connected worker can run it: it fails
        for good (waiting longer would not help, so no retries) and on_failure applies."""
        reason = task.blocked
        ran = task.attempts > 0
        self._set(task, TaskState.FAILED)
        self._journal(jn.SymbolFailed(
            now, task.run.id, task.id, task.name, attempt=task.attempts,
            error=f"{reason} (waited {self._wait_for_worker(task)} ms: wait_for_worker)",
            reason=reason, retryable=False))
        self._failed_for_good(task, now, ran=ran)
        self._check_run(task.run, now)

    # --- helpers ----------------------------------------------------------------------

    def _force(self, task: Task, state: TaskState) -> None:
        """Put a task in a state without a transition: only for rebuilding from records."""
        touch(task)
        if state in TERMINAL and task.state not in TERMINAL:
            _unlogged(task.run, "unfinished", task.run.unfinished - 1)
        counts = task.run.counts
        counts[task.state] -= 1
        counts[state] += 1
        task.state = state

    def _set(self, task: Task, state: TaskState) -> None:
        if state not in TASK_TRANSITIONS[task.state]:
            raise IllegalTransition(f"{task.id}: {task.state.value} -> {state.value}")
        touch(task)  # and so every change that follows it in this event is undoable
        if task.holding and state is not TaskState.RUNNING:
            self._place.release(task)  # success, failure, timeout, loss or cancel: let go
        if task.blocked and state is not TaskState.READY:
            self._stop_waiting(task)
        if state in TERMINAL and task.state not in TERMINAL:
            _unlogged(task.run, "unfinished", task.run.unfinished - 1)
            if task.token in self._by_token:  # (a finished attempt's is gone already)
                self._by_token.pop(task.token)
            task.checkpoint = None  # no attempt will resume from it
        counts = task.run.counts
        counts[task.state] -= 1
        counts[state] += 1
        task.state = state

    def _journal(self, record: jn.Record) -> None:
        self._out.append(record)


__all__ = [
    "Abandon",
    "Ack",
    "Assign",
    "CloseNode",
    "Command",
    "Event",
    "IllegalTransition",
    "Refused",
    "Journal",
    "KeepAck",
    "NodeConnected",
    "NodeDisconnected",
    "NodeDraining",
    "NodeHeartbeat",
    "ProgressReceived",
    "RUN_FINAL",
    "RUN_TRANSITIONS",
    "ResultsReceived",
    "RollbackRequested",
    "RunCancelled",
    "RunPaused",
    "RunRestored",
    "RunResumed",
    "RunPhase",
    "RunState",
    "RunStep",
    "RunSubmitted",
    "Scheduler",
    "SchedulerConfig",
    "TASK_TRANSITIONS",
    "TERMINAL",
    "TaskRecord",
    "TaskState",
    "Tick",
    "backoff_delay",
]
