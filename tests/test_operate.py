"""Operating a live dispatcher (real processes on 127.0.0.1): pruning while a run is
active, a backup taken mid-run and started on, event seqs across a restart, reports that
say why, metrics and alerting rules that promtool accepts, bad input exits 2."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import sqlite3
import stat
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from e2e_support import (
    REPO,
    Cluster,
    env,
    ndjson,
    result_json,
    swarm_argv,
    wait_for,
    write_manifest,
)

SLOW = """
    name: slow
    version: "1"
    symbols:
      - {name: a, type: action, parameters: {handler: echo, said: hi}}
      - {name: b, type: action, dependencies: [a], parameters: {handler: delay, ms: 2500}}
      - {name: c, type: action, dependencies: [b], parameters: {handler: echo}}
"""
QUICK = """
    name: quick-{n}
    version: "1"
    symbols:
      - {{name: a, type: action, parameters: {{handler: echo}}}}
      - {{name: b, type: action, dependencies: [a], parameters: {{handler: echo}}}}
"""


def run_rows(cluster: Cluster, run_id: str) -> dict[str, list[dict[str, Any]]]:
    return {t: cluster.query(f"SELECT * FROM {t} WHERE run_id = ? ORDER BY rowid", (run_id,))
            for t in ("runs", "tasks", "attempts", "events", "rollbacks")}


def running(cluster: Cluster, run_id: str, symbol: str) -> bool:
    return cluster.tasks(run_id).get(symbol, {}).get("state") == "running"


@pytest.mark.timeout(90)
def test_pruning_under_a_live_dispatcher_leaves_the_active_run_whole(
        cluster: Cluster, tmp_path: Path) -> None:
    cluster.start_dispatcher()
    cluster.start_worker("w1")
    old = []
    for n in range(3):
        cp = cluster.deploy(write_manifest(tmp_path, QUICK.format(n=n), f"q{n}.yaml"))
        assert cp.returncode == 0, cp.stderr
        old.append(result_json(cp)["run_id"])
    active = cluster.detach(write_manifest(tmp_path, SLOW, "slow.yaml"))
    wait_for(lambda: running(cluster, active, "b"), what="b to run")
    before = run_rows(cluster, active)
    args = ("prune", str(cluster.config_path), "--url", cluster.url, "--older-than", "1ms")
    dry = cluster.cli(*args, "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    assert json.loads(dry.stdout)["runs"] == 3
    assert all(cluster.run_status(r) == "completed" for r in old)  # a dry run removes none
    cp = cluster.cli(*args, "--json")
    assert cp.returncode == 0, cp.stderr
    out = json.loads(cp.stdout)
    assert out["runs"] == 3 and out["rows"]["tasks"] == 6 and out["rows"]["events"] > 0
    assert out["bytes_after"] <= out["bytes_before"]
    assert all(cluster.run_status(r) == "" for r in old)
    assert not cluster.query("SELECT 1 FROM events WHERE run_id IN (?, ?, ?)", tuple(old))
    # The active run goes on to its end, and every row it had is still there.
    wait_for(lambda: cluster.run_status(active) == "completed", what="the active run to end")
    after = run_rows(cluster, active)
    assert [e["seq"] for e in before["events"]] == [
        e["seq"] for e in after["events"]][:len(before["events"])]
    assert [t["task_id"] for t in after["tasks"]] == [t["task_id"] for t in before["tasks"]]
    assert len(after["attempts"]) == 3
    human = cluster.cli(*args)  # now the run that was active has finished, and goes too
    assert human.returncode == 0, human.stderr
    assert "removed 1 runs finished before" in human.stdout and "given back" in human.stdout


@pytest.mark.timeout(90)
def test_a_backup_taken_mid_run_resumes_the_run_when_started_on(
        cluster: Cluster, tmp_path: Path) -> None:
    cluster.start_dispatcher()
    cluster.start_worker("w1")
    run_id = cluster.detach(write_manifest(tmp_path, SLOW, "slow.yaml"))
    wait_for(lambda: running(cluster, run_id, "b"), what="b to run")
    copy = tmp_path / "backup" / "state-copy.db"
    copy.parent.mkdir()
    cp = cluster.cli("backup", str(copy), str(cluster.config_path), "--url", cluster.url,
                     "--json")
    assert cp.returncode == 0, cp.stderr
    out = json.loads(cp.stdout)
    assert out["integrity"] == "ok" and out["active_runs"] == 1 and out["path"] == str(copy)
    assert out["bytes"] == copy.stat().st_size
    assert stat.S_IMODE(copy.stat().st_mode) == 0o600
    again = cluster.cli("backup", str(copy), str(cluster.config_path), "--url", cluster.url)
    assert again.returncode == 2 and "exists already" in again.stderr
    cluster.close()  # the original site is gone; restore on a new one
    site = tmp_path / "restored"
    site.mkdir()
    shutil.copy(copy, site / "state.db")
    restored = Cluster(site)
    try:
        restored.start_dispatcher()
        restored.start_worker("w2")
        wait_for(lambda: restored.run_status(run_id) == "completed", timeout=30,
                 what="the restored run to complete")
        attempts = {t["symbol"]: t["attempts"] for t in restored.tasks(run_id).values()}
        assert attempts["a"] == 1  # completed before the backup: not run again
        assert attempts["c"] == 1
    finally:
        restored.close()


def _watch(cluster: Cluster, run_id: str, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        swarm_argv("watch", run_id, str(cluster.config_path), "--url", cluster.url, "--json",
                   *extra), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=env(), cwd=cluster.root, stdin=subprocess.DEVNULL)


@pytest.mark.timeout(90)
def test_a_stream_resumed_with_since_after_a_restart_has_no_gap_and_no_duplicate(
        cluster: Cluster, tmp_path: Path) -> None:
    port = cluster.start_dispatcher() and int(cluster.url.rsplit(":", 1)[1])
    cluster.start_worker("w1")
    run_id = cluster.detach(write_manifest(tmp_path, SLOW, "slow.yaml"))
    first = _watch(cluster, run_id, "--since", "0")
    assert first.stdout is not None
    lines_read: list[str] = []
    reader = threading.Thread(target=lambda: lines_read.extend(iter(first.stdout.readline, "")))
    reader.start()
    wait_for(lambda: running(cluster, run_id, "b"), what="b to run")
    wait_for(lambda: any('"symbol.started"' in line and '"b"' in line for line in lines_read),
             what="the watcher to see b start")
    cluster.kill("dispatcher", signal.SIGKILL)
    cluster.procs["dispatcher"].wait(10)
    first.wait(30)
    reader.join(10)
    err = first.stderr.read() if first.stderr else ""
    for pipe in (first.stdout, first.stderr):
        if pipe is not None:
            pipe.close()
    assert first.returncode == 3, err
    seen = [json.loads(line) for line in lines_read]
    assert seen and all(e["seq"] > 0 for e in seen)
    cluster.start_dispatcher(port=port)
    second = _watch(cluster, run_id, "--since", str(seen[-1]["seq"]))
    out, err = second.communicate(timeout=40)
    assert second.returncode == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    assert lines[-1]["summary"]["status"] == "completed"
    seqs = [e["seq"] for e in seen + lines[:-1]]
    stored = [r["seq"] for r in cluster.query(
        "SELECT seq FROM events WHERE run_id = ? ORDER BY seq", (run_id,))]
    assert seqs == stored  # every event once, in order, across the restart
    assert lines[-2]["event"] == "run.completed"
    # The whole journal again, from a reader that starts after the end.
    again = cluster.cli("watch", run_id, str(cluster.config_path), "--url", cluster.url,
                        "--json", "--since", "0")
    assert [e["seq"] for e in ndjson(again)[:-1]] == stored
    nothing = cluster.cli("watch", run_id, str(cluster.config_path), "--url", cluster.url,
                          "--json", "--since", str(stored[-1]))
    assert nothing.returncode == 0 and len(ndjson(nothing)) == 1  # only the summary


BACKEND = """#!/bin/sh
if [ "$1" = "--version" ]; then echo "fake 1.0"; exit 0; fi
case "$2" in
  costly) echo '{"done": true, "metrics": {"cost": 0.25, "tokens": 120}}' ;;
  cheap) echo '{"done": true, "metrics": {"cost": 0.5, "tokens": 30}}' ;;
  broken)
    echo "connecting to db" >&2
    echo "ERROR 1045: access denied for user wp" >&2
    echo '{"retryable": false, "api_key": "s3cr3t", "step": "connect"}'
    exit 3 ;;
