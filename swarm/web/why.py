"""Why a symbol is not running, read from the live scheduler (on the event loop, where
the scheduler lives; it is only read). The answer names what holds it back: a dependency,
a lock and who holds it, no worker with its backend or labels, a pause, a wave barrier,
a retry timer, or simply that every matching slot is busy."""

from __future__ import annotations

import itertools
from typing import Any

from ..core import Scheduler
from ..tasks import RUN_FINAL, TERMINAL, Task, TaskState


def why_not_running(core: Scheduler | None, run_id: str, symbol: str) -> list[dict[str, Any]]:
    """Reasons, most decisive first; [] when it runs, ended or is unknown to the scheduler
    (a finished run lives on in the DB only)."""
    run = core._runs.get(run_id) if core is not None else None  # noqa: SLF001 - read only
    if core is None or run is None:
        return []
    task = run.tasks.get(symbol) or next((t for t in run.rollbacks if t.name == symbol), None)
    if task is None or task.state is TaskState.RUNNING or task.state in TERMINAL:
        return []
    out: list[dict[str, Any]] = []
    if run.state in RUN_FINAL:
        return out
    if run.paused:
        out.append({"kind": "paused", "text": "the run is paused: nothing new starts until "
                                              "it is resumed"})
    if run.halted and task.kind == "main":
        out.append({"kind": "halted", "text": "the run is halting after a failure: no new "
                                              "symbol starts"})
    if task.state is TaskState.RETRYING:
        out.append({"kind": "retry", "due": task.due,
                    "text": "failed; its next attempt is due at the time shown"})
    if task.state is TaskState.PENDING:
        for d in task.deps:
            if d.state is not TaskState.COMPLETED:
                out.append({"kind": "dependency", "symbol": d.name, "state": d.state.value,
                            "text": f"waits for {d.name} ({d.state.value})"})
        if run.waves and task.level > run.wave and task.kind == "main":
            out.append({"kind": "wave", "level": task.level, "wave": run.wave,
                        "text": f"wave barrier: level {task.level} starts when every symbol "
                                f"of level {run.wave} has finished"})
    # The scheduler's own word, where it keeps one (`blocked`: #13's waiting reasons, with
    # the time a `wait_for_worker` runs out); else the reasons read from its state below.
    blocked = getattr(task, "blocked", "")
    if blocked and task.state is TaskState.READY:
        out.append({"kind": "waiting", "text": str(blocked),
                    "due": getattr(task, "wait_due", None)})
    elif task.state in (TaskState.READY, TaskState.PENDING):
        out.extend(_placement(core, task, held=bool(out)))
    return out


def _placement(core: Scheduler, task: Task, held: bool) -> list[dict[str, Any]]:
    """`held`: something above holds it back already; a busy slot is then no reason."""
    out: list[dict[str, Any]] = []
    place = core._place  # noqa: SLF001 - read only
    nodes = list(core._nodes.values())  # noqa: SLF001 - read only
    if task.resources and not place.resources_free(task):
        caps = task.run.workflow.resources
        for key in task.resources:
            if place.held.get(key, 0) < caps.get(key, 1):
                continue
            holders = [f"{t.run.id}/{t.name}" for t in _running(core)
                       if t.holding and key in t.resources]
            out.append({"kind": "resource", "resource": key, "holders": holders[:20],
                        "text": f"resource {key} is held by "
                                f"{', '.join(holders[:5]) or 'another symbol'}"})
    with_backend = [n for n in nodes if task.dispatch in n.caps]
    if not with_backend:
        out.append({"kind": "backend", "dispatch": task.dispatch,
                    "text": f"no connected worker runs the {task.dispatch} backend"})
    elif task.requires and not any(
            all(n.labels.get(k) == v for k, v in task.requires.items()) for n in with_backend):
        want = ", ".join(f"{k}={v}" for k, v in task.requires.items())
        out.append({"kind": "labels", "requires": dict(task.requires),
                    "text": f"no connected worker with the {task.dispatch} backend has the "
                            f"labels {want}"})
    elif task.state is TaskState.READY and not out and not held:
        free = sum(n.free for n in with_backend)
        out.append({"kind": "slots", "free": free,
                    "text": "queued: every slot of the workers that can run it is busy"
                    if not free else "queued: it starts with the next placement"})
    return out


def _running(core: Scheduler) -> list[Task]:
    return list(itertools.chain.from_iterable(
        n.running.values() for n in core._nodes.values()))  # noqa: SLF001 - read only
