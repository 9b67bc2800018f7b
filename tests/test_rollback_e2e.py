"""Issue #13 item 7 with real processes: `swarm rollback` is recorded as a phase of its
own and never rewrites the run's outcome; with nothing to undo it says so and changes
nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from e2e_support import Cluster, result_json, wait_for, write_manifest

import swarm

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]


def _run_row(cluster: Cluster, run_id: str) -> dict[str, object]:
    (row,) = cluster.query("SELECT status, finished_at FROM runs WHERE run_id = ?", (run_id,))
    return row


def test_a_rollback_with_nothing_to_undo_says_so_and_changes_nothing(
        cluster: Cluster, tmp_path: Path) -> None:
    cluster.start_dispatcher()
    cluster.start_worker("w1")
    m = write_manifest(tmp_path, """
        name: nothing-to-undo
        version: "1"
        symbols:
          - {name: a, type: action, parameters: {handler: noop}}
          - {name: b, type: action, dependencies: [a], parameters: {handler: noop}}
    """)
    cp = cluster.deploy(m)
    assert cp.returncode == 0, cp.stderr
    run_id = result_json(cp)["run_id"]
    before = _run_row(cluster, run_id)
    events = cluster.query("SELECT COUNT(*) AS n FROM events WHERE run_id = ?", (run_id,))
    plain = cluster.cli("rollback", run_id, "--url", cluster.url)
    assert plain.returncode == 0, plain.stderr
    assert plain.stdout.strip() == (f"run {run_id}: nothing to undo: no completed symbol of "
                                    "it has a rollback; it stays completed")
    as_json = cluster.cli("rollback", run_id, "--url", cluster.url, "--json")
    assert as_json.returncode == 0
    assert json.loads(as_json.stdout)["nothing_to_undo"] is True
    assert _run_row(cluster, run_id) == before
    assert cluster.query("SELECT COUNT(*) AS n FROM events WHERE run_id = ?",
                         (run_id,)) == events
    runs = json.loads(cluster.cli("runs", "--url", cluster.url, "--json").stdout)
    (r,) = [r for r in runs if r["run_id"] == run_id]
    assert (r["status"], r["finished_at"], r["rollback_status"]) == (
        "completed", before["finished_at"], None)


async def test_a_rollback_is_its_own_phase_in_runs_report_and_the_python_api(
        cluster: Cluster, tmp_path: Path) -> None:
    cluster.start_dispatcher()
    cluster.start_worker("w1")
    m = write_manifest(tmp_path, """
        name: undo-me
        version: "1"
        on_failure: continue
        symbols:
          - {name: a, type: action, parameters: {handler: noop},
             rollback: {name: undo_a, type: action, parameters: {handler: delay, ms: 200}}}
          - {name: broken, type: action, retries: 0, parameters: {handler: fail}}
    """)
    cp = cluster.deploy(m)
    assert cp.returncode == 1, cp.stderr
    run_id = result_json(cp)["run_id"]
    before = _run_row(cluster, run_id)
    assert before["status"] == "failed"
    async with swarm.Client(cluster.url) as c:
        handle = await c.rollback(run_id)
        assert not handle.nothing_to_undo
        statuses = [u.status async for u in handle.watch()]
        result = await handle.wait()
        again = await c.rollback(run_id)
        report = await c.report(run_id)
    assert statuses[-1] == "rolled_back"
    # The run's outcome and end are what they were; the rollback has its own.
    assert (result.status, result.finished_at) == ("failed", before["finished_at"])
    assert result.rollback_status == "rolled_back"
    assert result.rollback_finished_at is not None
    assert result.rollback_finished_at > result.finished_at  # type: ignore[operator]
    assert result.symbol("a").state == "rolled_back"
    assert again.nothing_to_undo and "rolled_back" in again.message
    assert _run_row(cluster, run_id) == before
    assert (report["status"], report["finished_at"]) == ("failed", before["finished_at"])
    assert report["rollback_status"] == "rolled_back" and report["rollback_attempts"] == 1
    kinds = [r["kind"] for r in cluster.query(
        "SELECT kind FROM events WHERE run_id = ? AND kind LIKE 'run.%' OR run_id = ? AND"
        " kind LIKE 'rollback.completed' ORDER BY seq", (run_id, run_id))
        if r["kind"] != "run.restored"]  # back from the DB, if the dispatcher forgot it
    assert kinds == ["run.started", "run.failed", "run.rollback_requested",
                     "rollback.completed"]
    text = cluster.cli("runs", "--url", cluster.url).stdout
    assert "failed, then rollback rolled_back" in text, text
    rep = cluster.cli("report", run_id, "--url", cluster.url).stdout
    assert "then rollback rolled_back" in rep


def test_a_rollback_in_progress_resumes_after_a_dispatcher_restart(
        cluster: Cluster, tmp_path: Path) -> None:
    from e2e_support import free_port

    port = free_port()
    cluster.start_dispatcher(port=port)
    cluster.start_worker("w1")
    m = write_manifest(tmp_path, """
        name: undo-slowly
        version: "1"
        symbols:
          - {name: a, type: action, parameters: {handler: noop},
             rollback: {name: undo_a, type: action, parameters: {handler: noop}}}
          - {name: b, type: action, dependencies: [a], parameters: {handler: noop},
             rollback: {name: undo_b, type: action, parameters: {handler: delay, ms: 1500}}}
    """)
    cp = cluster.deploy(m)
    run_id = result_json(cp)["run_id"]
    before = _run_row(cluster, run_id)
    assert cluster.cli("rollback", run_id, "--url", cluster.url, "--detach").returncode == 0
    wait_for(lambda: cluster.tasks(run_id).get("undo_b", {}).get("state") == "running",
             what="undo_b to run")
    assert cluster.stop("dispatcher") == 0
    cluster.start_dispatcher(port=port)
    wait_for(lambda: cluster.query("SELECT status FROM run_rollbacks WHERE run_id = ? AND"
                                   " status = 'rolled_back'", (run_id,)),
             timeout=40, what="the rollback to finish after the restart")
    assert _run_row(cluster, run_id) == before
    tasks = cluster.tasks(run_id)
    assert tasks["a"]["state"] == tasks["b"]["state"] == "rolled_back"
