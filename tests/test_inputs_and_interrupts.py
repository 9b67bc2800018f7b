"""Poison inputs are contained and interruptions are clean (issue #13), with real
processes: an oversized parameter, an assignment too big for its worker, concurrent
deploys of one manifest, `Client.close()`, and a second Ctrl-C on `swarm run`."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from pathlib import Path

import pytest
from e2e_support import (
    Cluster,
    delays_manifest,
    env,
    pid_alive,
    swarm_argv,
    wait_for,
)

from swarm.client import Client
from swarm.errors import ClientClosed

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]


def _connections(cluster: Cluster, worker: str) -> int:
    return cluster.log(worker).count(": connected to ")


def test_a_two_megabyte_parameter_is_refused_before_it_runs_and_harms_nobody(
        cluster: Cluster, tmp_path: Path) -> None:
    cluster.start_dispatcher()
    cluster.start_worker("w1", slots=2)
    healthy = cluster.detach(delays_manifest(tmp_path, "healthy", 40, 50))
    big = "x" * (2 << 20)
    poison = delays_manifest(tmp_path, "poison", 1, 1, extra=f"  - {{name: huge, type: action, "
                                                      f"parameters: {{blob: {big}}}}}\n")
    cp = cluster.deploy(poison)
    assert cp.returncode == 2, cp.stderr
    assert "symbol 'huge'" in cp.stderr and "field 'parameters'" in cp.stderr
    assert "2,097,1" in cp.stderr and "max_frame_size = 1,048,576" in cp.stderr
    wait_for(lambda: cluster.run_status(healthy) == "completed", timeout=60,
             what="the healthy run to complete")
    assert cluster.query("SELECT COUNT(*) AS n FROM runs")[0]["n"] == 1  # nothing half-done
    assert cluster.query("SELECT task_id FROM attempts GROUP BY task_id HAVING COUNT(*) > 1"
                         ) == []
    assert _connections(cluster, "w1") == 1  # never dropped


def test_an_assignment_too_big_for_its_worker_fails_that_symbol_alone(
        cluster: Cluster, tmp_path: Path) -> None:
    cluster.start_dispatcher()
    small = cluster.write_config("small.toml", "\n[dispatcher]\nmax_frame_size = 524288\n")
    cluster.start_worker("w1", config=small, slots=2)
    blob = "y" * 700_000  # fits the dispatcher's 1 MiB, not this worker's 512 KiB
    m = delays_manifest(tmp_path, "mixed", 10, 10, extra=f"  - {{name: wide, type: action, "
                                                  f"retries: 3, parameters: {{blob: {blob}}}}}\n")
    m.write_text(m.read_text().replace("name: mixed", "name: mixed\non_failure: continue"))
    cp = cluster.deploy(m)
    assert cp.returncode == 1, cp.stderr
    tasks = cluster.tasks()
    assert tasks["wide"]["state"] == "failed" and tasks["wide"]["attempts"] == 1
    assert "exceeds what worker w1 accepts in one frame (524,288 bytes)" in tasks["wide"]["error"]
    assert all(tasks[f"s{j}"]["state"] == "completed" for j in range(10))
    assert not cluster.query("SELECT 1 FROM events WHERE kind = 'attempt.lost'")
    assert _connections(cluster, "w1") == 1


def test_two_concurrent_deploys_of_one_manifest_make_one_run(
        cluster: Cluster, tmp_path: Path) -> None:
    cluster.start_dispatcher()
    cluster.start_worker("w1", slots=2)
    m = delays_manifest(tmp_path, "twice", 4, 300)

    async def both() -> list[str]:
        async with Client(cluster.url) as a, Client(cluster.url) as b:
            runs = await asyncio.gather(a.deploy(m), b.deploy(m), a.deploy(m))
            return [r.id for r in runs]

    ids = asyncio.run(asyncio.wait_for(both(), 30))
    assert len(set(ids)) == 1, ids
    wait_for(lambda: cluster.run_status(ids[0]) == "completed", what="the one run to end")
    assert cluster.query("SELECT COUNT(*) AS n FROM runs")[0]["n"] == 1


def test_closing_a_client_ends_its_pending_requests_and_streams(
        cluster: Cluster, tmp_path: Path) -> None:
    cluster.start_dispatcher()
    cluster.start_worker("w1", slots=1)
    m = delays_manifest(tmp_path, "long", 1, 20_000)

    async def go() -> tuple[BaseException | None, BaseException | None]:
        client = Client(cluster.url)
        await client.connect()
        run = await client.deploy(m)
        waiting = asyncio.ensure_future(run.wait())

        async def stream() -> None:
            async for _ in client.events(run.id):
                pass

        streaming = asyncio.ensure_future(stream())
        await asyncio.sleep(0.2)  # both are waiting on the dispatcher now
        await client.close()
        done, _ = await asyncio.wait([waiting, streaming], timeout=5)
        assert len(done) == 2, "close() left something waiting"
        return waiting.exception(), streaming.exception()

    a, b = asyncio.run(asyncio.wait_for(go(), 30))
    assert isinstance(a, ClientClosed) and isinstance(b, ClientClosed)


def _children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        out += [int(x) for x in text]
    return out


def test_a_second_ctrl_c_on_swarm_run_stops_at_once_without_a_traceback(
        tmp_path: Path) -> None:
    m = delays_manifest(tmp_path, "interrupted", 4, 30_000)
    db = tmp_path / "run.db"
    err = open(tmp_path / "run.err", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(swarm_argv("run", str(m), "--workers", "2", "--db", str(db)),
                            stdout=subprocess.DEVNULL, stderr=err, stdin=subprocess.DEVNULL,
                            env=env(), cwd=tmp_path)
    workers: list[int] = []
    try:
        cl = Cluster(tmp_path)
        cl.db = db
        wait_for(lambda: len(cl.query("SELECT 1 FROM tasks WHERE state = 'running'")) >= 2,
                 timeout=60, what="symbols to run on the local workers")
        workers = _children(proc.pid)
        assert len(workers) >= 2
        proc.send_signal(signal.SIGINT)
        wait_for(lambda: b"Ctrl-C again" in (tmp_path / "run.err").read_bytes(),
                 what="the first Ctrl-C to be heard")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(10) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        err.close()
    text = (tmp_path / "run.err").read_text()
    assert "Traceback" not in text and "stopped at once" in text
    try:
        wait_for(lambda: not any(pid_alive(pid) for pid in workers), timeout=5,
                 what="the local workers to be gone")
    finally:
        for pid in workers:  # only what this test started (through swarm run)
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)
