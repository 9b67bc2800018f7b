"""Replay: the stimuli a dispatcher fed its scheduler are kept with the journal, and
`swarm debug replay` rebuilds the scheduler from them and finds the journal it wrote."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import pytest
from e2e_support import Cluster, delays_manifest, free_port, wait_for

from swarm import stimuli
from swarm.events import (
    NodeConnected,
    NodeHeartbeat,
    ProgressReceived,
    ResultsReceived,
    RunRestored,
    TaskRecord,
    Tick,
)
from swarm.model import Symbol, Workflow
from swarm.protocol import ProgressReport, TaskResult
from swarm.replay import replay

pytestmark = [pytest.mark.timeout(120)]


def test_a_stimulus_comes_back_as_it_was_fed() -> None:
    wf = Workflow(name="w", version="1", symbols=(Symbol(name="a", type="action"),))
    events = [
        NodeConnected("n#1", "n", ("internal",), 4, 1.5, {"zone": "a"}, (7, -8), stimulus_id=3),
        NodeHeartbeat("n#1", 2.0, None, None, stimulus_id=3),
        ResultsReceived("n#1", (TaskResult(7, "r/a", True, {"x": [1]}, "", 0, True, False,
                                           1.25, "err", False, True),), 3.0, stimulus_id=3),
        RunRestored("r", wf, "running", 1.0, (TaskRecord("a", "main", "running", 1, 0, 7,
                                                         None, 1.0, None, ("b",), "n#1"),),
                    4.0, "", 0.0, stimulus_id=3),
        Tick(5.0, 1.5, stimulus_id=3),
        ProgressReceived("n#1", (ProgressReport(7, "r/a", 2, {"step": 6}, 0.6, "six", 0),
                                 ProgressReport(7, "r/a", 3, None, None, "", 300_000)),
                         6.0, stimulus_id=3),
    ]
    for event in events:
        kind, body = stimuli.encode(stimuli.Stimulus(3, 1, event, 0, 0, (5, 6)))
        assert stimuli.decode(3, kind, body, {"r": wf}) == (event, (5, 6))


def _db_copy(src: Path, dest: Path) -> Path:
    with sqlite3.connect(f"file:{src}?mode=ro", uri=True) as con, sqlite3.connect(dest) as out:
        con.backup(out)
    return dest


def test_replay_matches_a_run_across_a_dispatcher_restart(cluster: Cluster,
                                                          tmp_path: Path) -> None:
    port = free_port()
    cluster.start_dispatcher(port=port)
    cluster.start_worker("w1")
    run_id = cluster.detach(delays_manifest(tmp_path, "slow", 6, 300))
    wait_for(lambda: any(t["state"] == "completed" for t in cluster.tasks(run_id).values()),
             what="a symbol to complete")
    cluster.kill("dispatcher")
    cluster.procs["dispatcher"].wait(10)
    cluster.start_dispatcher(port=port)
    wait_for(lambda: cluster.run_status(run_id) == "completed", timeout=60,
             what="the restored run to complete")
    cluster.stop("dispatcher")
    kinds = {r["kind"] for r in cluster.query("SELECT kind FROM stimuli")}
    assert {"SessionStarted", "RunSubmitted", "RunRestored", "ResultsReceived"} <= kinds
    assert len(cluster.query("SELECT DISTINCT session FROM stimuli")) == 2

    out = replay(str(cluster.db))
    assert out.divergence is None and out.sessions == 2 and out.entries > 20
    cp = cluster.cli("debug", "replay", str(cluster.db), run_id)
    assert cp.returncode == 0, cp.stdout + cp.stderr
    assert cp.stdout.startswith("matches: 2 sessions") and f"of run {run_id}" in cp.stdout

    # A journal that says otherwise than the scheduler would: the first difference.
    bad = _db_copy(cluster.db, tmp_path / "bad.db")
    with sqlite3.connect(bad) as con:
        con.execute("DROP TRIGGER events_no_update")
        con.execute("UPDATE events SET node = 'elsewhere' WHERE seq = (SELECT MIN(seq) FROM"
                    " events WHERE kind = 'symbol.started' AND run_id = ?)", (run_id,))
    cp = cluster.cli("debug", "replay", str(bad))
    assert cp.returncode == 1, cp.stdout + cp.stderr
    assert "diverged: session 1: stimulus" in cp.stdout
    assert "symbol.started" in cp.stdout and "'elsewhere'" in cp.stdout


def test_what_the_bound_dropped_is_not_replayed(cluster: Cluster, tmp_path: Path) -> None:
    cluster.start_dispatcher()
    cluster.start_worker("w1")
    run_id = cluster.detach(delays_manifest(tmp_path, "quick", 3, 10))
    wait_for(lambda: cluster.run_status(run_id) == "completed", what="the run to complete")
    cluster.stop("dispatcher")
    trimmed = _db_copy(cluster.db, tmp_path / "trimmed.db")
    with sqlite3.connect(trimmed) as con:  # as the bound does: the oldest go first
        con.execute("DELETE FROM stimuli WHERE id = (SELECT MIN(id) FROM stimuli)")
    out = replay(str(trimmed))
    assert (out.sessions, out.skipped, out.stimuli, out.divergence) == (0, 1, 0, None)
    shutil.copy(cluster.db, tmp_path / "whole.db")
    assert replay(str(tmp_path / "whole.db")).sessions == 1
