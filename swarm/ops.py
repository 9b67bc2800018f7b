"""What clients may ask of the dispatcher (deploy, status, run control, reports) and the
HTTP endpoints beside the WebSocket. `Operations` works through `DispatcherPort`, the
small public face of the `Dispatcher`: its scheduler (read), its state store, feeding
an event, and replying once what was fed is committed. Nothing here touches a socket
directly."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import secrets
import time
from typing import TYPE_CHECKING, Any, Protocol

import msgpack  # type: ignore[import-untyped]
from websockets.asyncio.server import ServerConnection
from websockets.datastructures import Headers
from websockets.http11 import Request as HttpRequest
from websockets.http11 import Response

from . import __version__, maintenance, metrics, report
from . import core as c
from . import protocol as p
from .errors import ManifestError, Problem, RequestRefused
from .manifest import workflow_from_dict
from .model import Workflow
from .secrets import redact, redact_output
from .tasks import RunState, TaskState

if TYPE_CHECKING:
    from .config import Config
    from .dispatcher import _Peer
    from .metrics import Histogram, Tally
    from .store import StateStore

log = logging.getLogger("swarm.dispatcher")


class DispatcherPort(Protocol):
    """What operations use of the dispatcher. The scheduler is read, never changed, except
    through `feed`; the store is read, never written, except through the journal."""

    config: Config
    db_path: str
    started_at: float  # time.time() at start, for uptimes
    pruning: set[str]  # runs a prune is deleting now: never loaded again
    dispatch_latency: Histogram
    journal_latency: Histogram
    tally: Tally

    @property
    def core(self) -> c.Scheduler | None: ...

    @property
    def store(self) -> StateStore | None: ...

    def now(self) -> float: ...

    def feed(self, event: c.Event) -> None: ...

    def send_after_commit(self, peer: _Peer, msg: p.Message) -> None: ...

    async def stored(self) -> None: ...

    async def restore(self, run_id: str) -> bool: ...

    def counters(self) -> list[tuple[str, str, float]]: ...

    def gauges(self) -> list[tuple[str, str, float]]: ...


class Operations:
    def __init__(self, dispatcher: DispatcherPort) -> None:
        self.d = dispatcher

    def _reply_after_commit(self, peer: _Peer, req: p.Request, data: dict[str, Any]) -> None:
        """Queued behind the journal entries just fed: sent once they are committed."""
        self.d.send_after_commit(peer, p.Reply(id=req.id, ok=True, data=data))

    def _refuse(self, peer: _Peer, req: p.Request, error: str, code: int = 2,
                data: dict[str, Any] | None = None) -> None:
        peer.send(p.Reply(id=req.id, ok=False, error=error, code=code, data=data))

    async def _deploy(self, peer: _Peer, req: p.Request) -> None:
        assert self.d.core is not None and self.d.store is not None
        a = req.args
        reuse: dict[str, Any] = {}
        resumed_from: str | None = a.get("resume")
        try:
            doc = a.get("workflow")
            if resumed_from is not None:
                loaded = await self.d.store.load_run(resumed_from)
                if loaded is None:
                    return self._refuse(peer, req, f"no run {resumed_from!r}")
                old, _ = loaded
                if old["status"] not in (RunState.FAILED, RunState.ROLLED_BACK,
                                         RunState.CANCELLED):
                    return self._refuse(peer, req, f"run {resumed_from} is {old['status']}: "
                                        "only a failed or cancelled run can be resumed")
                doc = doc or old["manifest"]
            if doc is None:
                return self._refuse(peer, req, "deploy needs a workflow or a run to resume")
            wf = workflow_from_dict(doc, source="<deployed manifest>")
            too_big = oversized(wf, self.d.config.dispatcher.max_frame_size)
            if too_big:  # it would never reach a worker: say so before anything runs
                raise ManifestError(too_big)
        except ManifestError as e:  # the problems go back whole: the client raises them
            return self._refuse(peer, req, str(e), data={
                "problems": [dataclasses.asdict(pr) for pr in e.problems]})
        if resumed_from is not None:
            names = {s.name for s in wf.symbols}
            reuse = {k: v for k, v in old["outputs"].items() if k in names}
        elif not a.get("new") and self._attach(peer, req, wf):
            return None
        durations = await self.d.store.expected_durations(
            wf.name, {s.name: s.dispatch for s in wf.symbols})
        # Checked again: a deploy of the same manifest may have started it while we read.
        # From here to the submission nothing awaits, so two deploys make one run.
        if resumed_from is None and not a.get("new") and self._attach(peer, req, wf):
            return None
        run_id = f"run-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
        if a.get("follow"):
            peer.watching.add(run_id)
        self.d.feed(c.RunSubmitted(run_id, wf, self.d.now(), reuse, resumed_from, durations))
        log.info("run %s: %s %s, %d symbols%s", run_id, wf.name, wf.version, len(wf.symbols),
                 f", resuming {resumed_from} ({len(reuse)} done)" if resumed_from else "",
                 extra={"run_id": run_id})
        self._reply_after_commit(peer, req, {"run_id": run_id, "attached": False,
                                             "reused": len(reuse)})
        return None

    def _attach(self, peer: _Peer, req: p.Request, wf: Workflow) -> bool:
        """The same manifest is running: follow it, do not run it twice."""
        assert self.d.core is not None
        active = self.d.core.find_active(wf.content_hash)
        if active is None:
            return False
        if req.args.get("follow"):
            peer.watching.add(active)
        peer.send(p.Reply(id=req.id, ok=True, data={"run_id": active, "attached": True}))
        return True

    async def rollback(self, run_id: str) -> dict[str, Any]:
        """Undo a finished run's completed symbols, as a phase of its own (the run keeps
        its status and end); with nothing to undo, say so and change nothing. Raises
        RequestRefused when the run cannot be rolled back; the answer holds once the next
        commit is stored (`Dispatcher.stored`)."""
        assert self.d.core is not None and self.d.store is not None
        state = self.d.core.run_state(run_id)
        if state is not None and state not in c.RUN_FINAL:
            raise RequestRefused(f"run {run_id} is still {state.value}")
        await self.d.stored()  # the core runs a commit ahead: read the run as it ended
        loaded = await self.d.store.load_run(run_id)
        if loaded is None:
            raise RequestRefused(f"no run {run_id!r}")
        row, records = loaded
        if row["status"] not in (RunState.COMPLETED, RunState.FAILED):
            raise RequestRefused(f"run {run_id} is {row['status']}: only a completed or "
                                 "failed run can be rolled back")
        targets = _undoable(row["manifest"], records)
        if not targets:
            why = (f"its rollback ran already ({row['rollback_status']})"
                   if row["rollback_status"] else "no completed symbol of it has a rollback")
            return {"run_id": run_id, "nothing_to_undo": True, "status": row["status"],
                    "message": f"run {run_id}: nothing to undo: {why}; it stays "
                               f"{row['status']}"}
        if state is None and not await self.d.restore(run_id):
            raise RequestRefused(f"no run {run_id!r}")  # pruned meanwhile
        try:
            self.d.feed(c.RollbackRequested(run_id, self.d.now()))
        except c.Refused as e:
            raise RequestRefused(str(e)) from None
        log.info("run %s: rollback of %d symbols requested", run_id, len(targets),
                 extra={"run_id": run_id})
        return {"run_id": run_id, "rollbacks": len(targets), "status": row["status"]}

    def control(self, op: str, run_id: str, *, rollback: bool = False) -> dict[str, Any]:
        """pause / resume / cancel a run: journaled like every state change; the answer
        holds once the next commit is stored. RequestRefused if the run's state does not
        allow it now."""
        assert self.d.core is not None
        now = self.d.now()
        event: c.Event
        if op == "pause":
            event = c.RunPaused(run_id, now)
        elif op == "resume":
            event = c.RunResumed(run_id, now)
        elif op == "cancel":
            event = c.RunCancelled(run_id, now, rollback=rollback)
        else:
            raise RequestRefused(f"unknown operation {op!r}")
        state = self.d.core.run_state(run_id)
        if state is None or state in c.RUN_FINAL:
            raise RequestRefused(f"run {run_id!r} is not active")
        try:
            self.d.feed(event)
        except c.Refused as e:
            raise RequestRefused(str(e)) from None
        return {"run_id": run_id, "done": {"pause": RunState.PAUSED.value, "resume": "resumed",
                                           "cancel": RunState.CANCELLED.value}[op]}

    async def _rollback(self, peer: _Peer, req: p.Request) -> None:
        try:
            data = await self.rollback(req.args["run_id"])
        except RequestRefused as e:
            return self._refuse(peer, req, str(e))
        if req.args.get("follow") and not data.get("nothing_to_undo"):
            peer.watching.add(data["run_id"])  # before the commit: it misses nothing
        self._reply_after_commit(peer, req, data)
        return None

    async def request(self, peer: _Peer, req: p.Request) -> None:
        assert self.d.core is not None and self.d.store is not None
        a = req.args
        if req.op == "deploy":
            await self._deploy(peer, req)
        elif req.op == "rollback":
            await self._rollback(peer, req)
        elif req.op in ("pause", "resume", "cancel"):
            self._control(peer, req)
        elif req.op == "status":
            data: dict[str, Any] = self.d.core.snapshot()
            data["db"] = await self.d.store.counts()
            data["summary"] = summary(data, await self.d.store.symbol_totals())
            data["db_path"] = self.d.db_path
            data["version"] = __version__
            data["uptime"] = time.time() - self.d.started_at
            peer.send(p.Reply(id=req.id, ok=True, data=data))
        elif req.op in ("run", "report"):
            rows = await self.d.store.report_rows(a["run_id"])
            if rows is None:
                return self._refuse(peer, req, f"no run {a['run_id']!r}")
            if req.op == "report":
                # Built on a thread: a report of 100,000 symbols must not hold up the
                # event loop (heartbeats, commits, other clients).
                data = await asyncio.to_thread(
                    report.build, rows["run"], rows["tasks"], rows["attempts"],
                    rows["events"], rows["nodes"], time.time())
            else:
                data = {k: v for k, v in rows["run"].items() if k != "manifest"}
                # Outputs as users see them: values under secret-looking names masked.
                data["tasks"] = [{**t, "result": redact(t["result"])} for t in rows["tasks"]]
            peer.send(p.Reply(id=req.id, ok=True, data=data))
        elif req.op == "runs":
            peer.send(p.Reply(id=req.id, ok=True,
                              data={"runs": await self.d.store.runs(a.get("limit", 20))}))
        elif req.op == "watch":
            await self._watch(peer, req)
        elif req.op == "prune":
            older = maintenance.parse_duration(a["older_than"], "--older-than")
            result = await self.prune(older, dry_run=a.get("dry_run", False))
            peer.send(p.Reply(id=req.id, ok=True, data=result.to_dict()))
        elif req.op == "backup":
            # On the dispatcher's host, beside the loop: a reader never blocks the writer.
            done = await self.d.store.backup(a["path"])
            log.info("backup of the state database written to %s (%d bytes)", done.path,
                     done.bytes)
            peer.send(p.Reply(id=req.id, ok=True, data=done.to_dict()))
        return None

    async def prune(self, older_than: float, *, dry_run: bool = False
                    ) -> maintenance.PruneResult:
        """Remove finished runs older than that, on a connection of its own in a thread:
        the dispatcher serves meanwhile; its group commits wait for one short prune
        transaction at a time. Runs the core holds (active, or being rolled back) stay."""
        assert self.d.core is not None and self.d.store is not None
        protected = set(self.d.core.active_runs()) | set(self.d.core.known_runs())
        result = await self.d.store.prune(older_than, dry_run=dry_run, protected=protected,
                                          pruning=self.d.pruning)
        if result.runs and not dry_run:
            log.info("pruned %d runs (%d rows) finished before %s; %d bytes given back",
                     result.runs, sum(result.rows.values()),
                     time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(result.cutoff)),
                     result.freed_bytes)
        return result

    def _control(self, peer: _Peer, req: p.Request) -> None:
        run_id = req.args["run_id"]
        try:
            data = self.control(req.op, run_id, rollback=req.args.get("rollback", False))
        except RequestRefused as e:
            return self._refuse(peer, req, str(e))
        if req.args.get("follow"):
            peer.watching.add(run_id)  # before the commit: it misses nothing
        self._reply_after_commit(peer, req, data)

    async def _watch(self, peer: _Peer, req: p.Request) -> None:
        assert self.d.store is not None
        watched: str | None = req.args.get("run_id")
        if watched is not None and req.args.get("since") is not None:
            return await self._watch_since(peer, req, watched, req.args["since"])
        if watched is None:
            peer.watch_all = True
            return peer.send(p.Reply(id=req.id, ok=True, data={"run_id": None, "state": ""}))
        # Watching first, then the state as stored: the core runs ahead of the DB by one
        # group commit, and a follower told "completed" reads the run's record next. Every
        # change the stored state does not show yet reaches the follower as an event.
        peer.watching.add(watched)
        await self.d.stored()
        row = await self.d.store.run(watched)
        if row is None:
            peer.watching.discard(watched)
            return self._refuse(peer, req, f"no run {watched!r}")
        # A rollback requested after the run ended is followed like the run itself.
        state = (RunState.ROLLING_BACK.value if row["rollback_status"] == RunState.ROLLING_BACK
                 else row["status"])
        peer.send(p.Reply(id=req.id, ok=True, data={"run_id": watched, "state": state}))
        return None

    async def _watch_since(self, peer: _Peer, req: p.Request, run_id: str, since: int) -> None:
        """The run's events after seq `since` from the journal, then its new ones as they
        come: the new ones wait in `peer.held` while the past is read, and those the read
        already found are dropped, so that the stream has no gap and no duplicate."""
        assert self.d.store is not None
        peer.held[run_id] = []
        peer.watching.add(run_id)
        try:
            await self.d.stored()
            row = await self.d.store.run(run_id)
            past = await self.d.store.events(run_id, since) if row is not None else []
        finally:
            held = peer.held.pop(run_id, [])
        if row is None:
            peer.watching.discard(run_id)
            return self._refuse(peer, req, f"no run {run_id!r}")
        last = past[-1]["seq"] if past else since
        peer.send(p.Reply(id=req.id, ok=True, data={
            "run_id": run_id, "state": row["status"], "last_seq": last,
            "replayed": len(past)}))
        events = [p.Event(kind=r["kind"], ts=r["ts"], run_id=r["run_id"], task_id=r["task_id"],
                          symbol=r["symbol"], node=r["node"], attempt=r["attempt"],
                          data=redact_output(r["data"]), seq=r["seq"]) for r in past]
        events += [ev for ev in held if ev.seq > last]
        for i in range(0, len(events), 1000):  # frames of a bounded size
            peer.queue.put_nowait((p.encode(p.Events(tuple(events[i:i + 1000]))), 0))
        return None

    # --- HTTP beside the WebSocket --------------------------------------------------------

    async def http(self, conn: ServerConnection, request: HttpRequest) -> Response | None:
        """`GET /healthz` and `GET /metrics`; anything else goes on to the WebSocket."""
        path = request.path.split("?", 1)[0]
        if path == "/healthz":
            body = json.dumps({"status": "ok", "version": __version__,
                               "uptime": time.time() - self.d.started_at})
            return _response(200, body, "application/json")
        if path == "/metrics":
            assert self.d.core is not None and self.d.store is not None
            text = metrics.render(self.d.core.snapshot(), await self.d.store.runs_by_status(),
                                  (self.d.dispatch_latency, self.d.journal_latency),
                                  time.time() - self.d.started_at, __version__,
                                  self.d.counters(), self.d.gauges(),
                                  [*self.d.tally.render(), *metrics.process_metrics()])
            return _response(200, text, "text/plain; version=0.0.4; charset=utf-8")
        return None


def _undoable(manifest: dict[str, Any], records: list[c.TaskRecord]) -> list[str]:
    """What a rollback of a finished run would undo: its completed symbols that have a
    rollback (those rolled back already are `rolled_back`, not `completed`)."""
    done = {r.name for r in records if r.kind == "main" and r.state == TaskState.COMPLETED}
    return [s["name"] for s in manifest["symbols"] if s.get("rollback") and s["name"] in done]


def summary(status: dict[str, Any], totals: dict[str, int]) -> dict[str, int]:
    """The figures of the original's status: nodes idle and busy, tasks queued and running
    now, tasks completed and failed over every run in the state DB (so they do not drop
    to 0 when a run ends), active workflows."""
    nodes = status["nodes"]
    busy = sum(1 for n in nodes if n["running"])
    live = status["tasks"]
    return {
        "nodes": len(nodes), "idle": len(nodes) - busy, "busy": busy,
        "queued": sum(live.get(s, 0) for s in (TaskState.PENDING, TaskState.READY,
                                               TaskState.RETRYING)),
        "running": live.get(TaskState.RUNNING, 0),
        "completed": totals.get(TaskState.COMPLETED, 0),
        "failed": totals.get(TaskState.FAILED, 0),
        "active_workflows": len(status["runs"]),
    }


def _response(status: int, body: str, content_type: str) -> Response:
    data = body.encode()
    headers = Headers([("Content-Type", content_type), ("Content-Length", str(len(data))),
                       ("Connection", "close")])
    reason = {200: "OK", 403: "Forbidden"}.get(status, "")
    return Response(status, reason, headers, data)


# What an assignment carries besides a symbol's parameters (ids, names, token, limits),
# with room to spare: a frame's budget for the parameters is the frame limit less this.
ASSIGN_OVERHEAD = 4096


def oversized(wf: Workflow, frame_limit: int) -> list[Problem]:
    """Symbols (or rollbacks) whose assignment would not fit in one frame to a worker: a
    worker would refuse it, so it is a problem of the manifest, found before anything
    runs. Only non-empty parameters are measured (msgpack, as they travel)."""
    budget = frame_limit - ASSIGN_OVERHEAD
    problems = []
    for s in wf.symbols:
        for where, spec in (("parameters", s), ("rollback.parameters", s.rollback)):
            if spec is None or not spec.parameters:
                continue
            size = len(msgpack.packb(spec.parameters, use_bin_type=True)) + len(s.name)
            if size > budget:
                problems.append(Problem(
                    f"{size:,} bytes of parameters: an assignment to a worker holds at most "
                    f"{budget:,} ([dispatcher] max_frame_size = {frame_limit:,}); pass a "
                    "path or a URL to the data instead", file=wf.source, symbol=s.name,
                    field=where))
    return problems
