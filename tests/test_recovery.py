"""Crashes, hangs and lost workers, with real processes on 127.0.0.1: nothing completed is
lost or recorded twice (DESIGN §8). Processes are stopped with SIGSTOP and killed with
SIGKILL; every check reads the state DB."""

from __future__ import annotations

import json
import random
import signal
import stat
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest
from e2e_support import (
    Cluster,
    free_port,
    result_json,
    swarm_argv,
    wait_for,
    write_manifest,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]





def completions(cluster: Cluster, run_id: str) -> Counter[str]:
    return Counter(r["symbol"] for r in cluster.query(
        "SELECT symbol FROM events WHERE run_id = ? AND kind = 'symbol.completed'", (run_id,)))



def stop_worker_mid_symbol(cluster: Cluster, tmp_path: Path, symbol: str, ms: int
                           ) -> tuple[str, int]:
    """w1 starts `symbol` (a delay of `ms`) and is then SIGSTOPped: its TCP connection stays
    open, it just goes silent. The run id and the attempt token it holds."""
    cluster.edit_config("heartbeat_timeout = 3000", "heartbeat_timeout = 1000")
    cluster.start_dispatcher()
    cluster.start_worker("w1", slots=1)
    m = write_manifest(tmp_path, f"""
        name: stopped
        version: "1"
        symbols:
          - {{name: {symbol}, type: action, parameters: {{handler: delay, ms: {ms}}}}}
    """)
    run_id = cluster.detach(m)
    wait_for(lambda: cluster.tasks(run_id)[symbol]["state"] == "running",
             what=f"{symbol} to start")
    token = int(cluster.tasks(run_id)[symbol]["token"])
    cluster.kill("w1", signal.SIGSTOP)
    return run_id, token


def test_a_stopped_worker_is_declared_dead_and_its_late_result_is_dropped(
        cluster: Cluster, tmp_path: Path) -> None:
    run_id, first = stop_worker_mid_symbol(cluster, tmp_path, "slow", 1500)
    cluster.start_worker("w2", slots=1)
    wait_for(lambda: cluster.run_status(run_id) == "completed", timeout=30,
             what="the run to complete on w2")
    assert cluster.tasks(run_id)["slow"]["node"] == "w2"
    cluster.kill("w1", signal.SIGCONT)
    wait_for(lambda: cluster.query(
        "SELECT 1 FROM events WHERE kind = 'result.dropped' AND json_extract(data, '$.token')"
        " = ?", (first,)), timeout=30, what="w1's stale result to arrive and be dropped")
    assert completions(cluster, run_id) == Counter({"slow": 1})
    outcomes = [r["outcome"] for r in cluster.query(
        "SELECT outcome FROM attempts WHERE run_id = ? ORDER BY id", (run_id,))]
    assert outcomes == ["lost", "ok"]
    lost = cluster.query("SELECT data FROM events WHERE kind = 'node.lost'")
    assert any(json.loads(r["data"])["reason"] == "heartbeat timeout" for r in lost)


CHAIN = """
    name: chain
    version: "1"
    on_failure: rollback
    symbols:
      - {name: s1, type: action, parameters: {handler: delay, ms: 250}}
      - {name: s2, type: action, dependencies: [s1], parameters: {handler: delay, ms: 250}}
      - {name: s3, type: action, dependencies: [s2], parameters: {handler: delay, ms: 250}}
      - {name: s4, type: action, dependencies: [s3], parameters: {handler: delay, ms: 250}}
      - {name: s5, type: action, dependencies: [s4], parameters: {handler: delay, ms: 250}}
      - {name: s6, type: action, dependencies: [s5], parameters: {handler: delay, ms: 250}}
"""


