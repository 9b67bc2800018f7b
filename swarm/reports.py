"""A worker's side of long-running symbols: the checkpoints and progress reports of its
running attempts, on their way to the dispatcher.

- A checkpoint goes out at once and stays here until the dispatcher says it is committed
  (a `kept` frame); the latest unacknowledged one of each attempt is sent again after a
  reconnection. Whoever made it (an async handler awaiting `ctx.checkpoint`) hears then.
- A checkpoint too big for `max_checkpoint_size` is not sent: its size is, so that the
  dispatcher journals the refusal; the error also goes to the attempt's stderr.
- Progress without a checkpoint is throttled to one report per PROGRESS_EVERY per
  attempt (the latest wins); the last one is never lost, only delayed.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable

from . import protocol as p
from .progress import Report, checkpoint_size, too_big

log = logging.getLogger("swarm.worker")

# Seconds between two progress-only reports of one attempt: each one is a journal row,
# and a symbol of 50 hours should not leave hundreds of thousands of them.
PROGRESS_EVERY = 1.0
FRAME_BUDGET = 512 * 1024  # bytes of reports per frame
# Checkpoints bigger than this are refused here even without a limit: the frame carrying
# one must stay under the dispatcher's frame limit (1 MiB by default).
FRAME_SAFE_CHECKPOINT = 768 * 1024


class _Attempt:
    __slots__ = ("token", "task_id", "symbol", "seq", "waiting", "errors", "sent_at", "held",
                 "timer", "progress", "message")

    def __init__(self, token: int, task_id: str, symbol: str) -> None:
        self.token = token
        self.task_id = task_id
        self.symbol = symbol
        self.seq = 0
        self.waiting: dict[int, asyncio.Future[bool]] = {}  # seq -> whoever awaits it
        self.errors: list[str] = []  # for the attempt's stderr
        self.sent_at = float("-inf")  # loop time of the last progress-only report
        self.held: Report | None = None  # a progress report waiting for its turn
        self.timer: asyncio.TimerHandle | None = None
        self.progress: float | None = None  # the latest reported
        self.message = ""


class Reports:
    """The reports of one worker's attempts. `send` queues a frame to the dispatcher
    (a no-op while disconnected); `sink(...)` is what an attempt reports to."""

    def __init__(self, send: Callable[[p.Message], None]) -> None:
        self._send = send
        self.max_checkpoint_size = 0  # from the dispatcher's welcome; 0: no limit
        self._live: set[int] = set()  # attempts running now
        self._attempts: dict[int, _Attempt] = {}  # those of them that reported
        self._finished: dict[int, _Attempt] = {}  # ended, with checkpoints in flight
        self._unkept: dict[int, p.ProgressReport] = {}  # token -> latest unacknowledged
        self._outbox: list[p.ProgressReport] = []
        self._scheduled = False
        self.sent = 0  # reports sent, for tests and logs

    def sink(self, token: int, task_id: str, symbol: str
             ) -> Callable[[Report], asyncio.Future[bool] | None]:
        # Nothing is made per attempt until it reports: most symbols never do, and W1
        # runs thousands of them a second.
        self._live.add(token)
        return functools.partial(self._report, token, task_id, symbol)

    def _report(self, token: int, task_id: str, symbol: str, r: Report
                ) -> asyncio.Future[bool] | None:
        if token not in self._live:
            return None  # the attempt ended: whatever it still says is stale
        a = self._attempts.get(token)
        if a is None:
            a = self._attempts[token] = _Attempt(token, task_id, symbol)
        if r.progress is not None:
            a.progress = r.progress
        if r.message:
            a.message = r.message
        if r.checkpoint is None and not r.oversize:
            a.held = r
            now = asyncio.get_running_loop().time()
            if now - a.sent_at >= PROGRESS_EVERY:
                self._release(a)
            elif a.timer is None:
                a.timer = asyncio.get_running_loop().call_at(
                    a.sent_at + PROGRESS_EVERY, self._release, a)
            return None
        a.held = None  # a checkpoint carries the latest progress with it
        a.seq += 1
        fut = asyncio.get_running_loop().create_future()
        size = r.oversize or checkpoint_size(r.checkpoint)
        limit = min(self.max_checkpoint_size or FRAME_SAFE_CHECKPOINT, FRAME_SAFE_CHECKPOINT)
        error = too_big(size, limit)
        if error:
            self._note(a, error)
            fut.set_result(False)
            item = p.ProgressReport(a.token, a.task_id, a.seq, progress=a.progress,
                                    message=a.message, oversize=size)
        else:
            a.waiting[a.seq] = fut
            item = p.ProgressReport(a.token, a.task_id, a.seq, checkpoint=r.checkpoint,
                                    progress=a.progress, message=a.message)
            self._unkept[a.token] = item
        self._queue(item)
        return fut

    def _release(self, a: _Attempt) -> None:
        """Send the attempt's held progress report (its turn came)."""
        a.timer = None
        r, a.held = a.held, None
        if r is None or a.token not in self._live:
            return
        a.sent_at = asyncio.get_running_loop().time()
        self._queue(p.ProgressReport(a.token, a.task_id, 0, progress=r.progress,
                                     message=r.message))

    def _note(self, a: _Attempt, error: str) -> None:
        a.errors.append(f"swarm: {error}")
        log.warning("symbol %s (%s): %s", a.symbol, a.task_id, error)

    def _queue(self, item: p.ProgressReport) -> None:
        self._outbox.append(item)
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        """Send what is queued, in frames under the budget. Called before results are
        sent, so that an attempt's last checkpoint reaches the dispatcher before its
        result does."""
        self._scheduled = False
        batch: list[p.ProgressReport] = []
        size = 0
        for item in self._outbox:
            n = 256 + (checkpoint_size(item.checkpoint) if item.checkpoint is not None else 0)
            if batch and size + n > FRAME_BUDGET:
                self._send(p.Progress(tuple(batch)))
                batch, size = [], 0
            batch.append(item)
            size += n
        if batch:
            self._send(p.Progress(tuple(batch)))
            self.sent += len(batch)
        self._outbox.clear()

    def finish(self, token: int, cancelled: bool = False) -> list[str]:
        """The attempt ended: its held progress goes out now (unless it was cancelled);
        the errors for its stderr. Its checkpoints in flight are still acknowledged."""
        self._live.discard(token)
        a = self._attempts.pop(token, None)
        if a is None:
            return []
        if a.timer is not None:
            a.timer.cancel()
        if cancelled:  # abandoned: anything it still has is stale
            self._unkept.pop(token, None)
            for fut in a.waiting.values():
                if not fut.done():
                    fut.set_result(False)
        else:
            if a.held is not None:
                self._queue(p.ProgressReport(token, a.task_id, 0, progress=a.held.progress,
                                             message=a.held.message))
            if a.waiting:  # kept only to hear about the checkpoints in flight
                self._finished[token] = a
        return a.errors

    def on_kept(self, msg: p.Kept) -> None:
        for k in msg.items:
            item = self._unkept.get(k.token)
            if item is not None and item.seq <= k.seq:
                del self._unkept[k.token]
            a = self._attempts.get(k.token) or self._finished.get(k.token)
            if a is None:
                continue
            if k.error:
                self._note(a, k.error)
            for seq in [s for s in a.waiting if s <= k.seq]:
                fut = a.waiting.pop(seq)
                if not fut.done():
                    fut.set_result(not k.error)
            if not a.waiting:
                self._finished.pop(k.token, None)

    def resend(self) -> None:
        """After a reconnection: every checkpoint not yet acknowledged goes out again."""
        for item in self._unkept.values():
            self._queue(item)

    def drop_outbox(self) -> None:
        """Disconnected: queued progress is dropped (checkpoints wait in `_unkept`)."""
        self._outbox.clear()
