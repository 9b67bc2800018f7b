"""Watching and steering runs: the event stream, run control, reports, /metrics, and the
live display. Real dispatcher and worker processes on 127.0.0.1 unless said otherwise."""

from __future__ import annotations

import io
import json
import stat
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from e2e_support import (
    Cluster,
    free_port,
    ndjson,
    pid_alive,
    result_json,
    wait_for,
    write_manifest,
)

from swarm.console import Follower, print_report
from swarm.protocol import Event
from swarm.results import ProgressTracker

pytestmark = [pytest.mark.timeout(180)]



def http_get(url: str) -> tuple[int, str, str]:
    with urllib.request.urlopen(url, timeout=10) as r:  # only the cluster's 127.0.0.1 URL
        return r.status, r.headers["Content-Type"], r.read().decode()


@pytest.mark.e2e
def test_the_exact_event_sequence_of_a_small_run(cluster: Cluster, tmp_path: Path) -> None:
    cluster.start_dispatcher()
    cluster.start_worker("w1")
    m = write_manifest(tmp_path, """
        name: two
        version: "1"
        symbols:
          - {name: a, type: action, parameters: {handler: echo, x: 1}}
          - {name: b, type: action, dependencies: [a], parameters: {handler: noop}}
    """)
    cp = cluster.deploy(m)
    assert cp.returncode == 0, cp.stderr
    lines = ndjson(cp)  # nothing but JSON objects on stdout
    events = [(e["event"], e["symbol"], e["node"]) for e in lines[:-1]]
    assert events == [
        ("run.started", None, None),
        ("symbol.queued", "a", None),
        ("symbol.started", "a", "w1"),
        ("attempt.finished", "a", "w1"),
        ("symbol.completed", "a", "w1"),
        ("symbol.queued", "b", None),
        ("symbol.started", "b", "w1"),
        ("attempt.finished", "b", "w1"),
        ("symbol.completed", "b", "w1"),
        ("run.completed", None, None),
    ]
    assert lines[4]["data"]["output"] == {"x": 1}
    assert lines[-1]["summary"]["status"] == "completed"


def _big(tmp_path: Path, n: int) -> Path:
    body = "".join(f"  - {{name: s{i}, type: action, parameters: {{handler: noop}}}}\n"
                   for i in range(n))
    return write_manifest(tmp_path, 'name: big\nversion: "1"\nsymbols:\n' + body, "big.yaml")


@pytest.mark.e2e
def test_a_subscriber_that_never_reads_does_not_slow_dispatch(cluster: Cluster,
                                                              tmp_path: Path) -> None:
    from websockets.sync.client import connect

    from swarm import protocol as p

    cluster.start_dispatcher()
    cluster.start_worker("w1", slots=8)
    cluster.start_worker("w2", slots=8)
    m = _big(tmp_path, 2000)

    def timed_run() -> float:
        t0 = time.monotonic()
        cp = cluster.deploy(m, "--new", timeout=120)
        assert cp.returncode == 0, cp.stderr
        return time.monotonic() - t0

    baseline = timed_run()
    with connect(cluster.url, compression=None, max_queue=1, close_timeout=1) as stuck:
        stuck.recv(timeout=5)
        stuck.send(p.encode(p.Hello(role="client", name="stuck")))
        stuck.recv(timeout=5)
        stuck.send(p.encode(p.Request(id=1, op="watch", args={})))
        stuck.recv(timeout=5)
        # From here on it reads nothing: its buffers fill and the dispatcher must not wait.
        with_stuck = timed_run()
        status = cluster.cli("status", "--url", cluster.url, "--json")
        assert status.returncode == 0
    assert with_stuck < 3 * baseline + 5, (baseline, with_stuck)  # a generous bound


