"""TOML config -> frozen dataclasses. Defaults live here and nowhere else.

Keys keep the names and meaning of the original WP Praxis `swarm-config.toml`
(durations in milliseconds). Unknown keys are an error that names the key.
`SWARM_TOKEN` and `SWARM_URL` in the environment override the file.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import socket
import typing
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import tomli

from .errors import ConfigError
from .model import DISPATCHES, RetryPolicy
from .secrets import REFERENCE_NAME, check_source

DEFAULT_PORT = 8080
DEFAULT_CONFIG_NAME = "swarm-config.toml"


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


@dataclass(frozen=True, slots=True)
class CoordinatorConfig:
    max_workers: int = 10
    heartbeat_interval: int = 5000
    heartbeat_timeout: int = 15_000
    task_retry_limit: int = 3
    enable_load_balancing: bool = True
    priority_queue_enabled: bool = True
    max_worker_losses: int = 3  # a task lost with its worker this often fails ("worker lost")


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


@dataclass(frozen=True, slots=True)
class RustInjectorConfig:
    enabled: bool = True
    binary_path: str = "./examples/backends/rust-injector/target/release/wp-injector"
    timeout: int = 30_000


@dataclass(frozen=True, slots=True)
class PhpEngineConfig:
    enabled: bool = True
    php_binary: str = "php"
    script_path: str = "./examples/backends/php/engine.php"
    timeout: int = 30_000


@dataclass(frozen=True, slots=True)
class PowerShellEngineConfig:
    enabled: bool = True
    pwsh_binary: str = "pwsh"
    script_path: str = "./examples/backends/powershell/engine.ps1"
    timeout: int = 30_000


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


@dataclass(frozen=True, slots=True)
class SecurityConfig:
    token: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    tls_ca: str = ""
    tls_client_cert: str = ""
    tls_client_key: str = ""
    tls_require_client_cert: bool = False


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


T = TypeVar("T")

# Sections whose keys are free-form maps of one value type.
_FREE_MAPS = {"capabilities": bool, "labels": str, "secrets": str}


def _build(cls: type[T], data: Any, where: str) -> T:
    if not isinstance(data, dict):
        raise ConfigError(f"[{where}] must be a table, got {type(data).__name__}")
    known = {f.name: f for f in fields(cls)}  # type: ignore[arg-type]
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        f = known.get(key)
        if f is None or key in ("path", "base_dir"):
            hint = difflib.get_close_matches(key, list(known), n=1)
            extra = f" (did you mean '{hint[0]}'?)" if hint else ""
            raise ConfigError(f"unknown key '{key}' in [{where}]{extra}")
        kwargs[key] = _convert(f, value, f"{where}.{key}" if where else key)
    return cls(**kwargs)


def _convert(f: dataclasses.Field[Any], value: Any, where: str) -> Any:
    default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    if dataclasses.is_dataclass(default):
        return _build(type(default), value, where)
    name = where.rsplit(".", 1)[-1]
    if name in _FREE_MAPS:
        vtype = _FREE_MAPS[name]
        if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, vtype) for k, v in value.items()
        ):
            raise ConfigError(f"'{where}' must be a table of {vtype.__name__} values")
        return {**typing.cast(dict[str, Any], default), **value}  # unnamed keys keep defaults
    expected = type(default)
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if type(value) is not expected:
        raise ConfigError(
            f"'{where}' must be {expected.__name__}, got {type(value).__name__} {value!r}"
        )
    if isinstance(value, int) and not isinstance(value, bool) and value < 0:
        raise ConfigError(f"'{where}' must not be negative, got {value}")
    return value


def _validate(cfg: Config) -> None:
    if not 0 <= cfg.dispatcher.websocket_port <= 65535:
        raise ConfigError(
            f"'dispatcher.websocket_port' out of range: {cfg.dispatcher.websocket_port}")
    if cfg.dispatcher.synchronous.upper() not in ("FULL", "NORMAL", "EXTRA"):
        raise ConfigError("'dispatcher.synchronous' must be FULL, NORMAL or EXTRA")
    unknown = sorted(set(cfg.worker.capabilities) - set(DISPATCHES))
    if unknown:
        raise ConfigError(f"unknown backend '{unknown[0]}' in [worker.capabilities]; "
                          f"known: {', '.join(DISPATCHES)}")
    if cfg.worker.max_concurrent_tasks < 1:
        raise ConfigError("'worker.max_concurrent_tasks' must be at least 1")
    for key in ("heartbeat_interval", "heartbeat_timeout"):
        if getattr(cfg.coordinator, key) <= 0:
            raise ConfigError(f"'coordinator.{key}' must be positive")
    if cfg.worker.heartbeat_interval <= 0:
        raise ConfigError("'worker.heartbeat_interval' must be positive")
    if not cfg.retry.backoff_factor >= 1 or not 0 <= cfg.retry.jitter <= 1:  # NaN fails both
        raise ConfigError("'retry.backoff_factor' must be >= 1 and 'retry.jitter' within [0, 1]")
    if cfg.logging.level.lower() not in ("debug", "info", "warning", "error"):
        raise ConfigError("'logging.level' must be debug, info, warning or error")
    for name, source in cfg.secrets.items():
        why = check_source(source) if REFERENCE_NAME.fullmatch(name) else (
            "a secret's name uses letters, digits, '_', '.' and '-' only")
        if why is not None:
            raise ConfigError(f"'secrets.{name}': {why}")


def parse_config(text: str, path: str = "", base_dir: str = ".") -> Config:
    where = path or "<config>"
    try:
        data = tomli.loads(text)
    except tomli.TOMLDecodeError as e:
        raise ConfigError(f"{where}: {e}") from None
    except (RecursionError, ValueError) as e:  # nesting or a number past the parser's limits
        raise ConfigError(f"{where}: cannot read the config: {type(e).__name__}") from None
    try:
        cfg = _build(Config, data, "")
        cfg = dataclasses.replace(cfg, path=path, base_dir=base_dir)
        token = os.environ.get("SWARM_TOKEN")
        if token:
            cfg = dataclasses.replace(cfg, security=dataclasses.replace(cfg.security, token=token))
        _validate(cfg)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
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
    return parse_config(text, str(p), str(p.resolve().parent))


def default_config_text() -> str:
    """The fully commented default config (also committed as configs/swarm-config.toml)."""
    return resources.files("swarm").joinpath("data/swarm-config.toml").read_text(encoding="utf-8")
