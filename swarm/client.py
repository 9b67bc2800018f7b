"""The Python API to a running dispatcher; the CLI is a thin user of it.

    async with swarm.Client("ws://127.0.0.1:8080", token=...) as c:
        run = await c.deploy("workflow.yaml")        # a path, or a swarm.Workflow
        async for update in run.watch():             # progress until the run ends
            print(f"{update.percentage:.0f}%", update.running)
        result = await run.wait()                    # a RunResult
        report = await c.report(run.run_id)

Errors are `swarm.SwarmError`s: `DispatcherUnreachable` / `AuthenticationFailed`
(exit code 3 in the CLI), `ManifestError` (2), `RequestRefused` (the dispatcher said no).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import ssl as ssl_module
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from pathlib import Path
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI

from . import protocol as p
from .errors import (
    AuthenticationFailed,
    ClientClosed,
    DispatcherUnreachable,
    InputError,
    ManifestError,
    Problem,
    RemoteProtocolError,
    RequestRefused,
)
from .model import Workflow
from .results import (
    END_EVENTS,
    FINAL_RUN_STATES,
    ProgressTracker,
    RunResult,
    RunUpdate,
    ended_tasks,
)

EVENT_BACKLOG = 10_000  # events kept per run until someone listens for them
BACKLOG_RUNS = 64  # runs whose unheard events are kept


class Client:
    def __init__(self, url: str, *, token: str = "", name: str = "cli",
                 open_timeout: float = 10.0, max_size: int = 256 << 20,
                 ssl: ssl_module.SSLContext | None = None) -> None:
        self.ssl = ssl
        self.url = url
        self.token = token
        self.name = name
        self.open_timeout = open_timeout
        self.max_size = max_size
        self.version = ""
        self._ws: ClientConnection | None = None
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[p.Reply]] = {}
        # Every event goes to each listener; with none listening, it waits in its run's
        # backlog so that a listener started a little late misses nothing.
        self._listeners: list[tuple[str | None, asyncio.Queue[p.Event | None]]] = []
        self._backlog: dict[str | None, deque[p.Event]] = {}
        self._reader: asyncio.Task[None] | None = None
        self._seqs: dict[str, int] = {}  # per run, the seq of the last event received
        self._closed_error: Exception | None = None

    async def __aenter__(self) -> Client:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def connect(self) -> None:
        unreachable = f"cannot reach the dispatcher at {self.url}"
        try:
            ws = await connect(self.url, compression=None, max_size=self.max_size,
                               ping_interval=None, open_timeout=self.open_timeout,
                               close_timeout=2, ssl=self.ssl)
        except InvalidStatus as e:
            if e.response.status_code == 403:  # [security] allowed_hosts of the dispatcher
                raise AuthenticationFailed(
                    f"the dispatcher at {self.url} refused us: "
                    f"{e.response.body.decode(errors='replace').strip()}") from None
            raise DispatcherUnreachable(f"{unreachable}: {e}") from None
        except (OSError, InvalidHandshake, TimeoutError) as e:
            raise DispatcherUnreachable(f"{unreachable}: {e or type(e).__name__}") from None
        except (InvalidURI, ValueError) as e:
            raise InputError(f"invalid dispatcher URL {self.url!r}: {e}") from None
        try:
            challenge = p.decode(await asyncio.wait_for(ws.recv(), self.open_timeout))
            if not isinstance(challenge, p.Challenge):
                raise RemoteProtocolError("the dispatcher did not start with a challenge")
            if challenge.auth and not self.token:
                raise AuthenticationFailed(
                    "the dispatcher requires a token: set SWARM_TOKEN or [security] token")
            proof = p.proof_for(self.token, challenge.nonce) if challenge.auth else b""
            await ws.send(p.encode(p.Hello(role="client", name=self.name, proof=proof,
                                           pid=os.getpid())))
            welcome = p.decode(await asyncio.wait_for(ws.recv(), self.open_timeout))
            if not isinstance(welcome, p.Welcome):
                raise RemoteProtocolError("the dispatcher did not welcome us")
        except ConnectionClosed as e:
            await ws.close()
            if e.rcvd is not None and e.rcvd.code == p.CLOSE_POLICY:
                raise AuthenticationFailed(
                    f"the dispatcher at {self.url} refused us: {e.rcvd.reason}") from None
            raise DispatcherUnreachable(f"{unreachable}: connection closed") from None
        except (TimeoutError, RemoteProtocolError) as e:
            await ws.close()
            raise DispatcherUnreachable(f"{unreachable}: {e or 'no answer'}") from None
        except BaseException:
            await ws.close()
            raise
        self.version = welcome.version
        self._ws = ws
        self._reader = asyncio.get_running_loop().create_task(self._read())

    async def close(self) -> None:
        """Close the connection; every pending request and event iterator ends with
        ClientClosed instead of waiting forever."""
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        if self._closed_error is None:
            self._end(ClientClosed(f"the client of {self.url} was closed"))
        if self._ws is not None:
            await self._ws.close()

    async def _read(self) -> None:
        assert self._ws is not None
        error: Exception = DispatcherUnreachable(f"lost the connection to the dispatcher at "
                                                 f"{self.url}")
        try:
            async for frame in self._ws:
                msg = p.decode(frame, self.max_size)
                if isinstance(msg, p.Reply):
                    fut = self._pending.pop(msg.id, None)
                    if fut is not None and not fut.done():
                        fut.set_result(msg)
                elif isinstance(msg, p.Events):
                    for ev in msg.items:
                        self._dispatch_event(ev)
                elif isinstance(msg, p.Event):
                    self._dispatch_event(msg)
        except ConnectionClosed:
            pass
        except RemoteProtocolError as e:
            error = e
        self._end(error)

    def _end(self, error: Exception) -> None:
        """No more replies or events will come: say so to whoever waits for them."""
        self._closed_error = error
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(error)
        self._pending.clear()
        for _, queue in self._listeners:
            queue.put_nowait(None)

    def _dispatch_event(self, ev: p.Event) -> None:
        if ev.seq and ev.run_id is not None:  # a journal event: each is delivered once
            if ev.seq <= self._seqs.get(ev.run_id, 0):
                return
            self._seqs[ev.run_id] = ev.seq
        heard = False
        for run_id, queue in self._listeners:
            if run_id is None or run_id == ev.run_id:
                queue.put_nowait(ev)
                heard = True
        if not heard and ev.run_id is not None:
            backlog = self._backlog.get(ev.run_id)
            if backlog is None:
                if len(self._backlog) >= BACKLOG_RUNS:  # bounded: forget the oldest run's
                    del self._backlog[next(iter(self._backlog))]
                backlog = self._backlog[ev.run_id] = deque(maxlen=EVENT_BACKLOG)
            backlog.append(ev)

    async def request(self, op: str, **args: Any) -> Any:
        """Send a request and return its reply's data; refusals raise RequestRefused."""
        if self._ws is None:
            raise DispatcherUnreachable("not connected")
        if self._closed_error is not None:
            raise self._closed_error
        rid = next(self._ids)
        fut: asyncio.Future[p.Reply] = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        try:
            await self._ws.send(p.encode(p.Request(id=rid, op=op, args=args)))
        except ConnectionClosed:
            self._pending.pop(rid, None)
            raise DispatcherUnreachable(f"lost the connection to the dispatcher at "
                                        f"{self.url}") from None
        reply = await fut
        if not reply.ok:
            if isinstance(reply.data, dict) and isinstance(reply.data.get("problems"), list):
                raise ManifestError([Problem(**pr) for pr in reply.data["problems"]])
            err = RequestRefused(reply.error)
            err.exit_code = reply.code or 2
            raise err
        return reply.data

    async def events(self, run_id: str | None = None) -> AsyncGenerator[p.Event, None]:
        """Events of one watched run (or of all), until the connection ends."""
        queue: asyncio.Queue[p.Event | None] = asyncio.Queue()
        for old in self._backlog.pop(run_id, ()) if run_id is not None else ():
            queue.put_nowait(old)
        if self._closed_error is not None:
            queue.put_nowait(None)
        entry = (run_id, queue)
        self._listeners.append(entry)
        try:
            while (ev := await queue.get()) is not None:
                yield ev
            if self._closed_error is not None:
                raise self._closed_error
        finally:
            self._listeners.remove(entry)

    # --- runs ---------------------------------------------------------------------------

    async def submit(self, workflow: Workflow | None, *, follow: bool = True, new: bool = False,
                     resume: str | None = None) -> dict[str, Any]:
        """Start a run (or attach to the active run of the same manifest, unless `new`);
        `resume` starts a run that reuses what completed in a failed run."""
        args: dict[str, Any] = {"follow": follow, "new": new}
        if workflow is not None:
            args["workflow"] = workflow.to_dict()
        if resume is not None:
            args["resume"] = resume
        data: dict[str, Any] = await self.request("deploy", **args)
        return data

    async def deploy(self, source: Workflow | str | os.PathLike[str], *, new: bool = False,
                     resume_from: str | None = None) -> Run:
        """Start a run of a manifest file or a `Workflow` built in code. A manifest whose
        run is still active is attached to instead (unless `new`); `resume_from` reuses
        what completed in that failed or cancelled run."""
        if isinstance(source, Workflow):
            workflow = source
        else:
            from .manifest import load_manifest

            workflow = load_manifest(Path(source))
        data = await self.submit(workflow, new=new, resume=resume_from)
        return Run(self, str(data["run_id"]), total=len(workflow.symbols),
                   attached=bool(data.get("attached")))

    def run_handle(self, run_id: str) -> Run:
        """A `Run` for a run started elsewhere (to wait for it, watch it, steer it)."""
        return Run(self, run_id)

    async def status(self) -> dict[str, Any]:
        data: dict[str, Any] = await self.request("status")
        return data

    async def runs(self, limit: int = 20) -> list[dict[str, Any]]:
        data: dict[str, Any] = await self.request("runs", limit=limit)
        return list(data["runs"])

    async def run(self, run_id: str) -> dict[str, Any]:
        """The run's record as the dispatcher stores it (status, tasks)."""
        data: dict[str, Any] = await self.request("run", run_id=run_id)
        return data

    async def report(self, run_id: str) -> dict[str, Any]:
        data: dict[str, Any] = await self.request("report", run_id=run_id)
        return data

    async def pause(self, run_id: str) -> None:
        await self.request("pause", run_id=run_id)

    async def resume(self, run_id: str) -> None:
        """Let a paused run go on (to re-run a failed one, `deploy(..., resume_from=)`)."""
        await self.request("resume", run_id=run_id)

    async def cancel(self, run_id: str, *, rollback: bool = False) -> None:
        await self.request("cancel", run_id=run_id, rollback=rollback)

    async def rollback(self, run_id: str, *, follow: bool = True) -> Run:
        """Undo a finished run's completed symbols, as a phase of its own: the run keeps
        its status and end (`RunResult.rollback_status` tells how the rollback ended).
        With nothing to undo, nothing changes and the handle says so (`nothing_to_undo`,
        `message`)."""
        data = await self.request("rollback", run_id=run_id, follow=follow)
        run = Run(self, run_id)
        run.nothing_to_undo = bool(data.get("nothing_to_undo"))
        run.message = str(data.get("message", ""))
        return run

    async def subscribe(self, run_id: str | None = None) -> str:
        """Ask for a run's events (or every event); returns the run's current status."""
        data = await self.request("watch", **({"run_id": run_id} if run_id else {}))
        return str(data.get("state", ""))

    async def _subscribe_since(self, run_id: str, since: int) -> tuple[str, int]:
        """Ask for a run's events after seq `since` (from the journal), then its new ones;
        the run's status and the seq of the last past event (`since` if none)."""
        self._seqs[run_id] = since
        data = await self.request("watch", run_id=run_id, since=since)
        return str(data["state"]), int(data["last_seq"])

    async def _run_events(self, run_id: str, since: int | None
                          ) -> AsyncGenerator[p.Event, None]:
        """A run's events until its end: from `since` (seq) on if given, else from now."""
        events = self.events(run_id)
        try:
            if since is None:
                state = await self.subscribe(run_id)
                if state in FINAL_RUN_STATES:
                    return
                last = 0
            else:
                state, last = await self._subscribe_since(run_id, since)
                if state in FINAL_RUN_STATES and last <= since:
                    return  # ended, and nothing new after `since`
            async for ev in events:
                yield ev
                # The past may hold an earlier end (a rollback asked for afterwards): the
                # run ends at the first end after the past, or at the past's last event.
                if ev.seq >= last and (ev.kind in END_EVENTS or (
                        since is not None and state in FINAL_RUN_STATES)):
                    return
        finally:
            await events.aclose()

    async def follow(self, run_id: str, on_event: Callable[[p.Event], Any] | None = None,
                     *, since: int | None = None) -> dict[str, Any]:
        """Follow a run to its end, calling `on_event` for each event; return its record.
        With `since` (a seq), the events after it come first, from the journal."""
        async for ev in self._run_events(run_id, since):
            if on_event is not None:
                on_event(ev)
        return await self.run(run_id)

    async def wait(self, run_id: str) -> RunResult:
        """Wait for a run to end; its result."""
        return RunResult.from_record(await self.follow(run_id))

    async def watch(self, run_id: str, since: int | None = None
                    ) -> AsyncIterator[RunUpdate]:
        """Progress of a run, one update per event, until it ends (the last update is final).
        With `since` (the `seq` of the last event seen, 0 for all), the events after it
        come first, from the journal: a consumer that lost its connection resumes without
        a gap or a duplicate."""
        rec = await self.run(run_id)
        main = [t for t in rec["tasks"] if t["kind"] == "main"]
        tracker = (ProgressTracker(run_id, len(main), ended_tasks(main), rec["status"])
                   if since is None else ProgressTracker(run_id, len(main)))
        seen = False
        async for ev in self._run_events(run_id, since):
            seen = True
            tracker.on_event(ev)
            yield tracker.update(ev)
        if not seen:  # ended already, nothing after `since`
            tracker.status = (await self.run(run_id))["status"]
            yield tracker.update(None)

    async def prune(self, older_than: str, *, dry_run: bool = False) -> dict[str, Any]:
        """Remove the runs that finished more than `older_than` ago (`30d`, `12h`) through
        the dispatcher; what it removed and the space it gave back."""
        data: dict[str, Any] = await self.request("prune", older_than=older_than,
                                                  dry_run=dry_run)
        return data

    async def backup(self, path: str) -> dict[str, Any]:
        """A consistent copy of the state DB, written by the dispatcher at `path` (a path
        on the dispatcher's host) and checked; its size and contents."""
        data: dict[str, Any] = await self.request("backup", path=path)
        return data


class Run:
    """A handle on one run: wait for it, watch it, steer it."""

    def __init__(self, client: Client, run_id: str, *, total: int | None = None,
                 attached: bool = False) -> None:
        self.client = client
        self.run_id = run_id
        self.total = total
        self.attached = attached  # the same manifest was running already: this is that run
        self.nothing_to_undo = False  # a rollback was asked for and found nothing to undo
        self.message = ""

    def __repr__(self) -> str:
        return f"Run({self.run_id!r})"

    @property
    def id(self) -> str:
        return self.run_id

    async def wait(self) -> RunResult:
        return await self.client.wait(self.run_id)

    def watch(self, since: int | None = None) -> AsyncIterator[RunUpdate]:
        return self.client.watch(self.run_id, since)

    async def report(self) -> dict[str, Any]:
        return await self.client.report(self.run_id)

    async def pause(self) -> None:
        await self.client.pause(self.run_id)

    async def resume(self) -> None:
        await self.client.resume(self.run_id)

    async def cancel(self, *, rollback: bool = False) -> None:
        await self.client.cancel(self.run_id, rollback=rollback)
