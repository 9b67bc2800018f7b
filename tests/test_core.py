"""The scheduler core, driven with a fake clock and no sockets."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import pytest

from swarm import core as c
from swarm.model import RetryPolicy, RollbackSpec, Symbol, Workflow
from swarm.protocol import TaskAssignment, TaskResult

# Every write to a task inside the core must follow a touch (see swarm.undo).
pytestmark = pytest.mark.usefixtures("strict_touch")

NO_JITTER = RetryPolicy(initial_delay=100, max_delay=1000, backoff_factor=2.0, jitter=0.0)


def sym(name: str, *deps: str, rollback: bool = False, **kw: Any) -> Symbol:
    rb = RollbackSpec(name=f"undo_{name}") if rollback else None
    return Symbol(name=name, type="action", dependencies=tuple(deps), rollback=rb, **kw)


def wf(*symbols: Symbol, on_failure: str = "rollback") -> Workflow:
    return Workflow(name="t", version="1", symbols=tuple(symbols), on_failure=on_failure)


class Harness:
    def __init__(self, **cfg: Any) -> None:
        cfg.setdefault("retry", NO_JITTER)
        self.s = c.Scheduler(c.SchedulerConfig(**cfg))
        self.now = 1000.0
        self.journal: list[c.Journal] = []
        self.commands: list[c.Command] = []
        self.inbox: dict[str, list[TaskAssignment]] = defaultdict(list)

    def feed(self, event: c.Event) -> list[c.Command]:
        cmds = self.s.handle(event)
        self.s.validate()
        self.commands += cmds
        for cmd in cmds:
            if isinstance(cmd, c.Journal):
                self.journal.append(cmd)
            elif isinstance(cmd, c.Assign):
                self.inbox[cmd.node_id].extend(cmd.tasks)
        return cmds

    def node(self, name: str, caps: tuple[str, ...] = ("internal",), slots: int = 1,
             running: tuple[int, ...] = ()) -> list[c.Command]:
        return self.feed(c.NodeConnected(name, name, caps, slots, self.now, running=running))

    def submit(self, workflow: Workflow, run_id: str = "r1") -> None:
        self.feed(c.RunSubmitted(run_id, workflow, self.now))

    def take(self, node: str) -> list[TaskAssignment]:
        out, self.inbox[node] = self.inbox[node], []
        return out

    def names(self, node: str) -> list[str]:
        return [t.symbol for t in self.take(node)]

    def result(self, node: str, t: TaskAssignment, ok: bool = True, **kw: Any) -> list[c.Command]:
        return self.feed(c.ResultsReceived(node, (TaskResult(token=t.token, task_id=t.task_id,
                                                             ok=ok, **kw),), self.now))

    def run_one(self, node: str, ok: bool = True, **kw: Any) -> str:
        (t,) = self.take(node)
        self.result(node, t, ok, **kw)
        return t.symbol

    def kinds(self, kind: str) -> list[str | None]:
        return [j.symbol for j in self.journal if j.kind == kind]

    def tick(self, dt: float) -> None:
        self.now += dt
        self.feed(c.Tick(self.now))

    def state(self, name: str, run: str = "r1") -> str:
        st = self.s.task_state(run, name)
        assert st is not None
        return st.value


def test_a_symbol_is_released_only_when_all_its_dependencies_completed() -> None:
    h = Harness()
    h.node("w", slots=4)
    h.submit(wf(sym("a"), sym("b"), sym("c", "a", "b")))
    first = h.take("w")
    assert sorted(t.symbol for t in first) == ["a", "b"]
    h.result("w", first[0])
    assert h.take("w") == []
    assert h.state("c") == "pending"
    h.result("w", first[1])
    assert h.names("w") == ["c"]


def test_ready_symbols_start_by_priority_higher_first() -> None:
    h = Harness()
    h.submit(wf(sym("low", priority=1), sym("high", priority=10), sym("mid", priority=5)))
    h.node("w", slots=1)
    order = [h.run_one("w") for _ in range(3)]
    assert order == ["high", "mid", "low"]


def test_ties_break_by_longest_remaining_path_then_manifest_order() -> None:
    h = Harness()
    # `short1`, `short2` have no dependents; `long` heads a chain of three.
    h.submit(wf(sym("short1"), sym("short2"), sym("long"), sym("x", "long"), sym("y", "x")))
    h.node("w", slots=1)
    assert h.run_one("w") == "long"
    assert h.run_one("w") == "x"  # remaining path 2 beats 1
    assert [h.run_one("w") for _ in range(3)] == ["short1", "short2", "y"]  # rank 1 each


def test_fifo_order_when_priority_queue_is_disabled() -> None:
    h = Harness(priority_queue=False)
    h.submit(wf(sym("a", priority=1), sym("b", priority=9)))
    h.node("w", slots=1)
    assert [h.run_one("w") for _ in range(2)] == ["a", "b"]


def test_symbols_go_only_to_workers_advertising_their_backend() -> None:
    h = Harness()
    h.node("py", caps=("internal",), slots=4)
    h.node("php", caps=("php_engine",), slots=4)
    h.submit(wf(sym("p", dispatch="php_engine"), sym("i")))
    assert h.names("php") == ["p"]
    assert h.names("py") == ["i"]


def test_a_symbol_no_worker_can_run_waits_without_blocking_others() -> None:
    h = Harness()
    h.node("py", slots=1)
    h.submit(wf(sym("ps", dispatch="powershell_engine", priority=100), sym("i")))
    assert h.names("py") == ["i"]
    assert h.state("ps") == "ready"
    h.node("pwsh", caps=("powershell_engine",))
    assert h.names("pwsh") == ["ps"]


def test_least_loaded_worker_first() -> None:
    h = Harness()
    h.node("a", slots=2)
    h.node("b", slots=2)
    h.submit(wf(*(sym(f"s{i}") for i in range(4))))
    assert len(h.take("a")) == 2 and len(h.take("b")) == 2
    h2 = Harness()
    h2.node("a", slots=4)
    h2.node("b", slots=4)
    h2.submit(wf(sym("s1"), sym("s2")))
    assert len(h2.take("a")) == 1 and len(h2.take("b")) == 1


def test_without_load_balancing_workers_fill_in_registration_order() -> None:
    h = Harness(load_balancing=False)
    h.node("a", slots=2)
    h.node("b", slots=2)
    h.submit(wf(sym("s1"), sym("s2"), sym("s3")))
    assert len(h.take("a")) == 2 and len(h.take("b")) == 1


def test_never_more_assignments_than_free_slots() -> None:
    h = Harness()
    h.node("w", slots=3)
    h.submit(wf(*(sym(f"s{i}") for i in range(10))))
    got = h.take("w")
    assert len(got) == 3
    h.result("w", got[0])
    assert len(h.take("w")) == 1


def test_a_failure_is_retried_after_backoff_then_succeeds() -> None:
    h = Harness()
    h.node("w")
    h.submit(wf(sym("a", retries=2)))
    (t1,) = h.take("w")
    h.result("w", t1, ok=False, error="boom")
    assert h.state("a") == "retrying"
    assert h.s.next_deadline() == pytest.approx(h.now + 0.1)
    h.tick(0.05)
    assert h.take("w") == []
    h.tick(0.06)
    (t2,) = h.take("w")
    assert t2.attempt == 2 and t2.token != t1.token
    h.result("w", t2)
    assert h.state("a") == "completed"
    assert h.s.run_state("r1") == c.RunState.COMPLETED


def test_retries_exhausted_fail_the_symbol() -> None:
    h = Harness()
    h.node("w")
    h.submit(wf(sym("a", retries=1), on_failure="abort"))
    h.run_one("w", ok=False)
    h.tick(1)
    h.run_one("w", ok=False)
    assert h.state("a") == "failed"
    assert h.s.run_state("r1") == c.RunState.FAILED
    assert [j.attempt for j in h.journal if j.kind == "symbol.started"] == [1, 2]


def _attempts_until_failed(h: Harness) -> int:
    h.node("w")
    for _ in range(50):
        for t in h.take("w"):
            h.result("w", t, ok=False, error="boom")
        if h.state("a") == "failed":
            break
        h.tick(1)  # past any backoff (NO_JITTER: 0.1 s doubling, at most 1 s)
    return len([j for j in h.journal if j.kind == "symbol.started"])


@pytest.mark.parametrize("limit, own, attempts", [
    (3, None, 4),   # the original's default: 3 retries of a symbol without `retries`
    (5, None, 6),   # its "For Reliability" tuning: task_retry_limit = 5 adds retries
    (0, None, 1),
    (5, 1, 2),      # a symbol's own `retries` wins, lower ...
    (1, 4, 5),      # ... or higher
])
def test_task_retry_limit_is_the_retries_of_a_symbol_without_its_own(
        limit: int, own: int | None, attempts: int) -> None:
    h = Harness(default_retries=limit)
    h.submit(wf(sym("a", **({"retries": own} if own is not None else {})), on_failure="abort"))
    assert _attempts_until_failed(h) == attempts


def test_not_retryable_failure_fails_at_once() -> None:
    h = Harness()
    h.node("w")
    h.submit(wf(sym("a", retries=3)))
    h.run_one("w", ok=False, retryable=False)
    assert h.state("a") == "failed"
    assert h.kinds("symbol.retrying") == []


def test_deadline_beats_remaining_retries() -> None:
    h = Harness()
    h.node("w")
    h.submit(wf(sym("a", retries=5, deadline=500)))
    h.run_one("w", ok=False)
    h.tick(0.2)
    h.now += 0.4
    h.run_one("w", ok=False)
    assert h.state("a") == "failed"


def test_backoff_grows_by_factor_is_capped_and_jitter_is_bounded() -> None:
    p = RetryPolicy(initial_delay=100, max_delay=1000, backoff_factor=2.0, jitter=0.0)
    assert [c.backoff_delay(p, "t", n) for n in (1, 2, 3, 4, 5)] == [0.1, 0.2, 0.4, 0.8, 1.0]
    pj = RetryPolicy(initial_delay=1000, max_delay=60_000, backoff_factor=2.0, jitter=0.5)
    delays = {c.backoff_delay(pj, f"task{i}", 1) for i in range(50)}
    assert all(0.5 <= d <= 1.5 for d in delays) and len(delays) > 10


def test_rollback_runs_own_rollback_then_completed_ones_in_reverse_dependency_order() -> None:
    h = Harness()
    h.node("w", slots=4)
    h.submit(wf(sym("a", rollback=True), sym("b", "a", rollback=True),
                sym("c", "b", rollback=True, retries=0)))
    assert h.run_one("w") == "a"
    assert h.run_one("w") == "b"
    assert h.run_one("w", ok=False) == "c"
    assert h.run_one("w") == "undo_c"  # the failed symbol's own rollback first
    assert h.run_one("w") == "undo_b"
    assert h.run_one("w") == "undo_a"
    assert h.s.run_state("r1") == c.RunState.ROLLED_BACK
    assert h.state("a") == h.state("b") == "rolled_back"
    assert h.state("c") == "failed"


def test_rollback_of_x_waits_for_rollbacks_of_its_descendants_even_through_gaps() -> None:
    h = Harness()
    h.node("w", slots=4)
    # b has no rollback: undo_a must still wait for undo_c (c depends on a through b).
    h.submit(wf(sym("a", rollback=True), sym("b", "a"), sym("c", "b", rollback=True),
                sym("d", "c", retries=0)))
    for _ in range(3):
        h.run_one("w")
    h.run_one("w", ok=False)
    assert h.names("w") == ["undo_c"]
    assert h.state("a") == "completed"


def test_on_failure_rollback_lets_running_symbols_finish_and_starts_nothing_new() -> None:
    h = Harness()
    h.node("w", slots=2)
    h.submit(wf(sym("a", retries=0), sym("b", rollback=True), sym("c", "b")))
    ta, tb = sorted(h.take("w"), key=lambda t: t.symbol)
    h.result("w", ta, ok=False)
    assert h.state("c") == "skipped" and h.state("b") == "running"
    assert h.take("w") == []  # nothing starts, no rollback yet: b still runs
    h.result("w", tb)
    assert h.names("w") == ["undo_b"]


def test_on_failure_continue_skips_dependents_and_runs_independent_branches() -> None:
    h = Harness()
    h.node("w", slots=1)
    h.submit(wf(sym("bad", retries=0, priority=5), sym("child", "bad"),
                sym("grandchild", "child"), sym("other"), on_failure="continue"))
    assert h.run_one("w", ok=False) == "bad"
    assert h.state("child") == h.state("grandchild") == "skipped"
    assert h.run_one("w") == "other"
    assert h.s.run_state("r1") == c.RunState.FAILED


def test_on_failure_abort_starts_nothing_and_rolls_back_nothing_completed() -> None:
    h = Harness()
    h.node("w", slots=1)
    h.submit(wf(sym("a", rollback=True, priority=9),
                sym("bad", retries=0, rollback=True, priority=5), sym("z"), on_failure="abort"))
    h.run_one("w")
    h.run_one("w", ok=False)
    assert h.run_one("w") == "undo_bad"  # its own rollback, and nothing else
    assert h.take("w") == []
    assert h.state("z") == "skipped" and h.state("a") == "completed"
    assert h.s.run_state("r1") == c.RunState.FAILED


def test_a_failing_rollback_ends_the_run_failed() -> None:
    h = Harness()
    h.node("w", slots=1)
    h.submit(wf(sym("a", rollback=True), sym("b", "a", retries=0)))
    h.run_one("w")
    h.run_one("w", ok=False)
    (t,) = h.take("w")
    assert t.symbol == "undo_a"
    for _ in range(4):  # the rollback's own retries
        h.result("w", t, ok=False)
        h.tick(1.5)
        got = h.take("w")
        if not got:
            break
        (t,) = got
    assert h.s.run_state("r1") == c.RunState.FAILED


def test_journal_records_a_completion_before_the_assignment_of_its_dependent() -> None:
    h = Harness()
    h.node("w")
    h.submit(wf(sym("a"), sym("b", "a")))
    (t,) = h.take("w")
    cmds = h.result("w", t)
    kinds = ["Journal:" + x.kind if isinstance(x, c.Journal) else type(x).__name__ for x in cmds]
    assert kinds.index("Journal:symbol.completed") < kinds.index("Assign")


def test_lost_worker_tasks_are_requeued_and_counted_apart_from_retries() -> None:
    h = Harness(max_worker_losses=3)
    h.submit(wf(sym("a", retries=0)))
    for i in range(3):
        h.node(f"w{i}")
        assert h.names(f"w{i}") == ["a"]
        h.feed(c.NodeDisconnected(f"w{i}", h.now))
    assert h.state("a") == "failed"
    (failed,) = [j for j in h.journal if j.kind == "symbol.failed"]
    assert failed.data["error"] == "worker lost 3 times"
    assert h.kinds("symbol.retrying") == []


def test_graceful_leave_is_not_a_loss() -> None:
    h = Harness(max_worker_losses=1)
    h.submit(wf(sym("a")))
    h.node("w1")
    h.take("w1")
    h.feed(c.NodeDisconnected("w1", h.now, graceful=True))
    assert h.state("a") == "ready"
    h.node("w2")
    assert h.names("w2") == ["a"]


def test_stale_result_after_reassignment_is_acknowledged_and_dropped() -> None:
    h = Harness()
    h.submit(wf(sym("a")))
    h.node("w1")
    (old,) = h.take("w1")
    h.feed(c.NodeDisconnected("w1", h.now))
    h.node("w2")
    (new,) = h.take("w2")
    h.node("w1")  # back again, reporting the old attempt through a new session
    cmds = h.result("w1", old)
    assert any(isinstance(x, c.Ack) and old.token in x.tokens for x in cmds)
    assert h.kinds("result.dropped")
    assert h.state("a") == "running"
    h.result("w2", new)
    assert h.state("a") == "completed"
    assert len(h.kinds("symbol.completed")) == 1


def test_duplicate_result_is_recorded_once() -> None:
    h = Harness()
    h.node("w")
    h.submit(wf(sym("a")))
    (t,) = h.take("w")
    h.result("w", t)
    h.result("w", t)
    assert h.kinds("symbol.completed") == ["a"]


def test_silent_worker_is_closed_after_heartbeat_timeout_and_its_task_requeued() -> None:
    h = Harness(heartbeat_timeout=10.0)
    h.node("w1")
    h.node("w2")
    h.submit(wf(sym("a"), sym("b")))
    h.take("w1"), h.take("w2")
    h.now += 6
    h.feed(c.NodeHeartbeat("w2", h.now))
    h.tick(5)
    assert any(isinstance(x, c.CloseNode) and x.node_id == "w1" for x in h.commands)
    assert not any(isinstance(x, c.CloseNode) and x.node_id == "w2" for x in h.commands)
    assert h.kinds("attempt.lost")


def test_reconnecting_worker_keeps_an_attempt_nobody_took_and_abandons_the_rest() -> None:
    h = Harness()
    h.submit(wf(sym("a")))
    h.node("w", slots=2)
    (t,) = h.take("w")
    h.feed(c.NodeDisconnected("w", h.now))
    cmds = h.node("w", slots=2, running=(t.token, 999))
    assert h.state("a") == "running"
    assert any(isinstance(x, c.Abandon) and x.tokens == (999,) for x in cmds)
    h.result("w", t)
    assert h.state("a") == "completed"


def test_many_runs_are_active_at_once() -> None:
    h = Harness()
    h.node("w", slots=2)
    h.submit(wf(sym("a"), sym("b", "a")), run_id="r1")
    h.submit(wf(sym("a"), sym("b", "a")), run_id="r2")
    got = h.take("w")
    assert sorted(t.run_id for t in got) == ["r1", "r2"]
    for t in got:
        h.result("w", t)
    for t in h.take("w"):
        h.result("w", t)
    assert h.s.run_state("r1") == h.s.run_state("r2") == c.RunState.COMPLETED


def test_illegal_transition_raises_and_leaves_state_untouched() -> None:
    h = Harness()
    h.submit(wf(sym("a")))
    task = h.s._runs["r1"].tasks["a"]
    with pytest.raises(c.IllegalTransition):
        h.s._set(task, c.TaskState.COMPLETED)
    assert task.state is c.TaskState.READY


def test_event_sequence_of_a_two_symbol_run() -> None:
    h = Harness()
    h.node("w")
    h.submit(wf(sym("a"), sym("b", "a")))
    h.run_one("w")
    h.run_one("w")
    kinds = [j.kind for j in h.journal if j.run_id]
    assert kinds == [
        "run.started", "symbol.queued", "symbol.started", "attempt.finished",
        "symbol.completed", "symbol.queued", "symbol.started", "attempt.finished",
        "symbol.completed", "run.completed",
    ]


def test_result_of_a_lost_attempt_counts_if_nobody_took_it_over() -> None:
    h = Harness()
    h.submit(wf(sym("a"), sym("b", "a")))
    h.node("w")
    (t,) = h.take("w")
    h.feed(c.NodeDisconnected("w", h.now))  # the connection dropped as the work finished
    assert h.state("a") == "ready"
    h.node("w2", caps=("php_engine",))  # present, but cannot take `a`
    h.feed(c.NodeConnected("w", "w", ("internal",), 0, h.now))  # back, with no free slot
    h.result("w", t)  # the re-sent result, through the new session
    assert h.state("a") == "completed"
    assert len(h.kinds("symbol.completed")) == 1
    assert [j.attempt for j in h.journal if j.kind == "symbol.started"] == [1]


def test_a_duplicate_failure_result_schedules_one_retry() -> None:
    h = Harness()
    h.node("w")
    h.submit(wf(sym("a", retries=3)))
    (t,) = h.take("w")
    h.result("w", t, ok=False)
    h.result("w", t, ok=False)
    assert len(h.kinds("symbol.retrying")) == 1
    assert len(h.kinds("result.dropped")) == 1


def test_an_attempt_missing_from_two_heartbeats_is_lost() -> None:
    h = Harness()
    h.node("w", slots=2)
    h.submit(wf(sym("a"), sym("b")))
    ta, tb = h.take("w")
    h.feed(c.NodeHeartbeat("w", h.now, running=(tb.token,), assigned=2))
    assert h.state(ta.symbol) == "running"  # once may be a result in flight
    assert not h.kinds("attempt.lost")
    h.feed(c.NodeHeartbeat("w", h.now, running=(tb.token,), assigned=2))
    assert [j.data["reason"] for j in h.journal if j.kind == "attempt.lost"] == [
        "worker forgot the attempt"]
    (again,) = h.take("w")  # the freed slot takes the requeued symbol again
    assert again.symbol == ta.symbol and again.attempt == 2


def test_later_rollbacks_still_run_after_one_fails() -> None:
    h = Harness()
    h.node("w")
    h.submit(wf(sym("a", rollback=True), sym("b", "a", rollback=True),
                sym("c", "b", retries=0)))
    h.run_one("w")
    h.run_one("w")
    h.run_one("w", ok=False)
    (t,) = h.take("w")
    assert t.symbol == "undo_b"
    h.result("w", t, ok=False, retryable=False)
    assert h.run_one("w") == "undo_a"
    assert h.s.run_state("r1") == c.RunState.FAILED


# --- recovery ---------------------------------------------------------------------------

CHAIN = wf(sym("a", rollback=True), sym("b", "a", rollback=True), sym("c", "b"))


def restore(h: Harness, *records: c.TaskRecord, status: str = "running",
            workflow: Workflow = CHAIN) -> None:
    h.feed(c.RunRestored("r1", workflow, status, h.now - 10, records, h.now))


def test_a_restored_run_does_not_rerun_completed_symbols() -> None:
    h = Harness(orphan_grace=5.0)
    restore(h, c.TaskRecord("a", "main", "completed", attempts=1, token=1),
            c.TaskRecord("b", "main", "pending"), c.TaskRecord("c", "main", "pending"))
    h.node("w")
    assert h.names("w") == ["b"]
    assert h.state("a") == "completed"


def test_a_restored_running_attempt_is_adopted_when_its_worker_reports() -> None:
    h = Harness(orphan_grace=5.0, first_token=100)
    restore(h, c.TaskRecord("a", "main", "completed", attempts=1, token=1),
            c.TaskRecord("b", "main", "running", attempts=1, token=7, node_id="w"),
            c.TaskRecord("c", "main", "pending"))
    assert h.state("b") == "retrying"
    h.node("w", running=(7,))  # the worker outlived the dispatcher and still runs it
    assert h.state("b") == "running" and h.take("w") == []
    h.result("w", TaskAssignment("r1/b", "r1", "b", "action", "generic", "internal", {}, 1,
                                 7, 1000))
    (t,) = h.take("w")
    assert t.symbol == "c" and t.token == 100


def test_a_restored_attempt_whose_result_arrives_after_reconnect_counts() -> None:
    h = Harness(orphan_grace=5.0)
    restore(h, c.TaskRecord("a", "main", "running", attempts=1, token=3, node_id="w"),
            c.TaskRecord("b", "main", "pending"), c.TaskRecord("c", "main", "pending"))
    h.node("w")  # came back with the attempt finished, its result not yet acknowledged
    assert h.take("w") == []  # held for its worker, not re-run at once
    h.result("w", TaskAssignment("r1/a", "r1", "a", "action", "generic", "internal", {}, 1,
                                 3, 1000))
    assert h.state("a") == "completed" and h.names("w") == ["b"]


def test_an_unclaimed_restored_attempt_runs_again_after_the_grace() -> None:
    h = Harness(orphan_grace=5.0)
    restore(h, c.TaskRecord("a", "main", "running", attempts=1, token=3),
            c.TaskRecord("b", "main", "pending"), c.TaskRecord("c", "main", "pending"))
    h.node("w")
    h.tick(4.0)
    assert h.take("w") == []
    h.feed(c.NodeHeartbeat("w", h.now))
    h.tick(1.5)
    (t,) = h.take("w")
    assert t.symbol == "a" and t.attempt == 2


def test_a_restored_retry_keeps_its_due_time() -> None:
    h = Harness()
    restore(h, c.TaskRecord("a", "main", "retrying", attempts=1, token=3, due=h.now + 2.0),
            c.TaskRecord("b", "main", "pending"), c.TaskRecord("c", "main", "pending"))
    h.node("w")
    assert h.s._timers[0][0] == pytest.approx(h.now + 2.0)  # the stored due time, kept
    h.tick(1.0)
    assert h.take("w") == []
    h.tick(1.1)
    assert h.names("w") == ["a"]


def test_a_restored_rollback_phase_continues_in_order() -> None:
    h = Harness()
    restore(h, c.TaskRecord("a", "main", "completed", attempts=1),
            c.TaskRecord("b", "main", "rolled_back", attempts=1),
            c.TaskRecord("c", "main", "failed", attempts=4),
            c.TaskRecord("undo_b", "rollback", "completed", parent="b"),
            c.TaskRecord("undo_a", "rollback", "pending", parent="a", after=("b",)),
            status="rolling_back")
    h.node("w")
    assert h.run_one("w") == "undo_a"
    assert h.s.run_state("r1") == c.RunState.ROLLED_BACK


def test_rollback_of_a_finished_run_undoes_completed_symbols_in_reverse_order() -> None:
    h = Harness()
    restore(h, *(c.TaskRecord(n, "main", "completed", attempts=1) for n in "abc"),
            status="completed")
    h.feed(c.RollbackRequested("r1", h.now))
    h.node("w")
    assert [h.run_one("w") for _ in range(2)] == ["undo_b", "undo_a"]
    # The rollback is a phase of its own: the run keeps the outcome it ended with.
    assert h.s.run_state("r1") == c.RunState.COMPLETED
    (done,) = [j for j in h.journal if j.kind == "rollback.completed"]
    assert done.data["status"] == "rolled_back" and done.data["run_status"] == "completed"
    assert not [j for j in h.journal if j.kind in ("run.rolled_back", "run.rolling_back")]
    with pytest.raises(c.IllegalTransition, match="nothing to undo"):
        h.feed(c.RollbackRequested("r1", h.now))


def test_a_resumed_run_reuses_what_completed_before() -> None:
    h = Harness()
    h.node("w")
    h.feed(c.RunSubmitted("r2", CHAIN, h.now, reuse={"a": {"x": 1}}, resumed_from="r1"))
    assert h.names("w") == ["b"]
    (done,) = [j for j in h.journal if j.kind == "symbol.completed"]
    assert done.symbol == "a" and done.data["reused_from"] == "r1"


def test_the_same_manifest_is_found_active_until_its_run_ends() -> None:
    h = Harness()
    h.node("w")
    h.submit(wf(sym("a")))
    assert h.s.find_active(wf(sym("a")).content_hash) == "r1"
    assert h.s.find_active(wf(sym("b")).content_hash) is None
    h.run_one("w")
    assert h.s.find_active(wf(sym("a")).content_hash) is None


def test_an_attempt_never_outlives_the_symbols_deadline() -> None:
    h = Harness()
    h.node("w")
    h.submit(wf(sym("a", timeout=10_000, deadline=3000, retries=5)))
    (t,) = h.take("w")
    assert t.timeout == 3000
    h.now += 1.0
    h.result("w", t, ok=False)
    h.tick(0.5)
    (t2,) = h.take("w")
    assert 1400 <= t2.timeout <= 1600


# --- run control ------------------------------------------------------------------------


def test_pause_stops_new_assignments_while_running_symbols_finish() -> None:
    h = Harness()
    h.node("w", slots=1)
    h.submit(wf(sym("a"), sym("b"), sym("c", "a")))
    (t,) = h.take("w")
    h.feed(c.RunPaused("r1", h.now))
    h.result("w", t)
    assert h.take("w") == []  # b and c wait, though a slot is free
    h.feed(c.RunResumed("r1", h.now))
    assert len(h.take("w")) == 1
    with pytest.raises(c.IllegalTransition):
        h.feed(c.RunResumed("r1", h.now))


def test_a_paused_run_does_not_hold_back_other_runs() -> None:
    h = Harness()
    h.submit(wf(sym("a", priority=9)), run_id="r1")
    h.feed(c.RunPaused("r1", h.now))
    h.submit(wf(sym("b")), run_id="r2")
    h.node("w", slots=1)
    assert [t.run_id for t in h.take("w")] == ["r2"]


def test_cancel_abandons_running_attempts_and_ends_the_run_cancelled() -> None:
    h = Harness()
    h.node("w", slots=2)
    h.submit(wf(sym("a", rollback=True), sym("b"), sym("c", "a"), sym("d", "b")))
    ta, tb = sorted(h.take("w"), key=lambda t: t.symbol)
    h.result("w", ta)
    (tc,) = h.take("w")
    cmds = h.feed(c.RunCancelled("r1", h.now))
    (abandon,) = [x for x in cmds if isinstance(x, c.Abandon)]
    assert sorted(abandon.tokens) == sorted([tb.token, tc.token])
    assert {h.state(n) for n in "bcd"} == {"cancelled"} and h.state("a") == "completed"
    assert h.s.run_state("r1") == c.RunState.CANCELLED
    h.result("w", tb)  # a late result of an abandoned attempt changes nothing
    assert h.state("b") == "cancelled"


def test_cancel_with_rollback_undoes_completed_symbols() -> None:
    h = Harness()
    h.node("w", slots=1)
    h.submit(wf(sym("a", rollback=True), sym("b", "a", rollback=True), sym("c", "b")))
    h.run_one("w")
    h.run_one("w")
    h.take("w")
    h.feed(c.RunCancelled("r1", h.now, rollback=True))
    assert [h.run_one("w") for _ in range(2)] == ["undo_b", "undo_a"]
    assert h.s.run_state("r1") == c.RunState.CANCELLED
    assert h.state("a") == h.state("b") == "rolled_back"


def test_a_paused_run_stays_paused_after_a_restart() -> None:
    h = Harness()
    restore(h, c.TaskRecord("a", "main", "ready"), c.TaskRecord("b", "main", "pending"),
            c.TaskRecord("c", "main", "pending"), status="paused")
    h.node("w")
    assert h.take("w") == []
    h.feed(c.RunResumed("r1", h.now))
    assert h.names("w") == ["a"]


def test_a_forgotten_run_is_freed_by_reference_counting_alone() -> None:
    # Task graphs are cycles (deps <-> dependents, run <-> tasks); left linked, every
    # finished run would wait for a full GC pass, which slows a big dispatcher down.
    import gc

    h = Harness()
    h.node("w", slots=10)
    h.submit(wf(sym("a"), sym("b", "a", rollback=True), sym("c", "a", "b")))
    while tasks := h.take("w"):
        for t in tasks:
            h.result("w", t)
    assert h.s.run_state("r1") is c.RunState.COMPLETED
    h.journal.clear()
    h.commands.clear()
    gc.collect()
    gc.disable()
    try:
        h.s.forget_finished()
        assert h.s.run_state("r1") is None
        assert gc.collect() == 0  # nothing of the run was left for the collector
    finally:
        gc.enable()


# --- liveness judged on evidence, attempts owned by their node ----------------------------


def test_a_heartbeat_sent_before_the_assignment_arrived_loses_nothing() -> None:
    h = Harness()
    h.node("w", slots=2)
    h.submit(wf(sym("a"), sym("b")))
    ta, tb = h.take("w")
    # The dispatcher lags: heartbeats the worker sent before either assignment reached it
    # arrive after both were made. They prove nothing about `a` or `b`.
    for _ in range(5):
        h.feed(c.NodeHeartbeat("w", h.now, running=(), assigned=0))
    h.feed(c.NodeHeartbeat("w", h.now, running=(ta.token,), assigned=1))
    h.feed(c.NodeHeartbeat("w", h.now, running=(ta.token,), assigned=1))
    assert not h.kinds("attempt.lost")
    assert h.state("a") == h.state("b") == "running"


def test_a_heartbeat_without_an_assignment_count_judges_no_attempt() -> None:
    h = Harness()
    h.node("w")
    h.submit(wf(sym("a")))
    h.take("w")
    for _ in range(3):
        h.feed(c.NodeHeartbeat("w", h.now, running=()))
    assert h.state("a") == "running"


def test_after_a_stall_every_node_gets_a_fresh_grace_period() -> None:
    h = Harness(heartbeat_timeout=3.0)
    h.node("w1")
    h.submit(wf(sym("a")))
    h.take("w1")
    h.tick(0.5)
    h.now += 6.0  # the dispatcher was stopped: nobody was heard, nobody could be
    h.feed(c.Tick(h.now, stalled=6.0))
    assert not any(isinstance(x, c.CloseNode) for x in h.commands)
    assert h.kinds("dispatcher.stalled") == [None]
    h.feed(c.NodeHeartbeat("w1", h.now))
    h.tick(2.0)
    assert h.state("a") == "running"
    h.tick(2.0)  # now silent for longer than heartbeat_timeout of its own
    assert any(isinstance(x, c.CloseNode) and x.node_id == "w1" for x in h.commands)


def test_ticks_far_apart_count_as_a_stall_even_unannounced() -> None:
    h = Harness(heartbeat_timeout=3.0, stall_after=3.0)
    h.node("w1")
    h.tick(0.5)
    h.tick(10.0)
    assert not any(isinstance(x, c.CloseNode) for x in h.commands)
    assert h.s.stalls == 1


def test_a_result_from_a_node_that_does_not_own_the_attempt_is_refused() -> None:
    h = Harness()
    h.node("w1")
    h.node("w2")
    h.submit(wf(sym("a"), sym("b", "a")))
    (t,) = h.take("w1")
    h.result("w2", t, output="forged")  # it knows the token, but the attempt is not its own
    assert h.state("a") == "running"
    assert [j.data["claim"] for j in h.journal if j.kind == "claim.refused"] == ["result"]
    assert h.s.refused == 1
    h.result("w1", t, output="real")
    assert h.state("a") == "completed"
    assert [j.data["output"] for j in h.journal if j.kind == "symbol.completed"] == ["real"]


def test_an_orphaned_attempt_is_adopted_or_reported_only_by_its_owner() -> None:
    h = Harness()
    h.node("w1")
    h.submit(wf(sym("a")))
    (t,) = h.take("w1")
    h.feed(c.NodeDisconnected("w1", h.now))  # lost; its result would still be welcome
    cmds = h.node("thief", caps=("php_engine",), running=(t.token,))
    assert any(isinstance(x, c.Abandon) and x.tokens == (t.token,) for x in cmds)
    h.result("thief", t, output="forged")
    assert h.state("a") == "ready"
    assert [j.data["claim"] for j in h.journal if j.kind == "claim.refused"] == [
        "adoption", "result"]
    h.feed(c.NodeDisconnected("thief", h.now))
    h.node("w1", running=(t.token,))  # the owner, back under its own identity
    assert h.kinds("symbol.adopted") == ["a"]
    h.result("w1", t, output="real")
    assert [j.data["output"] for j in h.journal if j.kind == "symbol.completed"] == ["real"]


def test_tokens_come_from_the_token_source_and_a_live_one_is_never_reused() -> None:
    draws = iter([0, 41, 41, 42, 43])
    h = Harness(token_source=lambda: next(draws))
    h.node("w", slots=3)
    h.submit(wf(sym("a"), sym("b"), sym("c")))
    assert sorted(t.token for t in h.take("w")) == [41, 42, 43]


# --- waiting for a worker that can run a symbol (issue #13 item 5) ----------------------


def test_a_symbol_no_connected_worker_can_run_waits_once_with_the_reason() -> None:
    h = Harness()
    h.node("py", slots=2)
    h.submit(wf(sym("p", dispatch="php_engine"), sym("i")))
    assert h.names("py") == ["i"]
    (w,) = [j for j in h.journal if j.kind == "symbol.waiting"]
    assert w.symbol == "p" and w.data == {"reason": "no connected worker has backend php_engine"}
    h.tick(5.0)
    h.node("py2")  # another worker that cannot run it: the same episode goes on
    assert len(h.kinds("symbol.waiting")) == 1
    h.node("php", caps=("php_engine",))
    assert h.kinds("symbol.unblocked") == ["p"]
    assert h.names("php") == ["p"]
    assert h.s.snapshot()["waiting_for_capability"] == []


def test_unmatched_labels_are_the_reason_when_the_backend_is_there() -> None:
    h = Harness()
    h.feed(c.NodeConnected("us", "us", ("internal",), 1, h.now, labels={"region": "us"}))
    h.submit(wf(sym("a", requires={"region": "eu"})))
    (w,) = [j for j in h.journal if j.kind == "symbol.waiting"]
    assert w.data["reason"] == "no connected worker has labels region=eu with backend internal"
    (x,) = h.s.snapshot()["waiting_for_capability"]
    assert x["symbol"] == "a" and x["reason"] == w.data["reason"] and x["due"] is None
    h.feed(c.NodeConnected("eu", "eu", ("internal",), 1, h.now, labels={"region": "eu"}))
    assert h.names("eu") == ["a"]


def test_a_busy_capable_worker_is_no_reason_to_wait() -> None:
    h = Harness()
    h.node("w", slots=1)
    h.submit(wf(sym("a"), sym("b")))
    assert h.names("w") == ["a"]
    assert h.kinds("symbol.waiting") == []  # b is queued behind a, not waiting for a worker


def test_wait_for_worker_fails_the_symbol_with_the_reason_and_on_failure_applies() -> None:
    h = Harness()
    h.node("py", slots=2)
    workflow = Workflow(name="t", version="1", on_failure="continue", wait_for_worker=60_000,
                        symbols=(sym("p", dispatch="php_engine", wait_for_worker=2000,
                                     retries=5, rollback=True),
                                 sym("after", "p"), sym("slow", dispatch="rust_injector")))
    h.submit(workflow)
    waits = {j.symbol: j.data for j in h.journal if j.kind == "symbol.waiting"}
    assert waits["p"]["wait_for_worker"] == 2000  # the symbol's own value wins
    assert waits["slow"]["wait_for_worker"] == 60_000  # else the workflow's
    assert waits["p"]["due"] == pytest.approx(h.now + 2.0)
    h.tick(1.9)
    assert h.state("p") == "ready"
    assert h.s.next_deadline() == pytest.approx(h.now + 0.1)
    h.tick(0.2)
    assert h.state("p") == "failed" and h.state("after") == "skipped"
    (f,) = [j for j in h.journal if j.kind == "symbol.failed"]
    assert f.data["error"].startswith("no connected worker has backend php_engine")
    assert f.data["retryable"] is False and h.kinds("symbol.retrying") == []
    assert h.kinds("rollback.created") == []  # it never ran: nothing of it to undo
    assert h.state("slow") == "ready"  # continue: the rest goes on


def test_wait_for_worker_fails_a_rollback_run_by_rolling_back() -> None:
    h = Harness()
    h.node("py")
    h.submit(wf(sym("a", rollback=True), sym("p", "a", dispatch="php_engine",
                                             wait_for_worker=0)))
    h.run_one("py")
    assert h.s.next_deadline() == h.now  # wait_for_worker 0: the next tick fails it
    h.tick(0.0)
    assert h.state("p") == "failed"
    assert h.run_one("py") == "undo_a"
    assert h.s.run_state("r1") == c.RunState.ROLLED_BACK


def test_a_worker_joining_before_wait_for_worker_ends_saves_the_symbol() -> None:
    h = Harness()
    h.submit(wf(sym("p", dispatch="php_engine", wait_for_worker=1000)))
    h.tick(0.5)
    h.node("php", caps=("php_engine",))
    h.tick(5.0)
    assert h.names("php") == ["p"] and h.state("p") == "running"
    assert h.s.next_deadline() is not None  # liveness only: no stale wait timer left
    assert h.kinds("symbol.failed") == []


def test_a_worker_leaving_or_draining_makes_what_only_it_could_run_wait_again() -> None:
    h = Harness()
    h.node("php", caps=("php_engine",), slots=1)
    h.node("py")
    h.submit(wf(sym("p1", dispatch="php_engine"), sym("p2", dispatch="php_engine"),
                sym("i", dispatch="internal", wait_for_worker=500)))
    assert h.names("php") == ["p1"]
    assert h.kinds("symbol.waiting") == []
    h.feed(c.NodeDraining("py", h.now))  # the only internal worker takes no new work
    h.feed(c.NodeDisconnected("php", h.now))
    assert sorted(h.kinds("symbol.waiting")) == ["p1", "p2"]  # p1's attempt was lost
    assert h.names("py") == ["i"]  # started before the drain: not waiting
    h.node("php2", caps=("php_engine",), slots=2)
    assert sorted(h.kinds("symbol.unblocked")) == ["p1", "p2"]
    assert sorted(h.names("php2")) == ["p1", "p2"]


def test_needs_are_looked_up_once_not_per_symbol(monkeypatch: pytest.MonkeyPatch) -> None:
    h = Harness()
    for i in range(50):
        h.node(f"w{i}", caps=("rust_injector",), slots=1)
    asked: list[Any] = []
    why_not = h.s._why_not
    monkeypatch.setattr(h.s, "_why_not", lambda need: asked.append(need) or why_not(need))
    h.feed(c.RunSubmitted("r1", wf(*(sym(f"s{i}", dispatch=("internal", "php_engine")[i % 2])
                                     for i in range(2000))), h.now))
    assert sorted(asked) == ["internal", "php_engine"]
    assert len(h.kinds("symbol.waiting")) == 2000


def test_a_restored_wait_keeps_its_due_time_after_the_workers_grace() -> None:
    h = Harness(orphan_grace=1.0)
    workflow = wf(sym("a", dispatch="php_engine", wait_for_worker=60_000), sym("b", "a"),
                  sym("c", "b"))
    restore(h, c.TaskRecord("a", "main", "ready", due=h.now + 3.0),
            c.TaskRecord("b", "main", "pending"), c.TaskRecord("c", "main", "pending"),
            workflow=workflow)
    assert h.kinds("symbol.waiting") == []  # workers get their grace to come back first
    h.node("py")
    h.tick(1.0)
    (w,) = [j for j in h.journal if j.kind == "symbol.waiting"]
    assert w.data["due"] == pytest.approx(h.now + 2.0)  # the stored due time, kept
    h.tick(2.0)
    assert h.state("a") == "failed"


def test_a_restored_wait_already_due_still_gives_workers_their_grace() -> None:
    h = Harness(orphan_grace=2.0)
    workflow = wf(sym("a", dispatch="php_engine", wait_for_worker=100), sym("b", "a"),
                  sym("c", "b"))
    restore(h, c.TaskRecord("a", "main", "ready", due=h.now - 50),
            c.TaskRecord("b", "main", "pending"), c.TaskRecord("c", "main", "pending"),
            workflow=workflow)
    h.tick(1.0)
    h.node("php", caps=("php_engine",))  # back within the grace: it runs
    assert h.names("php") == ["a"] and h.kinds("symbol.failed") == []


# --- a requested rollback is a phase of its own (issue #13 item 7) ----------------------


def test_a_rollback_with_nothing_to_undo_is_refused_and_changes_nothing() -> None:
    h = Harness()
    h.node("w")
    h.submit(wf(sym("a"), sym("b"), on_failure="abort"))
    h.run_one("w")
    h.run_one("w", ok=False, retryable=False)  # b failed: only a completed, without rollback
    assert h.s.run_state("r1") == c.RunState.FAILED
    before = len(h.journal)
    with pytest.raises(c.IllegalTransition, match="nothing to undo"):
        h.feed(c.RollbackRequested("r1", h.now))
    assert len(h.journal) == before and h.s.run_state("r1") == c.RunState.FAILED


def test_a_requested_rollback_cannot_be_paused_or_cancelled_and_survives_a_restart() -> None:
    h = Harness()
    h.node("w")
    h.submit(wf(sym("a", rollback=True), sym("b", "a", rollback=True)))
    h.run_one("w")
    h.run_one("w")
    h.feed(c.RollbackRequested("r1", h.now + 1))
    (req,) = [j for j in h.journal if j.kind == "run.rollback_requested"]
    assert req.data == {"status": "completed", "rollbacks": 2}
    for event in (c.RunPaused("r1", h.now), c.RunCancelled("r1", h.now)):
        with pytest.raises(c.IllegalTransition):
            h.feed(event)
    assert h.run_one("w") == "undo_b"
    # The dispatcher restarts here: the run is rebuilt from its records.
    h2 = Harness()
    h2.feed(c.RunRestored("r1", wf(sym("a", rollback=True), sym("b", "a", rollback=True)),
                          "completed", h.now - 10, (
                              c.TaskRecord("a", "main", "completed", attempts=1),
                              c.TaskRecord("b", "main", "rolled_back", attempts=1),
                              c.TaskRecord("undo_b", "rollback", "completed", parent="b"),
                              c.TaskRecord("undo_a", "rollback", "pending", parent="a",
                                           after=("b",))),
                          h.now, rollback="rolling_back", rollback_started=h.now - 1))
    assert h2.s.run_state("r1") == c.RunState.ROLLING_BACK
    h2.node("w")
    assert h2.run_one("w") == "undo_a"
    (done,) = [j for j in h2.journal if j.kind == "rollback.completed"]
    assert done.data["status"] == "rolled_back" and done.data["run_status"] == "completed"
    assert done.data["duration"] == pytest.approx(1.0)
    assert h2.s.run_state("r1") == c.RunState.COMPLETED
    assert not [j for j in h2.journal if j.kind.startswith("run.") and j.kind != "run.restored"]


def test_a_finished_run_restored_for_a_rollback_stays_finished() -> None:
    h = Harness()
    h.node("w")
    # Its earlier rollback failed for a: restoring it must not end it again.
    restore(h, c.TaskRecord("a", "main", "completed", attempts=1),
            c.TaskRecord("b", "main", "rolled_back", attempts=1),
            c.TaskRecord("c", "main", "completed", attempts=1),
            c.TaskRecord("undo_b", "rollback", "completed", parent="b"),
            c.TaskRecord("undo_a", "rollback", "failed", parent="a", after=("b",)),
            status="completed", workflow=wf(sym("a", rollback=True), sym("b", "a", rollback=True),
                                            sym("c", "b")))
    assert h.s.run_state("r1") == c.RunState.COMPLETED
    assert [j.kind for j in h.journal if j.kind.startswith("run.")] == ["run.restored"]
