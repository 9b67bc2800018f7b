"""Liveness judged on evidence and attempts owned by their node, with real processes:
load, a stopped dispatcher, forged claims, repeated restarts (issue #20, #12)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from e2e_support import (
    Cluster,
    assert_no_losses,
    delays_manifest,
    free_port,
    pid_alive,
    wait_for,
    write_manifest,
)

from swarm import protocol as p
from swarm.client import Client

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

ONE_SECOND_BEATS = """
[coordinator]
heartbeat_interval = 1000
heartbeat_timeout = 3000
"""


@pytest.fixture
def busy(tmp_path: Path) -> Iterator[Cluster]:
    """A dispatcher and two workers of 4 slots, heartbeating every second (3 s timeout)."""
    cl = Cluster(tmp_path)
    cl.edit_config("heartbeat_interval = 200\nheartbeat_timeout = 3000",
                   "heartbeat_interval = 1000\nheartbeat_timeout = 3000")
    cl.edit_config("[worker]\nheartbeat_interval = 200", "[worker]\nheartbeat_interval = 1000")
    try:
        cl.start_dispatcher()
        cl.start_worker("w1", slots=4)
        cl.start_worker("w2", slots=4)
        yield cl
    finally:
        cl.close()


def test_fifty_concurrent_deploys_with_one_second_heartbeats_lose_nothing(
        busy: Cluster, tmp_path: Path) -> None:
    cluster = busy
    manifests = [delays_manifest(tmp_path, f"load-{i}", 12, 30) for i in range(50)]

    async def deploy_all() -> list[str]:
        async with Client(cluster.url) as client:
            runs = await asyncio.gather(*(client.deploy(m) for m in manifests))
            results = await asyncio.gather(*(r.wait() for r in runs))
        return [r.status for r in results]

    statuses = asyncio.run(asyncio.wait_for(deploy_all(), 150))
    assert statuses == ["completed"] * 50
    assert_no_losses(cluster)
    assert len(cluster.query("SELECT 1 FROM attempts WHERE outcome = 'ok'")) == 600


def test_a_dispatcher_stopped_for_three_heartbeat_intervals_loses_nothing(
        busy: Cluster, tmp_path: Path) -> None:
    cluster = busy
    run_id = cluster.detach(delays_manifest(tmp_path, "stopped", 16, 1500))
    wait_for(lambda: len(cluster.query("SELECT 1 FROM tasks WHERE state = 'running'"))
             >= 8, what="symbols to run")
    disp = cluster.procs["dispatcher"]
    os.kill(disp.pid, signal.SIGSTOP)
    try:
        time.sleep(3.5)  # the stall under test: > 3 heartbeat intervals, > the timeout
    finally:
        os.kill(disp.pid, signal.SIGCONT)
    wait_for(lambda: cluster.run_status(run_id) == "completed", timeout=60,
             what="the run to complete")
    assert_no_losses(cluster)
    assert cluster.query("SELECT 1 FROM events WHERE kind = 'dispatcher.stalled'")
    assert "stalled for" in cluster.log("dispatcher")


HOLD = """
name: hold
version: "1"
symbols:
  - {name: slow, type: action, parameters: {handler: delay, ms: 2500}}
