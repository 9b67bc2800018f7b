"""The workflow model: what a manifest means, as frozen dataclasses.

`swarm.manifest` turns YAML/TOML/dicts into these (with every problem reported);
everything downstream (plan, core, wire) works on them and never on raw documents.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

SYMBOL_TYPES = ("action", "filter", "state", "query", "transform")
CONTEXTS = ("wordpress", "filesystem", "database", "network", "generic")
DISPATCHES = ("rust_injector", "php_engine", "powershell_engine", "internal")
MODES = ("rolling", "waves")
ON_FAILURE = ("rollback", "continue", "abort")

DEFAULT_TIMEOUT_MS = 30_000
DEFAULT_RETRIES = 3  # [coordinator] task_retry_limit: a symbol without `retries`


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Backoff between attempts; a symbol's own policy overrides the config's `[retry]`."""

    initial_delay: int = 1000  # ms before the first retry
    max_delay: int = 60_000  # ms, cap on any one delay
    backoff_factor: float = 2.0
    jitter: float = 0.1  # fraction of the delay, spread both ways

    def to_dict(self) -> dict[str, Any]:
        return {
            "initial_delay": self.initial_delay,
            "max_delay": self.max_delay,
            "backoff_factor": self.backoff_factor,
            "jitter": self.jitter,
        }


@dataclass(frozen=True, slots=True)
class RollbackSpec:
    """The symbol that undoes a completed symbol. It has no dependencies of its own."""

    name: str
    type: str = "action"
    context: str = "generic"
    dispatch: str = "internal"
    parameters: dict[str, Any] = field(default_factory=dict)
    timeout: int = DEFAULT_TIMEOUT_MS
    retries: int | None = None  # None: the dispatcher's task_retry_limit
    secrets: dict[str, str] = field(default_factory=dict)  # env name -> worker's reference

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "name": self.name,
            "type": self.type,
            "context": self.context,
            "dispatch": self.dispatch,
            "parameters": self.parameters,
            "timeout": self.timeout,
            **({"retries": self.retries} if self.retries is not None else {}),
        }
        if self.secrets:
            d["secrets"] = dict(self.secrets)
        return d


@dataclass(frozen=True, slots=True)
class Symbol:
    name: str
    type: str
    context: str = "generic"
    dispatch: str = "internal"
    parameters: dict[str, Any] = field(default_factory=dict)
    dependencies: tuple[str, ...] = ()
    priority: int = 0
    timeout: int = DEFAULT_TIMEOUT_MS  # ms per attempt
    # Retries after the first failure; None: the dispatcher's [coordinator] task_retry_limit.
    retries: int | None = None
    resources: tuple[str, ...] = ()
    rollback: RollbackSpec | None = None
    description: str = ""
    retry: RetryPolicy | None = None
    deadline: int | None = None  # ms across all attempts
    requires: dict[str, str] = field(default_factory=dict)  # worker labels
    # Environment variable -> name of a secret in the worker's [secrets]. Only names
    # travel; the worker reads the value (see swarm.secrets).
    secrets: dict[str, str] = field(default_factory=dict)
    # ms to wait for a connected worker that can run it (backend and labels) before it
    # fails; None: the workflow's `wait_for_worker`, and without one, wait for ever.
    wait_for_worker: int | None = None
    # ms an attempt may go without a progress report or checkpoint before it is taken for
    # hung and retried like a timeout; None: only `timeout` bounds it.
    heartbeat_timeout: int | None = None
    checkpoint: bool = True  # False: its checkpoints are not kept nor handed on

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "name": self.name,
            "type": self.type,
            "context": self.context,
            "dispatch": self.dispatch,
            "parameters": self.parameters,
            "dependencies": list(self.dependencies),
            "priority": self.priority,
            "timeout": self.timeout,
        }
        if self.retries is not None:  # unset stays unset: the dispatcher's default applies
            d["retries"] = self.retries
        if self.resources:
            d["resources"] = list(self.resources)
        if self.rollback is not None:
            d["rollback"] = self.rollback.to_dict()
        if self.description:
            d["description"] = self.description
        if self.retry is not None:
            d["retry"] = self.retry.to_dict()
        if self.deadline is not None:
            d["deadline"] = self.deadline
        if self.requires:
            d["requires"] = dict(self.requires)
        if self.secrets:
            d["secrets"] = dict(self.secrets)
        if self.wait_for_worker is not None:  # absent stays absent: the hash is unchanged
            d["wait_for_worker"] = self.wait_for_worker
        if self.heartbeat_timeout is not None:
            d["heartbeat_timeout"] = self.heartbeat_timeout
        if not self.checkpoint:
            d["checkpoint"] = False
        return d


@dataclass(frozen=True, slots=True)
class Workflow:
    name: str
    version: str
    symbols: tuple[Symbol, ...]
    description: str = ""
    mode: str = "rolling"
    on_failure: str = "rollback"
    resources: dict[str, int] = field(default_factory=dict)  # key -> capacity
    source: str = "<memory>"  # where it was loaded from; not part of the content
    wait_for_worker: int | None = None  # ms; a symbol's own value wins (see Symbol)
    deadline: int | None = None  # ms for the whole run, from its start (survives restarts)
    # Computed once: the content hash of 100,000 symbols takes 0.7 s, and a deploy asks
    # for it twice. Not an argument, so dataclasses.replace() starts a fresh one.
    _memo: dict[str, str] = field(init=False, default_factory=dict, compare=False,
                                  repr=False)

    def to_dict(self) -> dict[str, Any]:
        """The canonical document: loading it again gives an equal workflow."""
        d: dict[str, Any] = {
            "name": self.name,
            "version": self.version,
            "description": self.description,
            "mode": self.mode,
            "on_failure": self.on_failure,
            "symbols": [s.to_dict() for s in self.symbols],
        }
        if self.resources:
            d["resources"] = dict(self.resources)
        if self.wait_for_worker is not None:
            d["wait_for_worker"] = self.wait_for_worker
        if self.deadline is not None:
            d["deadline"] = self.deadline
        return d

    @property
    def content_hash(self) -> str:
        """sha256 of the canonical document: equal workflows have equal hashes."""
        found = self._memo.get("hash")
        if found is None:
            text = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"),
                              default=str)
            found = self._memo["hash"] = hashlib.sha256(text.encode()).hexdigest()
        return found

    def wait_for_worker_of(self, sym: Symbol) -> int | None:
        """ms the symbol waits for a worker that can run it; None: for ever."""
        return sym.wait_for_worker if sym.wait_for_worker is not None else self.wait_for_worker

    def symbol(self, name: str) -> Symbol:
        for s in self.symbols:
            if s.name == name:
                return s
        raise KeyError(name)
