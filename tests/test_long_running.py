"""Long-running symbols (issue #14): checkpoints that survive a lost worker or dispatcher,
progress reports, hang detection and run deadlines. First the core with a fake clock and
the pieces that read backends' reports; then real dispatcher, worker and PHP processes,
killed with SIGKILL and stopped with SIGSTOP."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from backend_support import backends_toml, find_php, python_script
from e2e_support import Cluster, free_port, ndjson, wait_for, write_manifest
from test_core import Harness, sym, wf

from swarm import core as c
from swarm.backends.process import run_process
from swarm.errors import ManifestError
from swarm.manifest import workflow_from_dict
from swarm.model import Workflow
from swarm.progress import Report, parse_line
from swarm.protocol import ProgressReport

pytestmark = pytest.mark.timeout(120)


# --- the core, with a fake clock ---------------------------------------------------------


def report(h: Harness, node: str, token: int, seq: int = 1, **kw: Any) -> list[c.Command]:
    return h.feed(c.ProgressReceived(node, (ProgressReport(token, "r1/s", seq, **kw),), h.now))


def kept(cmds: list[c.Command]) -> list[tuple[int, str]]:
    return [(k.seq, k.error) for cmd in cmds if isinstance(cmd, c.KeepAck) for k in cmd.items]


def test_the_next_attempt_gets_the_last_kept_checkpoint_and_the_ack_follows_its_journal() -> None:
    h = Harness()
    h.node("w1")
    h.submit(wf(sym("s")))
    (t,) = h.take("w1")
    h.node("w2")
    cmds = report(h, "w1", t.token, checkpoint={"step": 6}, progress=0.6, message="six")
    kinds = ["Journal" if isinstance(x, c.Journal) else type(x).__name__ for x in cmds]
    assert kinds.index("Journal") < kinds.index("KeepAck")  # committed, then acknowledged
    assert kept(cmds) == [(1, "")]
    h.feed(c.NodeDisconnected("w1", h.now))  # the worker is lost
    (again,) = h.take("w2")
    assert again.checkpoint == {"step": 6} and again.attempt == 2


def test_a_stale_attempts_late_checkpoint_is_dropped() -> None:
    h = Harness()
    h.node("w1")
    h.submit(wf(sym("s")))
    (first,) = h.take("w1")
    report(h, "w1", first.token, checkpoint={"step": 1})
    h.feed(c.NodeDisconnected("w1", h.now))
    h.node("w2")
    (second,) = h.take("w2")
    report(h, "w2", second.token, checkpoint={"step": 2})
    h.node("w1")  # back, with a late checkpoint of its replaced attempt
    cmds = report(h, "w1", first.token, seq=2, checkpoint={"step": 9})
    assert kept(cmds) == [(2, "stale or unknown attempt")]
    (dropped,) = [j for j in h.journal if j.kind == "symbol.checkpoint_dropped"]
    assert dropped.data == {"token": first.token, "reason": "stale or unknown attempt"}
    h.feed(c.NodeDisconnected("w2", h.now))
    h.tick(0)
    (third,) = h.take("w1")
    assert third.checkpoint == {"step": 2}


def test_an_oversized_or_opted_out_checkpoint_is_refused_and_the_previous_one_stays() -> None:
    h = Harness(max_checkpoint_size=100)
    h.node("w", slots=2)
    h.submit(wf(sym("s", retries=1), sym("off", checkpoint=False)))
    tokens = {t.symbol: t for t in h.take("w")}
    report(h, "w", tokens["s"].token, checkpoint={"step": 1})
    cmds = report(h, "w", tokens["s"].token, seq=2, checkpoint={"pad": "x" * 200})
    assert "exceeds max_checkpoint_size (100 bytes)" in kept(cmds)[0][1]
    cmds = report(h, "w", tokens["off"].token, checkpoint={"step": 1})
    assert "checkpoint: false" in kept(cmds)[0][1]
    assert h.kinds("symbol.checkpoint_rejected") == ["s", "off"]
    h.result("w", tokens["s"], ok=False, error="boom")
    h.tick(1)
    (retry,) = h.take("w")
    assert retry.checkpoint == {"step": 1}


def test_progress_is_journaled_and_silence_past_heartbeat_timeout_is_a_hang() -> None:
    h = Harness()
    h.node("w")
    h.submit(wf(sym("s", heartbeat_timeout=2000, retries=1, timeout=600_000)))
    (t,) = h.take("w")
    for _ in range(3):  # reports keep it alive well past its heartbeat_timeout
        h.tick(1.5)
        report(h, "w", t.token, progress=0.5, message="half")
    assert h.kinds("symbol.progress") == ["s"] * 3 and h.state("s") == "running"
    h.tick(2.1)  # silent for longer than 2 s: hung
    abandoned = [x for x in h.commands if isinstance(x, c.Abandon)]
    assert abandoned == [c.Abandon("w", (t.token,))]
    (finished,) = [j for j in h.journal if j.kind == "attempt.finished"]
    assert finished.data["timed_out"] and finished.data["error"] == "no progress for 2000 ms"
    assert h.state("s") == "retrying"


def test_a_run_deadline_stops_running_symbols_and_on_failure_applies() -> None:
    h = Harness()
    h.node("w", slots=2)
    workflow = Workflow(name="t", version="1", deadline=5000, symbols=(
        sym("a", rollback=True), sym("long", "a"), sym("after", "long")))
    h.submit(workflow)
    h.run_one("w")
    (long_,) = h.take("w")
    h.tick(4.9)
    assert h.state("long") == "running"
    h.tick(0.1)
    assert [x for x in h.commands if isinstance(x, c.Abandon)] == [c.Abandon("w", (long_.token,))]
    assert h.state("long") == "failed" and h.state("after") == "skipped"
    (failed,) = [j for j in h.journal if j.kind == "symbol.failed"]
    assert failed.data["error"] == "run deadline exceeded"
    assert h.names("w") == ["undo_a"]  # on_failure: rollback


# --- the manifest ---------------------------------------------------------------------------


def test_the_manifest_fields_of_long_running_symbols_are_checked_and_kept() -> None:
    doc = {"name": "m", "version": "1", "deadline": 60000, "symbols": [
        {"name": "a", "type": "action", "heartbeat_timeout": 5000, "checkpoint": False}]}
    w = workflow_from_dict(doc)
    assert w.deadline == 60000 and w.symbols[0].heartbeat_timeout == 5000
    assert not w.symbols[0].checkpoint
    assert workflow_from_dict(w.to_dict()) == w
    plain = {"name": "m", "version": "1", "symbols": [{"name": "a", "type": "action"}]}
    assert "deadline" not in workflow_from_dict(plain).to_dict()  # old hashes unchanged
    bad = {"name": "m", "version": "1", "deadline": 0, "symbols": [
        {"name": "a", "type": "action", "heartbeat_timeout": "5s", "checkpoint": "no"}]}
    with pytest.raises(ManifestError) as info:
        workflow_from_dict(bad)
    text = str(info.value)
    assert "deadline" in text and "heartbeat_timeout" in text and "checkpoint" in text


# --- what backends say: ::swarm:: lines ---------------------------------------------------


def test_a_report_line_is_parsed_and_anything_else_is_not_one() -> None:
    assert parse_line(b'::swarm::{"checkpoint": {"s": 1}, "progress": 2}') == Report(
        checkpoint={"s": 1}, progress=1.0)
    assert parse_line(b'::swarm::{"message": "hi"}') == Report(message="hi")
    for line in (b"::swarm::not json", b'::swarm::{"other": 1}', b'{"checkpoint": 1}'):
        assert parse_line(line) is None


async def test_report_lines_are_taken_as_printed_and_left_out_of_the_output(
        tmp_path: Path) -> None:
    script = python_script(tmp_path / "b", """\
