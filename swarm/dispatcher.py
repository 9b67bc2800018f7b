"""The dispatcher: an asyncio shell around the scheduler core.

It decodes frames into events, hands them to `Scheduler.handle`, and carries out the
commands. Journal entries and the sends that follow them are queued together; the
flusher commits the entries in one transaction (group commit) and only then sends,
so nothing is acted on before it is stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import hashlib
import hmac
import itertools
import logging
import os
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request as HttpRequest
from websockets.http11 import Response

from . import __version__
from . import core as c
from . import journal as jn
from . import protocol as p
from .access import Network, peer_allowed, resolve_allowed
from .config import Config
from .errors import ConfigError, RemoteProtocolError, StateBusy, StateError, SwarmError
from .maintenance import parse_duration, retention_loop
from .manifest import workflow_from_dict
from .metrics import Histogram, Tally
from .ops import Operations, _response
from .plan import gc_paused
from .results import RunResult
from .secrets import redact_output
from .state import Store
from .stimuli import Fed, Forgotten, SessionStarted, Stimulus, session_config
from .store import StateStore
from .tls import check_listen, client_context, server_context
from .web import Dashboard

log = logging.getLogger("swarm.dispatcher")

HELLO_TIMEOUT = 5.0
CLIENT_QUEUE = 10_000  # events buffered per subscriber before it is told it missed some
SEND_QUEUE = 50_000  # frames queued for one peer before it is closed as stuck
TICK_MAX = 1.0
# A commit that another process's lock or a full disk holds up is tried again, with
# backoff up to COMMIT_BACKOFF_MAX, for up to STATE_GIVE_UP seconds; then the dispatcher
# stops (non-zero) rather than serve on unrecorded. A restart resumes every run.
COMMIT_BACKOFF_MAX = 2.0
STATE_GIVE_UP = 300.0
STATE_WATCH = 0.5  # seconds between checks that the state DB file is still ours
# The tick loop woke this much later than it asked to: the dispatcher itself stalled (a
# SIGSTOP, a blocked disk, a long burst of work), and nobody's silence is judged across it.
STALL = 1.0
STIMULI_ALONE = 256  # stimuli without journal entries that are committed on their own


def random_token() -> int:
    """An attempt token: 64 random bits, as a signed 64-bit integer (what SQLite holds)."""
    return secrets.randbits(64) - (1 << 63)


class Clock:
    """Seconds since the epoch that never jump: the wall clock at start, advanced by the
    monotonic clock. A wall-clock step (NTP, an operator) cannot make every node look
    silent, nor fire every retry timer at once."""

    def __init__(self) -> None:
        self._base = time.time() - time.monotonic()

    def __call__(self) -> float:
        return self._base + time.monotonic()


def scheduler_config(cfg: Config) -> c.SchedulerConfig:
    co = cfg.coordinator
    return c.SchedulerConfig(
        heartbeat_timeout=co.heartbeat_timeout / 1000.0,
        max_worker_losses=co.max_worker_losses,
        load_balancing=co.enable_load_balancing,
        priority_queue=co.priority_queue_enabled,
        retry=cfg.retry,
        default_retries=co.task_retry_limit,
        token_source=random_token,
        # A worker that outlived the last dispatcher reconnects within its backoff; its
        # running attempts wait this long for it before they run again elsewhere.
        orphan_grace=co.heartbeat_timeout / 1000.0,
        max_checkpoint_size=co.max_checkpoint_size,
    )


@dataclass(eq=False)
class _Peer:
    ws: ServerConnection
    role: str
    name: str
    node_id: str = ""
    watch_all: bool = False
    draining: bool = False
    missed: int = 0
    dropped: bool = False
    max_frame: int = 1 << 20  # the largest frame the peer accepts

    def __post_init__(self) -> None:
        self.queue: asyncio.Queue[tuple[bytes, int] | None] = asyncio.Queue()
        self.watching: set[str] = set()
        # Runs whose past events are being read for a `watch --since`: their new events
        # wait here, so that the past and the new join without a gap or a duplicate.
        self.held: dict[str, list[p.Event]] = {}
        self.events_queued = 0  # events in the frames of `queue`
        self.writer = asyncio.get_running_loop().create_task(self._write())

    async def _write(self) -> None:
        with contextlib.suppress(ConnectionClosed):
            while (item := await self.queue.get()) is not None:
                frame, events = item
                await self.ws.send(frame)
                self.events_queued -= events

    def send(self, msg: p.Message) -> None:
        self.send_frame(p.encode(msg))

    def send_frame(self, frame: bytes) -> None:
        if self.queue.qsize() >= SEND_QUEUE:
            # A peer that reads nothing for this long is stuck: drop it, keep the memory.
            if not self.dropped:
                self.dropped = True
                log.warning("%s %s does not read its frames; closing it", self.role, self.name)
                asyncio.get_running_loop().create_task(
                    self.ws.close(p.CLOSE_POLICY, "not reading"))
            return
        self.queue.put_nowait((frame, 0))

    def publish(self, events: list[p.Event]) -> None:
        """One frame for the events of one commit. Events never block dispatch: past the
        bound they are counted, not queued (but a run's own start and end always get
        through: followers wait for them)."""
        if self.held:
            new = [ev for ev in events if ev.run_id not in self.held]
            for ev in events:
                if ev.run_id in self.held:
                    self.held[ev.run_id].append(ev)
            events = new
            if not events:
                return
        if self.events_queued >= CLIENT_QUEUE:
            kept = [ev for ev in events if ev.kind.startswith("run.")]
            self.missed += len(events) - len(kept)
            events = kept
        elif self.missed:
            gap = jn.StreamGap(events[0].ts, missed=self.missed)
            events = [p.Event(kind=gap.kind, ts=gap.ts, data=gap.data), *events]
            self.missed = 0
        if events:
            self.events_queued += len(events)
            self.queue.put_nowait((p.encode(p.Events(tuple(events))), len(events)))

    def wants(self, run_id: str | None) -> bool:
        return self.watch_all or (run_id is not None and run_id in self.watching)

    async def close(self) -> None:
        self.queue.put_nowait(None)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.writer, 5)


class Dispatcher:
    """`async with Dispatcher(config) as d:` serves until the block ends."""

    def __init__(self, config: Config, *, host: str | None = None, port: int | None = None,
                 db_path: str | None = None, insecure: bool = False) -> None:
        self.config = config
        self.insecure = insecure
        self.host = host or config.dispatcher.host
        self.port = config.dispatcher.websocket_port if port is None else port
        self.db_path = db_path or config.resolve(config.dispatcher.state_db_path)
        self.core: c.Scheduler | None = None
        self.store: StateStore | None = None  # today's is SQLite's (`state.Store`)
        self._server: Server | None = None
        self._workers: dict[str, _Peer] = {}
        self._clients: set[_Peer] = set()
        self._records: list[jn.Record] = []
        self._sends: list[tuple[_Peer, p.Message | None]] = []
        self._stored: list[asyncio.Future[None]] = []  # resolved by the next commit
        # What the core was fed, for replay (swarm.stimuli): written with the journal.
        self._stimuli: list[Stimulus] = []
        self._session = 0  # the id of this dispatcher's first stimulus
        self._next_stimulus = 0
        self._drawn: list[int] = []  # attempt tokens drawn while the current event ran
        self.ops = Operations(self)
        self.web = Dashboard(self)  # the web dashboard: `/`, `/api/...`, `/ws/dashboard`
        self._fed_at = 0.0  # when the event behind the pending sends arrived
        self.dispatch_latency = Histogram(
            "swarm_dispatch_latency_seconds",
            "From the event that freed a symbol to its assignment being sent (incl. commit).")
        self.journal_latency = Histogram(
            "swarm_journal_write_seconds", "Duration of one group commit to the state DB.")
        self._dirty = asyncio.Event()
        self._flush_lock = asyncio.Lock()
        self._closing = False
        self._connections = 0
        self._rearm = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._ids = itertools.count(1)
        self.started_at = time.time()
        self.now = Clock()
        self.node_key = b""  # the DB's secret node secrets come from (read at start)
        self.failed: BaseException | None = None
        self._broken = False  # the scheduler raised: it takes no more events
        self._writing_since: float | None = None  # the commit in flight began then
        self._db_identity: tuple[int, int] | None = None
        self.refused_hellos = 0  # workers that claimed a node id without its proof
        self.stopped = asyncio.Event()
        self._allowed: tuple[Network, ...] = ()  # [security] allowed_hosts, resolved
        self.tally = Tally()  # the counters of /metrics
        self.pruning: set[str] = set()  # runs a prune is deleting now: never loaded again
        self._retention: asyncio.Task[None] | None = None

    # --- lifecycle --------------------------------------------------------------------

    async def start(self) -> None:
        check_listen(self.host, self.config, self.insecure)
        ssl_context = server_context(self.config)
        self._allowed = await resolve_allowed(self.config.security.allowed_hosts)
        self.store = await Store.open(self.db_path, self.config.dispatcher.synchronous)
        self.node_key = await self.store.node_key()
        self._session = self._next_stimulus = self.store.last_stimulus + 1
        sched = scheduler_config(self.config)
        self.core = c.Scheduler(dataclasses.replace(sched, token_source=self._draw_token))
        self._remember(SessionStarted(session_config(sched)), 0)
        for run_id in await self.store.unfinished_runs():
            await self.restore(run_id)
        try:
            self._server = await serve(
                self._serve, self.host, self.port,
                compression=None,
                max_size=self.config.dispatcher.max_frame_size,
                ping_interval=None,  # liveness is our own heartbeat, judged by the core
                server_header=f"swarm/{__version__}",
                process_request=self._process_request,
                ssl=ssl_context,
            )
        except OSError as e:
            await self.store.close()
            raise ConfigError(f"cannot listen on {self.host}:{self.port}: {e.strerror or e}"
                              ) from None
        sock = self._server.sockets[0] if self._server.sockets else None
        if sock is not None:
            self.port = sock.getsockname()[1]
        self._db_identity = self.store.identity
        self._tasks = [self._supervise(self._flush_loop(), "flusher"),
                       self._supervise(self._tick_loop(), "ticker"),
                       self._supervise(self._watch_state(), "state watch")]
        if self.config.dispatcher.retention:
            self._retention = self._supervise(retention_loop(
                parse_duration(self.config.dispatcher.retention, "[dispatcher] retention"),
                lambda: self.ops.prune(parse_duration(self.config.dispatcher.retention))),
                "retention")
        log.info("dispatcher %s listening on %s (state: %s)", __version__, self.url, self.db_path)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        scheme = "wss" if self.config.security.tls_cert else "ws"
        return f"{scheme}://{host}:{self.port}"

    async def stop(self) -> None:
        if self._retention is not None:
            self._retention.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._retention
        if self._server is not None:
            self._server.close()  # closes connections with 1001 going away
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 10)
        self.web.close()  # no request comes in any more: its reading thread may go
        if self._tasks:
            flusher, *others = self._tasks
            for task in others:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            # The flusher commits what the last connections' endings recorded, then ends.
            # Should the state DB hold it up, nothing of that was acknowledged: stopping
            # without it is as safe as a crash.
            self._closing = True
            self._dirty.set()
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                await asyncio.wait_for(asyncio.shield(flusher), 30)
            flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await flusher
        if self.store is not None:
            await self.store.close()
        self.stopped.set()
        log.info("dispatcher stopped")

    async def dispatch_from_file(self, path: str | os.PathLike[str]) -> RunResult:
        """Deploy a manifest file to this dispatcher's own workers and wait for the run to
        end (the original's `dispatchFromFile`): its `RunResult`, which carries
        `completed_tasks` and `total_tasks` too. ManifestError for a bad manifest."""
        from .client import Client

        if self.core is None:
            raise SwarmError("the dispatcher is not started: use `async with Dispatcher(...)`")
        async with Client(self.url, token=self.config.security.token,
                          name="dispatch_from_file", ssl=client_context(self.config, self.url)
                          ) as c:
            run = await c.deploy(path)
            return await run.wait()

    async def __aenter__(self) -> Dispatcher:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def restore(self, run_id: str) -> bool:
        """Load a run from the state DB into the core; False if there is no such run."""
        assert self.store is not None and self.core is not None
        loaded = await self.store.load_run(run_id)
        if loaded is None or run_id in self.pruning:
            return False
        row, records = loaded
        wf = workflow_from_dict(row["manifest"], source=f"<run {run_id}>")
        self.feed(c.RunRestored(run_id, wf, row["status"], row["created_at"], tuple(records),
                                self.now(), row["rollback_status"] or "",
                                row["rollback_requested_at"] or 0.0))
        log.info("run %s (%s): %s, restored from the state DB", run_id, wf.name, row["status"],
                 extra={"run_id": run_id})
        return True

    async def _process_request(self, conn: ServerConnection, request: HttpRequest
                               ) -> Response | None:
        address = str((conn.remote_address or ("",))[0])
        if not peer_allowed(address, self._allowed):
            log.warning("refused a connection from %s: not in [security] allowed_hosts",
                        address)
            return _response(403, "host not allowed by [security] allowed_hosts\n",
                             "text/plain")
        return await self.ops.http(conn, request) or await self.web.http(conn, request)

    # --- the core loop ----------------------------------------------------------------

    def _supervise(self, coro: Any, name: str) -> asyncio.Task[None]:
        """A background task whose unexpected end stops the dispatcher (non-zero) instead
        of leaving it serving without, say, its scheduler's timers."""
        task = asyncio.get_running_loop().create_task(coro, name=name)

        def done(t: asyncio.Task[None]) -> None:
            if not t.cancelled() and t.exception() is not None and self.failed is None:
                log.critical("dispatcher task '%s' failed; stopping", name,
                             exc_info=t.exception())
                self._fail(t.exception())  # type: ignore[arg-type]

        task.add_done_callback(done)
        return task

    def _fail(self, e: BaseException) -> None:
        """Stop taking work and stop the process (serve_forever exits non-zero); what was
        committed is the state a restart resumes from."""
        if self.failed is None:
            self.failed = e
        self.stopped.set()
        if self._server is not None:
            self._server.close()  # every peer sees the dispatcher go

    def _draw_token(self) -> int:
        token = random_token()
        self._drawn.append(token)  # a replay must hand out the same ones
        return token

    def _remember(self, event: Fed, first: int) -> None:
        """Keep a stimulus, to be written with the journal entries from index `first`."""
        self._stimuli.append(Stimulus(self._next_stimulus, self._session, event, first,
                                      len(self._records) - first, tuple(self._drawn)))
        self._next_stimulus += 1
        self._drawn.clear()

    def feed(self, event: c.Event) -> None:
        """Hand an event to the scheduler; what it asks for is stored, then sent. Raises
        `core.Refused` (nothing changed) for a request the run does not allow now."""
        assert self.core is not None
        if self._broken:
            return  # stopping: the scheduler's memory is no longer trusted
        if not self._sends:
            self._fed_at = time.perf_counter()
        event = dataclasses.replace(event, stimulus_id=self._next_stimulus)
        first = len(self._records)
        try:
            if isinstance(event, (c.RunSubmitted, c.RunRestored)):
                # A run's tasks are built in one burst (100,000 at a time): the cyclic GC
                # would rescan the growing heap over and over, doubling the time.
                with gc_paused():
                    commands = self.core.handle(event)
            else:
                commands = self.core.handle(event)
        except c.Refused:
            self._drawn.clear()
            raise  # a request its run does not allow now: nothing changed; the caller says so
        except Exception as e:
            # A bug of ours. `handle` undid the event's changes, but a scheduler that
            # raised is not trusted to go on: the entries before it are committed, and a
            # restart rebuilds the scheduler from the journal.
            self._broken = True
            log.critical("the scheduler could not apply %s; stopping (a restart resumes "
                         "every run from the state DB)", type(event).__name__, exc_info=True)
            self._fail(e)
            self._dirty.set()
            return
        for cmd in commands:
            if isinstance(cmd, jn.Record):
                self._records.append(cmd)
                self.tally.journal(cmd, self.core)
                match cmd:
                    case jn.ClaimRefused():
                        _log_refused(cmd)
                    case jn.DispatcherStalled():
                        _log_stall(cmd)
                    case jn.RunDeadlineExceeded():
                        _log_deadline(cmd)
                    case jn.SymbolCheckpointRejected():
                        _log_rejected(cmd)
                continue
            peer = self._workers.get(cmd.node_id)
            if peer is None:
                continue
            if isinstance(cmd, c.Assign):
                self._sends.append((peer, p.Assign(cmd.tasks)))
            elif isinstance(cmd, c.Ack):
                self._sends.append((peer, p.Ack(cmd.tokens)))
            elif isinstance(cmd, c.Abandon):
                self._sends.append((peer, p.Abandon(cmd.tokens)))
            elif isinstance(cmd, c.KeepAck):
                self._sends.append((peer, p.Kept(cmd.items)))
            elif isinstance(cmd, c.CloseNode):
                log.warning("node %s: %s; closing its connection", peer.name, cmd.reason)
                self._sends.append((peer, None))
        self._remember(event, first)
        self._dirty.set()
        self._rearm.set()

    def send_after_commit(self, peer: _Peer, msg: p.Message) -> None:
        """Send `msg` once the journal entries fed so far are committed."""
        self._sends.append((peer, msg))
        self._dirty.set()

    async def stored(self) -> None:
        """Return once everything fed so far is committed to the state DB (StateError if
        the state DB failed)."""
        if self.failed is not None:
            raise StateError(f"the dispatcher is stopping: {self.failed}")
        done = asyncio.get_running_loop().create_future()
        self._stored.append(done)
        self._dirty.set()
        await done

    async def _flush(self) -> None:
        async with self._flush_lock:  # one group commit at a time, in order
            records, sends, fed_at = self._records, self._sends, self._fed_at
            stored, self._stored = self._stored, []
            self._records, self._sends = [], []
            # Stimuli that caused no entry (heartbeats, quiet ticks) wait for a commit that
            # has some, within bounds: an idle swarm does not commit every heartbeat.
            stimuli: list[Stimulus] = []
            if records or len(self._stimuli) >= STIMULI_ALONE or self._closing:
                stimuli, self._stimuli = self._stimuli, []
            seqs = range(0)
            if records or stimuli:
                t0 = time.perf_counter()
                try:
                    seqs = await self._write(records, stimuli)
                except BaseException:
                    self._stored[:0] = stored  # the flush loop fails them all
                    raise
                self.journal_latency.observe(time.perf_counter() - t0)
            for waiter in stored:
                if not waiter.done():
                    waiter.set_result(None)
            now = time.perf_counter()
            for peer, msg in sends:
                if msg is None:
                    asyncio.get_running_loop().create_task(
                        peer.ws.close(p.CLOSE_HEARTBEAT, "heartbeat timeout"))
                    continue
                if isinstance(msg, p.Assign):
                    self.dispatch_latency.observe(now - fed_at)
                    self._send_assign(peer, msg)
                    continue
                peer.send(msg)
            for r in records:
                if isinstance(r, jn.RunEnded):
                    _log_outcome(r)
            if records:
                # The frames above go out first (their writers run now): workers wait for
                # work, watchers only watch.
                await asyncio.sleep(0)
                self._publish(records, seqs)

    def _send_assign(self, peer: _Peer, msg: p.Assign) -> None:
        """Assignments in frames the worker accepts: split when too big for one. A single
        one too big (from a run deployed before the size check) fails that symbol alone,
        with the reason, instead of costing the worker its connection."""
        frame = p.encode(msg)
        if len(frame) <= peer.max_frame:
            peer.send_frame(frame)
        elif len(msg.tasks) > 1:
            half = len(msg.tasks) // 2
            self._send_assign(peer, p.Assign(msg.tasks[:half]))
            self._send_assign(peer, p.Assign(msg.tasks[half:]))
        else:
            (t,) = msg.tasks
            error = (f"its assignment of {len(frame):,} bytes exceeds what worker {peer.name} "
                     f"accepts in one frame ({peer.max_frame:,} bytes)")
            log.error("symbol %s of run %s: %s", t.symbol, t.run_id, error)
            self.feed(c.ResultsReceived(peer.node_id, (p.TaskResult(
                token=t.token, task_id=t.task_id, ok=False, retryable=False, error=error),),
                self.now()))

    async def _write(self, records: list[jn.Record], stimuli: list[Stimulus]) -> range:
        """Commit, trying again with backoff while the state DB holds it up (another
        process's lock, a full disk). Meanwhile the dispatcher serves on: heartbeats are
        heard, new events queue behind, and nothing behind these entries is sent."""
        assert self.store is not None
        delay = 0.05
        began = self._writing_since = time.monotonic()
        warned = False
        try:
            while True:
                try:
                    seqs = await self.store.write(records, stimuli)
                    break
                except StateBusy as e:
                    waited = time.monotonic() - began
                    if not warned:
                        warned = True
                        log.warning("the state DB holds up a commit (%s): %s; %d entries "
                                    "wait, retrying", e.why, e, len(records))
                    log.debug("commit held up for %.1f s: %s", waited, e)
                    if e.why == "disk full":
                        await self.store.reclaim()
                    if waited > STATE_GIVE_UP:
                        raise StateError(f"{e} (for {waited:.0f} s; giving up)") from e
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, COMMIT_BACKOFF_MAX)
            if warned:
                log.warning("the state DB takes commits again after %.1f s",
                            time.monotonic() - began)
            return seqs
        finally:
            self._writing_since = None

    @property
    def state_stalled(self) -> float:
        """Seconds the commit in flight has been waiting, once that is over a second (a
        lock held elsewhere, a full or slow disk); 0 otherwise."""
        since = self._writing_since
        waited = 0.0 if since is None else time.monotonic() - since
        return waited if waited >= 1.0 else 0.0

    async def _watch_state(self) -> None:
        """Notice within a second a state DB file deleted or replaced under us: writing on
        into a file nobody can open again would lose every run at the next restart."""
        assert self.store is not None
        while True:
            await asyncio.sleep(STATE_WATCH)
            now = self.store.identity
            if now != self._db_identity:
                what = "deleted" if now is None else "replaced by another file"
                log.critical("the state DB %s was %s under the running dispatcher; stopping "
                             "(restore it, or start a dispatcher on a new one)",
                             self.db_path, what)
                self._fail(StateError(f"{self.db_path}: {what} while in use"))
                return

    async def _flush_loop(self) -> None:
        try:
            while not self._closing:
                await self._dirty.wait()
                self._dirty.clear()
                await self._flush()
            await self._flush()
        except Exception as e:  # the state DB failed: stop rather than act unrecorded
            log.critical("cannot write the state database: %s", e)
            for waiter in self._stored:  # nothing more will be stored: do not wait forever
                if not waiter.done():
                    waiter.set_exception(StateError(f"cannot write the state database: {e}"))
            self._fail(e)

    async def _tick_loop(self) -> None:
        assert self.core is not None
        stalled = 0.0
        while True:
            held = len(self.core.known_runs())
            self.core.forget_finished()  # finished runs live on in the state DB only
            if len(self.core.known_runs()) != held:
                self._remember(Forgotten(), len(self._records))
            deadline = self.core.next_deadline()
            now = self.now()
            wait = TICK_MAX if deadline is None else min(TICK_MAX, deadline - now)
            self._rearm.clear()
            if wait > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._rearm.wait(), wait)
                late = self.now() - now - wait
                if late > STALL:
                    stalled = max(stalled, late)
                nd = self.core.next_deadline()
                if (nd is None or nd > self.now()) and not stalled:
                    continue
            self.feed(c.Tick(self.now(), stalled))
            stalled = 0.0

    def _publish(self, records: list[jn.Record], seqs: range) -> None:
        """The committed entries, as events (with their seq in the journal), to the clients
        watching their runs."""
        if self.web.sockets:
            self.web.publish(records)
        if not self._clients:
            return
        batches: dict[_Peer, list[p.Event]] = {}
        for r, seq in zip(records, seqs, strict=True):
            targets = [peer for peer in self._clients if peer.wants(r.run_id)]
            if not targets:
                continue
            ev = p.Event(kind=r.kind, ts=r.ts, run_id=r.run_id, task_id=r.task_id,
                         symbol=r.symbol, node=r.node, attempt=r.attempt,
                         data=redact_output(r.lean_data()), seq=seq)
            for peer in targets:
                batches.setdefault(peer, []).append(ev)
        for peer, events in batches.items():
            peer.publish(events)

    # --- connections ------------------------------------------------------------------

    async def _serve(self, ws: ServerConnection) -> None:
        if self._connections >= self.config.dispatcher.max_connections:
            await ws.close(1013, "too many connections")
            return
        self._connections += 1
        try:
            if ws.request is not None and ws.request.path.split("?")[0] == "/ws/dashboard":
                await self.web.serve(ws)  # admitted by its cookie in web.http
            else:
                await self._serve_peer(ws)
        finally:
            self._connections -= 1

    def counters(self) -> list[tuple[str, str, float]]:
        """Counters for /metrics: what was refused or survived, since the start."""
        core = self.core
        return [
            ("swarm_claims_refused_total", "Results and adoption claims dropped because the "
             "node does not own the attempt.", core.refused if core else 0),
            ("swarm_node_proofs_refused_total", "Workers that claimed a node id without its "
             "proof.", self.refused_hellos),
            ("swarm_dispatcher_stalls_total", "Times the dispatcher itself stalled and gave "
             "every node a fresh grace period.", core.stalls if core else 0),
        ]

    def gauges(self) -> list[tuple[str, str, float]]:
        return [("swarm_state_db_stalled_seconds", "Seconds the state DB has been holding up "
                 "commits (a lock held by another process, a full disk); 0 when it is not.",
                 round(self.state_stalled, 3))]

    def node_secret(self, node_id: str) -> bytes:
        """A node's secret, derived from the DB's node key: nothing per node to store, and
        it survives dispatcher restarts."""
        return hmac.new(self.node_key, node_id.encode(), hashlib.sha256).digest()

    async def _serve_peer(self, ws: ServerConnection) -> None:
        token = self.config.security.token
        nonce = secrets.token_bytes(16)
        try:
            await ws.send(p.encode(p.Challenge(nonce=nonce, auth=bool(token))))
            frame = await asyncio.wait_for(ws.recv(), HELLO_TIMEOUT)
        except TimeoutError:
            await ws.close(p.CLOSE_POLICY, "no hello within 5 s")
            return
        except ConnectionClosed:
            return
        try:
            hello = p.decode(frame, self.config.dispatcher.max_frame_size)
        except RemoteProtocolError as e:
            log.warning("bad first frame from %s: %s", ws.remote_address, e)
            await ws.close(p.CLOSE_INVALID_DATA, "bad frame")
            return
        if not isinstance(hello, p.Hello) or hello.role not in ("worker", "client"):
            await ws.close(p.CLOSE_POLICY, "the first frame must be a hello")
            return
        if hello.v != p.PROTOCOL_VERSION:
            await ws.close(p.CLOSE_POLICY, f"protocol version {hello.v} not supported")
            return
        if token and not p.check_proof(token, nonce, hello.proof):
            log.warning("authentication failed for %s %r from %s", hello.role, hello.name,
                        ws.remote_address)
            await ws.close(p.CLOSE_POLICY, "authentication failed")
            return
        if not p.NODE_NAME.fullmatch(hello.name):
            await ws.close(p.CLOSE_POLICY, "invalid name: 1-64 of A-Z a-z 0-9 . _ @ : -")
            return
        if hello.role == "worker":
            await self._serve_worker(ws, hello, nonce)
        else:
            await self._serve_client(ws, hello)

    async def _messages(self, ws: ServerConnection, hello: p.Hello
                        ) -> AsyncIterator[p.Message]:
        """The decoded frames of one connection; a bad frame closes that connection only."""
        limit = ws.protocol.max_message_size or self.config.dispatcher.max_frame_size
        async for frame in ws:
            try:
                msg = p.decode(frame, limit)
            except RemoteProtocolError as e:
                log.warning("%s %s sent a bad frame: %s", hello.role, hello.name, e)
                await ws.close(p.CLOSE_INVALID_DATA, "bad frame")
                return
            yield msg

    def _identify(self, hello: p.Hello, nonce: bytes) -> tuple[str, bytes]:
        """The node id of a worker, and the secret to give it if it is new. A reconnecting
        worker keeps its id only with proof; without, it is a new node and adopts nothing."""
        if hello.node_id:
            if p.check_proof_bytes(self.node_secret(hello.node_id), nonce, hello.node_proof):
                return hello.node_id, b""
            self.refused_hellos += 1
            log.warning("worker %s claimed node id %r without proof; registered as a new "
                        "node", hello.name, hello.node_id)
        # Unique across dispatcher restarts too: the counter alone would repeat.
        node_id = f"{hello.name}#{next(self._ids)}.{secrets.token_hex(4)}"
        return node_id, self.node_secret(node_id)

    async def _serve_worker(self, ws: ServerConnection, hello: p.Hello, nonce: bytes) -> None:
        node_id, secret = self._identify(hello, nonce)
        old = self._workers.get(node_id)
        if len(self._workers) - (old is not None) >= self.config.coordinator.max_workers:
            await ws.close(1013, f"dispatcher full: max_workers={len(self._workers)}")
            return
        if hello.slots < 1:
            await ws.close(p.CLOSE_POLICY, "a worker needs at least one slot")
            return
        if old is not None:  # the same node again: its old connection is half-dead
            log.info("worker %s reconnected; closing its previous connection", hello.name)
            asyncio.get_running_loop().create_task(old.ws.close(p.CLOSE_REPLACED, "replaced"))
        peer = _Peer(ws, "worker", hello.name, node_id,
                     max_frame=hello.max_size or self.config.dispatcher.max_frame_size)
        self._workers[node_id] = peer
        peer.send(p.Welcome(node_id=node_id, version=__version__, node_secret=secret,
                            heartbeat_interval=self.config.coordinator.heartbeat_interval,
                            max_checkpoint_size=self.config.coordinator.max_checkpoint_size))
        log.info("worker %s joined: %s, %d slots", hello.name,
                 ", ".join(hello.capabilities) or "no backends", hello.slots)
        self.feed(c.NodeConnected(node_id, hello.name, hello.capabilities, hello.slots,
                                  self.now(), hello.labels, hello.running))
        try:
            async for msg in self._messages(ws, hello):
                now = self.now()
                if self._workers.get(node_id) is not peer:
                    break  # replaced by a newer connection of the same node
                if isinstance(msg, p.Results):
                    self.feed(c.ResultsReceived(node_id, msg.items, now))
                elif isinstance(msg, p.Progress):
                    self.feed(c.ProgressReceived(node_id, msg.items, now))
                elif isinstance(msg, p.Heartbeat):
                    self.feed(c.NodeHeartbeat(node_id, now, msg.running, msg.assigned))
                elif isinstance(msg, p.Draining):
                    peer.draining = True
                    self.feed(c.NodeDraining(node_id, now))
                else:
                    log.warning("worker %s sent %s, which workers may not send", hello.name,
                                msg.T)
                    await ws.close(p.CLOSE_POLICY, f"unexpected {msg.T}")
                    break
        except ConnectionClosed:
            pass
        finally:
            if self._workers.get(node_id) is peer:  # not if a newer connection took over
                del self._workers[node_id]
                log.info("worker %s left (%s)", hello.name,
                         "drained" if peer.draining else "connection closed")
                self.feed(c.NodeDisconnected(node_id, self.now(), graceful=peer.draining))
            await peer.close()

    async def _serve_client(self, ws: ServerConnection, hello: p.Hello) -> None:
        # Only now, authenticated, may it send large frames (a deploy of many symbols).
        ws.protocol.max_message_size = self.config.dispatcher.max_request_size
        peer = _Peer(ws, "client", hello.name)
        self._clients.add(peer)
        peer.send(p.Welcome(node_id="", version=__version__,
                            heartbeat_interval=self.config.coordinator.heartbeat_interval))
        try:
            async for msg in self._messages(ws, hello):
                if not isinstance(msg, p.Request):
                    await ws.close(p.CLOSE_POLICY, f"unexpected {msg.T}")
                    break
                try:
                    await self.ops.request(peer, msg)
                except SwarmError as e:
                    peer.send(p.Reply(id=msg.id, ok=False, error=str(e), code=e.exit_code))
        except ConnectionClosed:
            pass
        finally:
            self._clients.discard(peer)
            await peer.close()