"""


@contextlib.contextmanager
def _thief(url: str, **hello: Any) -> Iterator[Any]:
    """A hand-driven worker-role peer that can run nothing the manifest asks for."""
    from websockets.sync.client import connect

    with connect(url, compression=None) as ws:
        assert isinstance(p.decode(ws.recv(timeout=5)), p.Challenge)
        ws.send(p.encode(p.Hello(role="worker", name="thief", capabilities=("php_engine",),
                                 slots=1, **hello)))
        assert isinstance(p.decode(ws.recv(timeout=5)), p.Welcome)
        yield ws


def test_a_forged_result_from_another_worker_is_dropped_and_the_real_one_wins(
        cluster: Cluster, tmp_path: Path) -> None:
    cluster.start_dispatcher()
    cluster.start_worker("w1", slots=1)
    run_id = cluster.detach(write_manifest(tmp_path, HOLD))
    (att,) = wait_for(lambda: cluster.query(
        "SELECT token, task_id FROM attempts WHERE outcome = 'running'"), what="an attempt")
    assert att["token"] not in range(0, 1 << 20)  # random, not a counter from 1
    with _thief(cluster.url) as ws:
        forged = p.TaskResult(token=att["token"], task_id=att["task_id"], ok=True,
                              output="forged")
        ws.send(p.encode(p.Results((forged,))))
        wait_for(lambda: cluster.query("SELECT 1 FROM events WHERE kind = 'claim.refused'"),
                 what="the forged result to be refused")
        assert cluster.tasks(run_id)["slow"]["state"] == "running"
        wait_for(lambda: cluster.run_status(run_id) == "completed", what="the real result")
    assert cluster.tasks(run_id)["slow"]["result"] == '{"slept_ms":2500}'  # the real one
    assert "abandoning" not in cluster.log("w1")
    assert "belongs to" in cluster.log("dispatcher")


def test_a_forged_adoption_after_a_restart_is_refused_and_the_owner_adopts(
        cluster: Cluster, tmp_path: Path) -> None:
    port = free_port()
    cluster.start_dispatcher(port=port)
    worker = cluster.start_worker("w1", slots=1)
    run_id = cluster.detach(write_manifest(tmp_path, HOLD.replace("2500", "4000")))
    (att,) = wait_for(lambda: cluster.query(
        "SELECT a.token, t.node_id FROM attempts a JOIN tasks t ON t.task_id = a.task_id"
        " WHERE a.outcome = 'running'"), what="an attempt")
    os.kill(worker.pid, signal.SIGSTOP)  # the owner is away while the thief tries
    try:
        cluster.kill("dispatcher")
        cluster.procs["dispatcher"].wait(10)
        cluster.start_dispatcher(port=port)
        with _thief(cluster.url, running=(att["token"],), node_id=att["node_id"],
                    node_proof=secrets.token_bytes(32)) as ws:
            msg = p.decode(ws.recv(timeout=10))
            assert isinstance(msg, p.Abandon) and msg.tokens == (att["token"],)
    finally:
        os.kill(worker.pid, signal.SIGCONT)
    wait_for(lambda: cluster.run_status(run_id) == "completed", timeout=30,
             what="the owner to adopt and finish")
    kinds = [r["kind"] for r in cluster.query("SELECT kind FROM events ORDER BY seq")]
    assert "symbol.adopted" in kinds and kinds.count("symbol.started") == 1
    (refused,) = cluster.query("SELECT data FROM events WHERE kind = 'claim.refused'")
    assert '"claim":"adoption"' in refused["data"]
    assert "without proof" in cluster.log("dispatcher")
    assert "abandoning" not in cluster.log("w1")


def test_workers_are_back_within_a_second_after_each_of_six_restarts(
        tmp_path: Path) -> None:
    cluster = Cluster(tmp_path)
    # The shipped reconnect delays (the defaults), not the quick ones of the test config.
    cluster.edit_config("reconnect_initial_delay = 50\nreconnect_max_delay = 500\n", "")
    try:
        port = free_port()
        cluster.start_dispatcher(port=port)
        for name in ("w1", "w2"):
            cluster.start_worker(name, slots=2)
        run_id = cluster.detach(delays_manifest(tmp_path, "restarts", 30, 700))
        back: list[float] = []
        for _ in range(6):
            cluster.kill("dispatcher")
            cluster.procs["dispatcher"].wait(10)
            cluster.start_dispatcher(port=port)
            ready = (tmp_path / "dispatcher.url").stat().st_mtime  # written once listening

            def both_back(since: float = ready) -> list[float] | None:
                rows = cluster.query("SELECT seen_at FROM nodes WHERE status = 'connected'"
                                     " AND seen_at >= ?", (since,))
                return [r["seen_at"] for r in rows] if len(rows) >= 2 else None

            joined = wait_for(both_back, timeout=30, what="both workers back")
            back.append(max(joined) - ready)
        print("workers back after restarts (s):", [round(b, 3) for b in back])
        assert statistics.median(back) < 1.0, back
        wait_for(lambda: cluster.run_status(run_id) == "completed", timeout=90,
                 what="the run to complete")
        # Attempts cut off by the kills were closed, not left running forever.
        assert cluster.query("SELECT 1 FROM attempts WHERE outcome = 'running'") == []
        lost = cluster.query("SELECT started_at, finished_at FROM attempts"
                             " WHERE outcome = 'lost'")
        assert all(r["finished_at"] is not None and r["finished_at"] >= r["started_at"]
                   for r in lost)
        # Each worker kept its identity across all six restarts.
        assert len({r["node_id"] for r in cluster.query("SELECT node_id FROM nodes")}) == 2
    finally:
        cluster.close()


LOW_LATENCY = """
[coordinator]
heartbeat_interval = 2000
heartbeat_timeout = 6000
"""


def test_low_latency_tuning_moves_a_stopped_workers_symbol_within_about_six_seconds(
        tmp_path: Path) -> None:
    cluster = Cluster(tmp_path)
    cluster.edit_config("heartbeat_interval = 200\nheartbeat_timeout = 3000",
                        "heartbeat_interval = 2000\nheartbeat_timeout = 6000")
    # The workers' own interval is longer than the timeout: only the Welcome's interval
    # (the smaller) keeps the healthy worker alive.
    cluster.edit_config("[worker]\nheartbeat_interval = 200", "[worker]\nheartbeat_interval = 8000")
    try:
        cluster.start_dispatcher()
        workers = {n: cluster.start_worker(n, slots=1) for n in ("w1", "w2")}
        run_id = cluster.detach(write_manifest(tmp_path, HOLD.replace("2500", "12000")))
        (task,) = wait_for(lambda: cluster.query(
            "SELECT node FROM tasks WHERE state = 'running'"), what="the symbol to start")
        stopped = workers[task["node"]]
        os.kill(stopped.pid, signal.SIGSTOP)
        t0 = time.time()
        try:
            moved = wait_for(lambda: cluster.query(
                "SELECT started_at FROM attempts WHERE attempt = 2"), timeout=30,
                what="the symbol to move")[0]["started_at"]
        finally:
            os.kill(stopped.pid, signal.SIGCONT)
        print(f"moved after {moved - t0:.2f} s")
        assert moved - t0 < 9.0  # about the 6 s timeout, plus the liveness beat
        lost = [r["node"] for r in cluster.query(
            "SELECT node FROM events WHERE kind = 'node.lost'")]
        assert lost == [task["node"]]  # the healthy worker was never judged silent
        assert cluster.run_status(run_id) in ("running", "completed")
        assert pid_alive(stopped.pid)
    finally:
        cluster.close()


def test_a_worker_with_an_invalid_name_is_refused(cluster: Cluster) -> None:
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    cluster.start_dispatcher()
    with connect(cluster.url, compression=None) as ws:
        p.decode(ws.recv(timeout=5))
        ws.send(p.encode(p.Hello(role="worker", name="-rm -rf /", slots=1)))
        with pytest.raises(ConnectionClosed) as e:
            ws.recv(timeout=5)
    assert e.value.rcvd is not None and e.value.rcvd.code == p.CLOSE_POLICY
    cp = cluster.cli("start-worker", str(cluster.config_path), "bad name!", "--url",
                     cluster.url)
    assert cp.returncode == 2 and "invalid node name" in cp.stderr


def test_an_outside_write_lock_of_three_seconds_loses_nothing(busy: Cluster,
                                                               tmp_path: Path) -> None:
    import sqlite3

    run_id = busy.detach(delays_manifest(tmp_path, "locked", 40, 300))
    wait_for(lambda: busy.query("SELECT 1 FROM tasks WHERE state = 'completed'"),
             what="the run to be under way")
    con = sqlite3.connect(busy.db, timeout=10, isolation_level=None)
    try:
        con.execute("BEGIN EXCLUSIVE")  # another program holds the DB
        time.sleep(3.0)  # the stall under test
        con.execute("COMMIT")
    finally:
        con.close()
    wait_for(lambda: busy.run_status(run_id) == "completed", timeout=60,
             what="the run to complete")
    assert_no_losses(busy)
