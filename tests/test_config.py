"""Config: defaults in one place, the committed file matches them, errors name the key."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from swarm.config import Config, default_config_text, load_config, parse_config
from swarm.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent


def test_committed_default_config_is_the_builtin_defaults() -> None:
    text = (REPO / "configs" / "swarm-config.toml").read_text()
    assert text == default_config_text()
    assert parse_config(text) == Config()


def test_original_keys_keep_their_names() -> None:
    cfg = parse_config("""
[dispatcher]
coordinator_endpoint = "ws://10.0.0.1:9000"
state_db_path = "/var/lib/swarm/state.db"
enable_websocket = true
websocket_port = 9000
[coordinator]
max_workers = 50
heartbeat_interval = 1000
heartbeat_timeout = 3000
task_retry_limit = 5
enable_load_balancing = false
priority_queue_enabled = true
[worker]
node_name = "web-1"
dispatcher_url = "ws://10.0.0.1:9000"
heartbeat_interval = 1000
max_concurrent_tasks = 8
[worker.capabilities]
powershell_engine = false
[backends.php_engine]
enabled = true
php_binary = "/usr/bin/php"
script_path = "engine.php"
timeout = 10000
[logging]
level = "debug"
""", path="x.toml", base_dir="/etc/swarm")
    assert cfg.dispatcher.websocket_port == 9000 and cfg.coordinator.max_workers == 50
    assert cfg.worker.capabilities == {"rust_injector": True, "php_engine": True,
                                       "powershell_engine": False, "internal": True}
    assert cfg.resolve(cfg.backends.php_engine.script_path) == "/etc/swarm/engine.php"
    assert cfg.worker.name == "web-1"


@pytest.mark.parametrize("text, message", [
    ("[dispatcher]\nwebsocket_prot = 1\n", "unknown key 'websocket_prot' in [dispatcher] "
                                           "(did you mean 'websocket_port'?)"),
    ("[nonsense]\n", "unknown key 'nonsense'"),
    ("[worker]\nmax_concurrent_tasks = \"4\"\n", "'worker.max_concurrent_tasks' must be int"),
    ("[worker]\nmax_concurrent_tasks = 0\n", "at least 1"),
    ("[coordinator]\nheartbeat_timeout = -1\n", "must not be negative"),
    ("[worker.capabilities]\nperl = true\n", "unknown backend 'perl'"),
    ("[dispatcher\n", "line 1"),
])
def test_bad_config_names_the_key(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_config(text, path="bad.toml")


def test_environment_overrides_token_and_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SWARM_TOKEN", "s3cret")
    monkeypatch.setenv("SWARM_URL", "ws://127.0.0.1:1234")
    cfg = parse_config('[security]\ntoken = "file"\n')
    assert cfg.security.token == "s3cret"
    assert cfg.client_url == cfg.worker_url == "ws://127.0.0.1:1234"


def test_without_a_file_defaults_serve_and_local_file_is_used(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert load_config() == Config()
    (tmp_path / "swarm-config.toml").write_text("[worker]\nmax_concurrent_tasks = 9\n")
    assert load_config().worker.max_concurrent_tasks == 9
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.toml")


def test_swarm_config_writes_the_commented_default(tmp_path: Path) -> None:
    out = tmp_path / "c.toml"
    run = [sys.executable, "-m", "swarm", "config", str(out)]
    assert subprocess.run(run, capture_output=True, timeout=60).returncode == 0
    assert out.read_text() == default_config_text()
    again = subprocess.run(run, capture_output=True, text=True, timeout=60)
    assert again.returncode == 2 and "--force" in again.stderr
