"""Rendering for humans (rich): plans, run results, cluster status, live event lines.

Everything here takes plain data (dicts from the dispatcher, `Plan`) and prints it; no
logic about the workflow lives here. Scripts use `--json` instead.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from typing import Any

from rich import box
from rich.console import Console, Group
from rich.live import Live
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from . import journal as jn
from .plan import Plan
from .protocol import Event
from .results import ProgressTracker
from .tasks import RunState, TaskState

STATE_STYLE: dict[str, str] = {
    TaskState.COMPLETED: "green", TaskState.RUNNING: "cyan", TaskState.READY: "blue",
    TaskState.PENDING: "dim", TaskState.RETRYING: "yellow", TaskState.FAILED: "bold red",
    TaskState.SKIPPED: "dim", TaskState.ROLLED_BACK: "magenta",
    RunState.ROLLING_BACK: "magenta",
}
MAX_ROWS = 200


class _Console(Console):
    def on_broken_pipe(self) -> None:
        # rich exits 1 here; the CLI decides instead (output piped into `head` is no failure).
        self.quiet = True
        raise BrokenPipeError


def console(stderr: bool = False) -> Console:
    out = _Console(stderr=stderr, highlight=False, soft_wrap=False)
    if not out.is_terminal:  # logs and pipes: wide rows rather than wrapped cells
        out = _Console(stderr=stderr, highlight=False, soft_wrap=False, width=160)
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


def print_plan(out: Console, source: str, name: str, version: str, plan: Plan,
               prediction: dict[str, Any] | None = None) -> None:
    d = plan.to_dict()
    out.print(f"[bold]{name}[/] {version}  ({source})")
    out.print(f"{d['symbols']} symbols in {len(plan.levels)} levels, "
              f"widest level {d['max_width']}")
    by_backend = ", ".join(f"{k}: {v}" for k, v in plan.by_backend.items())
    out.print(f"backends: {by_backend}")
    out.print(f"critical path ({len(plan.critical_path)} symbols, expected "
              f"{_fmt_duration(plan.critical_length / 1000)}): " + " -> ".join(plan.critical_path))
    if prediction:
        out.print(f"predicted makespan on {prediction['slots']} slots: "
                  f"{_fmt_duration(prediction['makespan'] / 1000)} (lower bound "
                  f"{_fmt_duration(prediction['lower_bound'] / 1000)}, utilisation "
                  f"{prediction['utilisation']:.0%})")
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
        interesting = task["state"] != TaskState.COMPLETED or task["kind"] != "main"
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
    if run.get("rollback_status"):
        out.print(f"then {_rollback_phase(run)}")


def _rollback_phase(run: dict[str, Any]) -> str:
    """A rollback requested after the run ended: its own status and duration."""
    end = run.get("rollback_finished_at")
    took = _fmt_duration(end - run["rollback_requested_at"]) if end else "still running"
    status = run["rollback_status"]
    return f"rollback {_styled(status)} ({took})"


def print_status(out: Console, s: dict[str, Any]) -> None:
    out.print(f"dispatcher {s['version']}, up {_fmt_duration(s['uptime'])}, state {s['db_path']}")
    m = s["summary"]
    out.print(f"active nodes: {m['nodes']} ({m['idle']} idle, {m['busy']} busy)")
    out.print(f"tasks: {m['queued']} queued, {m['running']} running, {m['completed']} "
              f"completed, {m['failed']} failed (completed and failed: all runs in the state DB)")
    out.print(f"active workflows: {m['active_workflows']}")
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
    out.print("tasks of active runs: " + ", ".join(f"{k} {tc.get(k, 0)}" for k in (
        TaskState.PENDING, TaskState.READY, TaskState.RUNNING, TaskState.RETRYING,
        TaskState.COMPLETED, TaskState.FAILED, TaskState.SKIPPED)))
    if s["runs"]:
        runs = Table(box=_box(out), title="active runs")
        for col in ("run", "workflow", "state", "done/total", "running"):
            runs.add_column(col)
        for r in s["runs"]:
            done = r["tasks"].get(TaskState.COMPLETED, 0)
            runs.add_row(r["run_id"], r["workflow"], r["state"], f"{done}/{r['total']}",
                         str(r["tasks"].get(TaskState.RUNNING, 0)))
        out.print(runs)
    else:
        out.print("no active runs")
    waiting = s.get("waiting_for_capability", [])
    if waiting:
        w = Table(box=_box(out), title="waiting for capability: no connected worker can run")
        for col in ("run", "symbol", "backend", "requires", "reason", "fails in"):
            w.add_column(col)
        now = time.time()
        for x in waiting:
            due = x.get("due")
            w.add_row(x["run_id"], x["symbol"], x["dispatch"],
                      ", ".join(f"{k}={v}" for k, v in x["requires"].items()),
                      x.get("reason", ""),
                      "-" if due is None else _fmt_duration(max(0.0, due - now)))
        out.print(w)
    out.print("state DB records: " + ", ".join(f"{k} {v}" for k, v in s["db"].items()))


def print_runs(out: Console, runs: list[dict[str, Any]], now: float) -> None:
    t = Table(box=_box(out), title="runs")
    for col in ("run", "workflow", "status", "done/total", "started", "duration"):
        t.add_column(col, justify="right" if col in ("done/total", "duration") else "left")
    for r in runs:
        end = r["finished_at"] or now
        status = _styled(r["status"])
        if r.get("rollback_status"):
            status += f", then {_rollback_phase(r)}"
        t.add_row(r["run_id"], f"{r['workflow']} {r['version']}", status,
                  f"{r['done']}/{r['total']}",
                  time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["created_at"])),
                  _fmt_duration(end - r["created_at"]))
    out.print(t if runs else "no runs yet")


def print_report(out: Console, rep: dict[str, Any], timeline_rows: int = 40) -> None:
    m = rep["metrics"]
    out.print(f"[bold]run {rep['run_id']}[/]: {rep['workflow']} {rep['version']} "
              f"(manifest {rep['manifest_hash'][:12]}), {_styled(rep['status'])}")
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(rep["started_at"]))
    ended = (time.strftime("%H:%M:%S", time.localtime(rep["finished_at"]))
             if rep["finished_at"] else "still running")
    out.print(f"started {started}, ended {ended}; {rep['symbol_count']} symbols: "
              + ", ".join(f"{n} {s}" for s, n in rep["totals"].items()))
    if rep.get("rollback_status"):
        out.print(f"then {_rollback_phase(rep)}")
    if rep.get("error"):
        e = rep["error"]
        out.print(f"[red]{e['code']}[/]: {escape(e['message'])}"
                  + (f" (symbol {e['symbol']})" if e["symbol"] else "")
                  + ("" if e["recoverable"] else "; not recoverable"))
    print_not_completed(out, rep.get("symbols", []))
    print_long_running(out, rep.get("symbols", []))
    t = Table(box=_box(out), title="metrics", show_header=False)
    t.add_column("metric")
    t.add_column("value", justify="right")
    rows = [
        ("total duration", _fmt_duration(m["total_duration"])),
        ("effective duration", _fmt_duration(m["effective_duration"])),
        ("success rate", f"{m['success_rate']:.1%}"),
        ("error rate", f"{m['error_rate']:.1%}"),
        ("throughput", f"{m['throughput']:.2f} symbols/s"),
        ("attempts / retries", f"{m['attempts']} / {m['retries']}"),
        ("worker losses", str(m["worker_losses"])),
        ("worker utilisation", f"{m['utilisation']:.1%} ({m['busy_slot_seconds']:.2f} of "
                               f"{m['available_slot_seconds']:.2f} slot-seconds)"),
        ("planned critical path", " -> ".join(m["planned_critical_path"])),
        ("actual critical path", " -> ".join(m["actual_critical_path"])
         + f" ({_fmt_duration(m['actual_critical_path_seconds'])})"),
    ]
    for k, v in rows:
        t.add_row(k, v)
    out.print(t)
    b = Table(box=_box(out), title="backends")
    for col in ("backend", "symbols", "attempts", "busy"):
        b.add_column(col, justify="left" if col == "backend" else "right")
    for name, v in m["backends"].items():
        b.add_row(name, str(int(v["symbols"])), str(int(v["attempts"])),
                  _fmt_duration(v["busy_seconds"]))
    out.print(b)
    tl = Table(box=_box(out), title="timeline")
    for col in ("t", "event", "symbol", "node", "attempt"):
        tl.add_column(col, justify="right" if col in ("t", "attempt") else "left")
    events = rep["timeline"]
    for e in events[:timeline_rows]:
        tl.add_row(f"+{e['t']:.3f}s", e["kind"], e["symbol"] or "", e["node"] or "",
                   str(e["attempt"] or ""))
    out.print(tl)
    if len(events) > timeline_rows:
        out.print(f"({len(events) - timeline_rows} more events: --json shows all)")


def progress_text(fraction: float | None, message: str | None) -> str:
    """`40% step 4 of 10`: a progress report as a person reads it."""
    pct = f"{fraction:.0%}" if isinstance(fraction, (int, float)) else ""
    return " ".join(x for x in (pct, message or "") if x)


def print_long_running(out: Console, symbols: list[dict[str, Any]]) -> None:
    """The symbols that checkpointed or reported progress: their last word."""
    rows = [s for s in symbols if "progress" in s or "checkpoint_at" in s]
    if not rows:
        return
    t = Table(box=_box(out), title="checkpoints and progress")
    for col in ("symbol", "state", "last checkpoint", "progress"):
        t.add_column(col)
    for s in rows:
        at = s.get("checkpoint_at")
        t.add_row(s["name"], _styled(s["state"]),
                  time.strftime("%H:%M:%S", time.localtime(at)) if at else "-",
                  escape(progress_text(s.get("progress"), s.get("message"))) or "-")
    out.print(t)


def print_not_completed(out: Console, symbols: list[dict[str, Any]], tail_lines: int = 10
                        ) -> None:
    """Each symbol that did not complete: why (error, exit code or signal), the end of its
    stderr and its output, from its last attempt."""
    for s in symbols:
        if s["state"] in (TaskState.COMPLETED, TaskState.ROLLED_BACK):
            continue
        last = s["attempts"][-1] if s["attempts"] else None
        head = f"[bold]{escape(s['name'])}[/]" + (" (rollback)" if s["kind"] == "rollback"
                                                    else "")
        why = s["error"] or (last["error"] if last else None) or ""
        if last is not None and last["signal"]:
            why += f" [killed by {last['signal']}]"
        elif last is not None and last["exit_code"] not in (None, 0):
            why += f" [exit {last['exit_code']}]"
        attempts = f", {len(s['attempts'])} attempts" if s["attempts"] else ""
        out.print(f"{head}: {_styled(s['state'])}{attempts}: {escape(why.strip())}")
        if last is not None and last["stderr_tail"].strip():
            lines = last["stderr_tail"].rstrip().splitlines()[-tail_lines:]
            out.print("  stderr (end):")
            for line in lines:
                out.print("    " + escape(line), highlight=False)
        if last is not None and last["output"] not in (None, ""):
            text = last["output"] if isinstance(last["output"], str) else json.dumps(
                last["output"], default=str)
            out.print("  output: " + escape(text[:500]), highlight=False)


# Records worth a line while following a run; the rest show in the final table.
_LINE_EVENTS = (jn.SymbolFailed, jn.SymbolRetrying, jn.SymbolSkipped, jn.SymbolRolledBack,
                jn.RollbackCreated, jn.RunHalting, jn.RunRollingBack, jn.NodeLost,
                jn.SymbolWaiting, jn.RunRollbackRequested, jn.RollbackCompleted,
                jn.SymbolCheckpointRejected, jn.RunDeadlineExceeded)


def event_line(ev: Event, every: bool = False, with_run: bool = False) -> str | None:
    rec = jn.from_event(ev)
    if not every and not isinstance(rec, _LINE_EVENTS):
        return None
    stamp = time.strftime("%H:%M:%S", time.localtime(ev.ts))
    who = ev.symbol or ev.node or ""
    detail = ev.data.get("error") or ev.data.get("reason") or ev.data.get("cause") or ""
    match rec:
        case jn.SymbolRetrying(delay=delay):
            detail = f"{detail}; retry in {delay or 0:.2f} s"
        case jn.SymbolWaiting(wait_for_worker=int(wait)):
            detail = f"{detail}; fails in {wait / 1000:.2f} s (wait_for_worker)"
        case jn.RollbackCompleted(status=status, run_status=run_status):
            detail = f"rollback {status}; the run stays {run_status}"
        case jn.SymbolProgress(progress=progress, message=message):
            detail = progress_text(progress, message)
        case jn.SymbolCheckpointed(progress=progress, message=message, size=size):
            detail = f"checkpoint of {size or 0:,} bytes kept; " \
                f"{progress_text(progress, message)}".rstrip("; ")
    if every and ev.node and ev.symbol:
        who = f"{ev.symbol} on {ev.node}"
    run = f"{ev.run_id} " if with_run and ev.run_id else ""
    return " ".join(x for x in (f"{stamp} {run}{ev.kind:<18}", who, detail) if x).rstrip()


# --- following a run live ---------------------------------------------------------------

_ALERTS = frozenset({jn.Kind.SYMBOL_FAILED, jn.Kind.SYMBOL_RETRYING, jn.Kind.NODE_LOST,
                     jn.Kind.RUN_HALTING, jn.Kind.RUN_PAUSED, jn.Kind.RUN_RESUMED,
                     jn.Kind.RUN_CANCELLING, jn.Kind.SYMBOL_WAITING,
                     jn.Kind.SYMBOL_CHECKPOINT_REJECTED, jn.Kind.RUN_DEADLINE_EXCEEDED})


class Follower:
    """A run as it happens. On a terminal: a live progress bar (done/total, rate, ETA), the
    running symbols with node and elapsed time, and failures printed as they happen.
    Elsewhere: one plain line per event, no control codes."""

    def __init__(self, out: Console, run_id: str, total: int, ended: Iterable[str] = ()
                 ) -> None:
        self.out = out
        self.progress = ProgressTracker(run_id, total, ended)
        self.live_mode = out.is_terminal
        self._bar_view = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"), TextColumn("ETA"), TimeRemainingColumn(),
            TimeElapsedColumn(), console=out)
        self._bar = self._bar_view.add_task(run_id, total=total,
                                            completed=self.progress.completed, rate="")
        self._live: Live | None = None

    def __enter__(self) -> Follower:
        if self.live_mode:
            self._live = Live(self, console=self.out, refresh_per_second=8, transient=True)
            self._live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.__exit__(None, None, None)
            self._live = None

    def __rich__(self) -> Group:
        pr = self.progress
        self._bar_view.update(self._bar, completed=pr.done_fraction, rate=f"{pr.rate:.1f}/s")
        parts: list[Any] = [self._bar_view]
        if pr.running:
            t = Table(box=box.SIMPLE, show_header=True, header_style="dim")
            for col in ("running", "node", "elapsed", "progress"):
                t.add_column(col)
            now = time.time()
            shown = sorted(pr.running.items(), key=lambda kv: kv[1][2])[:15]
            for tid, (symbol, node, since) in shown:
                said = pr.said.get(tid)
                t.add_row(symbol, node, _fmt_duration(now - since),
                          escape(progress_text(*said)) if said else "")
            if len(pr.running) > 15:
                t.add_row(f"... {len(pr.running) - 15} more", "", "")
            parts.append(t)
        if pr.waiting:  # nothing connected can run these: say so rather than look stuck
            w = Table(box=box.SIMPLE, show_header=True, header_style="dim")
            for col in ("waiting", "why"):
                w.add_column(col)
            for symbol, reason in list(pr.waiting.values())[:10]:
                w.add_row(symbol, reason)
            if len(pr.waiting) > 10:
                w.add_row(f"... {len(pr.waiting) - 10} more", "")
            parts.append(w)
        return Group(*parts)

    def on_event(self, ev: Event) -> None:
        if not self.progress.on_event(ev):
            return
        if not self.live_mode:
            line = event_line(ev, every=True)
            if line:
                self.out.print(line, markup=False, highlight=False)
        elif ev.kind in _ALERTS:
            line = event_line(ev, every=True)
            if line:
                self.out.print(f"[red]{line}[/]" if ev.kind == jn.Kind.SYMBOL_FAILED else line,
                               markup=True, highlight=False)
