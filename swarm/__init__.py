"""swarm: a WebSocket swarm dispatcher and worker nodes for workflows of symbols."""

from __future__ import annotations

__version__ = "0.1.0"

from .errors import (  # noqa: E402
    AuthenticationFailed,
    ConfigError,
    ConnectionFailed,
    DispatcherUnreachable,
    InputError,
    ManifestError,
    ProtocolError,
    SwarmError,
)
from .model import RollbackSpec, Symbol, Workflow  # noqa: E402

__all__ = [
    "AuthenticationFailed",
    "ConfigError",
    "ConnectionFailed",
    "DispatcherUnreachable",
    "InputError",
    "ManifestError",
    "ProtocolError",
    "RollbackSpec",
    "Symbol",
    "SwarmError",
    "Workflow",
    "__version__",
]
