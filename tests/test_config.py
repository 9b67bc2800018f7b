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
    ("[dispatcher]\nwebsocket_prot = 1\n", "bad.toml:2: dispatcher.websocket_prot: unknown key "
                                           "in [dispatcher] (did you mean 'websocket_port'?)"),
    ("[nonsense]\n", "bad.toml:1: nonsense: unknown section"),
    ("[worker]\nmax_concurrent_tasks = \"4\"\n",
     "bad.toml:2: worker.max_concurrent_tasks: must be an integer, got a string ('4')"),
    ("[worker]\nmax_concurrent_tasks = 0\n", "worker.max_concurrent_tasks: must be at least 1"),
    ("[coordinator]\nheartbeat_timeout = -1\n", "must not be negative"),
    ("[worker.capabilities]\nperl = true\n", "bad.toml:2: worker.capabilities.perl: unknown "
                                             "backend"),
    ("[worker.capabilities]\nphp_engin = true\n", "(did you mean 'php_engine'?)"),
    ("[dispatcher\n", "line 1"),
    ("[logging]\nformat = \"xml\"\n", "bad.toml:2: logging.format: must be text or json"),
    ("[security]\nallowed_hosts = \"127.0.0.1\"\n",
     "bad.toml:2: security.allowed_hosts: must be a list of strings"),
    ("[security]\nenable_auth = true\n", "bad.toml:2: security.enable_auth: is true, but no "
                                          "key is set"),
    ("[security]\nmax_message_size = 100\n", "bad.toml:2: security.max_message_size: must be "
                                              "at least 524288"),
])
def test_bad_config_names_the_key(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)) as e:
        parse_config(text, path="bad.toml")
    assert e.value.exit_code == 2


def test_every_problem_of_a_config_is_reported_at_once() -> None:
    text = """[dispatcher]
websocket_prot = 8080
enable_websocket = false
[coordinator]
max_workers = "many"
[worker.capabilities]
perl = true
[logging]
level = "loud"
"""
    with pytest.raises(ConfigError) as e:
        parse_config(text, path="bad.toml")
    lines = str(e.value).splitlines()
    assert lines[0] == "bad.toml: 5 problems in the config:"
    assert [ln.split(": ")[0].strip() + ": " + ln.split(": ")[1] for ln in lines[1:]] == [
        "bad.toml:2: dispatcher.websocket_prot",
        "bad.toml:3: dispatcher.enable_websocket",
        "bad.toml:5: coordinator.max_workers",
        "bad.toml:7: worker.capabilities.perl",
        "bad.toml:9: logging.level",
    ]


def test_enable_websocket_false_is_refused_naming_the_key() -> None:
    with pytest.raises(ConfigError, match=r"dispatcher\.enable_websocket: false is not supported"):
        parse_config("[dispatcher]\nenable_websocket = false\n", path="c.toml")


def test_max_workers_defaults_to_the_originals_100() -> None:
    assert Config().coordinator.max_workers == 100


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


# --- the original WP Praxis swarm's files, exactly as shipped (tests/original/) ----------

ORIGINAL = REPO / "tests" / "original"


def test_original_files_are_the_shipped_bytes() -> None:
    shared = Path("/work/shared/original-examples")
    if not shared.is_dir():
        pytest.skip("the shared originals are not on this host")
    for name in ("swarm-config.toml", "repo-swarm-config.toml", "example-workflow.yaml",
                 "example-workflow.toml"):
        assert (ORIGINAL / name).read_bytes() == (shared / name).read_bytes(), name


def test_the_originals_documented_config_loads_unchanged() -> None:
    cfg = load_config(ORIGINAL / "swarm-config.toml")
    assert cfg.worker.capabilities == {"rust_injector": True, "php_engine": True,
                                       "powershell_engine": True, "internal": True}
    assert cfg.coordinator.max_workers == 100 and cfg.coordinator.task_retry_limit == 3
    assert cfg.worker.name == "worker-node-1" and cfg.worker.max_concurrent_tasks == 4
    assert cfg.client_url == "ws://localhost:8080" and cfg.warnings == ()