import sys
print("before")
print('::swarm::{"checkpoint": {"n": 1}, "progress": 0.5}', flush=True)
sys.stdout.write("::swarm::" + '{"checkpoint": "' + "x" * 70000 + '"}\\n')
print('::swarm::broken')
sys.stdout.write('{"ok": true}')
""")
    seen: list[Report] = []
    out = await run_process([str(script)], reports=seen.append, line_limit=1000)
    assert out.ok, out
    assert out.output == "before\n::swarm::broken\n{\"ok\": true}"
    assert seen[0] == Report(checkpoint={"n": 1}, progress=0.5)
    assert seen[1].oversize > 70000 and seen[1].checkpoint is None


# --- real processes -------------------------------------------------------------------------


@pytest.fixture
def php_cluster(tmp_path: Path) -> Iterator[Cluster]:
    find_php()  # skips where there is no php
    cl = Cluster(tmp_path, backends_toml())
    try:
        yield cl
    finally:
        cl.close()


STEPS = {
    "internal": "{handler: steps, steps: 10, ms: 400}",
    "php_engine": "{operation: steps, steps: 10, step_ms: 400}",
}


def steps_manifest(folder: Path, dispatch: str, extra: str = "") -> Path:
    return write_manifest(folder, f"""
        name: long
        version: "1"
        symbols:
          - {{name: s, type: action, dispatch: {dispatch}, parameters: {STEPS[dispatch]}{extra}}}
    """)


def step_of(cluster: Cluster, run_id: str) -> int:
    """The step of the symbol's last committed checkpoint (0: none yet)."""
    rows = cluster.query("SELECT checkpoint FROM tasks WHERE run_id = ?", (run_id,))
    return json.loads(rows[0]["checkpoint"])["step"] if rows and rows[0]["checkpoint"] else 0


