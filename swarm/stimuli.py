"""Stimuli: what the dispatcher fed its scheduler, kept (bounded) with the journal so that
the scheduler can be rebuilt and checked against it (`swarm debug replay`).

A *session* is one dispatcher's life on a state DB: its scheduler starts empty, so the
session's stimuli from its first one replay to the journal it wrote. The first stimulus
of a session is a `SessionStarted` carrying the scheduler's config; then every event fed
to `Scheduler.handle` (restored runs included: `RunRestored` carries the task records as
they were read), and a `Forgotten` marker wherever the shell dropped finished runs from
the scheduler's memory. Attempt tokens are random: those drawn while an event was handled
are kept with it, and a replay hands the same ones out again.

Encoding: one msgpack array per stimulus, the event's fields in declaration order (the
nested task results and task records as arrays of theirs). A run's workflow is not
copied: it is the run's manifest in the `runs` table, so a pruned run is no longer
replayable, which is the bound on what is replayable besides the number of rows kept.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import msgpack  # type: ignore[import-untyped]

from . import events as ev
from .model import RetryPolicy, Workflow
from .protocol import ProgressReport, TaskResult

KEPT = 200_000  # stimuli kept: the oldest beyond that go, a few thousand at a time
TRIM_EVERY = 5_000  # ... once this many more have been written


@dataclass(frozen=True, slots=True)
class SessionStarted:
    """A dispatcher started: its scheduler's config (the token source aside)."""

    config: dict[str, Any]
    stimulus_id: int = 0


@dataclass(frozen=True, slots=True)
class Forgotten:
    """The shell dropped finished runs from the scheduler's memory (`forget_finished`)."""

    stimulus_id: int = 0


Fed = ev.Event | SessionStarted | Forgotten


@dataclass(frozen=True, slots=True)
class Stimulus:
    """One stimulus to store: `entries` journal entries of the batch it is written with,
    from index `first`, are what it caused; `tokens` the attempt tokens it drew."""

    id: int
    session: int
    event: Fed
    first: int
    entries: int
    tokens: tuple[int, ...] = ()


_TYPES: dict[str, type[Any]] = {t.__name__: t for t in (
    ev.NodeConnected, ev.NodeDisconnected, ev.NodeHeartbeat, ev.NodeDraining,
    ev.RunSubmitted, ev.RunRestored, ev.RollbackRequested, ev.RunPaused, ev.RunResumed,
    ev.RunCancelled, ev.ResultsReceived, ev.ProgressReceived, ev.Tick, SessionStarted,
    Forgotten)}
_FIELDS = {name: tuple(f.name for f in dataclasses.fields(t) if f.name != "stimulus_id")
           for name, t in _TYPES.items()}
_RESULT_FIELDS = tuple(f.name for f in dataclasses.fields(TaskResult))
_REPORT_FIELDS = tuple(f.name for f in dataclasses.fields(ProgressReport))
_RECORD_FIELDS = tuple(f.name for f in dataclasses.fields(ev.TaskRecord))
_TUPLES = frozenset({"capabilities", "running"})  # tuple fields of plain values


def _plain(name: str, value: Any) -> Any:
    if isinstance(value, Workflow):
        return None  # the run's manifest, in `runs` (see the module docstring)
    if name == "results":
        return [[getattr(r, f) for f in _RESULT_FIELDS] for r in value]
    if name == "tasks":
        return [[getattr(r, f) for f in _RECORD_FIELDS] for r in value]
    if name == "reports":
        return [[getattr(r, f) for f in _REPORT_FIELDS] for r in value]
    return value


def encode(s: Stimulus) -> tuple[str, bytes]:
    """The stimulus's kind (its event's class name) and its body."""
    kind = type(s.event).__name__
    fields = [_plain(f, getattr(s.event, f)) for f in _FIELDS[kind]]
    return kind, msgpack.packb([fields, list(s.tokens)], use_bin_type=True, default=str)


def decode(stimulus_id: int, kind: str, body: bytes,
           workflows: dict[str, Workflow]) -> tuple[Fed, tuple[int, ...]]:
    """The event a row holds and the tokens it drew. `workflows` gives the workflow of a
    run (KeyError if it is gone)."""
    fields, tokens = msgpack.unpackb(body, raw=False, strict_map_key=False)
    args = dict(zip(_FIELDS[kind], fields, strict=True))
    for name, value in args.items():
        if name == "workflow":
            args[name] = workflows[args["run_id"]]
        elif name == "results":
            args[name] = tuple(TaskResult(*r) for r in value)
        elif name == "tasks":
            args[name] = tuple(_record(r) for r in value)
        elif name == "reports":
            args[name] = tuple(ProgressReport(*r) for r in value)
        elif name in _TUPLES and value is not None:
            args[name] = tuple(value)
    return _TYPES[kind](**args, stimulus_id=stimulus_id), tuple(tokens)


def _record(values: list[Any]) -> ev.TaskRecord:
    kw: dict[str, Any] = dict(zip(_RECORD_FIELDS, values, strict=True))
    kw["after"] = tuple(kw["after"])
    return ev.TaskRecord(**kw)


def session_config(config: Any) -> dict[str, Any]:
    """A `SchedulerConfig` as plain data (its token source left out)."""
    out = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
           if f.name != "token_source"}
    out["retry"] = dataclasses.asdict(out["retry"])
    return out


def scheduler_kwargs(config: dict[str, Any]) -> dict[str, Any]:
    """The inverse of `session_config`: keyword arguments of `SchedulerConfig`."""
    return {**config, "retry": RetryPolicy(**config["retry"])}
