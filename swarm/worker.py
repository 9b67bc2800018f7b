"""A worker node: connects to the dispatcher, advertises the backends that passed their
health check, runs up to `max_concurrent_tasks` symbols at once, reports results until
they are acknowledged, heartbeats, and reconnects with jittered exponential backoff.

On SIGINT/SIGTERM it tells the dispatcher it is draining (no new work), lets running
symbols finish for up to `shutdown_grace`, stops the rest, delivers its results, and
exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import random
import signal
import sys
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI
from websockets.uri import parse_uri

from . import protocol as p
from .backends import Backends, Invocation, Outcome
from .config import Config
from .errors import AuthenticationFailed, ConfigError, ProtocolError, RemoteProtocolError
from .reports import Reports
from .secrets import SecretError, scrub
from .secrets import resolve as resolve_secrets
from .tasks import AttemptOutcome
from .tls import client_context

log = logging.getLogger("swarm.worker")

# For this long after an accepted connection is lost, reconnection attempts stay at most
# FAST_RECONNECT_DELAY apart: a dispatcher restart takes a second or two, and workers
# should be back as soon as it listens (an attempt that is refused costs next to nothing).
FAST_RECONNECT_S = 10.0
FAST_RECONNECT_DELAY = 0.5
RESULT_FRAME_BUDGET = 256 * 1024  # bytes of results per frame, well under max_frame_size
STDERR_TAIL = 16 * 1024


_SMALL = (type(None), bool, int, float)


def _fit(result: p.TaskResult, budget: int) -> p.TaskResult:
    """Trim a result so that its frame fits the dispatcher's frame limit."""
    small = type(result.output) in _SMALL and len(result.stderr) + len(result.error) < 4096
    if small or len(p.encode(p.Results((result,)))) <= budget:  # small: no need to measure
        return result
    stderr = result.stderr[-STDERR_TAIL:]
    output: Any = result.output
    if len(p.encode(p.Results((p.TaskResult(token=0, task_id="", ok=True, output=output),)))) \
            > budget - STDERR_TAIL - 4096:
        text = output if isinstance(output, str) else repr(output)
        output = text[: budget // 2]
    return p.TaskResult(
        token=result.token, task_id=result.task_id, ok=result.ok, output=output,
        error=result.error[:4096], exit_code=result.exit_code, retryable=result.retryable,
        timed_out=result.timed_out, duration_ms=result.duration_ms, stderr=stderr,
        stdout_truncated=True, stderr_truncated=result.stderr_truncated
        or len(stderr) < len(result.stderr))


def _sendable(result: p.TaskResult) -> p.TaskResult:
    """A result the dispatcher will accept: trimmed to the frame budget, and replaced by a
    failure if the backend's output cannot cross the wire (huge ints, non-string keys)."""
    try:
        p.check_data(result.output, "output")  # the very check the dispatcher applies
        return _fit(result, RESULT_FRAME_BUDGET)
    except ProtocolError as e:
        return p.TaskResult(
            token=result.token, task_id=result.task_id, ok=False, output=None,
            error=f"the backend's output cannot be sent to the dispatcher: {e}",
            exit_code=result.exit_code if result.exit_code is None
            or p.INT_MIN <= result.exit_code <= p.INT_MAX else None,
            retryable=False, duration_ms=result.duration_ms,
            stderr=result.stderr[-STDERR_TAIL:])


class Worker:
    def __init__(self, config: Config, *, name: str | None = None, url: str | None = None,
                 slots: int | None = None) -> None:
        self.config = config
        self.name = name or config.worker.name
        if not p.NODE_NAME.fullmatch(self.name):
            raise ConfigError(f"invalid node name {self.name!r}: 1 to 64 characters of "
                              "A-Z a-z 0-9 . _ @ : -, starting with a letter or digit")
        self.url = url or config.worker_url
        try:
            parse_uri(self.url)
        except (InvalidURI, ValueError) as e:
            raise ConfigError(f"invalid dispatcher URL {self.url!r}: {e}") from None
        self.slots = slots or config.worker.max_concurrent_tasks
        self.backends = Backends.from_config(config)
        self._ssl = client_context(config, self.url)
        self.node_id = ""
        self._node_secret = b""  # proves `node_id` when reconnecting (from the Welcome)
        self._assigned = 0  # tasks received on the current connection
        self._heartbeat_s = config.worker.heartbeat_interval / 1000.0
        self._ws: ClientConnection | None = None
        self._running: dict[int, asyncio.Task[None]] = {}
        self._unacked: dict[int, p.TaskResult] = {}
        self._outbox: list[p.TaskResult] = []
        self._flush_scheduled = False
        self.reports = Reports(self._send)  # checkpoints and progress of running attempts
        self._stopping = asyncio.Event()
        self._connected = asyncio.Event()
        self._task: asyncio.Task[int] | None = None
        self._welcomed = False  # the current (or last) connection was accepted
        self.completed = 0
        self.failed: BaseException | None = None  # a background task's unexpected end

    # --- lifecycle --------------------------------------------------------------------

    async def __aenter__(self) -> Worker:
        """Run in the background of this process (handlers registered here are used)."""
        self._task = asyncio.get_running_loop().create_task(self.run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.request_stop()
        if self._task is not None:
            await self._task

    def request_stop(self) -> None:
        """Stop taking work; running symbols get `shutdown_grace` to finish."""
        if not self._stopping.is_set():
            log.info("worker %s: stopping, %d symbols running", self.name, len(self._running))
            self._stopping.set()
            self._send(p.Draining())

    async def run(self) -> int:
        reasons = await self.backends.check()
        for backend, why in reasons.items():
            if why is None:
                log.info("backend %s: available", backend)
            else:
                log.info("backend %s: not advertised: %s", backend, why)
        if not self.backends.available:
            log.error("worker %s: no backend is available; nothing to advertise", self.name)
        # Once, before any attempt: how nothing a backend starts outlives it (README).
        log.info("worker %s: containment: %s", self.name, self.backends.contain().describe())
        try:
            conn = asyncio.get_running_loop().create_task(self._connect_loop(),
                                                          name="connection")
            conn.add_done_callback(self._supervise)
            await self._stopping.wait()
            await self._drain()
            conn.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await conn
            if self._ws is not None:
                with contextlib.suppress(Exception):
                    await self._ws.close()
        finally:
            self.backends.close()
        log.info("worker %s: stopped after %d results", self.name, self.completed)
        return 1 if self.failed is not None else 0

    def _supervise(self, task: asyncio.Task[None]) -> None:
        """A background task that ends by an unexpected exception stops the worker (exit 1)
        instead of leaving it up without, say, its connection or its heartbeats."""
        if task.cancelled() or task.exception() is None:
            return
        log.critical("worker %s: its %s task failed; stopping", self.name, task.get_name(),
                     exc_info=task.exception())
        if self.failed is None:
            self.failed = task.exception()
        self.request_stop()

    async def _drain(self) -> None:
        grace = self.config.worker.shutdown_grace / 1000.0
        if self._running:
            _, pending = await asyncio.wait(list(self._running.values()), timeout=grace)
            if pending:
                log.warning("worker %s: %d symbols still running after %.1f s; stopping them",
                            self.name, len(pending), grace)
                for t in pending:
                    t.cancel()
                await asyncio.wait(pending)
        # Deliver what we have: results stay ours until the dispatcher acknowledges them.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 5.0
        while self._unacked and self._ws is not None and loop.time() < deadline:
            await asyncio.sleep(0.02)

    async def _connect_loop(self) -> None:
        cfg = self.config.worker
        first = delay = cfg.reconnect_initial_delay / 1000.0
        most = cfg.reconnect_max_delay / 1000.0
        loop = asyncio.get_running_loop()
        lost_at = -FAST_RECONNECT_S
        while True:
            try:
                await self._session()
                if self._stopping.is_set():
                    return
                log.warning("worker %s: connection to %s lost; reconnecting", self.name,
                            self.url)
            except AuthenticationFailed as e:
                # A wrong token will not fix itself: wait long, do not hammer the dispatcher.
                delay = max(delay, most / 2, 1.0)
                wait = delay * random.uniform(0.75, 1.0)
                log.error("worker %s: %s; retrying in %.1f s", self.name, e, wait)
                await asyncio.sleep(wait)
                delay = min(delay * 2, max(most, 1.0))
                continue
            except (OSError, InvalidHandshake, InvalidURI, TimeoutError, ConnectionClosed,
                    RemoteProtocolError) as e:
                log.info("worker %s: cannot reach %s (%s); retrying in %.2f s", self.name,
                         self.url, e or type(e).__name__, delay)
            if self._welcomed:  # the last connection was accepted: start over, quickly
                self._welcomed = False
                delay = first
                lost_at = loop.time()
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            recent = loop.time() - lost_at < FAST_RECONNECT_S
            delay = min(delay * 2, max(first, FAST_RECONNECT_DELAY) if recent else most)

    async def _session(self) -> None:
        max_size = self.config.dispatcher.max_frame_size
        async with connect(self.url, compression=None, max_size=max_size, ping_interval=None,
                           open_timeout=10, close_timeout=5, ssl=self._ssl) as ws:
            challenge = p.decode(await asyncio.wait_for(ws.recv(), 10), max_size)
            if not isinstance(challenge, p.Challenge):
                raise RemoteProtocolError("the dispatcher did not start with a challenge")
            token = self.config.security.token
            if challenge.auth and not token:
                raise AuthenticationFailed("the dispatcher requires a token (set SWARM_TOKEN "
                                           "or [security] token)")
            await ws.send(p.encode(p.Hello(
                role="worker", name=self.name, capabilities=self.backends.available,
                slots=self.slots, labels=dict(self.config.worker.labels),
                proof=p.proof_for(token, challenge.nonce) if challenge.auth else b"",
                running=tuple(self._running), pid=os.getpid(), node_id=self.node_id,
                max_size=max_size,
                node_proof=p.proof_of(self._node_secret, challenge.nonce)
                if self._node_secret else b"")))
            try:
                welcome = p.decode(await asyncio.wait_for(ws.recv(), 10), max_size)
            except ConnectionClosed as e:
                if e.rcvd is not None and e.rcvd.code == p.CLOSE_POLICY:
                    raise AuthenticationFailed(f"dispatcher refused: {e.rcvd.reason}") from None
                raise
            if not isinstance(welcome, p.Welcome):
                raise RemoteProtocolError("the dispatcher did not welcome us")
            if welcome.node_secret or welcome.node_id != self.node_id:
                self._node_secret = welcome.node_secret  # a new identity
            self.node_id = welcome.node_id
            self.reports.max_checkpoint_size = welcome.max_checkpoint_size
            self._welcomed = True
            self._assigned = 0
            # The dispatcher's interval, if shorter: it judges silence by its own.
            self._heartbeat_s = min(self.config.worker.heartbeat_interval,
                                    welcome.heartbeat_interval or 1 << 30) / 1000.0
            self._ws = ws
            self._connected.set()
            log.info("worker %s: connected to %s as %s", self.name, self.url, welcome.node_id)
            if self._stopping.is_set():
                self._send(p.Draining())
            self.reports.resend()  # checkpoints not yet known to be committed: before results
            if self._unacked:  # results the last connection did not see acknowledged
                self._outbox.extend(self._unacked.values())
                self._schedule_flush()
            beat = asyncio.get_running_loop().create_task(self._heartbeat(ws), name="heartbeat")
            beat.add_done_callback(self._supervise)
            try:
                async for frame in ws:
                    self._on_message(p.decode(frame, max_size))
            finally:
                beat.cancel()
                self._ws = None
                self._connected.clear()

    def _on_message(self, msg: p.Message) -> None:
        if isinstance(msg, p.Assign):
            self._assigned += len(msg.tasks)
            for t in msg.tasks:
                self._start(t)
        elif isinstance(msg, p.Ack):
            for token in msg.tokens:
                self._unacked.pop(token, None)
        elif isinstance(msg, p.Kept):
            self.reports.on_kept(msg)
        elif isinstance(msg, p.Abandon):
            for token in msg.tokens:
                task = self._running.get(token)
                if task is not None:
                    log.info("worker %s: abandoning attempt %d", self.name, token)
                    task.cancel()
        else:
            raise RemoteProtocolError(f"unexpected {msg.T} from the dispatcher")

    async def _heartbeat(self, ws: ClientConnection) -> None:
        with contextlib.suppress(ConnectionClosed):
            while True:
                await asyncio.sleep(self._heartbeat_s)
                free = 0 if self._stopping.is_set() else self.slots - len(self._running)
                # A finished attempt whose result is not yet acknowledged is still ours:
                # the dispatcher must not take it for forgotten while the result travels.
                await ws.send(p.encode(p.Heartbeat(
                    free=max(free, 0), running=(*self._running, *self._unacked),
                    assigned=self._assigned)))

    # --- running symbols --------------------------------------------------------------

    def _start(self, t: p.TaskAssignment) -> None:
        if t.token in self._running:
            return
        inv = Invocation(run_id=t.run_id, task_id=t.task_id, symbol=t.symbol, type=t.type,
                         context=t.context, dispatch=t.dispatch, parameters=t.parameters,
                         attempt=t.attempt, timeout_ms=t.timeout, checkpoint=t.checkpoint,
                         reports=self.reports.sink(t.token, t.task_id, t.symbol))
        task = asyncio.get_running_loop().create_task(self._execute(t.token, inv, t.secrets))
        self._running[t.token] = task

    async def _execute(self, token: int, inv: Invocation, secrets: dict[str, str]) -> None:
        try:
            outcome: Outcome = await self._attempt(inv, secrets)
        except asyncio.CancelledError:
            self._running.pop(token, None)
            self.reports.finish(token, cancelled=True)
            raise
        except Exception as e:  # a bug in a backend runner must not kill the worker
            log.exception("worker %s: backend %s crashed", self.name, inv.dispatch,
                          extra=_context(inv, self.name))
            outcome = Outcome(ok=False, output=None, error=f"{type(e).__name__}: {e}")
        self._running.pop(token, None)
        errors = self.reports.finish(token)
        if errors:  # the symbol's log says what became of its refused checkpoints
            outcome = dataclasses.replace(
                outcome, stderr="\n".join([outcome.stderr.rstrip("\n"), *errors]).lstrip("\n"))
        log.debug("symbol %s attempt %d on %s: %s in %.0f ms%s", inv.symbol, inv.attempt,
                  inv.dispatch, AttemptOutcome.OK if outcome.ok else AttemptOutcome.FAILED,
                  outcome.duration_ms,
                  "" if outcome.ok else f": {outcome.error}", extra=_context(inv, self.name))
        result = _sendable(p.TaskResult(
            token=token, task_id=inv.task_id, ok=outcome.ok, output=outcome.output,
            error=outcome.error, exit_code=outcome.exit_code, retryable=outcome.retryable,
            timed_out=outcome.timed_out, duration_ms=outcome.duration_ms,
            stderr=outcome.stderr, stdout_truncated=outcome.stdout_truncated,
            stderr_truncated=outcome.stderr_truncated))
        self.completed += 1
        self._unacked[token] = result
        self._outbox.append(result)
        self._schedule_flush()

    async def _attempt(self, inv: Invocation, secrets: dict[str, str]) -> Outcome:
        """Run `inv` with its secrets resolved here; what comes back is scrubbed of their
        values. A secret this worker cannot provide fails the symbol, not the worker."""
        if not secrets:
            return await self.backends.run(inv)
        try:
            env = resolve_secrets(secrets, self.config.secrets, self.config.base_dir)
        except SecretError as e:
            log.warning("worker %s: %s: %s", self.name, inv.task_id, e)
            return Outcome(ok=False, output=None, error=str(e), retryable=False)
        out = await self.backends.run(dataclasses.replace(inv, env=env))
        return dataclasses.replace(
            out, output=scrub(out.output, env), error=scrub(out.error, env),
            stderr=scrub(out.stderr, env))

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        """Send the results finished in this loop turn, batched into frames."""
        self._flush_scheduled = False
        if self._ws is None:
            self._outbox.clear()  # re-sent from _unacked after reconnecting
            self.reports.drop_outbox()
            return
        self.reports.flush()  # an attempt's reports go before its result
        batch: list[p.TaskResult] = []
        size = 0
        for r in self._outbox:
            n = len(r.stderr) + len(str(r.output)) + 256
            if batch and size + n > RESULT_FRAME_BUDGET:
                self._send(p.Results(tuple(batch)))
                batch, size = [], 0
            batch.append(r)
            size += n
        if batch:
            self._send(p.Results(tuple(batch)))
        self._outbox.clear()

    def _send(self, msg: p.Message) -> None:
        ws = self._ws
        if ws is None:
            return
        frame = p.encode(msg)

        async def send() -> None:
            with contextlib.suppress(ConnectionClosed):
                await ws.send(frame)

        asyncio.get_running_loop().create_task(send())


def _context(inv: Invocation, node: str) -> dict[str, Any]:
    """What JSON log lines carry about an attempt ([logging] format = "json")."""
    return {"run_id": inv.run_id, "symbol": inv.symbol, "node": node, "attempt": inv.attempt}


async def serve_worker(config: Config, *, name: str | None = None, url: str | None = None,
                       slots: int | None = None) -> int:
    """Run a worker until SIGINT/SIGTERM; returns the exit code."""
    w = Worker(config, name=name, url=url, slots=slots)
    loop = asyncio.get_running_loop()
    _watch_children_with_pidfds(loop)
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, w.request_stop)
    return await w.run()


def _watch_children_with_pidfds(loop: asyncio.AbstractEventLoop) -> None:
    """Python 3.11 waits for each backend process on a thread of its own; a pidfd per
    child, polled by the event loop, needs no thread (the default from 3.12 on). Only
    in a worker process of our own: the watcher is process-wide."""
    if sys.version_info >= (3, 12) or not hasattr(os, "pidfd_open"):
        return
    try:
        os.close(os.pidfd_open(os.getpid()))
    except OSError:  # a kernel older than 5.3, or a sandbox that forbids it
        return
    watcher = asyncio.PidfdChildWatcher()
    watcher.attach_loop(loop)
    asyncio.set_child_watcher(watcher)