esac
"""


@pytest.mark.timeout(90)
def test_the_report_of_a_failed_run_says_why(cluster: Cluster, tmp_path: Path) -> None:
    script = tmp_path / "fake-injector"
    script.write_text(BACKEND)
    script.chmod(0o755)
    cfg = cluster.write_config("fake.toml", f"""
[backends.rust_injector]
binary_path = "{script}"
""")
    cluster.start_dispatcher()
    cluster.start_worker("w1", cfg)
    m = write_manifest(tmp_path, """
        name: why
        version: "1"
        on_failure: continue
        symbols:
          - {name: costly, type: action, dispatch: rust_injector, resources: ["db:write"]}
          - {name: cheap, type: action, dispatch: rust_injector}
          - {name: broken, type: action, dispatch: rust_injector, dependencies: [costly]}
          - {name: after, type: action, dependencies: [broken]}
    """)
    run_id = result_json(cluster.deploy(m))["run_id"]
    cp = cluster.cli("report", run_id, "--url", cluster.url, "--json")
    assert cp.returncode == 0, cp.stderr
    rep = json.loads(cp.stdout)
    assert rep["run_id"] == run_id and rep["status"] == "failed"
    assert rep["started_at"] <= rep["completed_at"]
    err = rep["error"]
    assert err["code"] == "SYMBOL_FAILED" and err["symbol"] == "broken"
    assert err["recoverable"] is False and err["timestamp"] >= rep["started_at"]
    assert "3" in err["message"]
    m_ = rep["metrics"]
    assert m_["cost"] == pytest.approx(0.75) and m_["tokens"] == 150
    for key in ("total_duration", "effective_duration", "success_rate", "error_rate",
                "throughput", "utilisation"):
        assert key in m_
    usage = rep["resource_usage"]
    assert usage["resources"]["db:write"]["acquisitions"] == 1
    assert usage["resources"]["db:write"]["hold_seconds"] > 0
    assert usage["backends"]["rust_injector"]["attempts"] == 3
    syms = {s["name"]: s for s in rep["symbols"]}
    assert syms["after"]["state"] == "skipped" and syms["after"]["attempts"] == []
    (att,) = syms["broken"]["attempts"]
    assert att["exit_code"] == 3 and att["signal"] is None and att["node"] == "w1"
    assert att["token"] and att["started_at"] <= att["finished_at"]
    assert "access denied" in att["stderr_tail"]
    assert att["output"] == {"retryable": False, "api_key": "***", "step": "connect"} or \
        att["output"]["api_key"] != "s3cr3t"
    assert [e["seq"] for e in rep["timeline"]] == sorted(e["seq"] for e in rep["timeline"])
    human = cluster.cli("report", run_id, "--url", cluster.url)
    assert human.returncode == 0, human.stderr
    text = human.stdout
    assert "SYMBOL_FAILED" in text and "broken" in text and "exit 3" in text
    assert "ERROR 1045: access denied" in text and "skipped" in text and "s3cr3t" not in text


@pytest.mark.timeout(60)
def test_metrics_are_counters_promtool_and_the_prometheus_parser_accept(
        cluster: Cluster, tmp_path: Path) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    cluster.start_dispatcher()
    cluster.start_worker("w1")
    m = write_manifest(tmp_path, """
        name: m
        version: "1"
        symbols:
          - {name: a, type: action, parameters: {handler: echo}}
          - {name: b, type: action, retries: 1, parameters: {handler: fail}}
    """)
    assert cluster.deploy(m).returncode == 1
    text = urllib.request.urlopen(cluster.url.replace("ws://", "http://") + "/metrics",
                                  timeout=10).read().decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in families.values() for s in f.samples}
    assert samples[("swarm_attempts_total", (("backend", "internal"), ("outcome", "failed")))
                   ] == 2
    assert samples[("swarm_attempts_total", (("backend", "internal"), ("outcome", "ok")))] == 1
    assert samples[("swarm_symbols_finished_total", (("kind", "main"), ("state", "failed")))
                   ] == 1
    assert samples[("swarm_retries_total", ())] == 1
    assert samples[("swarm_runs_finished_total", (("status", "rolled_back"),))] == 1
    assert samples[("swarm_worker_losses_total", ())] == 0
    assert samples[("swarm_claims_refused_total", ())] == 0  # kept
    assert samples[("process_resident_memory_bytes", ())] > 1 << 20
    assert samples[("process_open_fds", ())] > 0 and ("process_cpu_seconds_total", ()) in samples
    for f in families.values():
        if f.type == "counter":
            assert all(s.name.endswith(("_total", "_created")) for s in f.samples), f.name
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (apt-get install prometheus); the parser "
                    "accepted the page")
    cp = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True,
                        text=True, timeout=30)
    assert cp.returncode == 0 and cp.stdout == cp.stderr == "", cp.stdout + cp.stderr


@pytest.mark.timeout(60)
def test_the_alerting_rules_pass_promtool_check_and_their_tests() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (apt-get install prometheus)")
    rules = REPO / "configs" / "prometheus-alerts.yml"
    cp = subprocess.run([promtool, "check", "rules", str(rules)], capture_output=True,
                        text=True, timeout=30)
    assert cp.returncode == 0 and "SUCCESS: 7 rules found" in cp.stdout, cp.stdout + cp.stderr
    cp = subprocess.run([promtool, "test", "rules", "alerts_test.yml"], capture_output=True,
                        text=True, timeout=30, cwd=REPO / "tests" / "prometheus")
    assert cp.returncode == 0 and "SUCCESS" in cp.stdout, cp.stdout + cp.stderr


@pytest.mark.timeout(60)
def test_retention_prunes_old_finished_runs_by_itself(cluster: Cluster, tmp_path: Path) -> None:
    cluster.start_dispatcher()
    cluster.start_worker("w1")
    cp = cluster.deploy(write_manifest(tmp_path, QUICK.format(n=1)))
    run_id = result_json(cp)["run_id"]
    assert cluster.stop("dispatcher") == 0
    cluster.edit_config("[coordinator]", '[dispatcher]\nretention = "1ms"\n\n[coordinator]')
    cluster.start_dispatcher()
    wait_for(lambda: cluster.run_status(run_id) == "", what="retention to remove the run")
    assert not cluster.query("SELECT 1 FROM tasks WHERE run_id = ?", (run_id,))
    wait_for(lambda: "retention: removed 1 runs" in cluster.log("dispatcher"),
             what="retention to say what it removed")


@pytest.mark.timeout(60)
def test_bad_input_exits_2_naming_it(cluster: Cluster, tmp_path: Path) -> None:
    cluster.start_dispatcher()
    base = (str(cluster.config_path), "--url", cluster.url)
    for args, says in (
            (("prune", *base, "--older-than", "30x"), "--older-than: not a duration: '30x'"),
            (("prune", *base, "--older-than", "0d"), "not a duration: '0d'"),
            (("report", "run-nope", *base), "no run 'run-nope'"),
            (("watch", "run-nope", *base, "--since", "0"), "no run 'run-nope'"),
            (("watch", "run-nope", *base, "--since", "-1"), "--since -1"),
            (("prune", "--db", str(tmp_path / "none.db"), "--older-than", "1d"),
             "none.db: no such state database")):
        cp = cluster.cli(*args)
        assert cp.returncode == 2 and says in cp.stderr, (args, cp.returncode, cp.stderr)
        assert "Traceback" not in cp.stderr
    bad = cluster.write_config("bad.toml", '[dispatcher]\nretention = "soon"\n')
    cp = cluster.cli("start-dispatcher", str(bad), "--port", "0")
    assert cp.returncode == 2 and "dispatcher.retention" in cp.stderr and "'soon'" in cp.stderr


@pytest.mark.timeout(60)
async def test_client_watch_since_replays_the_journal_then_goes_live(
        cluster: Cluster, tmp_path: Path) -> None:
    import swarm

    cluster.start_dispatcher()
    cluster.start_worker("w1")
    run_id = cluster.detach(write_manifest(tmp_path, SLOW, "slow.yaml"))
    await asyncio.to_thread(wait_for, lambda: running(cluster, run_id, "b"), 20.0, "b to run")
    async with swarm.Client(cluster.url) as c:
        events = [u.event async for u in c.watch(run_id, since=2) if u.event is not None]
    stored = [r["seq"] for r in cluster.query(
        "SELECT seq FROM events WHERE run_id = ? AND seq > 2 ORDER BY seq", (run_id,))]
    assert [e.seq for e in events] == stored and events[-1].kind == "run.completed"
    assert sys.version_info >= (3, 11)


def test_a_db_no_dispatcher_uses_can_be_pruned_and_copied_directly(tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    shutil.copy(REPO / "tests" / "fixtures" / "state-v2.db", db)
    cp = subprocess.run(swarm_argv("backup", str(tmp_path / "copy.db"), "--db", str(db)),
                        capture_output=True, text=True, env=env(), timeout=60)
    assert cp.returncode == 0 and "integrity ok" in cp.stdout, cp.stderr
    cp = subprocess.run(swarm_argv("prune", "--db", str(db), "--older-than", "1s", "--json"),
                        capture_output=True, text=True, env=env(), timeout=60)
    assert cp.returncode == 0, cp.stderr
    assert json.loads(cp.stdout)["runs"] == 2  # the finished ones; the cut-off run stays
    con = sqlite3.connect(db)
    try:
        assert con.execute("SELECT status FROM runs").fetchall() == [("running",)]
    finally:
        con.close()
