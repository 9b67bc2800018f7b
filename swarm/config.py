"""TOML config -> frozen dataclasses. Defaults live here and nowhere else.

Keys keep the names and meaning of the original WP Praxis `swarm-config.toml`
(durations in milliseconds); the original's own names for some of them are read too
(config_reader.py). Every unknown key, wrong type and bad value is reported at once,
each with file, line and `section.key`. `SWARM_TOKEN` and `SWARM_URL` in the
environment override the file.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import tomli

from .config_reader import LOG_LEVELS, Reader
from .errors import ConfigError, InputError
from .maintenance import parse_duration
from .model import RetryPolicy
from .secrets import REFERENCE_NAME, check_source

log = logging.getLogger("swarm.config")

DEFAULT_PORT = 8080
DEFAULT_CONFIG_NAME = "swarm-config.toml"
# A worker sends results in frames of up to half this (RESULT_FRAME_BUDGET in worker.py).
MIN_FRAME_SIZE = 512 * 1024


@dataclass(frozen=True, slots=True)
class DispatcherConfig:
    coordinator_endpoint: str = f"ws://127.0.0.1:{DEFAULT_PORT}"
    state_db_path: str = "./swarm-state.db"
    enable_websocket: bool = True
    websocket_port: int = DEFAULT_PORT
    host: str = "127.0.0.1"
    max_frame_size: int = 1 << 20  # bytes; larger frames close that connection (1009)
    max_request_size: int = 128 << 20  # bytes a client may send once authenticated (deploys)
    max_connections: int = 1000  # workers and clients at once; more are refused (1013)
    synchronous: str = "FULL"  # SQLite synchronous pragma: FULL or NORMAL
    retention: str = ""  # finished runs older than this are pruned (`30d`); "": kept forever


@dataclass(frozen=True, slots=True)
class CoordinatorConfig:
    max_workers: int = 100  # worker nodes connected at once, as in the original
    heartbeat_interval: int = 5000
    heartbeat_timeout: int = 15_000
    task_retry_limit: int = 3  # retries of a symbol whose manifest sets no `retries`
    enable_load_balancing: bool = True
    priority_queue_enabled: bool = True
    max_worker_losses: int = 3  # a task lost with its worker this often fails ("worker lost")
    max_checkpoint_size: int = 256 * 1024  # bytes of JSON per checkpoint; 0: no limit


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    node_name: str = ""  # empty: the host name
    dispatcher_url: str = f"ws://127.0.0.1:{DEFAULT_PORT}"
    heartbeat_interval: int = 5000
    max_concurrent_tasks: int = 4
    capabilities: dict[str, bool] = field(
        default_factory=lambda: {
            "rust_injector": True,
            "php_engine": True,
            "powershell_engine": True,
            "internal": True,
        }
    )
    labels: dict[str, str] = field(default_factory=dict)
    reconnect_initial_delay: int = 250
    reconnect_max_delay: int = 10_000
    shutdown_grace: int = 30_000  # ms running tasks may take to finish on SIGTERM

    @property
    def name(self) -> str:
        return self.node_name or socket.gethostname()


ADAPTERS = ("swarm", "wp_praxis")  # swarm: the argv contract of DESIGN §4


@dataclass(frozen=True, slots=True)
class RustInjectorConfig:
    enabled: bool = True
    binary_path: str = "./examples/backends/rust-injector/target/release/wp-injector"
    timeout: int = 30_000
    adapter: str = "swarm"  # "wp_praxis": the original wp_injector (inject --manifest ...)
    wp_root: str = ""  # wp_praxis: the WordPress root (symbol parameter `wp_root` wins)
    dry_run: bool = False  # wp_praxis: pass --dry-run (symbol parameter `dry_run` wins)
    require_output: bool = False  # exit 0 with empty stdout is a failure
    # Usage errors (clap, argparse, getopt) come back the same each time: never retried.
    fail_fast_exit_codes: list[int] = field(default_factory=lambda: [2])


@dataclass(frozen=True, slots=True)
class PhpEngineConfig:
    enabled: bool = True
    php_binary: str = "php"
    script_path: str = "./examples/backends/php/engine.php"
    timeout: int = 30_000
    adapter: str = "swarm"  # "wp_praxis": the original engine's class library, via our entry
    wp_load: str = ""  # wp_praxis: WordPress's wp-load.php
    require_output: bool = False
    fail_fast_exit_codes: list[int] = field(default_factory=lambda: [2])


@dataclass(frozen=True, slots=True)
class PowerShellEngineConfig:
    enabled: bool = True
    pwsh_binary: str = "pwsh"
    script_path: str = "./examples/backends/powershell/engine.ps1"
    timeout: int = 30_000
    adapter: str = "swarm"  # "wp_praxis": symbolic.ps1 -ManifestPath FILE -Operation Execute
    require_output: bool = False
    fail_fast_exit_codes: list[int] = field(default_factory=lambda: [2])


@dataclass(frozen=True, slots=True)
class BackendsConfig:
    rust_injector: RustInjectorConfig = field(default_factory=RustInjectorConfig)
    php_engine: PhpEngineConfig = field(default_factory=PhpEngineConfig)
    powershell_engine: PowerShellEngineConfig = field(default_factory=PowerShellEngineConfig)
    output_cap: int = 1 << 20  # bytes of stdout and of stderr kept per attempt
    kill_grace: int = 2000  # ms between SIGTERM and SIGKILL


@dataclass(frozen=True, slots=True)
class LoggingConfig:
    level: str = "info"
    file: str = ""
    console: bool = True  # log to stderr too
    format: str = "text"  # text | json (one object a line)


@dataclass(frozen=True, slots=True)
class SecurityConfig:
    token: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    tls_ca: str = ""
    tls_client_cert: str = ""
    tls_client_key: str = ""
    tls_require_client_cert: bool = False
    allowed_hosts: tuple[str, ...] = ()  # peers the dispatcher accepts; empty: any


@dataclass(frozen=True, slots=True)
class Config:
    dispatcher: DispatcherConfig = field(default_factory=DispatcherConfig)
    coordinator: CoordinatorConfig = field(default_factory=CoordinatorConfig)
    worker: WorkerConfig = field(default_factory=WorkerConfig)
    backends: BackendsConfig = field(default_factory=BackendsConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    security: SecurityConfig = field(default_factory=SecurityConfig)
    # Worker only: secret name -> "file:PATH" | "env:NAME" (see swarm.secrets).
    secrets: dict[str, str] = field(default_factory=dict)
    path: str = ""  # the file it came from, "" for built-in defaults
    base_dir: str = "."  # relative paths in the file are relative to this
    warnings: tuple[str, ...] = ()  # keys accepted but not used, each with why

    def resolve(self, p: str) -> str:
        """A path from the config, made absolute against the config file's folder."""
        if not p:
            return p
        q = Path(os.path.expanduser(p))
        return str(q if q.is_absolute() else Path(self.base_dir) / q)

    @property
    def client_url(self) -> str:
        """Where CLI clients reach the dispatcher."""
        return os.environ.get("SWARM_URL") or self.dispatcher.coordinator_endpoint

    @property
    def worker_url(self) -> str:
        return os.environ.get("SWARM_URL") or self.worker.dispatcher_url


