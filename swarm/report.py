"""A run's execution report, computed from its records in the state DB (so it works for
finished runs, after a restart). Pure: rows in, a JSON-able dict out.

Definitions (all times are the dispatcher's clock):
- total duration: run created -> run finished (or now, for an active run);
- effective duration: time during which at least one of the run's attempts was running;
- utilisation: busy slot-seconds (sum of the run's attempt durations) / available
  slot-seconds (slots of every worker connected during the run x the overlap);
- planned critical path: the longest dependency chain by symbol count; actual critical
  path: the longest chain weighted by each symbol's measured duration.
"""

from __future__ import annotations

import json
import signal
from collections import Counter
from collections.abc import Sequence
from typing import Any

from .journal import Kind
from .manifest import workflow_from_dict
from .plan import analyze
from .secrets import redact
from .tasks import AttemptOutcome, RunState, TaskState


def _union(intervals: Sequence[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


STDERR_TAIL = 2000  # characters of an attempt's stderr in a report: the end says why
# The error code of a run that failed, from how its first symbol failed for good.
ERROR_CODES = ("SYMBOL_FAILED", "SYMBOL_TIMEOUT", "SYMBOL_KILLED", "WORKER_LOST",
               "ROLLBACK_FAILED", "RUN_CANCELLED")


def _signal(code: int | None) -> str | None:
    """A backend killed by a signal has a negative exit code (asyncio's convention)."""
    if code is None or code >= 0:
        return None
    try:
        return signal.Signals(-code).name
    except ValueError:
        return f"signal {-code}"


def _attempt(a: dict[str, Any], output: Any) -> dict[str, Any]:
    stderr = a.get("stderr") or ""
    return {
        "attempt": a["attempt"], "node": a["node"], "token": a["token"],
        "started_at": a["started_at"], "finished_at": a["finished_at"],
        "outcome": a["outcome"], "duration_ms": a.get("duration_ms"),
        "exit_code": a.get("exit_code"), "signal": _signal(a.get("exit_code")),
        "error": a.get("error"), "output": redact(output),
        "stderr_tail": stderr[-STDERR_TAIL:], "truncated": bool(a.get("truncated")),
    }


def _usage(metrics: dict[str, float], output: Any) -> None:
    """Add what a backend reported as `{"metrics": {"cost": ..., "tokens": ...}}`."""
    if not isinstance(output, dict) or not isinstance(output.get("metrics"), dict):
        return
    for key in ("cost", "tokens"):
        value = output["metrics"].get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            metrics[key] += value


def _run_error(run: dict[str, Any], by_task: dict[str, dict[str, Any]],
               events: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Why a run did not complete: its first symbol that failed for good, with a code."""
    if run["status"] in (RunState.COMPLETED, RunState.RUNNING, RunState.PAUSED):
        return None
    for e in events:
        if e["kind"] != Kind.SYMBOL_FAILED:
            continue
        sym = by_task.get(e["task_id"] or "")
        last = sym["attempts"][-1] if sym and sym["attempts"] else {}
        message = (e["data"].get("error") or (last.get("error") if last else None)
                   or TaskState.FAILED.value)
        if sym is not None and sym["kind"] == "rollback":
            code = "ROLLBACK_FAILED"
        elif last.get("outcome") == AttemptOutcome.LOST or message.startswith("worker lost"):
            code = "WORKER_LOST"
        elif last.get("outcome") == AttemptOutcome.TIMEOUT:
            code = "SYMBOL_TIMEOUT"
        elif last.get("signal"):
            code = "SYMBOL_KILLED"
        else:
            code = "SYMBOL_FAILED"
        return {"code": code, "message": message, "symbol": e["symbol"],
                "timestamp": e["ts"],
                # A failure the backend did not call final: `deploy --resume` may get past it.
                "recoverable": bool(e["data"].get("retryable", True))}
    if run["status"] == RunState.CANCELLED:
        ts = next((e["ts"] for e in events if e["kind"] == Kind.RUN_CANCELLED),
                  run["finished_at"])
        return {"code": "RUN_CANCELLED", "message": "the run was cancelled", "symbol": None,
                "timestamp": ts, "recoverable": True}
    return None


def build(run: dict[str, Any], tasks: list[dict[str, Any]], attempts: list[dict[str, Any]],
          events: list[dict[str, Any]], nodes: list[dict[str, Any]], now: float
          ) -> dict[str, Any]:
    """The execution result of a run (the original design's fields, and more)."""
    start = run["created_at"]
    end = run["finished_at"] or now
    total = max(end - start, 1e-9)
    undo_at = run.get("rollback_requested_at")
    if undo_at is not None:  # a rollback requested later is a phase of its own, apart
        undo = [a for a in attempts if a["started_at"] >= undo_at]
        attempts = [a for a in attempts if a["started_at"] < undo_at]
    main = [t for t in tasks if t["kind"] == "main"]
    by_state = Counter(t["state"] for t in main)
    succeeded = by_state[TaskState.COMPLETED] + by_state[TaskState.ROLLED_BACK]
    spans = [(a["started_at"], a["finished_at"] or end) for a in attempts]
    busy = sum(b - a for a, b in spans)
    available = sum(n["slots"] * max(0.0, min(n["left_at"] or end, end)
                                     - max(n["joined_at"], start)) for n in nodes)
    dispatch = {t["task_id"]: t["dispatch"] for t in tasks}
    backends: dict[str, dict[str, float]] = {}
    for a, (s, e) in zip(attempts, spans, strict=True):
        b = backends.setdefault(dispatch.get(a["task_id"], "?"),
                                {"symbols": 0, "attempts": 0, "busy_seconds": 0.0})
        b["attempts"] += 1
        b["busy_seconds"] += e - s
    for t in main:
        backends.setdefault(t["dispatch"], {"symbols": 0, "attempts": 0, "busy_seconds": 0.0})
        backends[t["dispatch"]]["symbols"] += 1
    wf = workflow_from_dict(run["manifest"], source=f"<run {run['run_id']}>")
    planned = analyze(wf)
    measured = {a["task_id"].split("/", 1)[1]: (e - s) * 1000
                for a, (s, e) in zip(attempts, spans, strict=True) if a["outcome"] == "ok"}
    actual = analyze(wf, {k: v for k, v in measured.items() if k in planned.rank})
    per_task: dict[str, list[dict[str, Any]]] = {}
    usage = {"cost": 0.0, "tokens": 0.0}
    resources: dict[str, dict[str, float]] = {}
    held = {s.name: s.resources for s in wf.symbols if s.resources}
    for a, (s, e) in zip(attempts, spans, strict=True):
        output = json.loads(a["result"]) if a.get("result") is not None else None
        per_task.setdefault(a["task_id"], []).append(_attempt(a, output))
        _usage(usage, output)  # before redaction: `tokens` looks like a secret's name
        name = a["task_id"].split("/", 1)[1]
        for key in held.get(name, ()) if not name.endswith("/rollback") else ():
            r = resources.setdefault(key, {"acquisitions": 0, "hold_seconds": 0.0})
            r["acquisitions"] += 1
            r["hold_seconds"] += e - s
    by_task = {t["task_id"]: {
        "name": t["symbol"], "kind": t["kind"], "parent": t["parent"],
        "dispatch": t["dispatch"], "state": t["state"], "error": t["error"],
        "output": redact(t["result"]), "started_at": t["started_at"],
        "finished_at": t["finished_at"], "attempts": per_task.get(t["task_id"], []),
        # A long-running symbol's last word: its last checkpoint's time, progress, message.
        **({"checkpoint_at": t.get("checkpoint_at"), "progress": t.get("progress"),
            "message": t.get("message")}
           if t.get("checkpoint_at") is not None or t.get("progress") is not None else {}),
    } for t in tasks}
    symbols = list(by_task.values())
    return {
        "run_id": run["run_id"],
        "workflow": run["workflow"],
        "version": run["version"],
        "manifest_hash": run["manifest_hash"],
        "status": run["status"],
        "started_at": start,
        "completed_at": run["finished_at"],
        "finished_at": run["finished_at"],
        "rollback_status": run.get("rollback_status"),
        "rollback_requested_at": undo_at,
        "rollback_finished_at": run.get("rollback_finished_at"),
        "rollback_attempts": len(undo) if undo_at is not None else 0,
        "error": _run_error(run, by_task, events),
        "totals": dict(sorted(by_state.items())),
        "symbol_count": len(main),
        "metrics": {
            "cost": usage["cost"],
            "tokens": usage["tokens"],
            "total_duration": total,
            "effective_duration": _union(spans),
            "success_rate": succeeded / len(main) if main else 0.0,
            "error_rate": by_state[TaskState.FAILED] / len(main) if main else 0.0,
            "throughput": succeeded / total,
            "attempts": len(attempts),
            "retries": sum(1 for e in events if e["kind"] == Kind.SYMBOL_RETRYING),
            "worker_losses": sum(1 for a in attempts if a["outcome"] == AttemptOutcome.LOST),
            "backends": backends,
            "busy_slot_seconds": busy,
            "available_slot_seconds": available,
            "utilisation": busy / available if available else 0.0,
            "planned_critical_path": list(planned.critical_path),
            "actual_critical_path": list(actual.critical_path),
            "actual_critical_path_seconds": actual.critical_length / 1000
            if measured else 0.0,
        },
        "resource_usage": {
            "resources": resources,
            "backends": {k: {"attempts": v["attempts"], "busy_seconds": v["busy_seconds"]}
                         for k, v in backends.items()},
        },
        "symbols": symbols,
        "timeline": [{"seq": e["seq"], "t": e["ts"] - start, "kind": e["kind"],
                      "symbol": e["symbol"], "node": e["node"], "attempt": e["attempt"]}
                     for e in events],
    }
