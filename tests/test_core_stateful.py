"""The scheduler core under random event sequences (Hypothesis stateful testing).

Nodes join, vanish, drain and forget; runs are submitted, paused, resumed, cancelled and
rolled back; results arrive on time, twice, late and from the wrong node; time jumps;
the dispatcher restarts (runs restored from the records it would have kept). After
every step the core's invariants hold (`validate()`), and whenever a fault is injected
in the middle of an event, the core is exactly as it was before that event.
"""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from swarm import core as c
from swarm.model import RetryPolicy, RollbackSpec, Symbol, Workflow
from swarm.protocol import ProgressReport, TaskResult

pytestmark = [pytest.mark.timeout(300), pytest.mark.usefixtures("strict_touch")]

POLICY = RetryPolicy(initial_delay=100, max_delay=1000, backoff_factor=2.0, jitter=0.0)


class Fault(Exception):
    """Injected in the middle of an event: the core must undo what the event did."""


def dump(s: c.Scheduler) -> Any:
    """Everything the core holds, with objects named by their ids: two dumps are equal
    only if the cores are indistinguishable."""

    def task(t: c.Task) -> Any:
        return (t.id, t.state, t.attempts, t.losses, t.waiting, t.node.id if t.node else None,
                t.token, t.due, t.first_start, t.key, t.orphan, t.level, t.holding, t.owner,
                t.blocked, t.wait_due, [d.id for d in t.deps], [d.id for d in t.dependents],
                t.parent.id if t.parent else None, t.checkpoint, t.heard_at, t.sent)

    runs = {rid: (r.phase, r.unfinished, dict(r.counts), r.wave, r.undo_started, r.undo_from,
                  r.deadline_at,
                  [t.id for t in r.parked], [task(t) for t in r.tasks.values()],
                  [task(t) for t in r.rollbacks]) for rid, r in s._runs.items()}
    nodes = {nid: (n.name, n.slots, n.draining, n.last_seen, n.seq, sorted(n.suspect),
                   n.assigned, {k: t.id for k, t in n.running.items()})
             for nid, n in s._nodes.items()}
    p = s._place
    ready = {b: sorted((e[0], e[1], e[2].id) for e in h) for b, h in p._ready.items()}
    scalars = {k: getattr(s, k) for k in ("_next_token", "_liveness_at", "_last_tick",
                                          "refused", "stalls", "_joins", "_settle_at")}
    return (runs, nodes, ready, dict(p.held), {b: sorted(ns) for b, ns in p._open.items() if ns},
            [t.id for t in p._blocked], [t.id for t in p._unplaced],
            {k: t.id for k, t in s._by_token.items()},
            sorted((d, t.id) for d, _, t in s._timers),
            sorted((d, t.id) for d, _, t in s._wait_timers),
            sorted((d, t.id, k) for d, _, t, k in s._hang_timers),
            sorted((d, r.id) for d, _, r in s._deadlines),
            dict(s._can), {n: sorted(ts) for n, ts in s._waiting.items() if ts}, scalars)


def workflow(shape: list[tuple[int, ...]], on_failure: str, rollbacks: list[bool],
             waves: bool, deadline: int | None = None) -> Workflow:
    symbols = []
    for i, deps in enumerate(shape):
        rb = RollbackSpec(name=f"undo_s{i}") if rollbacks[i % len(rollbacks)] else None
        symbols.append(Symbol(name=f"s{i}", type="action",
                              dispatch="internal" if i % 3 else "php",
                              dependencies=tuple(f"s{d}" for d in deps if d < i),
                              rollback=rb, retries=1 if i % 2 else 0,
                              heartbeat_timeout=3000 if i % 4 == 1 else None,
                              checkpoint=i % 5 != 2))
    return Workflow(name="w", version="1", symbols=tuple(symbols), on_failure=on_failure,
                    mode="waves" if waves else "rolling", deadline=deadline)


class CoreMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.s = self.new_core()
        self.now = 1000.0
        self.runs = itertools.count(1)
        self.node_names = itertools.count(1)
        self.assigned: dict[int, tuple[str, str]] = {}  # token -> (node id, task id)
        self.finished: list[tuple[int, str, str]] = []  # results already reported
        self.faults = 0
        self.reports = 0

    @staticmethod
    def new_core() -> c.Scheduler:
        return c.Scheduler(c.SchedulerConfig(retry=POLICY, heartbeat_timeout=10.0,
                                             orphan_grace=5.0, max_worker_losses=2))

    # --- feeding events, sometimes with a fault in the middle ---------------------------

    def feed(self, event: c.Event, fault_at: int | None = None) -> list[c.Command]:
        if fault_at is not None:
            before = dump(self.s)
            calls = itertools.count()
            journal = self.s._journal

            def failing(*args: Any, **kwargs: Any) -> None:
                journal(*args, **kwargs)
                if next(calls) == fault_at:
                    raise Fault(f"injected after journal entry {fault_at}")

            self.s._journal = failing  # type: ignore[method-assign]
            try:
                self.s.handle(event)
            except Fault:
                self.faults += 1
                assert dump(self.s) == before, "a failed event left changes behind"
                self.s.validate()
            except c.Refused:
                assert dump(self.s) == before
            finally:
                del self.s._journal
        try:
            cmds = self.s.handle(event)
        except c.Refused:
            return []
        for cmd in cmds:
            if isinstance(cmd, c.Assign):
                for t in cmd.tasks:
                    self.assigned[t.token] = (cmd.node_id, t.task_id)
        return cmds

    faults_at = st.one_of(st.none(), st.integers(min_value=0, max_value=6))

    # --- nodes ------------------------------------------------------------------------

    @rule(caps=st.sampled_from([("internal",), ("php",), ("internal", "php")]),
          slots=st.integers(1, 3), fault=faults_at)
    def join(self, caps: tuple[str, ...], slots: int, fault: int | None) -> None:
        name = f"n{next(self.node_names)}"
        self.feed(c.NodeConnected(name, name, caps, slots, self.now), fault)

    @precondition(lambda self: self.s._nodes)
    @rule(data=st.data(), graceful=st.booleans(), fault=faults_at)
    def vanish(self, data: st.DataObject, graceful: bool, fault: int | None) -> None:
        nid = data.draw(st.sampled_from(sorted(self.s._nodes)))
        self.feed(c.NodeDisconnected(nid, self.now, graceful=graceful), fault)

    @precondition(lambda self: self.s._nodes)
    @rule(data=st.data(), fault=faults_at)
    def drain(self, data: st.DataObject, fault: int | None) -> None:
        nid = data.draw(st.sampled_from(sorted(self.s._nodes)))
        self.feed(c.NodeDraining(nid, self.now), fault)

    @precondition(lambda self: self.s._nodes)
    @rule(data=st.data(), forget=st.booleans(), fault=faults_at)
    def heartbeat(self, data: st.DataObject, forget: bool, fault: int | None) -> None:
        """A heartbeat; with `forget`, the worker leaves one of its attempts out."""
        nid = data.draw(st.sampled_from(sorted(self.s._nodes)))
        node = self.s._nodes[nid]
        running = sorted(node.running)
        if forget and running:
            running = running[1:]
        self.feed(c.NodeHeartbeat(nid, self.now, tuple(running), node.assigned), fault)

    # --- runs -------------------------------------------------------------------------

    @rule(shape=st.lists(st.lists(st.integers(0, 7), max_size=2).map(tuple), min_size=1,
                         max_size=8),
          on_failure=st.sampled_from(["halt", "continue", "rollback"]),
          rollbacks=st.lists(st.booleans(), min_size=1, max_size=3),
          waves=st.booleans(), deadline=st.sampled_from([None, None, 4000, 20000]),
          fault=faults_at)
    def submit(self, shape: list[tuple[int, ...]], on_failure: str, rollbacks: list[bool],
               waves: bool, deadline: int | None, fault: int | None) -> None:
        wf = workflow(shape, on_failure, rollbacks, waves, deadline)
        self.feed(c.RunSubmitted(f"r{next(self.runs)}", wf, self.now), fault)

    @precondition(lambda self: self.s._runs)
    @rule(data=st.data(), what=st.sampled_from(["pause", "resume", "cancel", "cancel+rollback",
                                                "rollback"]), fault=faults_at)
    def control(self, data: st.DataObject, what: str, fault: int | None) -> None:
        rid = data.draw(st.sampled_from(sorted(self.s._runs)))
        event: c.Event = {
            "pause": c.RunPaused(rid, self.now), "resume": c.RunResumed(rid, self.now),
            "cancel": c.RunCancelled(rid, self.now),
            "cancel+rollback": c.RunCancelled(rid, self.now, rollback=True),
            "rollback": c.RollbackRequested(rid, self.now)}[what]
        self.feed(event, fault)

    @precondition(lambda self: any(self.s.undoable(r) for r in self.s._runs))
    @rule(data=st.data(), fault=faults_at)
    def undo(self, data: st.DataObject, fault: int | None) -> None:
        """A rollback requested of a run with something to undo (finished or not)."""
        rid = data.draw(st.sampled_from(sorted(r for r in self.s._runs if self.s.undoable(r))))
        self.feed(c.RollbackRequested(rid, self.now), fault)

    # --- results ----------------------------------------------------------------------

    @precondition(lambda self: any(n.running for n in self.s._nodes.values()))
    @rule(data=st.data(), ok=st.booleans(), retryable=st.booleans(), fault=faults_at)
    def result(self, data: st.DataObject, ok: bool, retryable: bool, fault: int | None) -> None:
        running = sorted((t, n.id) for n in self.s._nodes.values() for t in n.running)
        token, nid = data.draw(st.sampled_from(running))
        task_id = self.assigned.get(token, (nid, "?"))[1]
        r = TaskResult(token=token, task_id=task_id, ok=ok, retryable=retryable,
                       error=None if ok else "boom")
        self.feed(c.ResultsReceived(nid, (r,), self.now), fault)
        self.finished.append((token, nid, task_id))

    @precondition(lambda self: any(n.running for n in self.s._nodes.values()))
    @rule(fail=st.lists(st.booleans(), min_size=1, max_size=4), rounds=st.integers(1, 12),
          fault=faults_at)
    def work(self, fail: list[bool], rounds: int, fault: int | None) -> None:
        """Rounds in which every running attempt reports, a batch per node, most of them
        ok: runs get to their end, and to rollbacks requested after it."""
        for i in range(rounds):
            busy = [n for n in self.s._nodes.values() if n.running]
            if not busy:
                return
            for node in busy:
                results = tuple(
                    TaskResult(token=token, task_id=self.assigned.get(token, ("", "?"))[1],
                               ok=not fail[j % len(fail)] or i > 1,
                               error=None if not fail[j % len(fail)] or i > 1 else "boom")
                    for j, token in enumerate(sorted(node.running)))
                self.feed(c.ResultsReceived(node.id, results, self.now),
                          fault if i == 0 else None)
                self.finished.extend((r.token, node.id, r.task_id) for r in results)
            self.now += 0.5  # retry timers come due
            self.feed(c.Tick(self.now))

    @precondition(lambda self: self.assigned and self.s._nodes)
    @rule(data=st.data(), checkpoint=st.booleans(), big=st.booleans(),
          progress=st.one_of(st.none(), st.floats(allow_nan=True)), fault=faults_at)
    def report(self, data: st.DataObject, checkpoint: bool, big: bool,
               progress: float | None, fault: int | None) -> None:
        """A progress report or checkpoint of an attempt: running, replaced or unknown,
        within max_checkpoint_size or over it."""
        token = data.draw(st.sampled_from(sorted(self.assigned)))
        nid, task_id = self.assigned[token]
        if nid not in self.s._nodes:
            nid = data.draw(st.sampled_from(sorted(self.s._nodes)))
        self.reports += 1
        report = ProgressReport(token, task_id, self.reports,
                                {"step": self.reports} if checkpoint and not big else None,
                                progress, "working", 300_000 if checkpoint and big else 0)
        self.feed(c.ProgressReceived(nid, (report,), self.now), fault)

    @precondition(lambda self: self.finished and self.s._nodes)
    @rule(data=st.data(), other_node=st.booleans(), fault=faults_at)
    def late_result(self, data: st.DataObject, other_node: bool, fault: int | None) -> None:
        """A duplicate or stale result, or one from a node that never had the attempt."""
        token, nid, task_id = data.draw(st.sampled_from(self.finished))
        if other_node or nid not in self.s._nodes:
            nid = data.draw(st.sampled_from(sorted(self.s._nodes)))
        r = TaskResult(token=token, task_id=task_id, ok=True)
        self.feed(c.ResultsReceived(nid, (r,), self.now), fault)

    # --- time and restarts ------------------------------------------------------------

    @rule(dt=st.sampled_from([0.05, 0.5, 2.0, 6.0, 12.0]), fault=faults_at)
    def tick(self, dt: float, fault: int | None) -> None:
        self.now += dt
        self.feed(c.Tick(self.now), fault)

    @precondition(lambda self: self.s._runs)
    @rule()
    def restart(self) -> None:
        """The dispatcher restarts: runs come back from the records it kept."""
        old, self.s = self.s, self.new_core()
        for run in old._runs.values():
            records = tuple(
                c.TaskRecord(name=t.name, kind=t.kind, state=t.state.value,
                             attempts=t.attempts, losses=t.losses, token=t.token,
                             due=t.due if t.state is c.TaskState.RETRYING else t.wait_due,
                             checkpoint=t.checkpoint,
                             first_start=t.first_start,
                             parent=t.parent.name if t.parent else None,
                             after=tuple(d.parent.name for d in t.deps if d.parent),
                             node_id=t.owner)
                for t in itertools.chain(run.tasks.values(), run.rollbacks))
            status = "paused" if run.paused else run.state.value
            undo = run.undo
            self.feed(c.RunRestored(run.id, run.workflow, undo.value if undo else status,
                                    run.started, records, self.now,
                                    rollback="rolling_back" if undo else "",
                                    rollback_started=run.undo_started))

    @invariant()
    def consistent(self) -> None:
        self.s.validate()


CoreMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=60, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
TestCoreUnderRandomEvents = CoreMachine.TestCase


def test_an_event_that_raises_halfway_leaves_the_core_exactly_as_it_was() -> None:
    """The same check, deterministic: a fault after each journal entry of a busy event."""
    for fault_at in range(12):
        m = CoreMachine()
        m.join(("internal", "php"), 3, None)
        m.submit([(), (0,), (0,), (1, 2), ()], "rollback", [True], False, None, None)
        running = sorted((t, n.id) for n in m.s._nodes.values() for t in n.running)
        assert running
        token, nid = running[0]
        r = TaskResult(token=token, task_id=m.assigned[token][1], ok=False, retryable=False,
                       error="boom")
        before = dump(m.s)
        m.feed(c.ResultsReceived(nid, (r,), m.now), fault_at)
        assert m.faults == 1 or fault_at > 3, "the fault was never injected"
        assert dump(m.s) != before  # then it applied whole, without the fault
        m.s.validate()
