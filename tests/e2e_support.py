"""Real processes on 127.0.0.1 for end-to-end tests: a dispatcher, workers, CLI calls.

Everything started here is tracked by PID and ended when the cluster closes. Waiting
is always on a condition with a deadline.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

REPO = Path(__file__).resolve().parent.parent
T = TypeVar("T")


def wait_for(cond: Callable[[], T], timeout: float = 20.0, what: str = "condition",
             interval: float = 0.02) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie is dead for our purposes.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def swarm_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "swarm", *args]


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), e.get("PYTHONPATH")]))
    e.pop("SWARM_URL", None)
    e.pop("SWARM_TOKEN", None)
    return e


BASE_CONFIG = """
[coordinator]
heartbeat_interval = 200
heartbeat_timeout = 3000

[worker]
heartbeat_interval = 200
reconnect_initial_delay = 50
reconnect_max_delay = 500
shutdown_grace = 5000

[backends]
kill_grace = 300

[retry]
initial_delay = 50
max_delay = 200
jitter = 0.0
"""


class Cluster:
    """A dispatcher process and worker processes sharing one work folder."""

    def __init__(self, root: Path, config: str = "") -> None:
        self.root = root
        self.db = root / "state.db"
        self.config_path = root / "swarm-config.toml"
        self.config_path.write_text(BASE_CONFIG + config)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self._logs: list[Any] = []
        self.url = ""

    def edit_config(self, old: str, new: str) -> None:
        text = self.config_path.read_text()
        assert old in text, old
        self.config_path.write_text(text.replace(old, new))

    def detach(self, manifest: Path, *extra: str) -> str:
        """Deploy without following; the run id."""
        cp = self.cli("deploy", str(manifest), str(self.config_path), "--url", self.url,
                      "--detach", *extra)
        assert cp.returncode == 0, cp.stderr
        return cp.stdout.strip()

    def write_config(self, name: str, extra: str) -> Path:
        path = self.root / name
        path.write_text(BASE_CONFIG + extra)
        return path

    def _spawn(self, key: str, argv: list[str], extra_env: dict[str, str] | None = None
               ) -> subprocess.Popen[bytes]:
        log = open(self.root / f"{key}.log", "ab")  # noqa: SIM115 - closed in close()
        self._logs.append(log)
        e = env()
        e.update(extra_env or {})
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=e, cwd=self.root)
        self.procs[key] = proc
        return proc

    def start_dispatcher(self, extra_env: dict[str, str] | None = None, port: int = 0,
                         host: str = "127.0.0.1") -> str:
        ready = self.root / "dispatcher.url"
        ready.unlink(missing_ok=True)
        proc = self._spawn("dispatcher", swarm_argv(
            "start-dispatcher", str(self.config_path), "--host", host, "--port", str(port),
            "--db", str(self.db),
            "--ready-file", str(ready), "--log-level", "debug"), extra_env)

        def up() -> str:
            if proc.poll() is not None:
                raise AssertionError(
                    f"dispatcher exited {proc.returncode}: {self.log('dispatcher')}")
            return ready.read_text().strip() if ready.exists() else ""

        self.url = wait_for(up, what="the dispatcher to listen")
        return self.url

    def start_worker(self, name: str, config: Path | None = None, slots: int = 2,
                     wait: bool = True, extra_env: dict[str, str] | None = None,
                     prefix: tuple[str, ...] = ()) -> subprocess.Popen[bytes]:
        proc = self._spawn(name, [*prefix, *swarm_argv(
            "start-worker", str(config or self.config_path), name, "--url", self.url,
            "--slots", str(slots), "--log-level", "debug")], extra_env)
        if wait:
            wait_for(lambda: self.node_connected(name), what=f"worker {name} to join")
        return proc

    def log(self, key: str) -> str:
        path = self.root / f"{key}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def cli(self, *args: str, timeout: float = 60, extra_env: dict[str, str] | None = None
            ) -> subprocess.CompletedProcess[str]:
        e = env()
        e.update(extra_env or {})
        return subprocess.run(swarm_argv(*args), capture_output=True, text=True, env=e,
                              timeout=timeout, cwd=self.root, stdin=subprocess.DEVNULL)

    def deploy(self, manifest: str | Path, *extra: str, timeout: float = 60
               ) -> subprocess.CompletedProcess[str]:
        return self.cli("deploy", str(manifest), str(self.config_path), "--url", self.url,
                        "--json", *extra, timeout=timeout)

    def query(self, sql: str, params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
        if not self.db.exists():
            return []
        con = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=5)
        con.row_factory = sqlite3.Row
        try:
            return [dict(r) for r in con.execute(sql, params).fetchall()]
        except sqlite3.OperationalError:
            return []
        finally:
            con.close()

    def run_status(self, run_id: str) -> str:
        rows = self.query("SELECT status FROM runs WHERE run_id = ?", (run_id,))
        return str(rows[0]["status"]) if rows else ""

    def node_connected(self, name: str) -> bool:
        return bool(self.query("SELECT 1 FROM nodes WHERE name = ? AND status = 'connected'",
                               (name,)))

    def tasks(self, run_id: str | None = None) -> dict[str, dict[str, Any]]:
        rows = self.query("SELECT * FROM tasks" + (" WHERE run_id = ?" if run_id else ""),
                          (run_id,) if run_id else ())
        return {r["symbol"]: r for r in rows}

    def kill(self, key: str, sig: int = signal.SIGKILL) -> None:
        proc = self.procs[key]
        if proc.poll() is None:
            proc.send_signal(sig)

    def stop(self, key: str, timeout: float = 15) -> int:
        proc = self.procs[key]
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait()

    def close(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        for proc in self.procs.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for log in self._logs:
            log.close()


def write_manifest(folder: Path, text: str, name: str = "wf.yaml") -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(text))
    return path


def ndjson(cp: subprocess.CompletedProcess[str]) -> list[dict[str, Any]]:
    """Every line of a `--json` follower's output, each one JSON object."""
    try:
        return [json.loads(line) for line in cp.stdout.splitlines()]
    except json.JSONDecodeError:
        raise AssertionError(
            f"not NDJSON (exit {cp.returncode}):\n{cp.stdout}\n{cp.stderr}") from None


def result_json(cp: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    """The run record from the last line of a `--json` follower (`{"summary": ...}`)."""
    try:
        return json.loads(cp.stdout.splitlines()[-1])["summary"]  # type: ignore[no-any-return]
    except (json.JSONDecodeError, IndexError, KeyError):
        raise AssertionError(
            f"not JSON (exit {cp.returncode}):\n{cp.stdout}\n{cp.stderr}") from None


def delays_manifest(folder: Path, name: str, count: int, ms: int, extra: str = "") -> Path:
    """A manifest of `count` independent symbols that each sleep `ms` (internal `delay`),
    then the symbol lines of `extra`."""
    body = "".join(f"  - {{name: s{j}, type: action, parameters: {{handler: delay, ms: {ms}}}}}\n"
                   for j in range(count))
    return write_manifest(folder, f"name: {name}\nversion: \"1\"\nsymbols:\n{body}{extra}",
                          name=f"{name}.yaml")


def assert_no_losses(cluster: Cluster) -> None:
    """No attempt or worker was lost, and no symbol ran twice."""
    lost = cluster.query("SELECT kind, node FROM events WHERE kind IN"
                         " ('attempt.lost', 'node.lost')")
    assert lost == [], lost
    again = cluster.query("SELECT task_id, COUNT(*) AS n FROM attempts GROUP BY task_id"
                          " HAVING n > 1")
    assert again == [], again