def output_of(cluster: Cluster, run_id: str) -> dict[str, Any]:
    out = json.loads(cluster.tasks(run_id)["s"]["result"])
    return out["result"] if "engine" in out else out  # the PHP engine wraps its result


def resume_after_worker_kill(cluster: Cluster, tmp_path: Path, dispatch: str) -> None:
    cluster.start_dispatcher()
    cluster.start_worker("w1", slots=1)
    run_id = cluster.detach(steps_manifest(tmp_path, dispatch))
    wait_for(lambda: step_of(cluster, run_id) >= 6, timeout=30, what="step 6's checkpoint")
    cluster.kill("w1")
    cluster.procs["w1"].wait(10)
    cluster.start_worker("w2", slots=1)
    wait_for(lambda: cluster.run_status(run_id) == "completed", timeout=40,
             what="the run to complete on w2")
    kept_steps = [json.loads(r["data"]).get("message") for r in cluster.query(
        "SELECT data FROM events WHERE run_id = ? AND kind = 'symbol.checkpointed'"
        " AND attempt = 1 ORDER BY seq", (run_id,))]
    k = len(kept_steps)
    assert k >= 6 and kept_steps == [f"step {i} of 10" for i in range(1, k + 1)]
    out = output_of(cluster, run_id)
    assert out["resumed_from"] == k and out["ran"] == list(range(k + 1, 11))
    attempts = cluster.query("SELECT node, outcome FROM attempts ORDER BY id")
    assert attempts == [{"node": "w1", "outcome": "lost"}, {"node": "w2", "outcome": "ok"}]
    # Attempt 1 ran its k committed steps and at most the one it was in when killed (the
    # handler awaits each commit; PHP's steps take 400 ms, the commit a few): <= 10 + 1.
    assert (k + 1) + len(out["ran"]) <= 11


def test_an_internal_symbol_resumes_on_another_worker_from_its_checkpoint_after_kill_9(
        cluster: Cluster, tmp_path: Path) -> None:
    resume_after_worker_kill(cluster, tmp_path, "internal")


def test_a_php_symbol_resumes_on_another_worker_from_its_checkpoint_after_kill_9(
        php_cluster: Cluster, tmp_path: Path) -> None:
    resume_after_worker_kill(php_cluster, tmp_path, "php_engine")
    out = json.loads(php_cluster.tasks()["s"]["result"])
    assert out["env"]["SWARM_ATTEMPT"] == "2" and out["result"]["resumed"] is True


