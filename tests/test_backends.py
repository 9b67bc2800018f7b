"""Backends against real subprocesses: argv, stdin, env, capture, kills, health, internal."""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.metadata
import json
import os
import subprocess
import sys
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from backend_support import (
    PHP_ENGINE,
    PS_ENGINE,
    REPO,
    backends_config,
    escaper,
    fake_pwsh,  # noqa: F401 - fixture
    kill_if_alive,
    php_bin,  # noqa: F401 - fixture
    python_script,
    read_pid,
    rust_injector_bin,  # noqa: F401 - fixture
)

import swarm.backends as backends_mod
from swarm.backends import (
    Backends,
    Containment,
    HandlerFailure,
    Invocation,
    Outcome,
    contain,
    internal,
)
from swarm.model import DISPATCHES

NO_SUBPROCESS = {"rust_injector": False, "php_engine": False, "powershell_engine": False}

# Prints what it was run with: argv, stdin and every SWARM_* variable.
RECORDER = """\
import json, os, sys
stdin = sys.stdin.buffer.read().decode("utf-8")
env = {k: v for k, v in os.environ.items() if k.startswith("SWARM_")}
print(json.dumps({"argv": sys.argv, "stdin": stdin, "env": env}))
"""

# Leader starts a grandchild that ignores SIGTERM and holds stdout, then sleeps.
GROUP = """\
import os, subprocess, sys, time
ready, pids, leader_exits = {ready!r}, {pids!r}, {leader_exits!r}
grandchild = ("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
              "open(" + repr(ready) + ", 'w').close(); time.sleep(60)")
child = subprocess.Popen([sys.executable, "-c", grandchild])
deadline = time.monotonic() + 10
while not os.path.exists(ready) and time.monotonic() < deadline:
    time.sleep(0.005)
with open(pids + ".tmp", "w") as f:
    f.write(str(os.getpid()) + " " + str(child.pid))
os.rename(pids + ".tmp", pids)  # whole or absent: the test polls for it
if leader_exits:
    print('{{"leader": "done"}}')
    sys.exit(0)
time.sleep(60)
"""


def make_inv(**kw: Any) -> Invocation:
    base: dict[str, Any] = dict(
        run_id="run-1", task_id="task-7", symbol="process_data", type="transform",
        context="database", dispatch="rust_injector", parameters={"table": "wp_posts"},
        attempt=2, timeout_ms=20_000,
    )  # fmt: skip
    base.update(kw)
    return Invocation(**base)


async def ready_backends(**kw: Any) -> Backends:
    b = Backends.from_config(backends_config(**kw))
    await b.check()
    return b


def script(tmp_path: Path, body: str, name: str = "tool") -> Path:
    """A fake backend binary that also answers --version (for the health check)."""
    head = 'import sys\nif "--version" in sys.argv:\n    print("tool 1.0"); sys.exit(0)\n'
    return python_script(tmp_path / name, head + body)


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    except OSError:  # no /proc: ask the kernel (zombies count as alive there)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    return state not in ("Z", "X")  # a zombie nobody reaped yet is dead already