# Journal records an operator should also see in the log, as they are made.


def _log_refused(j: jn.ClaimRefused) -> None:
    log.warning("node %s (%s) claimed attempt %s of %s (%s) that belongs to %s; dropped",
                j.node, j.node_id, j.token, j.symbol, j.claim, j.owner or "nobody")


def _log_stall(j: jn.DispatcherStalled) -> None:
    log.warning("the dispatcher stalled for %.1f s; %d nodes get a fresh grace period",
                j.seconds, j.nodes)


def _log_deadline(j: jn.RunDeadlineExceeded) -> None:
    log.warning("run %s: %s (deadline %s ms); stopping it", j.run_id, j.reason, j.deadline,
                extra={"run_id": j.run_id})


def _log_rejected(j: jn.SymbolCheckpointRejected) -> None:
    log.warning("symbol %s of run %s: %s", j.symbol, j.run_id, j.error,
                extra={"run_id": j.run_id})


def _log_outcome(r: jn.RunEnded) -> None:
    """Every run's end, at info: status, symbol counts, duration."""
    parts = ", ".join(f"{n} {s}" for s, n in sorted(r.counts.items())) or "no symbols"
    log.info("run %s %s: %d symbols (%s) in %.3f s", r.run_id, r.status,
             sum(r.counts.values()), parts, float(r.duration or 0.0),
             extra={"run_id": r.run_id})