def test_a_checkpoint_survives_kill_9_of_the_dispatcher_and_its_worker(
        cluster: Cluster, tmp_path: Path) -> None:
    port = free_port()
    cluster.start_dispatcher(port=port)
    cluster.start_worker("w1", slots=1)
    run_id = cluster.detach(steps_manifest(tmp_path, "internal"))
    wait_for(lambda: step_of(cluster, run_id) >= 6, timeout=30, what="step 6's checkpoint")
    cluster.kill("dispatcher")
    cluster.kill("w1")
    cluster.procs["dispatcher"].wait(10)
    k = step_of(cluster, run_id)
    cluster.start_dispatcher(port=port)
    cluster.start_worker("w2", slots=1)
    wait_for(lambda: cluster.run_status(run_id) == "completed", timeout=40,
             what="the run to complete after the restart")
    out = output_of(cluster, run_id)
    assert out["resumed_from"] == k >= 6 and out["ran"] == list(range(k + 1, 11))
    assert (k + 1) + len(out["ran"]) <= 11


def test_a_stopped_workers_late_checkpoint_is_dropped(php_cluster: Cluster,
                                                       tmp_path: Path) -> None:
    cl = php_cluster
    cl.edit_config("heartbeat_timeout = 3000", "heartbeat_timeout = 1000")
    cl.start_dispatcher()
    cl.start_worker("w1", slots=1)
    run_id = cl.detach(steps_manifest(tmp_path, "php_engine"))
    wait_for(lambda: step_of(cl, run_id) >= 2, timeout=30, what="step 2's checkpoint")
    first = int(cl.tasks(run_id)["s"]["token"])
    cl.kill("w1", signal.SIGSTOP)  # its PHP goes on printing checkpoints into the pipe
    cl.start_worker("w2", slots=1)
    wait_for(lambda: cl.query("SELECT 1 FROM events WHERE kind = 'symbol.checkpointed'"
                              " AND attempt = 2"), timeout=30, what="w2's first checkpoint")
    cl.kill("w1", signal.SIGCONT)
    dropped = wait_for(lambda: cl.query(
        "SELECT data FROM events WHERE kind = 'symbol.checkpoint_dropped'"), timeout=30,
        what="w1's late checkpoint to arrive and be dropped")
    assert {json.loads(r["data"])["token"] for r in dropped} == {first}
    wait_for(lambda: cl.run_status(run_id) == "completed", timeout=40, what="the run")
    second = int(cl.tasks(run_id)["s"]["token"])
    tokens = [json.loads(r["data"])["token"] for r in cl.query(
        "SELECT data FROM events WHERE kind = 'symbol.checkpointed' ORDER BY seq")]
    # Once the second attempt checkpointed, only it did: nothing of the first came after.
    assert set(tokens[tokens.index(second):]) == {second}
    assert output_of(cl, run_id)["ran"][-1] == 10


def test_an_oversized_checkpoint_is_refused_with_an_error_in_the_symbols_log(
        cluster: Cluster, tmp_path: Path) -> None:
    cluster.edit_config("[coordinator]\n", "[coordinator]\nmax_checkpoint_size = 1024\n")
    cluster.start_dispatcher()
    cluster.start_worker("w1", slots=1)
    m = write_manifest(tmp_path, """
        name: big
        version: "1"
        symbols:
          - {name: s, type: action, parameters: {handler: steps, steps: 4, ms: 10,
                                                 pad: 4000, pad_from: 3}}
    """)
    run_id = cluster.detach(m)
    wait_for(lambda: cluster.run_status(run_id) == "completed", what="the run")
    assert output_of(cluster, run_id)["refused"] == [3, 4]
    assert step_of(cluster, run_id) == 2  # the previous checkpoint stays
    (stderr,) = [r["stderr"] for r in cluster.query("SELECT stderr FROM attempts")]
    assert "exceeds max_checkpoint_size (1,024 bytes)" in stderr
    rejected = cluster.query("SELECT data FROM events WHERE kind = 'symbol.checkpoint_rejected'")
    assert [json.loads(r["data"])["size"] > 4000 for r in rejected] == [True, True]


