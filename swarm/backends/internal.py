"""In-process handlers for `dispatch: internal` (DESIGN §4).

A handler is `fn(parameters, ctx) -> JSON-able value`, sync or async (or `fn(parameters)`).
`ctx` is a `Context`: the invocation's fields (`ctx.attempt`, `ctx.run_id`, ...) and the
means of a long-running symbol: `ctx.checkpoint(data)`, `ctx.resumed_from`,
`ctx.progress(fraction, message)`. It is chosen by `parameters["handler"]`, else by the
symbol name. Built-ins: `noop`, `echo`, `delay`, `fail`, `steps` (a long-running drill that
checkpoints). More come from `register()` / `@handler(...)` or from the `swarm.handlers`
entry point group (`load_entry_points()`).

Sync handlers run in a thread so they cannot stall the worker's event loop. A thread
cannot be killed: on timeout the attempt is reported timed out at once, but a sync
handler that ignores time keeps its thread until it returns.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import copy
import importlib.metadata
import inspect
import json
import logging
import threading
import time
import typing
from collections.abc import Callable
from typing import Any, TypeVar

from ..progress import Report
from ..progress import fraction as as_fraction
from .process import Invocation, Outcome

log = logging.getLogger("swarm.backends.internal")

ENTRY_POINT_GROUP = "swarm.handlers"

Handler = Callable[[dict[str, Any], Any], Any]  # (parameters, Context)
H = TypeVar("H", bound=Handler)

_HANDLERS: dict[str, Handler] = {}


class Context:
    """What a handler gets besides its parameters: the attempt (every field of its
    `Invocation`, e.g. `ctx.attempt`), and the means to checkpoint and report progress.

    `checkpoint(data)` saves a JSON-able checkpoint that the symbol's next attempt, on any
    worker, gets as `resumed_from`. In an async handler it returns an awaitable that
    resolves, once the dispatcher committed it, to True (kept) or False (refused: too
    big, a stale attempt, `checkpoint: false`); in a sync handler it blocks until then and
    returns that bool. `progress(fraction, message)` reports how far the attempt is (also
    what hang detection listens for); it never blocks."""

    __slots__ = ("invocation", "_loop", "_thread")

    def __init__(self, invocation: Invocation) -> None:
        self.invocation = invocation
        self._loop = asyncio.get_running_loop()
        self._thread = threading.get_ident()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.invocation, name)

    def __repr__(self) -> str:
        return f"Context({self.invocation!r})"

    @property
    def resumed_from(self) -> Any:
        """The last checkpoint of an earlier attempt, or None: start from scratch."""
        return self.invocation.checkpoint

    def checkpoint(self, data: Any) -> Any:
        if data is None:
            raise ValueError("a checkpoint cannot be None (None means: no checkpoint)")
        # A copy as plain JSON data, taken now: the handler may go on changing its own.
        text = json.dumps(data)
        report = Report(checkpoint=json.loads(text))
        if threading.get_ident() == self._thread:
            return self._send(report)
        done: concurrent.futures.Future[bool] = concurrent.futures.Future()

        def send() -> None:
            fut = self._send(report)
            fut.add_done_callback(lambda f: done.set_result(
                not f.cancelled() and f.exception() is None and f.result()))

        self._loop.call_soon_threadsafe(send)
        return done.result()  # a sync handler goes on once its checkpoint is committed

    def progress(self, fraction: float, message: str = "") -> None:
        report = Report(progress=as_fraction(fraction), message=str(message))
        if self.invocation.reports is None:
            return
        if threading.get_ident() == self._thread:
            self.invocation.reports(report)
        else:
            self._loop.call_soon_threadsafe(self.invocation.reports, report)

    def _send(self, report: Report) -> asyncio.Future[bool]:
        sink = self.invocation.reports
        fut = sink(report) if sink is not None else None
        if fut is None:  # nobody to keep it (a handler run outside a worker)
            fut = self._loop.create_future()
            fut.set_result(sink is None)
        return fut


class HandlerFailure(Exception):
    """Raised by a handler to fail its attempt; `retryable=False` stops further retries."""

    def __init__(self, message: str = "handler failed", *, retryable: bool = True) -> None:
        super().__init__(message)
        self.retryable = retryable


def register(name: str, fn: Handler) -> None:
    """Make `fn` the handler called `name` (replacing any handler of that name)."""
    if not name:
        raise ValueError("a handler needs a name")
    if not callable(fn):
        raise TypeError(f"handler {name!r} is not callable: {fn!r}")
    _HANDLERS[name] = _two_arguments(fn)


def _two_arguments(fn: Handler) -> Handler:
    """Handlers may take just the parameters; the registry always calls (params, inv)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # a builtin or an odd callable: leave it as it is
        return fn
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(positional) != 1 or any(p.kind is p.VAR_POSITIONAL for p in params):
        return fn
    one = typing.cast(Callable[[dict[str, Any]], Any], fn)
    if inspect.iscoroutinefunction(fn):

        async def call_async(parameters: dict[str, Any], inv: Any) -> Any:
            return await one(parameters)

        return call_async

    def call(parameters: dict[str, Any], inv: Any) -> Any:
        return one(parameters)

    call.__name__ = getattr(fn, "__name__", "handler")
    return call


def handler(name: str) -> Callable[[H], H]:
    """Decorator form of `register`: `@handler("resize")`."""

    def deco(fn: H) -> H:
        register(name, fn)
        return fn

    return deco


def registered() -> dict[str, Handler]:
    """A copy of the registry: name -> handler."""
    return dict(_HANDLERS)


