"""Users of the original WP Praxis swarm switch without editing a file (issue #12, #21):
its configs and manifests (tests/original/, byte-for-byte copies) run through the
original's CLI forms, and each documented key does what the original says."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from e2e_support import Cluster, env, wait_for, write_manifest
from websockets.asyncio.client import connect

import swarm
from swarm.cli import _parser
from swarm.config import Config, default_config_text, load_config

ORIGINAL = Path(__file__).resolve().parent / "original"

HELLO = """
name: greetings
version: "1"
symbols:
  - name: greet
    type: action
    parameters: {handler: echo, message: hello}
  - name: done
    type: action
    dependencies: [greet]
    parameters: {handler: noop}
"""


def use_original(cluster: Cluster, name: str) -> None:
    """The cluster's config becomes the original file, unchanged."""
    shutil.copyfile(ORIGINAL / name, cluster.config_path)


def test_the_originals_documented_config_serves_every_command(cluster: Cluster) -> None:
    use_original(cluster, "swarm-config.toml")
    cfg = str(cluster.config_path)
    cluster.start_dispatcher()
    cluster.start_worker("w1")
    # Its backends point at the original's checkout, missing here: the worker says which
    # and why, and serves what it can.
    log = cluster.log("w1")
    for backend in ("rust_injector", "php_engine", "powershell_engine"):
        assert f"backend {backend}: not advertised" in log
    assert "not found" in log  # the binary or the script, whichever is missing first

    hello = write_manifest(cluster.root, HELLO)
    cp = cluster.deploy(hello)
    assert cp.returncode == 0, cp.stderr

    run_id = cluster.detach(ORIGINAL / "example-workflow.yaml")
    cp = cluster.cli("status", cfg, "--url", cluster.url, "--json")
    assert cp.returncode == 0, cp.stderr
    s = json.loads(cp.stdout)
    assert s["summary"]["active_workflows"] == 1 and s["summary"]["completed"] == 2
    assert s["summary"]["nodes"] == 1 and s["summary"]["idle"] == 1
    assert {w["symbol"] for w in s["waiting_for_capability"]} == {"initialize"}
    assert cluster.cli("cancel", run_id, cfg, "--url", cluster.url).returncode == 0
    wait_for(lambda: cluster.run_status(run_id) == "cancelled", what="the cancel")

    human = cluster.cli("status", cfg, "--url", cluster.url)
    assert human.returncode == 0, human.stderr
    assert "active nodes: 1 (1 idle, 0 busy)" in human.stdout
    # Completed counts come from the state DB: the finished run still counts.
    assert "0 queued, 0 running, 2 completed, 0 failed" in human.stdout
    assert "active workflows: 0" in human.stdout and "state DB records: nodes 1" in human.stdout

    toml = cluster.cli("validate", str(ORIGINAL / "example-workflow.toml"))
    assert toml.returncode == 0, toml.stderr
    local = cluster.cli("run", str(hello), "--config", cfg, "--workers", "1", "--json")
    assert local.returncode == 0, local.stderr


def test_the_originals_repository_config_runs_and_logs_to_its_file(cluster: Cluster) -> None:
    use_original(cluster, "repo-swarm-config.toml")
    cluster.start_dispatcher()  # allowed_hosts = ["localhost", "127.0.0.1"]: we may connect
    cluster.start_worker("w1")
    cp = cluster.deploy(write_manifest(cluster.root, HELLO))
    assert cp.returncode == 0, cp.stderr
    logfile = cluster.root / "swarm.log"  # [logging] file = "./swarm.log", beside the config
    wait_for(lambda: logfile.exists() and "completed: 2 symbols (2 completed)" in
             logfile.read_text(), what="the run's outcome in swarm.log")


def test_allowed_hosts_refuses_every_other_peer(cluster: Cluster) -> None:
    cluster.config_path.write_text(cluster.config_path.read_text()
                                   + '[security]\nallowed_hosts = ["127.0.0.2"]\n')
    url = cluster.start_dispatcher()
    cp = cluster.cli("status", str(cluster.config_path), "--url", url)
    assert cp.returncode == 3 and "host not allowed" in cp.stderr, cp.stderr
    assert "not in [security] allowed_hosts" in cluster.log("dispatcher")

    async def from_allowed_address() -> bytes:
        async with connect(url, local_addr=("127.0.0.2", 0), open_timeout=10) as ws:
            frame = await asyncio.wait_for(ws.recv(), 10)
            assert isinstance(frame, bytes)
            return frame

    assert asyncio.run(from_allowed_address())  # the challenge: 127.0.0.2 is served


def test_task_retry_limit_5_adds_retries_and_a_symbols_own_retries_win(
        cluster: Cluster) -> None:
    cluster.edit_config("heartbeat_timeout = 3000", "heartbeat_timeout = 3000\n"
                                                    "task_retry_limit = 5")
    cluster.start_dispatcher()
    cluster.start_worker("w1")
    m = write_manifest(cluster.root, """
        name: flaky
        version: "1"
        on_failure: continue
        symbols:
          - name: default_retries
            type: action
            parameters: {handler: fail}
          - name: own_retries
            type: action
            retries: 1
            parameters: {handler: fail}
    """)
    cp = cluster.deploy(m)
    assert cp.returncode == 1, cp.stderr
    tasks = {t["symbol"]: t for t in json.loads(cp.stdout.splitlines()[-1])["summary"]["tasks"]}
    assert tasks["default_retries"]["attempts"] == 6  # 1 + task_retry_limit
    assert tasks["own_retries"]["attempts"] == 2