def _validate(cfg: Config, r: Reader) -> None:
    d, co, w = cfg.dispatcher, cfg.coordinator, cfg.worker
    if not 0 <= d.websocket_port <= 65535:
        r.problem("dispatcher.websocket_port", f"out of range 0-65535: {d.websocket_port}")
    if not d.enable_websocket:
        r.problem("dispatcher.enable_websocket",
                  "false is not supported: the WebSocket endpoint is how workers and clients "
                  "reach the dispatcher (remove the key or set it true)")
    if d.synchronous.upper() not in ("FULL", "NORMAL", "EXTRA"):
        r.problem("dispatcher.synchronous", f"must be FULL, NORMAL or EXTRA, got {d.synchronous!r}")
    if d.retention:
        try:
            parse_duration(d.retention, "retention")
        except InputError as e:
            r.problem("dispatcher.retention", str(e).removeprefix("retention: "))
    if d.max_frame_size < MIN_FRAME_SIZE:
        key = ("security.max_message_size" if r.line("security.max_message_size")
               else "dispatcher.max_frame_size")
        r.problem(key, f"must be at least {MIN_FRAME_SIZE} bytes (a worker sends results in "
                       f"frames of up to {MIN_FRAME_SIZE // 2}), got {d.max_frame_size}")
    if co.max_workers < 1:
        r.problem("coordinator.max_workers", "must be at least 1")
    if co.max_checkpoint_size < 0:
        r.problem("coordinator.max_checkpoint_size", "must be 0 (no limit) or more")
    if w.max_concurrent_tasks < 1:
        r.problem("worker.max_concurrent_tasks", "must be at least 1")
    for key in ("heartbeat_interval", "heartbeat_timeout"):
        if getattr(co, key) <= 0:
            r.problem(f"coordinator.{key}", "must be positive")
    if w.heartbeat_interval <= 0:
        r.problem("worker.heartbeat_interval", "must be positive")
    if not cfg.retry.backoff_factor >= 1:  # NaN fails too
        r.problem("retry.backoff_factor", f"must be >= 1, got {cfg.retry.backoff_factor}")
    if not 0 <= cfg.retry.jitter <= 1:
        r.problem("retry.jitter", f"must be within [0, 1], got {cfg.retry.jitter}")
    if cfg.logging.level.lower() not in LOG_LEVELS:
        r.problem("logging.level", f"must be one of {', '.join(LOG_LEVELS)}, got "
                                   f"{cfg.logging.level!r}")
    if cfg.logging.format not in ("text", "json"):
        r.problem("logging.format", f"must be text or json, got {cfg.logging.format!r}")
    for i, host in enumerate(cfg.security.allowed_hosts):
        if not host.strip():
            r.problem("security.allowed_hosts", f"entry {i + 1} is empty")
    for section in ("rust_injector", "php_engine", "powershell_engine"):
        b = getattr(cfg.backends, section)
        if b.adapter not in ADAPTERS:
            r.problem(f"backends.{section}.adapter", f"must be one of "
                      f"{', '.join(repr(a) for a in ADAPTERS)}, got {b.adapter!r}")
        bad = [c for c in b.fail_fast_exit_codes if type(c) is not int or not 1 <= c <= 255]
        if bad:
            r.problem(f"backends.{section}.fail_fast_exit_codes",
                      f"must hold exit codes from 1 to 255, got {bad[0]!r}")
    for name, source in cfg.secrets.items():
        why = check_source(source) if REFERENCE_NAME.fullmatch(name) else (
            "a secret's name uses letters, digits, '_', '.' and '-' only")
        if why is not None:
            r.problem(f"secrets.{name}", why)
    if r.auth_without_key and not cfg.security.token:
        r.problem("security.enable_auth", "is true, but no key is set: set [security] api_key "
                                          "(or token, or SWARM_TOKEN)")