def test_the_originals_repository_config_loads_and_maps_onto_swarm() -> None:
    cfg = load_config(ORIGINAL / "repo-swarm-config.toml")
    assert cfg.worker.max_concurrent_tasks == 4
    assert "max_concurrent_tasks" not in cfg.worker.capabilities
    assert cfg.dispatcher.max_frame_size == 1048576
    assert cfg.security.allowed_hosts == ("localhost", "127.0.0.1")
    assert cfg.security.token == ""  # enable_auth = false
    assert (cfg.logging.level, cfg.logging.file, cfg.logging.console, cfg.logging.format) == (
        "info", "./swarm.log", True, "text")


@pytest.mark.parametrize("original, ours", [("warn", "warning"), ("verbose", "debug"),
                                            ("error", "error"), ("DEBUG", "debug")])
def test_the_originals_log_levels_map_onto_pythons(original: str, ours: str) -> None:
    assert parse_config(f'[logging]\nlevel = "{original}"\n').logging.level == ours


def test_original_capability_names_mean_ours() -> None:
    cfg = parse_config("[worker.capabilities]\nrust = false\nphp = true\npowershell = false\n")
    assert cfg.worker.capabilities == {"rust_injector": False, "php_engine": True,
                                       "powershell_engine": False, "internal": True}
    with pytest.raises(ConfigError, match="worker.capabilities.php: means 'php_engine', which "
                                          "is set to False"):
        parse_config("[worker.capabilities]\nphp = true\nphp_engine = false\n", path="c.toml")


def test_capabilities_max_concurrent_tasks_sets_the_slots() -> None:
    cfg = parse_config("[worker.capabilities]\nmax_concurrent_tasks = 7\n")
    assert cfg.worker.max_concurrent_tasks == 7
    both = parse_config("[worker]\nmax_concurrent_tasks = 2\n[worker.capabilities]\n"
                        "max_concurrent_tasks = 7\n", path="c.toml")
    assert both.worker.max_concurrent_tasks == 2
    assert both.warnings == ("c.toml:4: worker.capabilities.max_concurrent_tasks: ignored: "
                             "[worker] max_concurrent_tasks = 2 is used",)


def test_enable_auth_and_api_key_are_the_shared_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SWARM_TOKEN", raising=False)
    on = parse_config('[security]\nenable_auth = true\napi_key = "k3y"\n')
    assert on.security.token == "k3y"
    off = parse_config('[security]\nenable_auth = false\napi_key = "k3y"\n', path="c.toml")
    assert off.security.token == ""
    assert off.warnings == ("c.toml:3: security.api_key: accepted but not used: enable_auth "
                            "is false, so connections are not authenticated",)
    monkeypatch.setenv("SWARM_TOKEN", "from-env")
    assert parse_config("[security]\nenable_auth = true\n").security.token == "from-env"


def test_max_message_size_is_the_frame_limit() -> None:
    cfg = parse_config("[security]\nmax_message_size = 2097152\n")
    assert cfg.dispatcher.max_frame_size == 2097152
    with pytest.raises(ConfigError, match="security.max_message_size: is the frame limit"):
        parse_config("[dispatcher]\nmax_frame_size = 1048576\n[security]\n"
                     "max_message_size = 2097152\n")


def test_a_key_swarm_has_no_use_for_warns_once(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[dispatcher]\nmanifest_path = "./workflow.yaml"\n'
                    'coordinator_endpoint = "ws://127.0.0.1:1"\n')
    cfg = load_config(path)
    assert cfg.warnings == (f"{path}:2: dispatcher.manifest_path: accepted but not used: "
                            "swarm's dispatcher starts no workflow on its own; `swarm deploy "
                            "MANIFEST` submits one",)
    cp = subprocess.run([sys.executable, "-m", "swarm", "status", str(path)],
                        capture_output=True, text=True, timeout=60)
    assert cp.returncode == 3  # nothing listens there; the config itself loaded
    assert cp.stderr.count("dispatcher.manifest_path: accepted but not used") == 1


def test_keys_neither_product_knows_stay_errors() -> None:
    with pytest.raises(ConfigError, match=r"security\.enable_oauth: unknown key in \[security\]"):
        parse_config("[security]\nenable_oauth = true\n", path="c.toml")