def test_kill_9_of_the_dispatcher_mid_run_resumes_without_rerunning_completed_symbols(
        cluster: Cluster, tmp_path: Path) -> None:
    port = free_port()
    cluster.start_dispatcher(port=port)
    cluster.start_worker("w1")
    cluster.start_worker("w2")
    m = write_manifest(tmp_path, CHAIN)
    follower = subprocess.Popen(
        swarm_argv("deploy", str(m), str(cluster.config_path), "--url", cluster.url),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
        env=__import__("e2e_support").env())
    try:
        wait_for(lambda: sum(t["state"] == "completed" for t in cluster.tasks().values()) >= 2,
                 what="two symbols to complete")
        (run_id,) = {r["run_id"] for r in cluster.query("SELECT run_id FROM runs")}
        done_before = {s for s, t in cluster.tasks(run_id).items() if t["state"] == "completed"}
        cluster.kill("dispatcher")
        cluster.procs["dispatcher"].wait(10)
        _, err = follower.communicate(timeout=30)
        assert follower.returncode == 3, err
        assert "lost the connection" in err and f"swarm watch {run_id}" in err
    finally:
        if follower.poll() is None:
            follower.kill()
            follower.wait()
    cluster.start_dispatcher(port=port)
    watch = cluster.cli("watch", run_id, "--url", cluster.url)
    assert watch.returncode == 0, watch.stdout + watch.stderr
    assert cluster.run_status(run_id) == "completed"
    assert completions(cluster, run_id) == Counter({f"s{i}": 1 for i in range(1, 7)})
    tasks = cluster.tasks(run_id)
    for name in done_before:
        assert tasks[name]["attempts"] == 1, name
    assert "restored from the state DB" in cluster.log("dispatcher")


def test_a_retry_timer_keeps_its_due_time_across_a_dispatcher_restart(
        cluster: Cluster, tmp_path: Path) -> None:
    port = free_port()
    cluster.start_dispatcher(port=port)
    cluster.start_worker("w1")
    m = write_manifest(tmp_path, """
        name: timer
        version: "1"
        symbols:
          - name: later
            type: action
            retries: 2
            retry: {initial_delay: 3000, jitter: 0.0}
            parameters: {handler: fail, succeed_on_attempt: 2}
    """)
    run_id = cluster.detach(m)
    wait_for(lambda: cluster.tasks(run_id)["later"]["state"] == "retrying", what="a retry")
    due = cluster.tasks(run_id)["later"]["due_at"]
    assert cluster.stop("dispatcher") == 0  # SIGTERM: flushed, going-away, exit 0
    cluster.start_dispatcher(port=port)
    wait_for(lambda: cluster.run_status(run_id) == "completed", timeout=30,
             what="the retry after the restart")
    (second,) = cluster.query("SELECT started_at FROM attempts WHERE run_id = ? AND attempt = 2",
                              (run_id,))
    assert second["started_at"] >= due - 0.05  # not early: the stored due time was kept


POISON = """#!/bin/sh
if [ "$1" = "--version" ]; then echo "poison 1.0"; exit 0; fi
kill -9 $PPID
"""


def test_a_poison_task_that_kills_every_worker_fails_as_worker_lost(
        cluster: Cluster, tmp_path: Path) -> None:
    script = tmp_path / "poison"
    script.write_text(POISON)
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    cfg = cluster.write_config("poison.toml", f'[backends.rust_injector]\nbinary_path = '
                                              f'"{script}"\n')
    cluster.start_dispatcher()
    for name in ("w1", "w2", "w3"):
        cluster.start_worker(name, cfg, slots=1)
    m = write_manifest(tmp_path, """
        name: poison
        version: "1"
        symbols:
          - {name: bomb, type: action, dispatch: rust_injector, retries: 5}
    """)
    cp = cluster.deploy(m)
    assert cp.returncode == 1
    (task,) = result_json(cp)["tasks"]
    assert task["state"] == "failed" and task["error"] == "worker lost 3 times"
    assert task["losses"] == 3 and task["attempts"] == 3  # losses do not spend retries


def test_deadline_beats_remaining_retries(cluster: Cluster, tmp_path: Path) -> None:
    cluster.start_dispatcher()
    cluster.start_worker("w1")
    m = write_manifest(tmp_path, """
        name: deadline
        version: "1"
        symbols:
          - name: doomed
            type: action
            retries: 100
            deadline: 600
            retry: {initial_delay: 150, backoff_factor: 1.0, jitter: 0.0}
            parameters: {handler: fail}
    """)
    cp = cluster.deploy(m)
    assert cp.returncode == 1
    (task,) = result_json(cp)["tasks"]
    assert task["state"] == "failed" and 2 <= task["attempts"] <= 5


