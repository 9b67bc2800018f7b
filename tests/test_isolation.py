"""One mistake never hurts anyone else (issue #13), with real processes: one dispatcher
per state DB, a state DB that is locked, full, deleted, and a scheduler that raises."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from e2e_support import (
    Cluster,
    assert_no_losses,
    delays_manifest,
    env,
    free_port,
    wait_for,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]


def test_a_second_dispatcher_on_the_same_db_refuses_naming_the_holder(
        cluster: Cluster) -> None:
    cluster.start_dispatcher()
    first = cluster.procs["dispatcher"]
    cp = cluster.cli("start-dispatcher", str(cluster.config_path), "--port", "0",
                     "--db", str(cluster.db), timeout=30)
    assert cp.returncode == 2, cp.stderr
    assert f"in use by another dispatcher (host {os.uname().nodename}, PID {first.pid}, " \
           f"since 20" in cp.stderr
    # Read-only tools still work beside it.
    assert sqlite3.connect(cluster.db).execute("SELECT COUNT(*) FROM runs").fetchone() == (0,)
    # The lock dies with its process: a restart after kill -9 is never blocked.
    cluster.kill("dispatcher")
    first.wait(10)
    cluster.start_dispatcher()
    assert cluster.procs["dispatcher"].poll() is None


def test_an_outside_write_lock_of_ten_seconds_costs_no_work_and_no_worker(
        cluster: Cluster, tmp_path: Path) -> None:
    cluster.start_dispatcher()
    cluster.start_worker("w1", slots=4)
    cluster.start_worker("w2", slots=4)
    run_id = cluster.detach(delays_manifest(tmp_path, "locked", 2000, 10))
    wait_for(lambda: len(cluster.query("SELECT 1 FROM tasks WHERE state = 'completed'"))
             >= 100, what="the run to be under way")
    con = sqlite3.connect(cluster.db, timeout=10, isolation_level=None)
    stalled = []
    try:
        con.execute("BEGIN EXCLUSIVE")  # another program holds the DB for 10 s
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with urllib.request.urlopen(cluster.url.replace("ws", "http") + "/metrics",
                                        timeout=5) as r:
                for line in r.read().decode().splitlines():
                    if line.startswith("swarm_state_db_stalled_seconds "):
                        stalled.append(float(line.split()[1]))
            time.sleep(0.5)  # a sample every half second, while the lock is held
        con.execute("COMMIT")
    finally:
        con.close()
    wait_for(lambda: cluster.run_status(run_id) == "completed", timeout=120,
             what="the run to complete")
    assert_no_losses(cluster)
    assert len(cluster.query("SELECT 1 FROM attempts WHERE outcome = 'ok'")) == 2000
    assert max(stalled) > 5.0, stalled  # /metrics answered all along, and said so
    log = cluster.log("dispatcher")
    assert "holds up a commit (locked by another process)" in log
    assert "takes commits again after" in log


@contextlib.contextmanager
def _small_tmpfs(where: Path) -> Iterator[Path]:
    where.mkdir()
    cp = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(where)],
                        capture_output=True, text=True)
    if cp.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {cp.stderr.strip() or cp.returncode}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def test_a_full_file_system_holds_commits_until_there_is_room(tmp_path: Path) -> None:
    with _small_tmpfs(tmp_path / "small") as small:
        cluster = Cluster(tmp_path)
        cluster.db = small / "state.db"
        try:
            cluster.start_dispatcher()
            cluster.start_worker("w1", slots=4)
            run_id = cluster.detach(delays_manifest(tmp_path, "full", 400, 20))
            wait_for(lambda: cluster.query("SELECT 1 FROM tasks WHERE state = 'completed'"),
                     what="the run to be under way")
            filler = small / "filler"
            fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
            try:
                with contextlib.suppress(OSError):
                    while True:  # fill the file system to the last byte
                        os.write(fd, b"\0" * 4096)
            finally:
                os.close(fd)
            wait_for(lambda: "holds up a commit (disk full)" in cluster.log("dispatcher"),
                     timeout=30, what="the dispatcher to notice the full disk")
            assert cluster.procs["dispatcher"].poll() is None
            filler.unlink()
            wait_for(lambda: cluster.run_status(run_id) == "completed", timeout=90,
                     what="the run to complete once there is room")
            assert_no_losses(cluster)
            assert len(cluster.query("SELECT 1 FROM attempts WHERE outcome = 'ok'")) == 400
        finally:
            cluster.close()


def test_a_state_db_deleted_under_the_dispatcher_stops_it_with_the_reason(
        cluster: Cluster) -> None:
    cluster.start_dispatcher()
    proc = cluster.procs["dispatcher"]
    moved = cluster.db.with_name("moved.db")
    shutil.move(cluster.db, moved)  # an operator "cleaning up"
    assert proc.wait(10) != 0
    assert "was deleted under the running dispatcher" in cluster.log("dispatcher")


FAULTY = """
import asyncio, sys
from swarm import core, dispatcher
from swarm.config import load_config