def load_entry_points() -> list[str]:
    """Load the `swarm.handlers` entry points; returns the names registered.

    An entry point names a callable (registered under the entry point's name) or a module
    that registers its handlers on import. A broken one is logged and skipped.
    """
    loaded: list[str] = []
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            obj = ep.load()
            if not inspect.ismodule(obj):
                register(ep.name, obj)
        except Exception:
            log.exception("skipping handler entry point %r (%s)", ep.name, ep.value)
        else:
            loaded.append(ep.name)
    return loaded


async def run_internal(inv: Invocation, timeout_ms: int) -> Outcome:
    """Run the handler `inv` names; `timeout_ms` <= 0 means no limit. Never raises
    except CancelledError."""
    started = time.monotonic()

    def done(ok: bool, output: Any = None, **kw: Any) -> Outcome:
        elapsed = (time.monotonic() - started) * 1000
        return Outcome(ok=ok, output=output, duration_ms=elapsed, **kw)

    name = inv.parameters.get("handler", inv.symbol)
    fn = _HANDLERS.get(name) if isinstance(name, str) else None
    if fn is None:
        known = ", ".join(sorted(_HANDLERS)) or "none"
        error = f"unknown internal handler {name!r} (known: {known})"
        return done(False, error=error, retryable=False)
    params = copy.deepcopy(inv.parameters)  # a handler must not change what the worker holds
    limit = timeout_ms / 1000 if timeout_ms > 0 else None
    scope = asyncio.timeout(limit)
    try:
        async with scope:
            result = await _call(fn, params, Context(inv))
    except TimeoutError as e:
        if not scope.expired():  # the handler's own timeout (a socket, say), not ours
            return done(False, error=f"TimeoutError: {e or 'raised by the handler'}")
        return done(False, error=f"timed out after {timeout_ms} ms", timed_out=True)
    except HandlerFailure as e:
        return done(False, error=str(e), retryable=e.retryable)
    except Exception as e:
        return done(False, error=f"{type(e).__name__}: {e}")
    try:
        json.dumps(result)
    except (TypeError, ValueError) as e:
        error = f"handler {name!r} returned a value that is not JSON: {e}"
        return done(False, error=error, retryable=False)
    return done(True, result)


async def _call(fn: Handler, params: dict[str, Any], inv: Context) -> Any:
    if inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(fn, "__call__", None)  # noqa: B004 - an object with an async __call__
    ):
        return await fn(params, inv)
    result = await _in_daemon_thread(fn, params, inv)
    if inspect.isawaitable(result):  # e.g. a lambda or partial returning a coroutine
        result = await result
    return result


def _in_daemon_thread(fn: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
    """Run a sync handler on a daemon thread. Unlike asyncio.to_thread, a handler that
    never returns cannot keep the worker process alive after it was told to stop."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[Any] = loop.create_future()

    def settle(ok: bool, value: Any) -> None:
        if not fut.done():
            fut.set_result(value) if ok else fut.set_exception(value)

    def target() -> None:
        try:
            value = fn(*args)
        except BaseException as e:  # delivered to the awaiting coroutine
            ok, value = False, e
        else:
            ok = True
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody is waiting
            loop.call_soon_threadsafe(settle, ok, value)

    threading.Thread(target=target, name=f"handler-{getattr(fn, '__name__', 'fn')}",
                     daemon=True).start()
    return fut


# --- built-ins --------------------------------------------------------------------------


@handler("noop")
async def _noop(parameters: dict[str, Any], inv: Context) -> None:
    return None


@handler("echo")
async def _echo(parameters: dict[str, Any], inv: Context) -> dict[str, Any]:
    return {k: v for k, v in parameters.items() if k != "handler"}


@handler("delay")
async def _delay(parameters: dict[str, Any], inv: Context) -> dict[str, Any]:
    ms = parameters.get("ms", 0)
    if isinstance(ms, bool) or not isinstance(ms, int | float) or ms < 0:
        message = f"delay: 'ms' must be a non-negative number, got {ms!r}"
        raise HandlerFailure(message, retryable=False)
    await asyncio.sleep(ms / 1000)
    return {"slept_ms": ms}


@handler("fail")
async def _fail(parameters: dict[str, Any], inv: Context) -> dict[str, Any]:
    succeed_on = parameters.get("succeed_on_attempt")
    if isinstance(succeed_on, int) and not isinstance(succeed_on, bool) and (
        inv.attempt >= succeed_on
    ):
        return {"attempt": inv.attempt}
    message = parameters.get("message", "failed on purpose")
    raise HandlerFailure(str(message), retryable=bool(parameters.get("retryable", True)))


@handler("steps")
async def _steps(parameters: dict[str, Any], ctx: Context) -> dict[str, Any]:
    """A drill for long-running symbols: `steps` steps of `ms` each, with progress and a
    checkpoint after every step; an attempt resumes after the last checkpointed step.
    `pad` bytes of filler in the checkpoints of steps `pad_from` (1) on: big checkpoints."""
    steps, ms = parameters.get("steps", 10), parameters.get("ms", 100)
    pad, pad_from = parameters.get("pad", 0), parameters.get("pad_from", 1)
    for name, value in (("steps", steps), ("ms", ms), ("pad", pad), ("pad_from", pad_from)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise HandlerFailure(f"steps: {name!r} must be a non-negative integer, got "
                                 f"{value!r}", retryable=False)
    resumed = ctx.resumed_from
    start = resumed.get("step", 0) if isinstance(resumed, dict) else 0
    ran, refused = [], []
    for step in range(start + 1, steps + 1):
        await asyncio.sleep(ms / 1000)
        ran.append(step)
        ctx.progress(step / steps, f"step {step} of {steps}")
        data: dict[str, Any] = {"step": step}
        if pad and step >= pad_from:
            data["pad"] = "x" * pad
        if not await ctx.checkpoint(data):
            refused.append(step)
    return {"steps": steps, "resumed_from": start, "ran": ran, "refused": refused}