def test_a_duplicated_result_is_acknowledged_and_recorded_once(cluster: Cluster,
                                                               tmp_path: Path) -> None:
    from websockets.sync.client import connect

    from swarm import protocol as p

    cluster.start_dispatcher()
    m = write_manifest(tmp_path, """
        name: dup
        version: "1"
        symbols:
          - {name: once, type: action}
          - {name: after, type: action, dependencies: [once]}
    """)
    with connect(cluster.url, compression=None) as ws:  # a hand-driven worker
        assert isinstance(p.decode(ws.recv(timeout=5)), p.Challenge)
        ws.send(p.encode(p.Hello(role="worker", name="manual", capabilities=("internal",),
                                 slots=1)))
        assert isinstance(p.decode(ws.recv(timeout=5)), p.Welcome)
        run_id = cluster.detach(m)
        (task,) = p.decode(ws.recv(timeout=10)).tasks  # type: ignore[union-attr]
        result = p.TaskResult(token=task.token, task_id=task.task_id, ok=True, output="x")
        ws.send(p.encode(p.Results((result, result))))
        ws.send(p.encode(p.Results((result,))))
        acked: list[int] = []
        nxt = None
        while len(acked) < 3 or nxt is None:
            msg = p.decode(ws.recv(timeout=10))
            if isinstance(msg, p.Ack):
                acked += msg.tokens
            elif isinstance(msg, p.Assign):
                nxt = msg.tasks[0]
        assert acked == [task.token] * 3 and nxt.symbol == "after"
    assert completions(cluster, run_id)["once"] == 1
    assert len(cluster.query("SELECT 1 FROM events WHERE kind = 'result.dropped'")) == 2


def test_worker_sigterm_past_its_grace_requeues_without_counting_a_loss(
        cluster: Cluster, tmp_path: Path) -> None:
    cfg = cluster.write_config("short.toml", "").read_text().replace(
        "shutdown_grace = 5000", "shutdown_grace = 300")
    short = cluster.root / "short.toml"
    short.write_text(cfg)
    cluster.start_dispatcher()
    w1 = cluster.start_worker("w1", short)
    m = write_manifest(tmp_path, """
        name: grace
        version: "1"
        symbols:
          - {name: long, type: action, parameters: {handler: delay, ms: 20000}}
    """)
    run_id = cluster.detach(m)
    wait_for(lambda: cluster.tasks(run_id)["long"]["state"] == "running", what="long to run")
    started = time.monotonic()
    assert cluster.stop("w1") == 0 and w1.returncode == 0
    assert time.monotonic() - started < 10
    task = cluster.tasks(run_id)["long"]
    assert task["state"] == "ready" and task["losses"] == 0


def test_rollback_of_a_finished_run_after_a_dispatcher_restart(cluster: Cluster,
                                                              tmp_path: Path) -> None:
    port = free_port()
    cluster.start_dispatcher(port=port)
    cluster.start_worker("w1")
    m = write_manifest(tmp_path, """
        name: undoable
        version: "1"
        symbols:
          - {name: a, type: action, parameters: {handler: noop},
             rollback: {name: undo_a, type: action, parameters: {handler: noop}}}
          - {name: b, type: action, dependencies: [a], parameters: {handler: noop},
             rollback: {name: undo_b, type: action, parameters: {handler: noop}}}
          - {name: c, type: action, dependencies: [b], parameters: {handler: noop}}
    """)
    cp = cluster.deploy(m)
    assert cp.returncode == 0
    run_id = result_json(cp)["run_id"]
    assert cluster.stop("dispatcher") == 0
    cluster.start_dispatcher(port=port)
    cp = cluster.cli("rollback", run_id, "--url", cluster.url, "--json")
    assert cp.returncode == 0, cp.stdout + cp.stderr
    # A phase of its own: the run keeps its outcome, the rollback has its own.
    assert (result_json(cp)["status"], result_json(cp)["rollback_status"]) == (
        "completed", "rolled_back")
    order = [r["symbol"] for r in cluster.query(
        "SELECT symbol FROM events WHERE run_id = ? AND kind = 'symbol.completed' ORDER BY seq",
        (run_id,))]
    assert order == ["a", "b", "c", "undo_b", "undo_a"]
    again = cluster.cli("rollback", run_id, "--url", cluster.url)
    assert again.returncode == 0 and "nothing to undo" in again.stdout, again.stderr