def test_json_logs_carry_run_symbol_node_and_attempt(cluster: Cluster) -> None:
    cluster.config_path.write_text(cluster.config_path.read_text() + (
        '[logging]\nformat = "json"\nfile = "swarm.jsonl"\nconsole = false\n'))
    cluster.start_dispatcher()
    cluster.start_worker("w1")
    cp = cluster.deploy(write_manifest(cluster.root, HELLO))
    assert cp.returncode == 0, cp.stderr
    path = cluster.root / "swarm.jsonl"
    wait_for(lambda: path.exists() and "completed: 2 symbols" in path.read_text(),
             what="the run's outcome in the JSON log")
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert all({"ts", "level", "logger", "msg"} <= set(x) for x in lines)
    (outcome,) = [x for x in lines if "completed: 2 symbols" in x["msg"]]
    assert outcome["level"] == "info" and outcome["logger"] == "swarm.dispatcher"
    assert outcome["run_id"]
    attempt = next(x for x in lines if x.get("symbol") == "greet")
    assert (attempt["node"], attempt["attempt"], attempt["run_id"]) == (
        "w1", 1, outcome["run_id"])
    assert "listening" not in cluster.log("dispatcher")  # console = false: no stderr logs


def test_enable_websocket_false_is_refused_by_every_daemon(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text("[dispatcher]\nenable_websocket = false\n")
    for argv in (["start-dispatcher", str(cfg)], ["start-worker", str(cfg)],
                 ["status", str(cfg)]):
        cp = subprocess.run([sys.executable, "-m", "swarm", *argv], capture_output=True,
                            text=True, env=env(), timeout=60)
        assert cp.returncode == 2, cp.stderr
        assert f"{cfg}:2: dispatcher.enable_websocket: false is not supported" in cp.stderr


async def test_an_eleventh_host_is_welcome_by_default(tmp_path: Path) -> None:
    async with swarm.LocalSwarm(Config(), workers=11, processes=False,
                                db_path=str(tmp_path / "s.db")) as ls:
        assert len((await ls.client.status())["nodes"]) == 11


async def test_the_originals_programmatic_shape(tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path, HELLO)
    cfg = Config()
    async with swarm.Dispatcher(cfg, port=0, db_path=str(tmp_path / "s.db")) as d, \
            swarm.Worker(cfg, name="w", url=d.url):
        result = await d.dispatch_from_file(manifest)
        assert result.ok and result.completed_tasks == result.total_tasks == 2
        assert result.symbols["greet"].output == {"message": "hello"}
        assert "done" in result.symbols and result.symbols[0].symbol == "greet"
        assert result.duration is not None and result.duration > 0
        assert result.id == result.run_id
        async with swarm.Client(d.url) as c:
            run = await c.deploy(manifest, new=True)
            again = await run.wait()
            assert again.id == run.id != result.id and again.ok


# --- the original's CLI forms ------------------------------------------------------------


def swarm_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "swarm", *args], capture_output=True,
                          text=True, env=env(), cwd=cwd, timeout=60)


def test_swarm_config_without_argument_writes_the_local_file(tmp_path: Path) -> None:
    assert swarm_cli("config", cwd=tmp_path).returncode == 0
    assert (tmp_path / "swarm-config.toml").read_text() == default_config_text()
    again = swarm_cli("config", cwd=tmp_path)
    assert again.returncode == 2 and "--force" in again.stderr
    assert swarm_cli("config", "--force", cwd=tmp_path).returncode == 0
    out = swarm_cli("config", "-", cwd=tmp_path)
    assert out.returncode == 0 and out.stdout == default_config_text()
    assert load_config(tmp_path / "swarm-config.toml") == dataclass_path(tmp_path)


def dataclass_path(folder: Path) -> Config:
    p = folder / "swarm-config.toml"
    return dataclasses.replace(Config(), path=str(p), base_dir=str(folder.resolve()))


def test_swarm_help_and_bare_swarm_print_the_help(tmp_path: Path) -> None:
    bare = swarm_cli(cwd=tmp_path)
    assert bare.returncode == 0 and "start-dispatcher" in bare.stdout
    assert swarm_cli("help", cwd=tmp_path).stdout == bare.stdout
    deploy = swarm_cli("help", "deploy", cwd=tmp_path)
    assert deploy.returncode == 0 and "usage: swarm deploy" in deploy.stdout
    unknown = swarm_cli("help", "nope", cwd=tmp_path)
    assert unknown.returncode == 2 and "no command 'nope'" in unknown.stderr


def test_every_argument_of_every_command_has_a_help_line() -> None:
    missing = []
    for action in _parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sp in action.choices.items():
                missing += [f"{name} {a.dest}" for a in sp._actions if not a.help]
    assert missing == []


@pytest.mark.parametrize("argv", [["config", "-"], ["help"],
                                  ["plan", str(ORIGINAL / "example-workflow.yaml")]])
def test_output_piped_into_head_ends_quietly(argv: list[str], tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "swarm", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env(), cwd=tmp_path)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # the reader is gone before a byte is written
    err = proc.stderr.read()
    proc.stderr.close()
    assert proc.wait(60) == 0 and b"Traceback" not in err and b"BrokenPipe" not in err, err
