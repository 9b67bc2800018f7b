"""End to end: a real dispatcher process and real worker processes on 127.0.0.1 with
ephemeral ports, real SQLite files, real subprocess backends. Checked in the state DB."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from backend_support import PHP_ENGINE, PS_ENGINE, build_rust_injector, fake_pwsh_path, find_php
from e2e_support import REPO, Cluster, env, pid_alive, result_json, wait_for, write_manifest

from swarm.state import SCHEMA_VERSION

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]




def test_hello_runs_across_two_workers_and_every_record_is_in_the_db(cluster: Cluster) -> None:
    cluster.start_dispatcher()
    cluster.start_worker("w1")
    cluster.start_worker("w2")
    cp = cluster.deploy(REPO / "examples" / "hello.yaml")
    assert cp.returncode == 0, cp.stderr
    run = result_json(cp)
    assert run["status"] == "completed"
    tasks = cluster.tasks(run["run_id"])
    assert set(tasks) == {"greet", "fetch_posts", "fetch_users", "combine", "publish"}
    for t in tasks.values():
        assert t["state"] == "completed" and t["attempts"] == 1
        assert t["node"] in ("w1", "w2")
    assert json.loads(tasks["greet"]["result"]) == {"message": "hello, swarm"}
    # Dependency order, from the append-only journal.
    events = cluster.query("SELECT kind, symbol FROM events WHERE run_id = ? ORDER BY seq",
                           (run["run_id"],))
    done = [e["symbol"] for e in events if e["kind"] == "symbol.completed"]
    started = [e["symbol"] for e in events if e["kind"] == "symbol.started"]
    assert done.index("greet") < started.index("fetch_posts")
    assert done.index("fetch_posts") < started.index("combine")
    assert done.index("combine") < started.index("publish")
    assert {r["node"] for r in cluster.query("SELECT node FROM attempts")} == {"w1", "w2"}
    version = cluster.query("SELECT value FROM meta WHERE key = 'schema_version'")[0]["value"]
    assert version == str(SCHEMA_VERSION)
    assert cluster.query("PRAGMA journal_mode")[0]["journal_mode"] == "wal"


def test_symbols_are_routed_only_to_workers_with_their_backend_powershell_via_standin_pwsh(
        cluster: Cluster) -> None:
    php = find_php()
    rust = build_rust_injector()
    pwsh = fake_pwsh_path()
    cluster.start_dispatcher()
    php_cfg = cluster.write_config("php.toml", f"""
        [worker.capabilities]
        rust_injector = false
        powershell_engine = false
        php_engine = true
        internal = true
        [backends.php_engine]
        php_binary = "{php}"
        script_path = "{PHP_ENGINE}"
    """.replace("\n        ", "\n"))
    other_cfg = cluster.write_config("other.toml", f"""
        [worker.capabilities]
        php_engine = false
        [backends.rust_injector]
        binary_path = "{rust}"
        [backends.powershell_engine]
        pwsh_binary = "{pwsh}"
        script_path = "{PS_ENGINE}"
    """.replace("\n        ", "\n"))
    pwsh_log = cluster.root / "pwsh.log"
    cluster.start_worker("php-node", php_cfg)
    cluster.start_worker("rust-node", other_cfg, extra_env={"FAKE_PWSH_LOG": str(pwsh_log)})
    cp = cluster.deploy(REPO / "examples" / "mixed-backends.yaml")
    assert cp.returncode == 0, cp.stdout + cp.stderr
    tasks = cluster.tasks(result_json(cp)["run_id"])
    assert tasks["initialize"]["node"] == tasks["finalize"]["node"] == "php-node"
    assert tasks["process_data"]["node"] == tasks["audit_host"]["node"] == "rust-node"
    assert tasks["summarize"]["node"] in ("php-node", "rust-node")
    assert json.loads(tasks["initialize"]["result"])["operation"] == "init"
    rust_out = json.loads(tasks["process_data"]["result"])
    assert rust_out["symbol"] == "process_data"
    (call,) = [json.loads(line) for line in pwsh_log.read_text().splitlines()]
    assert call["argv"][1:7] == ["-NoProfile", "-NonInteractive", "-File", str(PS_ENGINE),
                                 "-SymbolName", "audit_host"]


def test_a_failed_attempt_is_retried_and_then_succeeds(cluster: Cluster, tmp_path: Path) -> None:
    cluster.start_dispatcher()
    cluster.start_worker("w1")
    cluster.start_worker("w2")
    m = write_manifest(tmp_path, """
        name: retry
        version: "1"
        symbols:
          - name: flaky
            type: action
            parameters: {handler: fail, succeed_on_attempt: 3, message: not yet}
            retries: 3
    """)
    cp = cluster.deploy(m)
    assert cp.returncode == 0, cp.stderr
    run_id = result_json(cp)["run_id"]
    assert cluster.tasks(run_id)["flaky"]["attempts"] == 3
    outcomes = [r["outcome"] for r in cluster.query(
        "SELECT outcome FROM attempts WHERE run_id = ? ORDER BY attempt", (run_id,))]
    assert outcomes == ["failed", "failed", "ok"]


def test_a_failure_rolls_back_completed_symbols_in_reverse_order(cluster: Cluster,
                                                                 tmp_path: Path) -> None:
    cluster.start_dispatcher()
    cluster.start_worker("w1")
    cluster.start_worker("w2")
    m = write_manifest(tmp_path, """
        name: rollback
        version: "1"
        on_failure: rollback
        symbols:
          - {name: a, type: action, parameters: {handler: noop},
             rollback: {name: undo_a, type: action, parameters: {handler: noop}}}
          - {name: b, type: action, dependencies: [a], parameters: {handler: noop},
             rollback: {name: undo_b, type: action, parameters: {handler: noop}}}
          - {name: c, type: action, dependencies: [b], parameters: {handler: noop},
             rollback: {name: undo_c, type: action, parameters: {handler: noop}}}
          - {name: d, type: action, dependencies: [c], retries: 0,
             parameters: {handler: fail, retryable: false},
             rollback: {name: undo_d, type: action, parameters: {handler: noop}}}
          - {name: e, type: action, dependencies: [d], parameters: {handler: noop}}
    """)
    cp = cluster.deploy(m)
    assert cp.returncode == 1
    run = result_json(cp)
    assert run["status"] == "rolled_back"
    tasks = {(t["symbol"], t["kind"]): t for t in run["tasks"]}
    assert tasks[("d", "main")]["state"] == "failed"
    assert tasks[("e", "main")]["state"] == "skipped"
    for s in "abc":
        assert tasks[(s, "main")]["state"] == "rolled_back"
    events = cluster.query("SELECT symbol FROM events WHERE run_id = ? AND kind = "
                           "'symbol.completed' ORDER BY seq", (run["run_id"],))
    order = [e["symbol"] for e in events]
    assert order == ["a", "b", "c", "undo_d", "undo_c", "undo_b", "undo_a"]
    stored = cluster.query("SELECT symbol, spec, rolled_back_at FROM rollbacks WHERE run_id = ?",
                           (run["run_id"],))
    assert {r["symbol"] for r in stored} == {"a", "b", "c"}
    assert all(r["rolled_back_at"] for r in stored)


TIMEOUT_BACKEND = """#!/bin/sh
if [ "$1" = "--version" ]; then echo "stubborn 1.0"; exit 0; fi
# A grandchild that ignores SIGTERM, and a leader that ignores it too.
sh -c 'trap "" TERM; echo $$ >> "{pids}"; while :; do sleep 1; done' &
trap "" TERM
echo $$ >> "{pids}"
while :; do sleep 1; done
"""


def test_a_timeout_leaves_no_process_behind(cluster: Cluster, tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    script = tmp_path / "stubborn"
    script.write_text(TIMEOUT_BACKEND.format(pids=pids))
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    cfg = cluster.write_config("stubborn.toml", f"""
[backends.rust_injector]
binary_path = "{script}"
""")
    cluster.start_dispatcher()
    cluster.start_worker("w1", cfg)
    m = write_manifest(tmp_path, """
        name: timeout
        version: "1"
        symbols:
          - {name: hang, type: action, dispatch: rust_injector, timeout: 500, retries: 0}
    """)
    cp = cluster.deploy(m)
    assert cp.returncode == 1
    run = result_json(cp)
    (task,) = run["tasks"]
    assert task["state"] == "failed" and "timed out" in task["error"]
    started = [int(x) for x in pids.read_text().split()]
    assert len(started) == 2
    wait_for(lambda: not any(pid_alive(p) for p in started), timeout=10,
             what="the backend's process group to be gone")


def test_a_task_on_a_worker_whose_connection_drops_goes_to_another_worker(
        cluster: Cluster, tmp_path: Path) -> None:
    cluster.start_dispatcher()
    w1 = cluster.start_worker("w1")
    m = write_manifest(tmp_path, """
        name: drop
        version: "1"
        symbols:
          - {name: long, type: action, parameters: {handler: delay, ms: 1500}}
    """)
    run_id = cluster.detach(m)
    wait_for(lambda: cluster.tasks(run_id).get("long", {}).get("state") == "running",
             what="the task to run on w1")
    cluster.kill("w1")
    w1.wait(10)
    cluster.start_worker("w2")
    wait_for(lambda: cluster.tasks(run_id)["long"]["state"] == "completed", timeout=30,
             what="the task to complete on w2")
    task = cluster.tasks(run_id)["long"]
    assert task["node"] == "w2" and task["attempts"] == 2 and task["losses"] == 1
    outcomes = [r["outcome"] for r in cluster.query(
        "SELECT outcome FROM attempts WHERE task_id = ? ORDER BY attempt", (task["task_id"],))]
    assert outcomes == ["lost", "ok"]
    assert cluster.query("SELECT status FROM runs WHERE run_id = ?",
                         (run_id,))[0]["status"] == "completed"


def test_a_bad_manifest_exits_2_naming_each_problem_and_dispatches_nothing(
        cluster: Cluster, tmp_path: Path) -> None:
    cluster.start_dispatcher()
    m = write_manifest(tmp_path, """
        name: bad
        version: "1"
        symbols:
          - {name: a, type: action, timeout: -5}
          - {name: a, type: bogus, dependencies: [ghost]}
    """)
    cp = cluster.deploy(m)
    assert cp.returncode == 2
    assert "Traceback" not in cp.stderr
    assert str(m) in cp.stderr and "timeout" in cp.stderr and "ghost" in cp.stderr
    assert cluster.query("SELECT * FROM runs") == []


def test_status_shows_nodes_tasks_and_db_records(cluster: Cluster) -> None:
    cluster.start_dispatcher()
    cluster.start_worker("w1", slots=3)
    cp = cluster.cli("status", str(cluster.config_path), "--url", cluster.url, "--json")
    assert cp.returncode == 0, cp.stderr
    s = json.loads(cp.stdout)
    (node,) = s["nodes"]
    assert node["name"] == "w1" and node["slots"] == 3 and "internal" in node["capabilities"]
    assert s["db"]["nodes"] == 1
    human = cluster.cli("status", str(cluster.config_path), "--url", cluster.url)
    assert human.returncode == 0 and "w1" in human.stdout and "idle" in human.stdout


_STATUS_IMPORTS = """
import sys
from swarm.cli import main
code = main(sys.argv[1:])
print(",".join(sorted(m for m in sys.modules if m.startswith("swarm"))), file=sys.stderr)
sys.exit(code)
"""


def test_status_imports_neither_benchmark_nor_simulator_nor_dispatcher(cluster: Cluster
                                                                        ) -> None:
    cluster.start_dispatcher()
    for extra in ((), ("--json",)):
        cp = subprocess.run([sys.executable, "-c", _STATUS_IMPORTS, "status", "--url",
                             cluster.url, *extra], capture_output=True, text=True, env=env(),
                            timeout=60, cwd=cluster.root, stdin=subprocess.DEVNULL)
        assert cp.returncode == 0, cp.stderr
        loaded = set(cp.stderr.strip().splitlines()[-1].split(","))
        assert "swarm.client" in loaded
        heavy = {"swarm.bench", "swarm.bench.harness", "swarm.bench.peers", "swarm.simulate",
                 "swarm.dispatcher", "swarm.core", "swarm.state", "swarm.local"}
        assert not loaded & heavy, sorted(loaded & heavy)


def test_unreachable_dispatcher_exits_3(tmp_path: Path) -> None:
    cl = Cluster(tmp_path)
    cp = cl.cli("status", "--url", "ws://127.0.0.1:9")
    assert cp.returncode == 3 and "cannot reach" in cp.stderr and "Traceback" not in cp.stderr
    cp = cl.cli("deploy", str(REPO / "examples" / "hello.yaml"), "--url", "ws://127.0.0.1:9")
    assert cp.returncode == 3


def test_wrong_token_is_refused_with_exit_3(tmp_path: Path) -> None:
    cl = Cluster(tmp_path, '\n[security]\ntoken = "right"\n')
    try:
        cl.start_dispatcher()
        cp = cl.cli("status", "--url", cl.url, extra_env={"SWARM_TOKEN": "wrong"})
        assert cp.returncode == 3 and "authentication failed" in cp.stderr
        cp = cl.cli("status", str(cl.config_path), "--url", cl.url)
        assert cp.returncode == 0, cp.stderr
    finally:
        cl.close()


def test_worker_sigterm_finishes_running_symbol_and_exits_0(cluster: Cluster,
                                                            tmp_path: Path) -> None:
    cluster.start_dispatcher()
    w1 = cluster.start_worker("w1")
    m = write_manifest(tmp_path, """
        name: graceful
        version: "1"
        symbols:
          - {name: slow, type: action, parameters: {handler: delay, ms: 800}}
    """)
    run_id = cluster.detach(m)
    wait_for(lambda: cluster.tasks(run_id).get("slow", {}).get("state") == "running",
             what="the symbol to start")
    assert cluster.stop("w1") == 0
    assert w1.returncode == 0
    task = cluster.tasks(run_id)["slow"]
    assert task["state"] == "completed" and task["attempts"] == 1


def test_swarm_run_runs_hello_on_a_local_swarm_and_stops_everything(tmp_path: Path) -> None:
    cl = Cluster(tmp_path)
    db = tmp_path / "run.db"
    cp = cl.cli("run", str(REPO / "examples" / "hello.yaml"), "--workers", "2", "--db", str(db),
                "--json")
    assert cp.returncode == 0, cp.stderr
    assert result_json(cp)["status"] == "completed"
    cl.db = db
    assert {r["status"] for r in cl.query("SELECT status FROM nodes")} <= {"left", "lost"}
    assert len(cl.query("SELECT * FROM tasks WHERE state = 'completed'")) == 5


def test_swarm_run_exits_1_when_the_workflow_fails(tmp_path: Path) -> None:
    m = write_manifest(tmp_path, """
        name: failing
        version: "1"
        symbols:
          - {name: boom, type: action, retries: 0, parameters: {handler: fail}}
    """)
    cp = Cluster(tmp_path).cli("run", str(m), "--workers", "1")
    assert cp.returncode == 1
    assert "boom" in cp.stdout and "failed" in cp.stdout


def test_bin_swarm_works_from_a_checkout(tmp_path: Path) -> None:
    import subprocess

    e = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    cp = subprocess.run([str(REPO / "bin" / "swarm"), "plan",
                         str(REPO / "examples" / "example-workflow.yaml"), "--json"],
                        capture_output=True, text=True, env=e, cwd=tmp_path, timeout=60)
    assert cp.returncode == 0, cp.stderr
    plan = json.loads(cp.stdout)
    assert plan["critical_path"] == ["initialize", "process_data", "finalize"]


def test_bad_frames_close_only_their_own_connection_while_a_run_goes_on(
        cluster: Cluster, tmp_path: Path) -> None:
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    from swarm import protocol as p

    cluster.start_dispatcher()
    cluster.start_worker("w1")
    m = write_manifest(tmp_path, """
        name: steady
        version: "1"
        symbols:
          - {name: a, type: action, parameters: {handler: delay, ms: 300}}
          - {name: b, type: action, dependencies: [a], parameters: {handler: delay, ms: 300}}
    """)
    run_id = cluster.detach(m)

    def closed_with(payload: bytes | str, hello_first: bool = False) -> int:
        with connect(cluster.url, max_size=None, compression=None) as ws:
            assert isinstance(p.decode(ws.recv(timeout=5)), p.Challenge)
            if hello_first:
                ws.send(p.encode(p.Hello(role="client", name="rogue")))
                ws.recv(timeout=5)
            ws.send(payload)
            with pytest.raises(ConnectionClosed) as e:
                while True:
                    ws.recv(timeout=5)
            assert e.value.rcvd is not None
            return e.value.rcvd.code

    assert closed_with(b"\xc1 not msgpack") == p.CLOSE_INVALID_DATA
    assert closed_with(p.encode(p.Heartbeat(free=1))) == p.CLOSE_POLICY  # hello must be first
    assert closed_with("text frame") == p.CLOSE_INVALID_DATA
    assert closed_with(b"\x00" * (2 << 20)) == p.CLOSE_TOO_BIG
    assert closed_with(p.encode(p.Results(items=())), hello_first=True) == p.CLOSE_POLICY
    wait_for(lambda: cluster.tasks(run_id).get("b", {}).get("state") == "completed",
             what="the run to finish despite the rogue connections")
    cp = cluster.cli("status", "--url", cluster.url, "--json")
    assert cp.returncode == 0 and json.loads(cp.stdout)["nodes"][0]["name"] == "w1"


def test_workers_reconnect_by_themselves_when_the_dispatcher_comes_back(
        cluster: Cluster, tmp_path: Path) -> None:
    from e2e_support import free_port

    port = free_port()
    cluster.start_dispatcher(port=port)
    w1 = cluster.start_worker("w1")
    assert cluster.stop("dispatcher") == 0
    wait_for(lambda: "lost; reconnecting" in cluster.log("w1") or "cannot reach" in
             cluster.log("w1"), what="the worker to notice")
    cluster.start_dispatcher(port=port)
    wait_for(lambda: len(cluster.query(
        "SELECT 1 FROM nodes WHERE name = 'w1' AND status = 'connected'")) >= 1,
        what="w1 to reconnect")
    assert w1.poll() is None
    cp = cluster.deploy(REPO / "examples" / "hello.yaml")
    assert cp.returncode == 0, cp.stderr
    assert {t["node"] for t in result_json(cp)["tasks"]} == {"w1"}


def test_labels_route_symbols_and_a_resource_serializes_them_across_workers(
        cluster: Cluster, tmp_path: Path) -> None:
    cluster.start_dispatcher()
    eu = cluster.write_config("eu.toml", '[worker.labels]\nzone = "eu"\n')
    cluster.start_worker("plain", slots=4)
    cluster.start_worker("eu-1", eu, slots=4)
    m = write_manifest(tmp_path, """
        name: routed
        version: "1"
        symbols:
          - {name: gdpr, type: action, requires: {zone: eu}, parameters: {handler: noop}}
          - {name: m1, type: action, resources: [db], parameters: {handler: delay, ms: 150}}
          - {name: m2, type: action, resources: [db], parameters: {handler: delay, ms: 150}}
          - {name: m3, type: action, resources: [db], parameters: {handler: delay, ms: 150}}
    """)
    cp = cluster.deploy(m)
    assert cp.returncode == 0, cp.stderr
    run_id = result_json(cp)["run_id"]
    assert cluster.tasks(run_id)["gdpr"]["node"] == "eu-1"
    spans = sorted((r["started_at"], r["finished_at"]) for r in cluster.query(
        "SELECT a.started_at, a.finished_at FROM attempts a JOIN tasks t ON t.task_id ="
        " a.task_id WHERE t.symbol LIKE 'm%' AND a.run_id = ?", (run_id,)))
    assert len(spans) == 3
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:],
                                                                      strict=False))