def attempt_processes(run_id: str) -> list[int]:
    """PIDs of processes whose environment names this run: its backends."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if f"SWARM_RUN_ID={run_id}".encode() in f.read().split(b"\0"):
                    found.append(int(entry))
        except OSError:
            continue
    return found


def test_a_hung_php_backend_is_caught_by_heartbeat_timeout_and_retried(
        php_cluster: Cluster, tmp_path: Path) -> None:
    cl = php_cluster
    cl.start_dispatcher()
    cl.start_worker("w1", slots=1)
    m = write_manifest(tmp_path, """
        name: hung
        version: "1"
        on_failure: abort
        symbols:
          - {name: s, type: action, dispatch: php_engine, timeout: 120000, retries: 1,
             heartbeat_timeout: 1500, parameters: {sleep_ms: 100000}}
    """)
    run_id = cl.detach(m)
    wait_for(lambda: attempt_processes(run_id), what="the PHP backend to start")
    wait_for(lambda: cl.run_status(run_id) == "failed", timeout=30, what="the run to fail")
    task = cl.tasks(run_id)["s"]
    assert task["error"] == "no progress for 1500 ms" and task["attempts"] == 2
    outcomes = [r["outcome"] for r in cl.query("SELECT outcome FROM attempts ORDER BY id")]
    assert outcomes == ["timeout", "timeout"]
    wait_for(lambda: not attempt_processes(run_id), timeout=10,
             what="every PHP process of the run to be gone")
    assert "abandoning attempt" in cl.log("w1")


def test_a_run_deadline_holds_across_a_dispatcher_restart(cluster: Cluster,
                                                          tmp_path: Path) -> None:
    port = free_port()
    cluster.start_dispatcher(port=port)
    cluster.start_worker("w1", slots=2)
    m = write_manifest(tmp_path, """
        name: due
        version: "1"
        deadline: 5000
        symbols:
          - {name: first, type: action, parameters: {handler: noop},
             rollback: {name: undo_first, parameters: {handler: noop}}}
          - {name: long, type: action, dependencies: [first],
             parameters: {handler: delay, ms: 60000}, timeout: 120000}
          - {name: after, type: action, dependencies: [long], parameters: {handler: noop}}
    """)
    run_id = cluster.detach(m)
    wait_for(lambda: cluster.tasks(run_id)["long"]["state"] == "running", what="long to run")
    cluster.kill("dispatcher")
    cluster.procs["dispatcher"].wait(10)
    cluster.start_dispatcher(port=port)
    wait_for(lambda: cluster.run_status(run_id) == "rolled_back", timeout=30,
             what="the deadline to end the run")
    (run,) = cluster.query("SELECT created_at FROM runs")
    (hit,) = cluster.query("SELECT ts, data FROM events WHERE kind = 'run.deadline_exceeded'")
    assert 5.0 <= hit["ts"] - run["created_at"] < 8.0  # from the run's start, not the restart
    tasks = cluster.tasks(run_id)
    assert tasks["after"]["state"] == "skipped" and tasks["first"]["state"] == "rolled_back"
    assert tasks["long"]["error"] == "run deadline exceeded"
    assert tasks["long"]["state"] in ("failed", "skipped")  # adopted by then, or not yet


def test_deploy_json_watch_and_report_show_progress_and_checkpoints(
        cluster: Cluster, tmp_path: Path) -> None:
    cluster.start_dispatcher()
    cluster.start_worker("w1", slots=1)
    m = write_manifest(tmp_path, """
        name: shown
        version: "1"
        symbols:
          - {name: s, type: action, heartbeat_timeout: 2000,
             parameters: {handler: steps, steps: 4, ms: 600}}
    """)
    cp = cluster.deploy(m)
    assert cp.returncode == 0, cp.stderr
    events = ndjson(cp)
    kinds = [e.get("event") for e in events]
    assert "symbol.progress" in kinds and kinds.count("symbol.checkpointed") == 4
    last = [e for e in events if e.get("event") == "symbol.checkpointed"][-1]
    assert last["data"]["progress"] == 1.0 and last["data"]["message"] == "step 4 of 4"
    assert "checkpoint" not in last["data"]  # the data stays in the state DB
    run_id = events[-1]["summary"]["run_id"]
    plain = cluster.cli("watch", run_id, "--url", cluster.url, "--since", "0")
    assert "symbol.checkpointed" in plain.stdout and "100% step 4 of 4" in plain.stdout
    rep = cluster.cli("report", run_id, "--url", cluster.url, "--json")
    assert rep.returncode == 0, rep.stderr
    (s,) = [x for x in json.loads(rep.stdout)["symbols"] if x["name"] == "s"]
    assert s["progress"] == 1.0 and s["message"] == "step 4 of 4" and s["checkpoint_at"]
    text = cluster.cli("report", run_id, "--url", cluster.url)
    assert "checkpoints and progress" in text.stdout, text.stdout + text.stderr


def test_a_one_argument_handler_and_a_sync_handler_with_context_work() -> None:
    import asyncio

    from swarm.backends.internal import register, run_internal
    from swarm.backends.process import Invocation

    def sync_steps(params: dict[str, Any], ctx: Any) -> Any:
        kept = ctx.checkpoint({"at": ctx.attempt})
        ctx.progress(1.0, "done")
        return {"kept": kept, "resumed_from": ctx.resumed_from}

    register("sync_steps", sync_steps)
    register("one_arg", lambda params: {"got": params.get("x")})

    async def main() -> tuple[Any, Any]:
        reports: list[Report] = []

        def sink(r: Report) -> asyncio.Future[bool] | None:
            reports.append(r)
            if r.checkpoint is None:
                return None
            fut = asyncio.get_running_loop().create_future()
            fut.set_result(True)
            return fut

        inv = Invocation(run_id="r", task_id="r/s", symbol="s", type="action",
                         context="generic", dispatch="internal",
                         parameters={"handler": "sync_steps"}, attempt=2, timeout_ms=5000,
                         checkpoint={"at": 1}, reports=sink)
        a = await run_internal(inv, 5000)
        b = await run_internal(Invocation(
            run_id="r", task_id="r/t", symbol="t", type="action", context="generic",
            dispatch="internal", parameters={"handler": "one_arg", "x": 7}, attempt=1,
            timeout_ms=5000), 5000)
        assert [r.checkpoint for r in reports] == [{"at": 2}, None]
        return a.output, b.output

    a, b = asyncio.run(main())
    assert a == {"kept": True, "resumed_from": {"at": 1}} and b == {"got": 7}



def test_a_worker_that_outlives_the_dispatcher_resends_its_checkpoint_and_carries_on(
        cluster: Cluster, tmp_path: Path) -> None:
    port = free_port()
    cluster.start_dispatcher(port=port)
    cluster.start_worker("w1", slots=1)
    run_id = cluster.detach(steps_manifest(tmp_path, "internal"))
    wait_for(lambda: step_of(cluster, run_id) >= 3, timeout=30, what="step 3's checkpoint")
    cluster.kill("dispatcher")
    cluster.procs["dispatcher"].wait(10)
    cluster.start_dispatcher(port=port)  # the handler waits for its checkpoint meanwhile
    wait_for(lambda: cluster.run_status(run_id) == "completed", timeout=40, what="the run")
    assert output_of(cluster, run_id)["ran"] == list(range(1, 11))  # one attempt, adopted
    assert cluster.tasks(run_id)["s"]["attempts"] == 1
    steps = [json.loads(r["data"])["message"] for r in cluster.query(
        "SELECT data FROM events WHERE kind = 'symbol.checkpointed' ORDER BY seq")]
    # A checkpoint committed just before the crash may be committed again when the worker
    # sends it anew (it never heard it was kept): at least once, in order.
    assert sorted(set(steps), key=lambda m: int(m.split()[1])) == [
        f"step {i} of 10" for i in range(1, 11)]
    assert cluster.query("SELECT 1 FROM events WHERE kind = 'symbol.adopted'")