async def test_a_slow_subscriber_gets_run_events_and_a_gap_instead_of_unbounded_frames(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncio

    from swarm import dispatcher as d
    from swarm import protocol as p

    class Unread:  # a connection whose peer reads nothing until told to
        def __init__(self) -> None:
            self.sent: list[p.Message] = []
            self.gate = asyncio.Event()

        async def send(self, frame: bytes) -> None:
            await self.gate.wait()
            self.sent.append(p.decode(frame))

    monkeypatch.setattr(d, "CLIENT_QUEUE", 10)
    ws = Unread()
    peer = d._Peer(ws, "client", "slow")  # type: ignore[arg-type]
    peer.publish([_event("symbol.started", str(i)) for i in range(12)])  # under the bound
    peer.publish([_event("symbol.completed", "x"), _event("run.completed")])  # over it
    peer.publish([_event("symbol.started", "y")])
    ws.gate.set()
    await asyncio.wait_for(_drained(peer), 5)
    kinds = [ev.kind for msg in ws.sent if isinstance(msg, p.Events) for ev in msg.items]
    assert kinds == ["symbol.started"] * 12 + ["run.completed"]
    peer.publish([_event("symbol.started", "z")])  # read again: told what it missed
    await asyncio.wait_for(_drained(peer), 5)
    last = ws.sent[-1]
    assert isinstance(last, p.Events)
    assert [(ev.kind, ev.data) for ev in last.items] == [
        ("stream.gap", {"missed": 2}), ("symbol.started", {})]
    await peer.close()


async def _drained(peer: Any) -> None:
    import asyncio

    while peer.events_queued:
        await asyncio.sleep(0.01)


@pytest.mark.e2e
def test_pause_resume_and_cancel_are_recorded_and_survive_a_restart(cluster: Cluster,
                                                                    tmp_path: Path) -> None:
    port = free_port()
    cluster.start_dispatcher(port=port)
    cluster.start_worker("w1", slots=1)
    m = write_manifest(tmp_path, """
        name: steer
        version: "1"
        symbols:
          - {name: a, type: action, parameters: {handler: delay, ms: 3000}}
          - {name: b, type: action, dependencies: [a], parameters: {handler: noop}}
    """)  # a lasts long enough for a CLI process to start and pause the run on a busy host
    run_id = cluster.detach(m)
    wait_for(lambda: cluster.tasks(run_id)["a"]["state"] == "running", what="a to start")
    cp = cluster.cli("pause", run_id, "--url", cluster.url)
    assert cp.returncode == 0 and "paused" in cp.stdout
    assert cluster.run_status(run_id) == "paused"
    wait_for(lambda: cluster.tasks(run_id)["a"]["state"] == "completed", what="a to finish")
    # b would have started in the same commit that completed a: it did not.
    assert cluster.tasks(run_id)["b"]["state"] == "ready"
    assert cluster.stop("dispatcher") == 0
    cluster.start_dispatcher(port=port)
    assert cluster.run_status(run_id) == "paused"
    assert cluster.cli("resume", run_id, "--url", cluster.url).returncode == 0
    wait_for(lambda: cluster.run_status(run_id) == "completed", what="the resumed run")
    kinds = [r["kind"] for r in cluster.query(
        "SELECT kind FROM events WHERE run_id = ? AND kind LIKE 'run.%' ORDER BY seq",
        (run_id,))]
    assert kinds == ["run.started", "run.paused", "run.restored", "run.resumed",
                     "run.completed"]
    again = cluster.cli("pause", run_id, "--url", cluster.url)
    assert again.returncode == 2 and "not active" in again.stderr


STUBBORN = """#!/bin/sh
if [ "$1" = "--version" ]; then echo "stubborn 1.0"; exit 0; fi
trap "" TERM
echo $$ >> "{pids}"
while :; do sleep 1; done
"""


@pytest.mark.e2e
def test_cancel_terminates_running_backends_and_can_roll_back(cluster: Cluster,
                                                              tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    script = tmp_path / "stubborn"
    script.write_text(STUBBORN.format(pids=pids))
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    cfg = cluster.write_config("b.toml", f'[backends.rust_injector]\nbinary_path = "{script}"\n')
    cluster.start_dispatcher()
    cluster.start_worker("w1", cfg, slots=2)
    m = write_manifest(tmp_path, """
        name: cancel-me
        version: "1"
        symbols:
          - {name: a, type: action, parameters: {handler: noop},
             rollback: {name: undo_a, type: action, parameters: {handler: noop}}}
          - {name: hang, type: action, dispatch: rust_injector, dependencies: [a]}
          - {name: later, type: action, dependencies: [hang], parameters: {handler: noop}}
    """)
    run_id = cluster.detach(m)
    wait_for(lambda: pids.exists() and pids.read_text().strip(), what="the backend to start")
    pid = int(pids.read_text().split()[0])
    cp = cluster.cli("cancel", run_id, "--rollback", "--url", cluster.url)
    assert cp.returncode == 0, cp.stderr
    wait_for(lambda: cluster.run_status(run_id) == "cancelled", what="the run to end")
    tasks = cluster.tasks(run_id)
    assert tasks["hang"]["state"] == tasks["later"]["state"] == "cancelled"
    assert tasks["a"]["state"] == "rolled_back" and tasks["undo_a"]["state"] == "completed"
    wait_for(lambda: not pid_alive(pid), timeout=15, what="the backend to be terminated")


@pytest.mark.e2e
def test_report_figures_of_a_workflow_with_known_durations(cluster: Cluster,
                                                           tmp_path: Path) -> None:
    port = free_port()
    cluster.start_dispatcher(port=port)
    cluster.start_worker("w1", slots=1)
    cluster.start_worker("w2", slots=1)
    m = write_manifest(tmp_path, """
        name: diamond
        version: "1"
        symbols:
          - {name: a, type: action, parameters: {handler: delay, ms: 300}}
          - {name: b, type: action, dependencies: [a], parameters: {handler: delay, ms: 600}}
          - {name: c, type: action, dependencies: [a], parameters: {handler: delay, ms: 300}}
          - {name: d, type: action, dependencies: [b, c], parameters: {handler: delay, ms: 300}}
    """)
    run_id = result_json(cluster.deploy(m))["run_id"]
    assert cluster.stop("dispatcher") == 0  # the report comes from the state DB
    cluster.start_dispatcher(port=port)
    cp = cluster.cli("report", run_id, "--url", cluster.url, "--json")
    assert cp.returncode == 0, cp.stderr
    rep = json.loads(cp.stdout)
    mt = rep["metrics"]
    assert rep["status"] == "completed" and rep["totals"] == {"completed": 4}
    assert 1.2 <= mt["total_duration"] < 2.0  # a + b + d = 1.2 s of critical path
    assert 1.2 <= mt["effective_duration"] <= mt["total_duration"]
    assert mt["success_rate"] == 1.0 and mt["error_rate"] == 0.0
    assert mt["throughput"] == pytest.approx(4 / mt["total_duration"])
    assert mt["attempts"] == 4 and mt["retries"] == 0 and mt["worker_losses"] == 0
    assert mt["backends"]["internal"]["symbols"] == 4
    assert 1.5 <= mt["busy_slot_seconds"] < 1.9
    assert mt["utilisation"] == pytest.approx(
        mt["busy_slot_seconds"] / mt["available_slot_seconds"])
    assert 0.3 < mt["utilisation"] < 0.8
    assert mt["planned_critical_path"][0] == "a" and mt["planned_critical_path"][-1] == "d"
    assert mt["actual_critical_path"] == ["a", "b", "d"]
    assert 1.2 <= mt["actual_critical_path_seconds"] < 1.6
    assert [e["kind"] for e in rep["timeline"]][0] == "run.started"
    human = cluster.cli("report", run_id, "--url", cluster.url)
    assert human.returncode == 0 and "a -> b -> d" in human.stdout
    runs = cluster.cli("runs", "--url", cluster.url)
    assert run_id in runs.stdout and "4/4" in runs.stdout


@pytest.mark.e2e
def test_healthz_and_metrics_beside_the_websocket(cluster: Cluster, tmp_path: Path) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    cluster.start_dispatcher()
    cluster.start_worker("w1", slots=3)
    m = write_manifest(tmp_path, """
        name: m
        version: "1"
        symbols:
          - {name: a, type: action, parameters: {handler: noop}}
          - {name: b, type: action, dependencies: [a], parameters: {handler: noop}}
    """)
    assert cluster.deploy(m).returncode == 0
    http = cluster.url.replace("ws://", "http://")
    code, ctype, body = http_get(http + "/healthz")
    health = json.loads(body)
    assert code == 200 and ctype == "application/json" and health["status"] == "ok"
    assert health["version"] and health["uptime"] > 0
    code, ctype, text = http_get(http + "/metrics")
    assert code == 200 and ctype.startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(text)}
    value = {f: {tuple(sorted(s.labels.items())): s.value for s in families[f].samples}
             for f in families}
    assert value["swarm_workers_connected"][()] == 1
    assert value["swarm_worker_free_slots"][()] == 3
    assert value["swarm_queue_depth"][()] == 0
    assert value["swarm_runs"][(("state", "completed"),)] == 1
    assert families["swarm_dispatch_latency_seconds"].type == "histogram"
    count = [s.value for s in families["swarm_dispatch_latency_seconds"].samples
             if s.name.endswith("_count")]
    assert count == [2]  # one assignment per symbol
    assert families["swarm_journal_write_seconds"].type == "histogram"
    assert "swarm_symbols" in families
    watch = cluster.cli("status", "--url", cluster.url, "--watch", "--count", "2",
                        "--interval", "0.1", "--json")
    frames = [json.loads(line) for line in watch.stdout.splitlines()]
    assert watch.returncode == 0 and len(frames) == 2
    assert all(f["nodes"][0]["name"] == "w1" for f in frames)


def _event(kind: str, symbol: str | None = None, node: str | None = None,
           **data: object) -> Event:
    task_id = f"r1/{symbol}" if symbol else None
    return Event(kind=kind, ts=time.time(), run_id="r1", task_id=task_id, symbol=symbol,
                 node=node, data=dict(data))


def _feed(f: Follower) -> None:
    for ev in (_event("symbol.started", "a", "w1"), _event("symbol.started", "b", "w2"),
               _event("symbol.completed", "a", "w1"),
               _event("symbol.failed", "b", "w2", error="disk full")):
        f.on_event(ev)


def test_live_display_on_a_terminal_shows_progress_running_symbols_and_failures() -> None:
    from rich.console import Console

    buf = io.StringIO()
    out = Console(file=buf, force_terminal=True, width=100, color_system=None)
    with Follower(out, "r1", total=3) as f:
        f.on_event(_event("symbol.started", "a", "w1"))
        out.print(f)  # one frame, as Live draws it
        _feed(f)
        out.print(f)
    text = buf.getvalue()
    assert "0/3" in text and "2/3" in text and "/s" in text and "ETA" in text
    assert "running" in text and "w1" in text
    assert "symbol.failed" in text and "disk full" in text


def test_followers_print_plain_lines_without_control_codes_when_not_a_terminal() -> None:
    from rich.console import Console

    buf = io.StringIO()
    out = Console(file=buf, force_terminal=False, width=100)
    with Follower(out, "r1", total=3) as f:
        _feed(f)
    text = buf.getvalue()
    assert "\x1b" not in text
    assert [line.split()[1] for line in text.splitlines()] == [
        "symbol.started", "symbol.started", "symbol.completed", "symbol.failed"]


def test_progress_counts_an_ending_once_when_the_snapshot_already_had_it() -> None:
    # watch() reads the run's record, then the events buffered since the deploy: an ending
    # in both is one ending.
    tracker = ProgressTracker("r1", 3, ended=["r1/a"])
    for ev in (_event("symbol.completed", "a", "w1"), _event("symbol.completed", "b", "w2"),
               _event("symbol.completed", "b", "w2")):
        tracker.on_event(ev)
    assert tracker.completed == 2
    assert tracker.update(None).completed == 2


def test_report_renders_for_humans() -> None:
    from rich.console import Console

    buf = io.StringIO()
    rep = {"run_id": "r1", "workflow": "w", "version": "1", "manifest_hash": "ab" * 32,
           "status": "completed", "started_at": 0.0, "finished_at": 2.0, "symbol_count": 1,
           "totals": {"completed": 1}, "timeline": [{"t": 0.0, "kind": "run.started",
                                                     "symbol": None, "node": None,
                                                     "attempt": None}],
           "metrics": {"total_duration": 2.0, "effective_duration": 1.0, "success_rate": 1.0,
                       "error_rate": 0.0, "throughput": 0.5, "attempts": 1, "retries": 0,
                       "worker_losses": 0, "busy_slot_seconds": 1.0,
                       "available_slot_seconds": 4.0, "utilisation": 0.25,
                       "planned_critical_path": ["x"], "actual_critical_path": ["x"],
                       "actual_critical_path_seconds": 1.0,
                       "backends": {"internal": {"symbols": 1, "attempts": 1,
                                                 "busy_seconds": 1.0}}}}
    print_report(Console(file=buf, width=120), rep)
    text = buf.getvalue()
    assert "25.0%" in text and "0.50 symbols/s" in text and "run.started" in text


async def test_a_watch_is_answered_only_once_what_it_reports_is_stored(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # The core knows a run ended one group commit before the state DB does; a follower
    # told "completed" reads the run's record next, which must say so too.
    import asyncio

    import swarm

    wf = swarm.Workflow(name="one", version="1", symbols=(
        swarm.Symbol(name="a", type="action", parameters={"handler": "noop"}),))
    async with swarm.LocalSwarm(workers=1, processes=False) as ls:
        assert ls.dispatcher is not None and ls.dispatcher.store is not None
        store = ls.dispatcher.store
        real_write, held, gate = store.write, asyncio.Event(), asyncio.Event()

        async def slow_write(entries: Any, stimuli: Any = ()) -> range:
            entries = list(entries)
            if any(e.kind == "run.completed" for e in entries):
                held.set()
                await gate.wait()
            return await real_write(entries, stimuli)

        monkeypatch.setattr(store, "write", slow_write)
        run_id = (await ls.client.submit(wf, follow=False))["run_id"]
        await asyncio.wait_for(held.wait(), 10)
        async with ls.connect() as other:
            watch = asyncio.ensure_future(other.subscribe(run_id))
            done, _ = await asyncio.wait({watch}, timeout=0.3)
            assert not done  # the end is not stored yet
            gate.set()
            assert await asyncio.wait_for(watch, 10) == "completed"
            assert (await other.run(run_id))["status"] == "completed"


async def test_waiting_for_a_commit_ends_when_the_state_db_fails(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncio
    import sqlite3

    import swarm
    from swarm.errors import StateError

    wf = swarm.Workflow(name="one", version="1", symbols=(
        swarm.Symbol(name="a", type="action", parameters={"handler": "noop"}),))
    async with swarm.LocalSwarm(workers=1, processes=False) as ls:
        d = ls.dispatcher
        assert d is not None and d.store is not None
        held, gate = asyncio.Event(), asyncio.Event()

        async def failing_write(entries: Any, stimuli: Any = ()) -> None:
            held.set()
            await gate.wait()
            raise sqlite3.OperationalError("disk I/O error")

        monkeypatch.setattr(d.store, "write", failing_write)
        submit = asyncio.ensure_future(ls.client.submit(wf, follow=False))
        await asyncio.wait_for(held.wait(), 10)
        waiting = asyncio.ensure_future(d.stored())  # behind the commit that will fail
        await asyncio.sleep(0)
        gate.set()
        with pytest.raises(StateError):
            await asyncio.wait_for(waiting, 10)
        with pytest.raises(StateError):
            await d.stored()  # and at once from then on
        assert d.failed is not None
        with pytest.raises(swarm.SwarmError):  # the deploy was never acknowledged
            await asyncio.wait_for(submit, 10)
