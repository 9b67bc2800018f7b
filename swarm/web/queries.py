"""Read-only queries of the state DB for the dashboard.

They run on a thread of their own with a connection of their own (`mode=ro`): a page of
100,000 symbols is read and shaped there, not on the event loop that dispatches. WAL
lets it read what is committed while the dispatcher writes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from ..secrets import redact
from ..tasks import RUN_ACTIVE, NodeState, TaskState, sql_list

T = TypeVar("T")
TAIL = 4096  # characters of stderr and of text output a symbol's page shows
RUN_SORTS = {"start": "created_at", "duration": "COALESCE(finished_at, ?) - created_at"}
_GRAPHS_KEPT = 4  # runs whose graph (names, dependencies, levels) stays cached


@dataclass(frozen=True, slots=True)
class Graph:
    """The immutable part of a run: its symbols in manifest order, dependencies as
    indices, levels, and each symbol's backend. Built once per run from the manifest."""

    names: tuple[str, ...]
    deps: tuple[tuple[int, ...], ...]
    levels: tuple[int, ...]
    dispatch: tuple[str, ...]
    specs: tuple[dict[str, Any], ...]


class Queries:
    def __init__(self, path: str) -> None:
        self.path = path
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="swarm-web")
        self._con: sqlite3.Connection | None = None
        self._graphs: OrderedDict[str, Graph] = OrderedDict()

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def close(self) -> None:
        def shut() -> None:
            if self._con is not None:
                self._con.close()
                self._con = None
        self._pool.submit(shut)
        self._pool.shutdown(wait=True)

    def _db(self) -> sqlite3.Connection:
        if self._con is None:
            self._con = sqlite3.connect(f"file:{Path(self.path).resolve()}?mode=ro", uri=True,
                                        check_same_thread=False, timeout=5)
            self._con.row_factory = sqlite3.Row
        return self._con

    def _rows(self, sql: str, params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
        return [dict(r) for r in self._db().execute(sql, params).fetchall()]

    # --- runs ---------------------------------------------------------------------------

    def runs(self, status: str, workflow: str, sort: str, descending: bool, offset: int,
             limit: int) -> dict[str, Any]:
        """One page of every run in the DB, with the total that match."""
        where, params = [], []
        if status:
            where.append("status = ?")
            params.append(status)
        if workflow:
            where.append("workflow LIKE ? ESCAPE '\\'")
            params.append("%" + workflow.replace("\\", "\\\\").replace("%", "\\%")
                          .replace("_", "\\_") + "%")
        clause = (" WHERE " + " AND ".join(where)) if where else ""
        total = self._db().execute(f"SELECT COUNT(*) FROM runs{clause}", params).fetchone()[0]
        order = RUN_SORTS.get(sort, RUN_SORTS["start"])
        now = time.time()
        order_params = [now] if "?" in order else []
        rows = self._rows(
            "SELECT run_id, workflow, version, status, mode, on_failure, created_at,"
            " finished_at,"
            " (SELECT COUNT(*) FROM tasks t WHERE t.run_id = r.run_id AND t.kind = 'main')"
            "  AS total,"
            " (SELECT COUNT(*) FROM tasks t WHERE t.run_id = r.run_id AND t.kind = 'main'"
            f"  AND t.state IN {sql_list(TaskState.COMPLETED, TaskState.ROLLED_BACK)}) AS done,"
            " (SELECT COUNT(*) FROM tasks t WHERE t.run_id = r.run_id AND t.kind = 'main'"
            f"  AND t.state = '{TaskState.FAILED.value}') AS failed"
            f" FROM runs r{clause} ORDER BY {order} {'DESC' if descending else 'ASC'},"
            " run_id LIMIT ? OFFSET ?",
            (*params, *order_params, limit, offset))
        workflows = [r["workflow"] for r in self._rows(
            "SELECT DISTINCT workflow FROM runs ORDER BY workflow LIMIT 500")]
        return {"runs": rows, "total": total, "offset": offset, "limit": limit,
                "workflows": workflows, "now": now}

    def graph(self, run_id: str) -> Graph | None:
        found = self._graphs.get(run_id)
        if found is not None:
            self._graphs.move_to_end(run_id)
            return found
        row = self._db().execute("SELECT manifest FROM runs WHERE run_id = ?",
                                 (run_id,)).fetchone()
        if row is None:
            return None
        symbols = json.loads(row[0])["symbols"]
        index = {s["name"]: i for i, s in enumerate(symbols)}
        deps = tuple(tuple(index[d] for d in s.get("dependencies", ()) if d in index)
                     for s in symbols)
        levels = _levels(deps)
        g = Graph(tuple(s["name"] for s in symbols), deps, levels,
                  tuple(s.get("dispatch", "internal") for s in symbols),
                  tuple(symbols))
        self._graphs[run_id] = g
        while len(self._graphs) > _GRAPHS_KEPT:
            self._graphs.popitem(last=False)
        return g

    def run(self, run_id: str) -> dict[str, Any] | None:
        """A run and its symbols, as columns (100,000 symbols in a few MB of JSON)."""
        runs = self._rows("SELECT run_id, workflow, version, manifest_hash, on_failure, mode,"
                          " status, created_at, finished_at FROM runs WHERE run_id = ?",
                          (run_id,))
        g = self.graph(run_id)
        if not runs or g is None:
            return None
        n = len(g.names)
        state, node, attempts = [TaskState.PENDING.value] * n, [""] * n, [0] * n
        started: list[float | None] = [None] * n
        finished: list[float | None] = [None] * n
        rollbacks = []
        for t in self._db().execute(
                "SELECT kind, position, symbol, parent, state, node, attempts, started_at,"
                " finished_at FROM tasks WHERE run_id = ?", (run_id,)):
            if t[0] != "main":
                rollbacks.append({"symbol": t[2], "parent": t[3], "state": t[4], "node": t[5],
                                  "attempts": t[6], "started_at": t[7], "finished_at": t[8]})
                continue
            i = t[1]
            if 0 <= i < n:
                state[i], node[i], attempts[i] = t[4], t[5] or "", t[6]
                started[i], finished[i] = t[7], t[8]
        return {"run": runs[0], "names": g.names, "deps": g.deps, "levels": g.levels,
                "dispatch": g.dispatch, "state": state, "node": node, "attempts": attempts,
                "started": started, "finished": finished, "rollbacks": rollbacks,
                "now": time.time()}

    def attempts(self, run_id: str) -> dict[str, Any]:
        """Every attempt of a run, as columns, for the waterfall."""
        rows = self._db().execute(
            "SELECT t.symbol, a.attempt, a.node, a.started_at, a.finished_at, a.outcome"
            " FROM attempts a JOIN tasks t ON t.task_id = a.task_id WHERE a.run_id = ?"
            " ORDER BY a.id", (run_id,)).fetchall()
        slots = {r[0]: r[1] for r in self._db().execute("SELECT name, MAX(slots) FROM nodes"
                                                         " GROUP BY name")}
        return {"symbol": [r[0] for r in rows], "attempt": [r[1] for r in rows],
                "node": [r[2] for r in rows], "start": [r[3] for r in rows],
                "end": [r[4] for r in rows], "outcome": [r[5] for r in rows],
                "slots": slots, "now": time.time()}

    def symbol(self, run_id: str, name: str) -> dict[str, Any] | None:
        """One symbol: its spec (parameters redacted), every attempt, its dependencies."""
        g = self.graph(run_id)
        # Every column: those other issues add (progress, checkpoints) show up as they come.
        tasks = [_extra(t, _TASK_INTERNAL) for t in self._rows(
            "SELECT * FROM tasks WHERE run_id = ? AND symbol = ?", (run_id, name))]
        if g is None or not tasks:
            return None
        task = next((t for t in tasks if t["kind"] == "main"), tasks[0])
        task["result"] = _output(task["result"])
        attempts = [_extra(a, _ATTEMPT_INTERNAL) for a in self._rows(
            "SELECT * FROM attempts WHERE task_id = ? ORDER BY id", (task["task_id"],))]
        for a in attempts:
            a["token"] = f"{a['token'] & 0xFFFFFFFFFFFFFFFF:016x}"  # as an opaque id
            a["result"] = _output(a["result"])
            a["stderr"] = _tail(a["stderr"])
        spec: dict[str, Any] = {}
        deps: list[dict[str, Any]] = []
        if name in g.names:
            i = g.names.index(name)
            spec = dict(g.specs[i])
            spec["parameters"] = redact(spec.get("parameters") or {})
            if isinstance(spec.get("rollback"), dict):
                spec["rollback"] = {**spec["rollback"],
                                    "parameters": redact(spec["rollback"].get("parameters")
                                                         or {})}
            spec["level"] = g.levels[i]
            names = [g.names[d] for d in g.deps[i]]
            states = {r["symbol"]: r["state"] for r in self._rows(
                "SELECT symbol, state FROM tasks WHERE run_id = ? AND kind = 'main' AND"
                " symbol IN (SELECT value FROM json_each(?))", (run_id, json.dumps(names)))}
            deps = [{"symbol": d, "state": states.get(d, TaskState.PENDING.value)}
                    for d in names]
        rollback = next((t for t in tasks if t["kind"] == "rollback"), None)
        return {"task": task, "spec": spec, "attempts": attempts, "dependencies": deps,
                "rollback": rollback, "now": time.time()}

    def nodes(self) -> list[dict[str, Any]]:
        """Every node the DB knows, connected or not (history survives restarts)."""
        rows = self._rows("SELECT node_id, name, capabilities, slots, labels, status,"
                          " joined_at, left_at, reason, seen_at FROM nodes"
                          f" ORDER BY status = '{NodeState.CONNECTED.value}' DESC,"
                          " COALESCE(left_at, seen_at)"
                          " DESC LIMIT 200")
        for r in rows:
            r["capabilities"] = json.loads(r["capabilities"])
            r["labels"] = json.loads(r["labels"])
        return rows

    def queue(self) -> dict[str, int]:
        """Symbols of unfinished runs by state: the queue as the DB holds it."""
        return {r["state"]: r["n"] for r in self._rows(
            "SELECT state, COUNT(*) AS n FROM tasks WHERE run_id IN (SELECT run_id FROM runs"
            f" WHERE status IN {sql_list(*RUN_ACTIVE)}) GROUP BY state")}


def _levels(deps: tuple[tuple[int, ...], ...]) -> tuple[int, ...]:
    """Each symbol's wave: 0 without dependencies, else 1 + its deepest dependency's
    (Kahn's order: linear, whatever order the manifest lists them in)."""
    n = len(deps)
    waiting = [len(d) for d in deps]
    dependents: list[list[int]] = [[] for _ in range(n)]
    for i, ds in enumerate(deps):
        for d in ds:
            dependents[d].append(i)
    level = [0] * n
    order = [i for i in range(n) if not waiting[i]]
    for i in order:  # grows while it is walked
        for j in dependents[i]:
            level[j] = max(level[j], level[i] + 1)
            waiting[j] -= 1
            if not waiting[j]:
                order.append(j)
    return tuple(level)


_TASK_INTERNAL = ("run_id", "position", "token", "deps", "node_id")
_ATTEMPT_INTERNAL = ("id", "task_id", "run_id")
_KNOWN = frozenset({"task_id", "symbol", "kind", "parent", "dispatch", "state", "attempts",
                    "losses", "node", "due_at", "started_at", "finished_at", "result", "error",
                    "token", "attempt", "outcome", "exit_code", "duration_ms", "stderr",
                    "truncated"})


def _extra(row: dict[str, Any], internal: tuple[str, ...]) -> dict[str, Any]:
    """A row without its internal columns; columns this module does not know yet (JSON
    in TEXT, as the store writes them) decoded and redacted like outputs."""
    out = {k: v for k, v in row.items() if k not in internal}
    for k, v in out.items():
        if k not in _KNOWN and isinstance(v, str) and v[:1] in ("{", "["):
            with contextlib.suppress(ValueError):  # text after all: shown as it is
                out[k] = redact(json.loads(v))
    return out


def _output(raw: str | None) -> Any:
    if raw is None:
        return None
    value = redact(json.loads(raw))
    return _tail(value) if isinstance(value, str) else value


def _tail(text: str | None) -> str | None:
    if text is None or len(text) <= TAIL:
        return text
    return "…" + text[-TAIL:]
