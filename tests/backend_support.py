"""Shared test helpers for the backends: the example backends, built or found once.

Use the fixtures by importing them into a test module (`from backend_support import
rust_injector_bin`); the build behind them runs once per session however many modules
import them. The plain functions do the same for code that is not a fixture.

- `rust_injector_bin`: builds examples/backends/rust-injector with
  `cargo build --release --offline` (skips if cargo is absent, fails if the build does);
- `php_bin`: the php executable on PATH (skips if absent);
- `fake_pwsh`: tests/bin/fake-pwsh, the stand-in for `pwsh` (PowerShell is not
  installable everywhere); set FAKE_PWSH_LOG to record what it was called with;
- `backends_config()` / `backends_toml()`: a config whose backends are these.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from swarm.config import (
    BackendsConfig,
    Config,
    PhpEngineConfig,
    PowerShellEngineConfig,
    RustInjectorConfig,
    WorkerConfig,
)
from swarm.model import DISPATCHES

REPO = Path(__file__).resolve().parent.parent
RUST_CRATE = REPO / "examples" / "backends" / "rust-injector"
RUST_BINARY = RUST_CRATE / "target" / "release" / "wp-injector"
PHP_ENGINE = REPO / "examples" / "backends" / "php" / "engine.php"
PS_ENGINE = REPO / "examples" / "backends" / "powershell" / "engine.ps1"
FAKE_PWSH = REPO / "tests" / "bin" / "fake-pwsh"

CARGO_BUILD_TIMEOUT_S = 300

# One build per session: a failure (or a skip reason) is remembered as well.
_rust: dict[str, Any] = {}


def find_cargo() -> str | None:
    """cargo on PATH, else ~/.cargo/bin/cargo (rustup's default, often not on PATH)."""
    found = shutil.which("cargo")
    if found:
        return found
    home = Path(os.path.expanduser("~")) / ".cargo" / "bin" / "cargo"
    return str(home) if os.access(home, os.X_OK) else None


def build_rust_injector() -> Path:
    """Path of the built wp-injector; pytest.skip if no cargo, pytest.fail if it won't build."""
    if "path" in _rust:
        return Path(_rust["path"])
    if "skip" in _rust:
        pytest.skip(_rust["skip"])
    if "fail" in _rust:
        pytest.fail(_rust["fail"])
    cargo = find_cargo()
    if cargo is None:
        _rust["skip"] = "cargo not found (PATH, ~/.cargo/bin): cannot build wp-injector"
        pytest.skip(_rust["skip"])
    env = {**os.environ, "CARGO_TARGET_DIR": str(RUST_CRATE / "target")}
    try:
        proc = subprocess.run(
            [cargo, "build", "--release", "--offline", "--quiet"],
            cwd=RUST_CRATE,
            env=env,
            capture_output=True,
            text=True,
            timeout=CARGO_BUILD_TIMEOUT_S,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        _rust["fail"] = f"cargo build of wp-injector did not run: {e}"
        pytest.fail(_rust["fail"])
    if proc.returncode != 0 or not RUST_BINARY.is_file():
        _rust["fail"] = f"cargo build of wp-injector failed:\n{proc.stderr[-4000:]}"
        pytest.fail(_rust["fail"])
    _rust["path"] = str(RUST_BINARY)
    return RUST_BINARY


def find_php() -> Path:
    """The php executable; pytest.skip if there is none."""
    found = shutil.which("php")
    if found is None:
        pytest.skip("php not found on PATH")
    return Path(found)


def fake_pwsh_path() -> Path:
    """tests/bin/fake-pwsh (made executable if a checkout lost the bit)."""
    if not os.access(FAKE_PWSH, os.X_OK):
        FAKE_PWSH.chmod(FAKE_PWSH.stat().st_mode | 0o111)
    return FAKE_PWSH


@pytest.fixture(scope="session")
def rust_injector_bin() -> Path:
    return build_rust_injector()


@pytest.fixture(scope="session")
def php_bin() -> Path:
    return find_php()


@pytest.fixture(scope="session")
def fake_pwsh() -> Path:
    return fake_pwsh_path()


def backends_config(
    *,
    rust: str | os.PathLike[str] = RUST_BINARY,
    php: str | os.PathLike[str] = "php",
    php_script: str | os.PathLike[str] = PHP_ENGINE,
    pwsh: str | os.PathLike[str] = FAKE_PWSH,
    pwsh_script: str | os.PathLike[str] = PS_ENGINE,
    timeout: int = 30_000,
    output_cap: int = 1 << 20,
    kill_grace: int = 2000,
    enabled: dict[str, bool] | None = None,
    capabilities: dict[str, bool] | None = None,
    base_dir: str | os.PathLike[str] = REPO,
) -> Config:
    """A Config whose [backends] point at the example backends (or at what is given)."""
    on = dict.fromkeys(("rust_injector", "php_engine", "powershell_engine"), True)
    on.update(enabled or {})
    caps = dict.fromkeys(DISPATCHES, True)
    caps.update(capabilities or {})
    backends = BackendsConfig(
        rust_injector=RustInjectorConfig(on["rust_injector"], str(rust), timeout),
        php_engine=PhpEngineConfig(on["php_engine"], str(php), str(php_script), timeout),
        powershell_engine=PowerShellEngineConfig(
            on["powershell_engine"], str(pwsh), str(pwsh_script), timeout
        ),
        output_cap=output_cap,
        kill_grace=kill_grace,
    )
    worker = WorkerConfig(capabilities=caps)
    return Config(worker=worker, backends=backends, base_dir=str(base_dir))


def backends_toml(
    *,
    rust: str | os.PathLike[str] = RUST_BINARY,
    php: str | os.PathLike[str] = "php",
    pwsh: str | os.PathLike[str] = FAKE_PWSH,
    timeout: int = 30_000,
) -> str:
    """[backends] sections (absolute paths) for a config file a worker process reads."""

    def s(v: str | os.PathLike[str]) -> str:
        return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'

    return f"""\
[backends.rust_injector]
enabled = true
binary_path = {s(rust)}
timeout = {timeout}

[backends.php_engine]
enabled = true
php_binary = {s(php)}
script_path = {s(PHP_ENGINE)}
timeout = {timeout}

[backends.powershell_engine]
enabled = true
pwsh_binary = {s(pwsh)}
script_path = {s(PS_ENGINE)}
timeout = {timeout}
"""


def python_script(path: Path, body: str) -> Path:
    """Write an executable Python script (this interpreter) to `path`: a fake backend."""
    path.write_text(f"#!{sys.executable}\n{body}", encoding="utf-8")
    path.chmod(0o755)
    return path


# A backend whose grandchild escapes its process group: it forks, the child calls setsid
# and (escape "double") forks again and exits, so that the grandchild is an orphan too.
# The grandchild ignores SIGTERM, keeps stdout and stderr open, and writes its pid to
# `pidfile` (whole or absent), the backend its own to `pidfile`.leader; the backend then
# exits (leader "exit") or sleeps.
ESCAPER = """\
import json, os, signal, sys, time
if "--version" in sys.argv:
    print("escaper 1.0"); sys.exit(0)
p = json.loads(sys.argv[sys.argv.index("--params") + 1])
pidfile = p["pidfile"]
with open(pidfile + ".leader", "w") as f:
    f.write(str(os.getpid()))
child = os.fork()
if child == 0:
    os.setsid()
    if p.get("escape") == "double" and os.fork() > 0:
        os._exit(0)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    with open(pidfile + ".tmp", "w") as f:
        f.write(str(os.getpid()))
    os.rename(pidfile + ".tmp", pidfile)
    time.sleep(120)
    os._exit(0)
if p.get("escape") == "double":
    os.waitpid(child, 0)
deadline = time.monotonic() + 10
while not os.path.exists(pidfile) and time.monotonic() < deadline:
    time.sleep(0.005)
if p.get("leader") == "exit":
    print(json.dumps({"leader": "done"}))
    sys.exit(0)
time.sleep(120)
"""


def escaper(path: Path) -> Path:
    """ESCAPER as an executable fake backend binary at `path`."""
    return python_script(path, ESCAPER)


def read_pid(pidfile: Path) -> int:
    return int(pidfile.read_text())


def kill_if_alive(pidfile: Path, script: Path) -> None:
    """Test cleanup: SIGKILL the escaper and its grandchild if a failed containment left
    them running (only pids that still run `script`: processes this test started)."""
    import signal

    for path in (pidfile, Path(f"{pidfile}.leader")):
        try:
            pid = read_pid(path)
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if str(script).encode() in f.read():
                    os.kill(pid, signal.SIGKILL)
        except (OSError, ValueError):
            pass