async def wait_until(cond: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


@pytest.fixture(autouse=True)
def isolated_handlers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(internal, "_HANDLERS", dict(internal._HANDLERS))


# --- the command line, stdin and environment ---------------------------------------------


def test_invocation_document_carries_the_whole_task() -> None:
    doc = make_inv().document()
    assert doc == {
        "run_id": "run-1", "task_id": "task-7", "symbol": "process_data",
        "type": "transform", "context": "database", "dispatch": "rust_injector",
        "parameters": {"table": "wp_posts"}, "attempt": 2, "timeout": 20_000,
        "checkpoint": None,
    }  # fmt: skip


async def test_rust_injector_argv_stdin_and_env_are_exact(tmp_path: Path) -> None:
    rec = python_script(tmp_path / "injector", RECORDER)
    b = await ready_backends(rust=rec)
    inv = make_inv()
    out = await b.run(inv)
    assert out.ok, out
    assert out.output["argv"] == [
        str(rec), "--symbol", "process_data", "--type", "transform", "--context", "database",
        "--params", '{"table": "wp_posts"}',
    ]  # fmt: skip
    assert json.loads(out.output["stdin"]) == inv.document()
    assert out.output["env"] == {
        "SWARM_RUN_ID": "run-1", "SWARM_TASK_ID": "task-7", "SWARM_SYMBOL": "process_data",
        "SWARM_ATTEMPT": "2",
    }  # fmt: skip


async def test_php_engine_argv_is_exact(tmp_path: Path) -> None:
    rec = python_script(tmp_path / "php", RECORDER)
    b = await ready_backends(php=rec)
    out = await b.run(make_inv(dispatch="php_engine", parameters={"operation": "init"}))
    assert out.ok, out
    assert out.output["argv"] == [
        str(rec), str(PHP_ENGINE), "--symbol", "process_data", "--type", "transform",
        "--context", "database", "--params", '{"operation": "init"}',
    ]  # fmt: skip


async def test_powershell_argv_via_standin_pwsh_records_exact_argv(
    tmp_path: Path, fake_pwsh: Path, monkeypatch: pytest.MonkeyPatch  # noqa: F811
) -> None:
    log = tmp_path / "pwsh.jsonl"
    monkeypatch.setenv("FAKE_PWSH_LOG", str(log))
    b = await ready_backends(pwsh=fake_pwsh)
    assert "powershell_engine" in b.available
    inv = make_inv(dispatch="powershell_engine", parameters={"operation": "restore", "n": 1})
    out = await b.run(inv)
    assert out.ok, out
    (record,) = [json.loads(line) for line in log.read_text().splitlines()]
    assert record["argv"] == [
        str(fake_pwsh), "-NoProfile", "-NonInteractive", "-File", str(PS_ENGINE),
        "-SymbolName", "process_data", "-SymbolType", "transform", "-Context", "database",
        "-Parameters", '{"operation": "restore", "n": 1}',
    ]  # fmt: skip
    assert json.loads(record["stdin"]) == inv.document()
    assert record["env"]["SWARM_TASK_ID"] == "task-7"
    assert out.output["symbol"] == "process_data"
    assert out.output["operation"] == "restore"
    assert out.output["params"] == {"operation": "restore", "n": 1}


async def test_shell_metacharacters_arrive_literally(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    params = {
        "cmd": f"$(touch {marker}); `touch {marker}` | touch {marker} && echo x > {marker}",
        "quotes": "it's \"quoted\" \\ back\\slash",
        "glob": "* ? [a-z] ~ $HOME %PATH% !!",
        "lines": "one\ntwo\r\n\tthree",
        "unicode": "é ✓ 🚀",
    }
    rec = python_script(tmp_path / "injector", RECORDER)
    b = await ready_backends(rust=rec, php=rec)
    for dispatch in ("rust_injector", "php_engine"):
        out = await b.run(make_inv(dispatch=dispatch, parameters=params))
        assert out.ok, out
        assert json.loads(out.output["argv"][-1]) == params
        assert json.loads(out.output["stdin"])["parameters"] == params
    assert not marker.exists()


async def test_worker_environment_is_passed_through(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SWARM_FROM_WORKER", "yes")
    b = await ready_backends(rust=python_script(tmp_path / "injector", RECORDER))
    out = await b.run(make_inv())
    assert out.output["env"]["SWARM_FROM_WORKER"] == "yes"


# --- the example backends ----------------------------------------------------------------


async def test_rust_injector_example_honours_the_contract(rust_injector_bin: Path) -> None:  # noqa: F811
    b = await ready_backends(rust=rust_injector_bin)
    assert b.versions["rust_injector"].startswith("wp-injector ")
    params = {"table": "wp_posts", "filter": "status = 'publish'", "nested": {"a": [1, None]}}
    inv = make_inv(parameters=params)
    out = await b.run(inv)
    assert out.ok, out
    o = out.output
    assert (o["symbol"], o["type"], o["context"]) == ("process_data", "transform", "database")
    assert o["params"] == params
    assert o["env"]["SWARM_ATTEMPT"] == "2" and o["env"]["SWARM_RUN_ID"] == "run-1"
    assert o["task_id"] == "task-7" and o["attempt"] == 2
    assert o["stdin_bytes"] == len(json.dumps(inv.document()).encode())


async def test_rust_injector_example_failure_not_retryable(rust_injector_bin: Path) -> None:  # noqa: F811
    b = await ready_backends(rust=rust_injector_bin)
    params = {"fail": True, "retryable": False, "message": "table locked"}
    out = await b.run(make_inv(parameters=params))
    assert not out.ok and not out.retryable and out.exit_code == 1
    assert out.error == "exit code 1: wp-injector: table locked"
    assert out.output["error"] == "table locked"


async def test_php_engine_example_honours_the_contract(php_bin: Path) -> None:  # noqa: F811
    b = await ready_backends(php=php_bin)
    assert b.available == DISPATCHES
    inv = make_inv(dispatch="php_engine", context="wordpress", parameters={"operation": "init"})
    out = await b.run(inv)
    assert out.ok, out
    o = out.output
    assert o["operation"] == "init" and o["result"]["initialized"] is True
    assert (o["symbol"], o["type"], o["context"]) == ("process_data", "transform", "wordpress")
    assert o["env"] == make_inv().environment()
    assert o["stdin_document"] == inv.document()
    assert o["pid"] > 0


async def test_php_engine_example_failures(php_bin: Path) -> None:  # noqa: F811
    b = await ready_backends(php=php_bin)
    out = await b.run(make_inv(dispatch="php_engine", parameters={"fail": True}))
    assert not out.ok and out.retryable and out.exit_code == 1
    assert out.error == "exit code 1: engine.php: failed on purpose"
    params = {"fail": True, "retryable": False, "message": "no such site"}
    out = await b.run(make_inv(dispatch="php_engine", parameters=params))
    assert not out.ok and not out.retryable
    expected = {"ok": False, "error": "no such site", "retryable": False}
    assert out.output == {**expected, "symbol": "process_data"}


# --- what a backend prints, and how it ends ----------------------------------------------


@pytest.mark.parametrize(
    ("printed", "expected"),
    [
        ('print("  hello world  ")', "hello world"),
        ('print(\'{"rows": [1, 2]}\')', {"rows": [1, 2]}),
        ("print('  42 ')", 42),
        ("pass", ""),
        ("sys.stdout.buffer.write(b'caf\\xe9')", "caf\ufffd"),
    ],
)
async def test_stdout_is_json_when_json_else_trimmed_text(
    tmp_path: Path, printed: str, expected: Any
) -> None:
    b = await ready_backends(rust=script(tmp_path, printed))
    out = await b.run(make_inv())
    assert out.ok and out.output == expected and out.exit_code == 0


async def test_nonzero_exit_fails_retryably_naming_the_last_stderr_line(tmp_path: Path) -> None:
    body = "sys.stderr.write('warming up\\ndisk full\\n\\n'); sys.exit(3)"
    b = await ready_backends(rust=script(tmp_path, body))
    out = await b.run(make_inv())
    assert (out.ok, out.retryable, out.exit_code) == (False, True, 3)
    assert out.error == "exit code 3: disk full"
    assert out.stderr == "warming up\ndisk full\n\n"


async def test_json_retryable_false_stops_retries(tmp_path: Path) -> None:
    body = "print('{\"ok\": false, \"error\": \"bad input\", \"retryable\": false}'); sys.exit(1)"
    b = await ready_backends(rust=script(tmp_path, body))
    out = await b.run(make_inv())
    assert (out.ok, out.retryable) == (False, False)
    assert out.error == "exit code 1: bad input"


async def test_killed_by_signal_is_a_failure(tmp_path: Path) -> None:
    b = await ready_backends(rust=script(tmp_path, "import os, signal\nos.kill(os.getpid(), 9)"))
    out = await b.run(make_inv())
    assert not out.ok and out.exit_code == -9 and out.error == "killed by signal SIGKILL"


async def test_backend_that_never_reads_stdin_is_fine(tmp_path: Path) -> None:
    # ~100 KB of parameters: more than a pipe buffer, still under the kernel's argv limit.
    b = await ready_backends(rust=script(tmp_path, "print('ok')"))
    out = await b.run(make_inv(parameters={"blob": "x" * 100_000}))
    assert out.ok and out.output == "ok"


async def test_output_cap_drops_the_excess_of_50_mb_without_holding_it(tmp_path: Path) -> None:
    body = "sys.stdout.buffer.write(b'o' * 50_000_000); sys.stderr.buffer.write(b'e' * 5_000_000)"
    b = await ready_backends(rust=script(tmp_path, body), output_cap=64 * 1024)
    tracemalloc.start()
    try:
        out = await b.run(make_inv())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert out.ok, out.error
    assert out.stdout_truncated and out.output == "o" * 65536
    assert out.stderr_truncated and out.stderr == "e" * 65536
    assert peak < 8_000_000


async def test_parameters_that_are_not_json_fail_without_running(tmp_path: Path) -> None:
    b = await ready_backends(rust=script(tmp_path, "print('ran')"))
    out = await b.run(make_inv(parameters={"when": object()}))
    assert not out.ok and not out.retryable and "not JSON" in out.error


async def test_parameters_too_long_for_argv_fail_without_retry(tmp_path: Path) -> None:
    b = await ready_backends(rust=script(tmp_path, "print('ran')"))
    out = await b.run(make_inv(parameters={"blob": "x" * 200_000}))  # > MAX_ARG_STRLEN
    assert (out.ok, out.retryable) == (False, False)
    assert out.error.startswith("cannot start ") and "too long" in out.error


# --- timeouts, cancellation and the process group ----------------------------------------


def group_script(tmp_path: Path, leader_exits: bool = False) -> tuple[Path, Path]:
    pids = tmp_path / "pids"
    body = GROUP.format(ready=str(tmp_path / "ready"), pids=str(pids), leader_exits=leader_exits)
    return script(tmp_path, body, "group"), pids


def read_pids(pids: Path) -> list[int]:
    return [int(p) for p in pids.read_text().split()]


async def test_timeout_kills_the_whole_group_even_a_grandchild_ignoring_sigterm(
    tmp_path: Path,
) -> None:
    tool, pids = group_script(tmp_path)
    b = await ready_backends(rust=tool, kill_grace=300)
    started = time.monotonic()
    out = await b.run(make_inv(timeout_ms=1500))
    assert (out.ok, out.timed_out, out.retryable) == (False, True, True)
    assert out.error == "timed out after 1500 ms"
    assert time.monotonic() - started < 10
    leader, grandchild = read_pids(pids)
    await wait_until(lambda: not pid_alive(leader), "the leader to die")
    await wait_until(lambda: not pid_alive(grandchild), "the grandchild to die")


async def test_timeout_is_the_smaller_of_symbol_and_backend_timeout(tmp_path: Path) -> None:
    b = await ready_backends(rust=script(tmp_path, "import time\ntime.sleep(30)"), timeout=300)
    out = await b.run(make_inv(timeout_ms=20_000))
    assert out.timed_out and out.error == "timed out after 300 ms"
    b = await ready_backends(rust=script(tmp_path, "import time\ntime.sleep(30)"))
    out = await b.run(make_inv(timeout_ms=200))
    assert out.timed_out and out.error == "timed out after 200 ms"


async def test_grandchild_left_behind_after_success_is_killed(tmp_path: Path) -> None:
    tool, pids = group_script(tmp_path, leader_exits=True)
    b = await ready_backends(rust=tool)
    started = time.monotonic()
    out = await b.run(make_inv())
    assert out.ok and out.output == {"leader": "done"}
    assert time.monotonic() - started < 10  # the grandchild's open stdout did not hang us
    _, grandchild = read_pids(pids)
    await wait_until(lambda: not pid_alive(grandchild), "the orphaned grandchild to die")


async def test_cancel_kills_the_process_group_and_propagates(tmp_path: Path) -> None:
    tool, pids = group_script(tmp_path)
    b = await ready_backends(rust=tool, kill_grace=300)
    task = asyncio.create_task(b.run(make_inv()))
    await wait_until(pids.exists, "the backend to start its grandchild")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    leader, grandchild = read_pids(pids)
    await wait_until(lambda: not pid_alive(leader), "the leader to die")
    await wait_until(lambda: not pid_alive(grandchild), "the grandchild to die")


# --- containment: what leaves the group (setsid, double fork) dies with the attempt -------


@pytest.fixture(params=["cgroup", "subreaper"])
def contained(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ContainedCase]:
    """Backends running ESCAPER under each containment mechanism (cgroup: if the host
    allows one here), closed after the test; the escaped grandchild killed if it lives."""
    tool = escaper(tmp_path / "escaper")
    b = Backends.from_config(backends_config(rust=tool, kill_grace=300))
    info = b.contain(None if request.param == "cgroup" else "subreaper")
    try:
        if info.mechanism != request.param:
            pytest.skip(f"no cgroup v2 here: {info.why}")
        yield ContainedCase(b, info, tmp_path / "grandchild.pid")
    finally:
        b.close()
        kill_if_alive(tmp_path / "grandchild.pid", tool)


@dataclasses.dataclass(frozen=True)
class ContainedCase:
    backends: Backends
    info: Containment
    pidfile: Path

    def inv(self, escape: str, leader: str = "stay", timeout_ms: int = 20_000) -> Invocation:
        params = {"pidfile": str(self.pidfile), "escape": escape, "leader": leader}
        return make_inv(parameters=params, timeout_ms=timeout_ms)

    async def grandchild_gone(self) -> None:
        grandchild = read_pid(self.pidfile)
        await wait_until(lambda: not pid_alive(grandchild), "the escaped grandchild to die")


@pytest.mark.parametrize("escape", ["setsid", "double"])
async def test_timeout_kills_a_grandchild_that_left_the_group(
    contained: ContainedCase, escape: str
) -> None:
    await contained.backends.check()
    out = await contained.backends.run(contained.inv(escape, timeout_ms=1500))
    assert out.timed_out and out.error == "timed out after 1500 ms"
    await contained.grandchild_gone()


@pytest.mark.parametrize("escape", ["setsid", "double"])
async def test_cancel_kills_a_grandchild_that_left_the_group(
    contained: ContainedCase, escape: str
) -> None:
    await contained.backends.check()
    task = asyncio.create_task(contained.backends.run(contained.inv(escape)))
    await wait_until(contained.pidfile.exists, "the grandchild to start")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await contained.grandchild_gone()


async def test_success_kills_the_grandchild_and_empties_the_attempt_cgroup(
    contained: ContainedCase,
) -> None:
    await contained.backends.check()
    started = time.monotonic()
    out = await contained.backends.run(contained.inv("setsid", leader="exit"))
    assert out.ok and out.output == {"leader": "done"}
    assert time.monotonic() - started < 5  # its open stdout did not keep us waiting
    await contained.grandchild_gone()
    if contained.info.mechanism == "cgroup":  # kept, empty, for the next attempt
        where = contained.info.where
        await wait_until(lambda: not contain._cgroup_pids(where), "the cgroups to be empty")
        out = await contained.backends.run(make_inv(parameters={
            "pidfile": str(contained.pidfile) + "2", "escape": "double", "leader": "exit"}))
        assert out.ok
        await wait_until(lambda: not contain._cgroup_pids(where), "the cgroups to be empty")
        assert os.listdir(where).count("1") == 1 and "2" not in os.listdir(where)


def test_the_backend_runs_in_an_attempt_cgroup_and_the_worker_does_not(
    tmp_path: Path,
) -> None:
    async def main() -> tuple[str, str, str]:
        tool = python_script(tmp_path / "where", 'import sys\nif "--version" in sys.argv:'
                             '\n    print(1); sys.exit(0)\nprint(open("/proc/self/cgroup")'
                             '.read().strip())')
        b = Backends.from_config(backends_config(rust=tool))
        info = b.contain()
        try:
            if info.mechanism != "cgroup":
                pytest.skip(f"no cgroup v2 here: {info.why}")
            await b.check()
            out = await b.run(make_inv())
            with open("/proc/self/cgroup") as f:
                mine = f.read()
            return str(out.output), mine, info.where
        finally:
            b.close()

    theirs, mine, where = asyncio.run(main())
    line = next(ln for ln in theirs.splitlines() if ln.startswith("0::"))
    assert where.endswith(line[3:].rsplit("/", 1)[0])  # <worker's cgroup>/swarm-<key>/<n>
    assert "swarm-" not in mine  # the worker came back to its own cgroup
    assert not os.path.exists(where)  # close() removed the worker's cgroup folder


async def test_two_workers_in_one_process_are_contained_apart(tmp_path: Path) -> None:
    # `swarm run` holds its local workers in one process: one's exit must not end another's.
    first = Backends.from_config(backends_config(rust=escaper(tmp_path / "escaper")))
    second = Backends.from_config(backends_config(rust=tmp_path / "escaper"))
    try:
        a, b = first.contain(), second.contain()
        if a.mechanism != "cgroup":
            pytest.skip(f"no cgroup v2 here: {a.why}")
        assert b.mechanism == "cgroup" and a.where != b.where
        first.close()
        assert not os.path.exists(a.where) and os.path.isdir(b.where)
        await second.check()
        pidfile = tmp_path / "grandchild.pid"
        params = {"pidfile": str(pidfile), "escape": "setsid", "leader": "exit"}
        assert (await second.run(make_inv(parameters=params))).ok
        grandchild = read_pid(pidfile)
        await wait_until(lambda: not pid_alive(grandchild), "the grandchild to die")
    finally:
        first.close()
        second.close()
        kill_if_alive(tmp_path / "grandchild.pid", tmp_path / "escaper")


@pytest.mark.parametrize("mode", ["auto", "subreaper"])
async def test_a_spawn_that_begins_after_its_attempt_was_released_does_not_start(
    tmp_path: Path, mode: str
) -> None:
    # Cancelled between scheduling the spawn task and its first step: nothing may start.
    containers = contain.start(mode)
    try:
        cage = containers.cage()
        marker = tmp_path / "started"
        start = asyncio.get_running_loop().subprocess_exec(
            asyncio.SubprocessProtocol, sys.executable, "-c",
            f"open({str(marker)!r}, 'w').close()")
        spawn = asyncio.ensure_future(cage.spawn(start))
        cage.release()
        with pytest.raises(OSError, match="ended before its backend started"):
            await spawn
        assert not marker.exists()
    finally:
        containers.close()


async def test_leftover_cgroups_of_dead_workers_are_removed_at_start(tmp_path: Path) -> None:
    probe = Backends.from_config(backends_config())
    info = probe.contain()
    probe.close()
    if info.mechanism != "cgroup":
        pytest.skip(f"no cgroup v2 here: {info.why}")
    own, _ = contain.own_cgroup_dir()
    dead = os.path.join(own, "swarm-999999999-1")  # no such pid: a worker long gone
    sleeper = await asyncio.create_subprocess_exec(sys.executable, "-c", "import time; "
                                                   "time.sleep(60)")
    try:
        os.makedirs(os.path.join(dead, "7"))
        with open(os.path.join(dead, "7", "cgroup.procs"), "w") as f:
            f.write(str(sleeper.pid))
        b = Backends.from_config(backends_config())
        b.contain()
        b.close()
        assert not os.path.exists(dead)
        assert await asyncio.wait_for(sleeper.wait(), 10) == -9
    finally:
        if sleeper.returncode is None:
            sleeper.kill()
            await sleeper.wait()
        contain.remove_cgroup_tree(dead, 5)


@pytest.mark.parametrize("mode", ["cgroup", "subreaper"])
def test_kill_9_of_the_process_running_backends_kills_their_escaped_grandchildren(
    tmp_path: Path, mode: str
) -> None:
    """The watchdog: a host process killed with SIGKILL still leaves nothing behind."""
    tool = escaper(tmp_path / "escaper")
    pidfile = tmp_path / "grandchild.pid"
    host = python_script(tmp_path / "host", f"""\
import asyncio, sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from backend_support import backends_config
from swarm.backends import Backends, Invocation
async def main():
    b = Backends.from_config(backends_config(rust={str(tool)!r}))
    info = b.contain({None if mode == "cgroup" else "subreaper"!r})
    print(info.mechanism, flush=True)
    await b.check()
    params = {{"pidfile": {str(pidfile)!r}, "escape": "setsid"}}
    await b.run(Invocation("r", "t", "s", "action", "generic", "rust_injector", params, 1, 0))
asyncio.run(main())
""")
    proc = subprocess.Popen([str(host)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert proc.stdout is not None
        mechanism = proc.stdout.readline().strip()
        if mechanism != mode:
            pytest.skip(f"no cgroup v2 here (got {mechanism!r})")
        sync_wait(pidfile.exists, "the grandchild to start")
        grandchild = read_pid(pidfile)
        proc.kill()
        proc.wait(10)
        sync_wait(lambda: not pid_alive(grandchild), "the escaped grandchild to die")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
        kill_if_alive(pidfile, tool)


def sync_wait(cond: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def test_containment_is_described_for_the_startup_log() -> None:
    cg = Containment("cgroup", "/sys/fs/cgroup/x/swarm-1-2", "cgroup.kill", "")
    assert cg.describe() == ("cgroup v2 per attempt under /sys/fs/cgroup/x/swarm-1-2 "
                             "(ended with cgroup.kill)")
    fb = Containment("subreaper", "", "", "cannot create a cgroup in /sys/fs/cgroup/x")
    assert fb.describe().startswith("subreaper + SWARM_CONTAIN environment tag (no cgroup v2:")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cg.mechanism = "subreaper"  # type: ignore[misc]


# --- health checks -----------------------------------------------------------------------


async def test_health_check_passes_for_the_example_backends(
    rust_injector_bin: Path, php_bin: Path, fake_pwsh: Path  # noqa: F811
) -> None:
    b = Backends.from_config(backends_config(rust=rust_injector_bin, php="php", pwsh=fake_pwsh))
    assert b.available == ()
    assert await b.check() == dict.fromkeys(DISPATCHES)
    assert b.available == DISPATCHES


async def test_health_check_reports_why_a_backend_is_unusable(tmp_path: Path) -> None:
    not_exec = tmp_path / "not-exec"
    not_exec.write_text("#!/bin/sh\n")
    config = backends_config(
        rust=tmp_path / "missing-injector", php="php-that-does-not-exist", pwsh=not_exec
    )
    b = Backends.from_config(config)
    reasons = await b.check()
    assert reasons["rust_injector"] == (
        f"[backends.rust_injector] binary_path: '{tmp_path}/missing-injector' not found"
    )
    assert reasons["php_engine"] == (
        "[backends.php_engine] php_binary: 'php-that-does-not-exist' not found on PATH"
    )
    assert reasons["powershell_engine"] == (
        f"[backends.powershell_engine] pwsh_binary: '{not_exec}' is not executable"
    )
    assert reasons["internal"] is None
    assert b.available == ("internal",)


async def test_health_check_disabled_capability_off_and_script_missing(
    tmp_path: Path, fake_pwsh: Path  # noqa: F811
) -> None:
    tool = script(tmp_path, "print('x')")
    config = backends_config(
        rust=tool,
        php=tool,
        php_script=tmp_path / "gone.php",
        pwsh=fake_pwsh,
        enabled={"rust_injector": False},
        capabilities={"powershell_engine": False, "internal": False},
    )
    b = Backends.from_config(config)
    reasons = await b.check()
    assert reasons == {
        "rust_injector": "disabled in [backends.rust_injector]",
        "php_engine": f"[backends.php_engine] script_path: script file "
        f"'{tmp_path}/gone.php' not found",
        "powershell_engine": "not enabled in [worker.capabilities]",
        "internal": "disabled in [worker.capabilities]",
    }
    assert b.available == ()
    out = await b.run(make_inv(dispatch="internal", parameters={}, symbol="noop"))
    assert (out.ok, out.retryable) == (False, False)
    assert out.error == (
        "backend internal is not available on this worker: disabled in [worker.capabilities]"
    )


async def test_health_check_fails_when_version_fails_or_hangs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(backends_mod, "CHECK_TIMEOUT_MS", 300)
    broken = python_script(tmp_path / "broken", "import sys\nsys.exit('broken install')")
    hangs = python_script(tmp_path / "hangs", "import time\ntime.sleep(60)")
    config = backends_config(rust=broken, php=hangs, enabled={"powershell_engine": False})
    b = Backends.from_config(config)
    reasons = await b.check()
    assert reasons["rust_injector"] == f"`{broken} --version` failed: exit code 1: broken install"
    assert reasons["php_engine"] == f"`{hangs} --version` failed: timed out after 300 ms"
    assert b.available == ("internal",)


async def test_relative_paths_resolve_against_the_config_folder(tmp_path: Path) -> None:
    (tmp_path / "bin").mkdir()
    script(tmp_path / "bin", "print('relative')")
    b = await ready_backends(rust="bin/tool", base_dir=tmp_path)
    assert "rust_injector" in b.available
    assert (await b.run(make_inv())).output == "relative"


async def test_run_refuses_unavailable_or_unknown_dispatch(tmp_path: Path) -> None:
    b = Backends.from_config(backends_config(enabled=NO_SUBPROCESS))
    out = await b.run(make_inv(dispatch="internal", symbol="noop"))
    assert not out.ok and not out.retryable and "health check has not run" in out.error
    await b.check()
    out = await b.run(make_inv(dispatch="php_engine"))
    why = "backend php_engine is not available on this worker: disabled in [backends.php_engine]"
    assert out == Outcome(ok=False, output="", retryable=False, error=why)
    out = await b.run(make_inv(dispatch="bash"))
    assert not out.ok and not out.retryable and out.error == "unknown dispatch 'bash'"


# --- internal handlers -------------------------------------------------------------------


async def run_internal(symbol: str, params: dict[str, Any], **kw: Any) -> Outcome:
    b = await ready_backends(enabled=NO_SUBPROCESS)
    assert b.available == ("internal",)
    return await b.run(make_inv(dispatch="internal", symbol=symbol, parameters=params, **kw))


async def test_internal_builtins_noop_echo_delay() -> None:
    out = await run_internal("noop", {})
    assert out.ok and out.output is None
    out = await run_internal("anything", {"handler": "echo", "a": [1, {"b": None}]})
    assert out.ok and out.output == {"a": [1, {"b": None}]}
    out = await run_internal("wait", {"handler": "delay", "ms": 20})
    assert out.ok and out.output == {"slept_ms": 20} and out.duration_ms >= 20


async def test_internal_fail_is_retryable_unless_told_otherwise() -> None:
    out = await run_internal("fail", {})
    assert (out.ok, out.retryable, out.error) == (False, True, "failed on purpose")
    out = await run_internal("drill", {"handler": "fail", "message": "no", "retryable": False})
    assert (out.ok, out.retryable, out.error) == (False, False, "no")


async def test_internal_fail_succeeds_from_the_given_attempt() -> None:
    params = {"handler": "fail", "succeed_on_attempt": 3}
    assert not (await run_internal("flaky", params, attempt=2)).ok
    out = await run_internal("flaky", params, attempt=3)
    assert out.ok and out.output == {"attempt": 3}


async def test_internal_sync_handler_runs_in_a_thread_and_async_handler_awaited() -> None:
    loop_thread = threading.get_ident()

    @internal.handler("where")
    def where(params: dict[str, Any], inv: Invocation) -> dict[str, Any]:
        return {"thread": threading.get_ident(), "attempt": inv.attempt, **params}

    async def resize(params: dict[str, Any], inv: Invocation) -> str:
        await asyncio.sleep(0)
        return f"resized {params['w']}"

    backends_mod.register("resize", resize)
    assert {"where", "resize", "noop"} <= set(backends_mod.registered())
    out = await run_internal("where", {"x": 1})
    assert out.ok and out.output["thread"] != loop_thread and out.output["x"] == 1
    out = await run_internal("thumb", {"handler": "resize", "w": 64})
    assert out.ok and out.output == "resized 64"


async def test_internal_handler_cannot_change_the_invocation() -> None:
    internal.register("mutate", lambda params, inv: params.setdefault("added", 1))
    inv = make_inv(dispatch="internal", symbol="mutate", parameters={"a": {}})
    b = await ready_backends(enabled=NO_SUBPROCESS)
    assert (await b.run(inv)).ok
    assert inv.parameters == {"a": {}}


async def test_internal_unknown_handler_is_not_retryable() -> None:
    out = await run_internal("nope", {})
    assert (out.ok, out.retryable) == (False, False)
    # Other tests may have registered handlers of their own in this process.
    assert out.error.startswith("unknown internal handler 'nope' (known: ")
    assert all(name in out.error for name in ("delay", "echo", "fail", "noop"))


async def test_internal_timeout_and_errors() -> None:
    out = await run_internal("slow", {"handler": "delay", "ms": 5000}, timeout_ms=50)
    assert (out.ok, out.timed_out, out.retryable) == (False, True, True)
    assert out.error == "timed out after 50 ms"

    def boom(params: dict[str, Any], inv: Invocation) -> None:
        raise KeyError("missing")

    async def own_timeout(params: dict[str, Any], inv: Invocation) -> None:
        raise TimeoutError

    internal.register("boom", boom)
    internal.register("own_timeout", own_timeout)
    internal.register("not_json", lambda params, inv: {1, 2})
    out = await run_internal("boom", {})
    assert (out.ok, out.retryable, out.error) == (False, True, "KeyError: 'missing'")
    out = await run_internal("own_timeout", {})
    assert not out.ok and not out.timed_out
    out = await run_internal("not_json", {})
    assert not out.ok and not out.retryable and "not JSON" in out.error
    with pytest.raises(HandlerFailure) as e:
        await internal._fail({"retryable": False}, make_inv())
    assert e.value.retryable is False


async def test_internal_entry_points_load_and_broken_ones_are_skipped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "swarm_test_plugin.py").write_text(
        "def shout(params, inv):\n    return params['text'].upper()\nNOT_A_HANDLER = 3\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    eps = [
        importlib.metadata.EntryPoint("shout", "swarm_test_plugin:shout", "swarm.handlers"),
        importlib.metadata.EntryPoint("gone", "swarm_no_such_module:x", "swarm.handlers"),
        importlib.metadata.EntryPoint("three", "swarm_test_plugin:NOT_A_HANDLER", "swarm.handlers"),
    ]

    def fake_entry_points(**kw: Any) -> list[importlib.metadata.EntryPoint]:
        assert kw == {"group": "swarm.handlers"}
        return eps

    monkeypatch.setattr(importlib.metadata, "entry_points", fake_entry_points)
    monkeypatch.delitem(sys.modules, "swarm_test_plugin", raising=False)
    assert backends_mod.load_entry_points() == ["shout"]
    assert "gone" in caplog.text and "three" in caplog.text
    out = await run_internal("shout", {"text": "hi"})
    assert out.ok and out.output == "HI"


def test_outcome_and_invocation_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        make_inv().attempt = 3  # type: ignore[misc]


async def test_sync_handlers_run_on_daemon_threads_so_a_stuck_one_cannot_block_exit() -> None:
    import threading

    from swarm.backends.internal import _in_daemon_thread

    release = threading.Event()

    def stuck() -> str:
        release.wait(30)
        return "done"

    fut = _in_daemon_thread(stuck)
    (thread,) = [t for t in threading.enumerate() if t.name == "handler-stuck"]
    assert thread.daemon
    release.set()
    assert await fut == "done"
