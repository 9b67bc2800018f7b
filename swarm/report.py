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

from collections import Counter
from collections.abc import Sequence
from typing import Any

from .manifest import workflow_from_dict
from .plan import analyze


def _union(intervals: Sequence[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def build(run: dict[str, Any], tasks: list[dict[str, Any]], attempts: list[dict[str, Any]],
          events: list[dict[str, Any]], nodes: list[dict[str, Any]], now: float
          ) -> dict[str, Any]:
    start = run["created_at"]
    end = run["finished_at"] or now
    total = max(end - start, 1e-9)
    undo_at = run.get("rollback_requested_at")
    if undo_at is not None:  # a rollback requested later is a phase of its own, apart
        undo = [a for a in attempts if a["started_at"] >= undo_at]
        attempts = [a for a in attempts if a["started_at"] < undo_at]
    main = [t for t in tasks if t["kind"] == "main"]
    by_state = Counter(t["state"] for t in main)
    succeeded = by_state["completed"] + by_state["rolled_back"]
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
    return {
        "run_id": run["run_id"],
        "workflow": run["workflow"],
        "version": run["version"],
        "manifest_hash": run["manifest_hash"],
        "status": run["status"],
        "started_at": start,
        "finished_at": run["finished_at"],
        "rollback_status": run.get("rollback_status"),
        "rollback_requested_at": undo_at,
        "rollback_finished_at": run.get("rollback_finished_at"),
        "rollback_attempts": len(undo) if undo_at is not None else 0,
        "totals": dict(sorted(by_state.items())),
        "symbols": len(main),
        "metrics": {
            "total_duration": total,
            "effective_duration": _union(spans),
            "success_rate": succeeded / len(main) if main else 0.0,
            "error_rate": by_state["failed"] / len(main) if main else 0.0,
            "throughput": succeeded / total,
            "attempts": len(attempts),
            "retries": sum(1 for e in events if e["kind"] == "symbol.retrying"),
            "worker_losses": sum(1 for a in attempts if a["outcome"] == "lost"),
            "backends": backends,
            "busy_slot_seconds": busy,
            "available_slot_seconds": available,
            "utilisation": busy / available if available else 0.0,
            "planned_critical_path": list(planned.critical_path),
            "actual_critical_path": list(actual.critical_path),
            "actual_critical_path_seconds": actual.critical_length / 1000
            if measured else 0.0,
        },
        "timeline": [{"t": e["ts"] - start, "kind": e["kind"], "symbol": e["symbol"],
                      "node": e["node"], "attempt": e["attempt"]} for e in events],
    }
