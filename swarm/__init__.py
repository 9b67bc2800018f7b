"""swarm: a WebSocket swarm dispatcher and worker nodes for workflows of symbols.

The Python API (the CLI is a thin user of it):

    import swarm

    async with swarm.LocalSwarm(workers=2) as ls:         # or swarm.Client(url, token=...)
        run = await ls.client.deploy("examples/hello.yaml")
        result = await run.wait()

Heavier parts (dispatcher, worker, client) are imported when first used, so that
`import swarm` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

from .backends.internal import Context as HandlerContext  # noqa: E402
from .backends.internal import HandlerFailure, handler  # noqa: E402
from .config import Config, load_config  # noqa: E402
from .errors import (  # noqa: E402
    AuthenticationFailed,
    ConfigError,
    ConnectionFailed,
    DispatcherUnreachable,
    InputError,
    ManifestError,
    Problem,
    ProtocolError,
    RequestRefused,
    StateError,
    SwarmError,
)
from .manifest import load_manifest  # noqa: E402
from .model import RetryPolicy, RollbackSpec, Symbol, Workflow  # noqa: E402
from .results import RunResult, RunUpdate, SymbolOutcome  # noqa: E402

if TYPE_CHECKING:
    from .client import Client, Run
    from .dispatcher import Dispatcher
    from .local import LocalSwarm
    from .worker import Worker

_LAZY = {"Client": "client", "Run": "client", "Dispatcher": "dispatcher",
         "LocalSwarm": "local", "Worker": "worker"}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'swarm' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


__all__ = [
    "AuthenticationFailed",
    "Client",
    "Config",
    "ConfigError",
    "ConnectionFailed",
    "Dispatcher",
    "DispatcherUnreachable",
    "HandlerContext",
    "HandlerFailure",
    "InputError",
    "LocalSwarm",
    "ManifestError",
    "Problem",
    "ProtocolError",
    "RequestRefused",
    "RetryPolicy",
    "RollbackSpec",
    "Run",
    "RunResult",
    "RunUpdate",
    "StateError",
    "Symbol",
    "SwarmError",
    "SymbolOutcome",
    "Worker",
    "Workflow",
    "__version__",
    "handler",
    "load_config",
    "load_manifest",
]
