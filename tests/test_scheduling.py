"""Scheduling choices in the pure core: resources, waves, label routing, duration-weighted
priorities, and duration estimates from history."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_core import Harness, sym, wf

from swarm import core as c
from swarm.model import Workflow


def with_resources(workflow: Workflow, **capacities: int) -> Workflow:
    return dataclasses.replace(workflow, resources=dict(capacities))


def test_an_exclusive_resource_is_held_by_one_symbol_at_a_time() -> None:
    h = Harness()
    h.node("w", slots=4)
    h.submit(wf(sym("a", resources=("db",)), sym("b", resources=("db",)), sym("free")))
    first = h.take("w")
    assert sorted(t.symbol for t in first) == ["a", "free"]  # b waits; free does not
    h.result("w", next(t for t in first if t.symbol == "a"))
    assert h.names("w") == ["b"]


def test_a_counted_resource_admits_its_capacity() -> None:
    h = Harness()
    h.node("w", slots=8)
    h.submit(with_resources(wf(*(sym(f"s{i}", resources=("api",)) for i in range(5))), api=2))
    assert len(h.take("w")) == 2


def test_a_symbol_takes_all_its_resources_or_none() -> None:
    h = Harness()
    h.node("w", slots=4)
    h.submit(wf(sym("x", resources=("a",)), sym("y", resources=("b",)),
                sym("both", resources=("a", "b"), priority=-1)))
    got = h.take("w")
    assert sorted(t.symbol for t in got) == ["x", "y"]
    h.result("w", got[0])
    assert h.take("w") == []  # one of its two locks is still held: it holds neither
    assert all(not t.holding for t in [h.s._runs["r1"].tasks["both"]])
    h.result("w", got[1])
    assert h.names("w") == ["both"]


@pytest.mark.parametrize("ending", ["failure", "loss", "cancel"])
def test_locks_are_released_however_a_symbol_ends(ending: str) -> None:
    h = Harness()
    h.node("w", slots=2)
    h.submit(wf(sym("a", resources=("db",), retries=0), sym("b", resources=("db",))),
             run_id="r1")
    h.submit(wf(sym("c", resources=("db",))), run_id="r2")
    (t,) = h.take("w")
    if ending == "failure":
        h.result("w", t, ok=False, timed_out=True, error="timed out")
    elif ending == "loss":
        h.feed(c.NodeDisconnected("w", h.now))
        h.node("w", slots=2)
    else:
        h.feed(c.RunCancelled(t.run_id, h.now))
    assert len(h.take("w")) == 1  # the lock went to the next symbol that wants it
    assert sum(h.s._place.held.values()) == 1


def test_a_restored_running_symbol_keeps_its_lock_until_its_fate_is_known() -> None:
    h = Harness(orphan_grace=5.0)
    w = wf(sym("a", resources=("db",)), sym("b", resources=("db",)))
    h.feed(c.RunRestored("r1", w, "running", h.now, (
        c.TaskRecord("a", "main", "running", attempts=1, token=7),
        c.TaskRecord("b", "main", "ready")), h.now))
    h.node("w", slots=2)
    assert h.take("w") == []  # b waits: a may still run on a worker coming back
    h.tick(6.0)
    assert len(h.take("w")) == 1


@settings(max_examples=60, deadline=None, derandomize=True)
@given(st.lists(st.tuples(st.sets(st.sampled_from("abc"), max_size=3), st.integers(0, 5)),
                min_size=1, max_size=12),
       st.dictionaries(st.sampled_from("abc"), st.integers(1, 2)),
       st.integers(1, 4), st.randoms(use_true_random=False))
def test_resource_exclusion_holds_and_never_deadlocks(
        specs: list[tuple[set[str], int]], capacity: dict[str, int], slots: int,
        rng: Any) -> None:
    h = Harness()
    h.node("w", slots=slots)
    w = with_resources(wf(*(sym(f"s{i}", resources=tuple(sorted(keys)), priority=prio)
                            for i, (keys, prio) in enumerate(specs))), **capacity)
    h.submit(w)
    running: list[Any] = []
    for _ in range(10 * len(specs)):
        running += h.take("w")
        for key in "abc":  # never more holders than the capacity
            holders = sum(1 for t in running if key in w.symbol(t.symbol).resources)
            assert holders <= capacity.get(key, 1)
        if not running:
            break
        done = running.pop(rng.randrange(len(running)))
        h.result("w", done)
    assert h.s.run_state("r1") == c.RunState.COMPLETED  # everything ran: no deadlock


def test_waves_run_level_by_level_with_a_checkpoint_per_wave() -> None:
    for mode, expect_c_early in (("rolling", True), ("waves", False)):
        h = Harness()
        h.node("w", slots=4)
        w = dataclasses.replace(wf(sym("a"), sym("b"), sym("c", "b")), mode=mode)
        h.submit(w)
        ta, tb = sorted(h.take("w"), key=lambda t: t.symbol)
        h.result("w", tb)
        assert (h.names("w") == ["c"]) is expect_c_early
        h.result("w", ta)
        if not expect_c_early:
            assert h.names("w") == ["c"]  # the barrier opened once a finished too
            assert [j.data["wave"] for j in h.journal if j.kind == "run.wave_completed"] == [0]


def test_a_failing_wave_stops_the_run_before_the_next_wave() -> None:
    h = Harness()
    h.node("w", slots=4)
    w = dataclasses.replace(wf(sym("bad", retries=0), sym("ok"), sym("next", "ok"),
                               on_failure="continue"), mode="waves")
    h.submit(w)
    for t in h.take("w"):
        h.result("w", t, ok=t.symbol != "bad")
    assert h.take("w") == []
    assert h.state("next") == "skipped" and h.s.run_state("r1") == c.RunState.FAILED


def test_requires_routes_to_workers_with_matching_labels_only() -> None:
    h = Harness()
    h.node("plain", slots=2)
    h.feed(c.NodeConnected("eu", "eu", ("internal",), 1, h.now, labels={"zone": "eu"}))
    h.submit(wf(sym("here", requires={"zone": "eu"}), sym("there", requires={"zone": "eu"}),
                sym("anywhere")))
    assert h.names("eu") == ["here"]
    assert h.names("plain") == ["anywhere"]  # not held back by the symbol waiting for eu
    h.result("eu", [t for t in h.commands if isinstance(t, c.Assign) and t.node_id == "eu"][0]
             .tasks[0])
    assert h.names("eu") == ["there"]


def test_a_symbol_no_worker_can_ever_run_is_reported_waiting_for_capability() -> None:
    h = Harness()
    h.node("w", slots=1)
    h.submit(wf(sym("gpu", requires={"gpu": "yes"}), sym("ps", dispatch="powershell_engine")))
    waiting = h.s.snapshot()["waiting_for_capability"]
    assert {(x["symbol"], x["dispatch"]) for x in waiting} == {
        ("gpu", "internal"), ("ps", "powershell_engine")}
    h.feed(c.NodeConnected("g", "g", ("internal",), 1, h.now, labels={"gpu": "yes"}))
    assert [x["symbol"] for x in h.s.snapshot()["waiting_for_capability"]] == ["ps"]


def test_expected_durations_weight_the_remaining_path() -> None:
    h = Harness()
    # By count, `wide1` (2 symbols to the end) beats `long`; by time, `long` (10 s) wins.
    h.feed(c.RunSubmitted("r1", wf(sym("long"), sym("wide1"), sym("wide2", "wide1")), h.now,
                          durations={"long": 10_000, "wide1": 100, "wide2": 100}))
    h.node("w", slots=1)
    assert h.names("w") == ["long"]


async def test_duration_estimates_come_from_history(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from swarm import state
    from swarm.state import DEFAULT_DURATION_MS, Store

    store = await Store.open(tmp_path / "s.db")
    try:
        h = Harness()
        h.node("w", slots=3)
        w = dataclasses.replace(wf(sym("a"), sym("b", dispatch="php_engine")), name="hist")
        for i in range(3):
            h.submit(w, run_id=f"r{i}")
        h.node("p", caps=("php_engine",), slots=3)
        for node, ms_list in (("w", (100.0, 300.0, 200.0)), ("p", (50.0, 50.0, 80.0))):
            for t, ms in zip(h.take(node), ms_list, strict=True):
                h.result(node, t, duration_ms=ms)
        other = dataclasses.replace(wf(sym("x", dispatch="php_engine")), name="other")
        h.submit(other, run_id="o1")
        await store.write(h.journal)
        est = await store.expected_durations("hist", {"a": "internal", "b": "php_engine",
                                                      "new": "php_engine", "n2": "rust"})
        assert est == {"a": 200.0, "b": 50.0, "new": 50.0, "n2": DEFAULT_DURATION_MS}
        # Reused while fresh (a deploy does not wait for the query), asked again after.
        written = len(h.journal)
        h.submit(w, run_id="r3")
        for t in h.take("w"):
            h.result("w", t, duration_ms=900.0)  # median of a: 100, 200, 300, 900 -> 250
        await store.write(h.journal[written:])
        again = await store.expected_durations("hist", {"a": "internal", "b": "php_engine",
                                                        "new": "php_engine", "n2": "rust"})
        assert again == est
        other_symbols = await store.expected_durations("hist", {"a": "internal"})
        assert other_symbols == {"a": 250.0}  # not what was cached: asked again
        monkeypatch.setattr(state, "DURATIONS_TTL", 0.0)
        assert (await store.expected_durations("hist", {"a": "internal", "b": "php_engine"})
                == {"a": 250.0, "b": 50.0})
    finally:
        await store.close()


async def test_duration_estimates_are_coarse_so_noise_keeps_manifest_order(
        tmp_path: Path) -> None:
    # Sub-millisecond no-ops measure 0.01 or 0.03 ms at random: ordered by that, a
    # fan-out would start in a shuffled order (and write its rows all over the DB).
    from swarm.state import Store

    store = await Store.open(tmp_path / "s.db")
    try:
        h = Harness()
        h.node("w", slots=10)
        w = dataclasses.replace(wf(sym("a"), sym("b"), sym("c")), name="noops")
        h.submit(w)
        for t, ms in zip(h.take("w"), (0.012, 0.031, 1234.0), strict=True):
            h.result("w", t, duration_ms=ms)
        await store.write(h.journal)
        est = await store.expected_durations("noops", {"a": "internal", "b": "internal",
                                                       "c": "internal"})
        assert est == {"a": 1.0, "b": 1.0, "c": 1200.0}
        h2 = Harness()
        h2.feed(c.RunSubmitted("r2", wf(*(sym(f"t{i}") for i in range(50))), h2.now,
                               durations={f"t{i}": 1.0 for i in range(50)}))
        h2.node("w", slots=50)
        assert h2.names("w") == [f"t{i}" for i in range(50)]
    finally:
        await store.close()
