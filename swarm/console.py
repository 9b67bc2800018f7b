"""Rendering for humans (rich): plans, run results, cluster status, live event lines.

Everything here takes plain data (dicts from the dispatcher, `Plan`) and prints it; no
logic about the workflow lives here. Scripts use `--json` instead.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table

from .plan import Plan
from .protocol import Event

STATE_STYLE = {
    "completed": "green", "running": "cyan", "ready": "blue", "pending": "dim",
    "retrying": "yellow", "failed": "bold red", "skipped": "dim", "rolled_back": "magenta",
    "rolling_back": "magenta",
}
MAX_ROWS = 200


def console(stderr: bool = False) -> Console:
    out = Console(stderr=stderr, highlight=False, soft_wrap=False)
    if not out.is_terminal:  # logs and pipes: wide rows rather than wrapped cells
        out = Console(stderr=stderr, highlight=False, soft_wrap=False, width=160)
    return out


def _box(out: Console) -> box.Box:
    return box.SIMPLE if out.is_terminal else box.ASCII2


def _styled(state: str) -> str:
    style = STATE_STYLE.get(state)
    return f"[{style}]{state}[/]" if style else state


def _fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 120:
        return f"{seconds:.2f} s"
    return f"{seconds / 60:.1f} min"


def print_plan(out: Console, source: str, name: str, version: str, plan: Plan) -> None:
    d = plan.to_dict()
    out.print(f"[bold]{name}[/] {version}  ({source})")
    out.print(f"{d['symbols']} symbols in {len(plan.levels)} levels, "
              f"widest level {d['max_width']}")
    by_backend = ", ".join(f"{k}: {v}" for k, v in plan.by_backend.items())
    out.print(f"backends: {by_backend}")
    out.print(f"critical path ({len(plan.critical_path)} symbols): "
              + " -> ".join(plan.critical_path))
    t = Table(box=_box(out), show_header=True)
    t.add_column("level", justify="right")
    t.add_column("symbols")
    for i, level in enumerate(plan.levels):
        shown = ", ".join(level[:20]) + (f", ... (+{len(level) - 20})" if len(level) > 20 else "")
        t.add_row(str(i), shown)
    out.print(t)


def print_run(out: Console, run: dict[str, Any]) -> None:
    """The per-symbol table and totals of a run record from the dispatcher."""
    tasks = run.get("tasks", [])
    t = Table(box=_box(out), title=f"run {run['run_id']}: {run['workflow']} {run['version']}")
    for col in ("symbol", "status", "node", "attempts", "duration", "note"):
        t.add_column(col, justify="right" if col in ("attempts", "duration") else "left")
    shown = 0
    for task in tasks:
        interesting = task["state"] != "completed" or task["kind"] != "main"
        if shown >= MAX_ROWS and not interesting:
            continue
        shown += 1
        dur = (task["finished_at"] - task["started_at"]
               if task["finished_at"] and task["started_at"] else None)
        name = task["symbol"] if task["kind"] == "main" else f"{task['symbol']} (rollback of " \
            f"{task['parent']})"
        t.add_row(name, _styled(task["state"]), task["node"] or "-", str(task["attempts"]),
                  _fmt_duration(dur), (task["error"] or "")[:80])
    out.print(t)
    if shown < len(tasks):
        out.print(f"({len(tasks) - shown} more completed symbols not shown)")
    counts: dict[str, int] = {}
    for task in tasks:
        if task["kind"] == "main":
            counts[task["state"]] = counts.get(task["state"], 0) + 1
    total = sum(counts.values())
    elapsed = (run["finished_at"] - run["created_at"]) if run.get("finished_at") else None
    parts = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    out.print(f"{_styled(run['status'])}: {total} symbols ({parts}) in {_fmt_duration(elapsed)}")


def print_status(out: Console, s: dict[str, Any]) -> None:
    out.print(f"dispatcher {s['version']}, up {_fmt_duration(s['uptime'])}, state {s['db_path']}")
    nodes = Table(box=_box(out), title="nodes")
    for col in ("name", "state", "capabilities", "running/slots", "labels"):
        nodes.add_column(col)
    for n in s["nodes"]:
        state = "draining" if n["draining"] else ("busy" if n["running"] else "idle")
        labels = ", ".join(f"{k}={v}" for k, v in n.get("labels", {}).items())
        nodes.add_row(n["name"], state, ", ".join(n["capabilities"]),
                      f"{n['running']}/{n['slots']}", labels)
    out.print(nodes if s["nodes"] else "no nodes connected")
    tc = s["tasks"]
    out.print("tasks: " + ", ".join(f"{k} {tc.get(k, 0)}" for k in (
        "ready", "running", "retrying", "completed", "failed", "skipped")))
    if s["runs"]:
        runs = Table(box=_box(out), title="active runs")
        for col in ("run", "workflow", "state", "done/total", "running"):
            runs.add_column(col)
        for r in s["runs"]:
            done = r["tasks"].get("completed", 0)
            runs.add_row(r["run_id"], r["workflow"], r["state"], f"{done}/{r['total']}",
                         str(r["tasks"].get("running", 0)))
        out.print(runs)
    else:
        out.print("no active runs")
    out.print("state DB records: " + ", ".join(f"{k} {v}" for k, v in s["db"].items()))


# Events worth a line while following a run; the rest show in the final table.
_LINE_EVENTS = {"symbol.failed", "symbol.retrying", "symbol.skipped", "symbol.rolled_back",
                "rollback.created", "run.halting", "run.rolling_back", "node.lost"}


def event_line(ev: Event, every: bool = False) -> str | None:
    if not every and ev.kind not in _LINE_EVENTS:
        return None
    stamp = time.strftime("%H:%M:%S", time.localtime(ev.ts))
    who = ev.symbol or ev.node or ""
    detail = ev.data.get("error") or ev.data.get("reason") or ev.data.get("cause") or ""
    if ev.kind == "symbol.retrying":
        detail = f"{detail}; retry in {ev.data.get('delay', 0):.2f} s"
    if every and ev.node and ev.symbol:
        who = f"{ev.symbol} on {ev.node}"
    run = f"{ev.run_id} " if every and ev.run_id else ""
    return f"{stamp} {run}{ev.kind:<18} {who} {detail}".rstrip()


def setup_logging(level: str = "info", file: str = "") -> None:
    lvl = getattr(logging, level.upper(), logging.INFO)
    handlers: list[logging.Handler] = []
    stream = logging.StreamHandler(sys.stderr)
    stream.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s",
                                          "%H:%M:%S"))
    handlers.append(stream)
    if file:
        fh = logging.FileHandler(file)
        fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        handlers.append(fh)
    logging.basicConfig(level=lvl, handlers=handlers, force=True)
    for noisy in ("websockets", "aiosqlite"):
        logging.getLogger(noisy).setLevel(max(lvl, logging.WARNING))