def tune_gc() -> None:
    """GC settings for a process that hosts a dispatcher (the CLI's; an embedding program
    keeps its own). Young collections every 700 allocations, and full ones over a heap of
    millions of task objects, cost W1 15% and a 100,000-symbol run a quarter of its rate;
    the scheduler unlinks its task graphs itself (forget_finished), so reference counting
    frees nearly everything and the collector has little to find."""
    gc.freeze()  # what is loaded by now (modules, config) lives as long as the process
    gc.set_threshold(50_000, 50, 100)


async def serve_forever(config: Config, *, host: str | None = None, port: int | None = None,
                        db_path: str | None = None, ready_file: str | None = None,
                        insecure: bool = False) -> int:
    """Run a dispatcher until SIGINT/SIGTERM; returns the process exit code."""
    import signal
    from pathlib import Path

    tune_gc()
    d = Dispatcher(config, host=host, port=port, db_path=db_path, insecure=insecure)
    await d.start()
    if ready_file:
        try:
            Path(ready_file).write_text(d.url + "\n")
        except OSError as e:
            await d.stop()
            raise ConfigError(f"cannot write --ready-file {ready_file}: {e.strerror or e}"
                              ) from None
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, d.stopped.set)
    await d.stopped.wait()
    await d.stop()
    return 1 if d.failed else 0


__all__ = ["Dispatcher", "scheduler_config", "serve_forever", "tune_gc"]