def test_deploy_attaches_to_an_active_run_of_the_same_manifest_and_resume_reuses_work(
        cluster: Cluster, tmp_path: Path) -> None:
    cluster.start_dispatcher()
    cluster.start_worker("w1")
    slow = write_manifest(tmp_path, """
        name: slow
        version: "1"
        symbols:
          - {name: wait, type: action, parameters: {handler: delay, ms: 1500}}
    """, "slow.yaml")
    first = cluster.detach(slow)
    assert cluster.detach(slow) == first
    assert cluster.detach(slow, "--new") != first
    broken = write_manifest(tmp_path, """
        name: fixable
        version: "1"
        on_failure: abort
        symbols:
          - {name: a, type: action, parameters: {handler: noop}}
          - {name: b, type: action, dependencies: [a], retries: 0, parameters: {handler: fail}}
          - {name: c, type: action, dependencies: [b], parameters: {handler: noop}}
    """, "broken.yaml")
    cp = cluster.deploy(broken)
    assert cp.returncode == 1
    failed_run = result_json(cp)["run_id"]
    fixed = write_manifest(tmp_path, broken.read_text().replace(
        "retries: 0, parameters: {handler: fail}", "parameters: {handler: noop}"), "fixed.yaml")
    cp = cluster.deploy(fixed, "--resume", failed_run)
    assert cp.returncode == 0, cp.stderr
    resumed = result_json(cp)
    tasks = {t["symbol"]: t for t in resumed["tasks"]}
    assert tasks["a"]["state"] == "completed" and tasks["a"]["attempts"] == 0  # reused
    assert tasks["b"]["attempts"] == 1 and tasks["c"]["attempts"] == 1
    refused = cluster.deploy(fixed, "--resume", resumed["run_id"])
    assert refused.returncode == 2 and "only a failed or cancelled run" in refused.stderr


def test_chaos_soak_of_500_tasks_over_3_workers_killed_at_random(cluster: Cluster,
                                                                tmp_path: Path) -> None:
    rng = random.Random(20261121)
    cluster.edit_config("[coordinator]\n", "[coordinator]\nmax_worker_losses = 1000\n")
    lines = ["name: soak", 'version: "1"', "on_failure: continue", "symbols:"]
    for layer in range(10):
        for i in range(50):
            deps = sorted({f"t{layer - 1}_{rng.randrange(50)}" for _ in range(2)}) if layer else []
            lines.append(f"  - {{name: t{layer}_{i}, type: action, dependencies: {deps}, "
                         f"parameters: {{handler: delay, ms: {rng.randrange(20, 120)}}}}}")
    m = tmp_path / "soak.yaml"
    m.write_text("\n".join(lines) + "\n")
    cluster.start_dispatcher()
    for n in range(3):
        cluster.start_worker(f"w{n}", slots=4)
    run_id = cluster.detach(m)
    kills, generation = 0, {n: 0 for n in range(3)}
    deadline = time.monotonic() + 150
    while cluster.run_status(run_id) == "running" and time.monotonic() < deadline:
        time.sleep(rng.uniform(0.2, 0.6))  # a seeded chaos schedule, not a wait for a result
        if kills >= 12:
            continue
        n = rng.randrange(3)
        cluster.kill(f"w{n}" + (f"-{generation[n]}" if generation[n] else ""))
        generation[n] += 1
        kills += 1
        cluster.start_worker(f"w{n}-{generation[n]}", slots=4, wait=False)
    assert cluster.run_status(run_id) == "completed", cluster.log("dispatcher")[-3000:]
    assert kills >= 6
    tasks = cluster.tasks(run_id)
    assert len(tasks) == 500 and all(t["state"] == "completed" for t in tasks.values())
    assert completions(cluster, run_id) == Counter({name: 1 for name in tasks})
    ok = Counter(r["task_id"] for r in cluster.query(
        "SELECT task_id FROM attempts WHERE run_id = ? AND outcome = 'ok'", (run_id,)))
    assert set(ok.values()) == {1} and len(ok) == 500
    assert sum(t["losses"] for t in tasks.values()) > 0



def test_a_worker_back_from_a_stop_is_told_to_abandon_an_attempt_taken_over(
        cluster: Cluster, tmp_path: Path) -> None:
    run_id, first = stop_worker_mid_symbol(cluster, tmp_path, "long", 6000)
    cluster.start_worker("w2", slots=1)
    wait_for(lambda: cluster.tasks(run_id)["long"]["node"] == "w2", timeout=30,
             what="w2 to take the symbol over")
    cluster.kill("w1", signal.SIGCONT)  # back while its attempt still runs
    wait_for(lambda: f"abandoning attempt {first}" in cluster.log("w1"), timeout=30,
             what="w1 to be told to abandon its attempt")
    wait_for(lambda: cluster.run_status(run_id) == "completed", timeout=30, what="the run")
    assert completions(cluster, run_id) == Counter({"long": 1})
    assert not cluster.query("SELECT 1 FROM events WHERE kind = 'result.dropped'")