def parse_config(text: str, path: str = "", base_dir: str = ".") -> Config:
    """A config from TOML text; ConfigError lists every problem of it at once."""
    where = path or "<config>"
    try:
        data = tomli.loads(text)
    except tomli.TOMLDecodeError as e:
        raise ConfigError(f"{where}: {e}") from None
    except (RecursionError, ValueError) as e:  # nesting or a number past the parser's limits
        raise ConfigError(f"{where}: cannot read the config: {type(e).__name__}") from None
    r = Reader(text)
    cfg = r.build(Config, r.translate(data), "")
    cfg = dataclasses.replace(cfg, path=path, base_dir=base_dir, warnings=tuple(
        f"{w.render(where)}" for w in r.warnings))
    token = os.environ.get("SWARM_TOKEN")
    if token:
        cfg = dataclasses.replace(cfg, security=dataclasses.replace(cfg.security, token=token))
    _validate(cfg, r)
    if r.problems:
        n = len(r.problems)
        raise ConfigError(f"{where}: {n} problem{'s' if n != 1 else ''} in the config:\n"
                          + "\n".join(f"  {pr.render(where)}" for pr in sorted(
                              r.problems, key=lambda pr: pr.line or 0)))
    return cfg


def load_config(path: str | os.PathLike[str] | None = None) -> Config:
    """Load `path`; without one, `./swarm-config.toml` if present, else the defaults."""
    if path is None:
        if not Path(DEFAULT_CONFIG_NAME).is_file():
            return parse_config("")
        path = DEFAULT_CONFIG_NAME
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{p}: config file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{p}: cannot read config: {e}") from None
    cfg = parse_config(text, str(p), str(p.resolve().parent))
    for warning in cfg.warnings:
        log.warning("config warning: %s", warning)
    return cfg


def default_config_text() -> str:
    """The fully commented default config (also committed as configs/swarm-config.toml)."""
    return resources.files("swarm").joinpath("data/swarm-config.toml").read_text(encoding="utf-8")
