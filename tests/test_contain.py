"""Nothing escapes (issue #20, item 3), with real dispatcher and worker processes on
127.0.0.1: a backend's grandchild that called setsid, or was double-forked, is gone after
the attempt's timeout, after `swarm cancel`, and after the worker is killed with SIGKILL,
under each containment mechanism (cgroup where this host allows it, and the subreaper
fallback, forced with SWARM_CONTAINMENT=subreaper)."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from backend_support import escaper, kill_if_alive, read_pid
from e2e_support import Cluster, pid_alive, wait_for, write_manifest

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]


@dataclass(frozen=True)
class Escape:
    cluster: Cluster
    folder: Path
    pidfile: Path
    mechanism: str
    where: str  # the worker's cgroup folder (cgroup), else ""

    def deploy(self, escape: str, timeout_ms: int) -> str:
        """Start a run of one symbol whose backend's grandchild escapes; its run id."""
        m = write_manifest(self.folder, f"""
            name: escape
            version: "1"
            symbols:
              - name: runaway
                type: action
                dispatch: rust_injector
                timeout: {timeout_ms}
                retries: 0
                parameters: {{pidfile: "{self.pidfile}", escape: {escape}}}
        """)
        return self.cluster.detach(m)

    def started(self) -> tuple[int, int]:
        """(backend, grandchild) pids once the grandchild runs."""
        wait_for(self.pidfile.exists, what="the escaped grandchild to start")
        return read_pid(Path(f"{self.pidfile}.leader")), read_pid(self.pidfile)

    def all_gone(self, *pids: int) -> None:
        for pid in pids:
            wait_for(lambda pid=pid: not pid_alive(pid), timeout=10,  # type: ignore[misc]
                     what=f"process {pid} to be gone")


@pytest.fixture(params=["cgroup", "subreaper"])
def escape(request: pytest.FixtureRequest, cluster: Cluster, tmp_path: Path
           ) -> Iterator[Escape]:
    tool = escaper(tmp_path / "escaper")
    config = cluster.write_config("escaper.toml", f"""
[worker.capabilities]
rust_injector = true
[backends.rust_injector]
enabled = true
binary_path = "{tool}"
""")
    cluster.start_dispatcher()
    env = {"SWARM_CONTAINMENT": "subreaper"} if request.param == "subreaper" else {}
    cluster.start_worker("w1", config, slots=1, extra_env=env)
    said = wait_for(lambda: re.search(r"containment: (\S+)(?: v2 per attempt under (\S+))?",
                                      cluster.log("w1")), what="the containment log line")
    mechanism = "cgroup" if said.group(1) == "cgroup" else "subreaper"
    if mechanism != request.param:
        pytest.skip(f"this host allows no cgroup v2 for the worker: {cluster.log('w1')}")
    pidfile = tmp_path / "grandchild.pid"
    try:
        yield Escape(cluster, tmp_path, pidfile, mechanism, said.group(2) or "")
    finally:
        kill_if_alive(pidfile, tool)


@pytest.mark.parametrize("how", ["setsid", "double"])
def test_an_escaped_grandchild_is_gone_after_the_attempts_timeout(
        escape: Escape, how: str) -> None:
    run_id = escape.deploy(how, timeout_ms=1500)
    backend, grandchild = escape.started()
    wait_for(lambda: escape.cluster.tasks(run_id)["runaway"]["state"] == "failed",
             timeout=30, what="the symbol to fail on its timeout")
    error = escape.cluster.query("SELECT error FROM attempts WHERE run_id = ?", (run_id,))
    assert [r["error"] for r in error] == ["timed out after 1500 ms"]
    escape.all_gone(backend, grandchild)


@pytest.mark.parametrize("how", ["setsid", "double"])
def test_an_escaped_grandchild_is_gone_after_swarm_cancel(escape: Escape, how: str) -> None:
    run_id = escape.deploy(how, timeout_ms=60_000)
    backend, grandchild = escape.started()
    cp = escape.cluster.cli("cancel", run_id, "--url", escape.cluster.url)
    assert cp.returncode == 0, cp.stdout + cp.stderr
    escape.all_gone(backend, grandchild)
    wait_for(lambda: escape.cluster.run_status(run_id) == "cancelled", what="the run to end")


@pytest.mark.parametrize("how", ["setsid", "double"])
def test_an_escaped_grandchild_is_gone_after_kill_9_of_the_worker(
        escape: Escape, how: str) -> None:
    escape.deploy(how, timeout_ms=60_000)
    backend, grandchild = escape.started()
    escape.cluster.kill("w1")
    escape.cluster.procs["w1"].wait(10)
    escape.all_gone(backend, grandchild)
    if escape.where:  # the watchdog removed the worker's cgroups too
        wait_for(lambda: not os.path.exists(escape.where), timeout=10,
                 what=f"{escape.where} to be removed")