real = core.Scheduler._on_results
seen = 0

def faulty(self, ev):
    global seen
    seen += 1
    if seen == 5:
        raise RuntimeError("injected fault in the scheduler")
    return real(self, ev)

core.Scheduler._on_results = faulty
sys.exit(asyncio.run(dispatcher.serve_forever(
    load_config(sys.argv[1]), port=int(sys.argv[2]), db_path=sys.argv[3],
    ready_file=sys.argv[4])))
"""


def test_a_scheduler_that_raises_stops_the_dispatcher_and_a_restart_resumes(
        cluster: Cluster, tmp_path: Path) -> None:
    port = free_port()
    ready = tmp_path / "dispatcher.url"
    log = open(tmp_path / "faulty.log", "wb")  # noqa: SIM115 - closed below
    faulty = subprocess.Popen(
        [sys.executable, "-c", FAULTY, str(cluster.config_path), str(port), str(cluster.db),
         str(ready)], stdout=log, stderr=subprocess.STDOUT, env=env(), cwd=tmp_path,
        stdin=subprocess.DEVNULL)
    try:
        cluster.url = wait_for(lambda: ready.exists() and ready.read_text().strip(),
                               what="the faulty dispatcher to listen")
        cluster.start_worker("w1", slots=1)
        run_id = cluster.detach(delays_manifest(tmp_path, "faulty", 12, 10))
        assert faulty.wait(30) == 1  # stopped, not serving on without its scheduler
        text = (tmp_path / "faulty.log").read_text()
        assert "the scheduler could not apply ResultsReceived" in text
        assert "RuntimeError: injected fault in the scheduler" in text  # the traceback
        cluster.start_dispatcher(port=port)
        wait_for(lambda: cluster.run_status(run_id) == "completed", timeout=60,
                 what="the restarted dispatcher to finish the run")
        done = cluster.query("SELECT symbol FROM tasks WHERE state = 'completed'")
        assert len(done) == 12
    finally:
        if faulty.poll() is None:
            faulty.send_signal(signal.SIGKILL)
            faulty.wait()
        log.close()


async def test_a_worker_whose_background_task_fails_stops_with_exit_1(tmp_path: Path) -> None:
    import asyncio

    from swarm.config import Config
    from swarm.dispatcher import Dispatcher
    from swarm.worker import Worker

    async with Dispatcher(Config(), port=0, db_path=str(tmp_path / "s.db")) as d:
        w = Worker(Config(), name="w1", url=d.url)

        async def broken(ws: object) -> None:
            raise RuntimeError("injected fault in the heartbeat")

        w._heartbeat = broken  # type: ignore[method-assign]
        code = await asyncio.wait_for(w.run(), 30)
    assert code == 1 and isinstance(w.failed, RuntimeError)
