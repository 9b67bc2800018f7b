"""One attempt of one symbol: what it is, what came of it, and how a subprocess runs it.

Rules this module keeps (DESIGN §4):

- argv is built here and executed directly, never through a shell;
- stdin gets the task document, then EOF; a backend that does not read it is fine;
- stdout and stderr are each kept up to a cap; the rest is read and dropped on arrival,
  so a backend printing gigabytes costs no memory;
- the backend runs in its own session, hence its own process group, and that whole group
  is SIGKILLed before `run_process` returns, whatever happened (success, failure, timeout,
  cancellation): no grandchild outlives the attempt or keeps our pipes open;
- with a `cage` (contain.py), what left the group (setsid, double fork) is killed with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    from .contain import Cage

from ..progress import LINE_PREFIX, MAX_LINE_SLACK, Report, parse_line
from ..secrets import argv_parameters

# Where an attempt's reports go (the worker's; None: nobody listens): a checkpoint's
# future says, once committed, whether it was kept.
ReportSink = Callable[[Report], "asyncio.Future[bool] | None"]

_TAIL = 4096  # bytes at the end of stderr kept apart from the cap: the error line lives there
_DRAIN_MIN_S = 0.5  # after the group is killed, how long its pipes may take to reach EOF
_REAP_S = 5.0  # SIGKILL cannot be ignored; this only bounds a process stuck in the kernel


@dataclass(frozen=True, slots=True)
class Invocation:
    """One attempt of one symbol, as the worker hands it to a backend."""

    run_id: str
    task_id: str
    symbol: str
    type: str
    context: str
    dispatch: str  # rust_injector | php_engine | powershell_engine | internal
    parameters: dict[str, Any]
    attempt: int  # 1-based
    timeout_ms: int  # the symbol's per-attempt timeout
    # The symbol's secrets, resolved on this worker: env name -> value. Out of repr and of
    # the stdin document; a subprocess gets them in its environment, an internal handler
    # reads `inv.env` (os.environ is shared by every handler of the worker).
    env: dict[str, str] = field(default_factory=dict, repr=False)
    checkpoint: Any = None  # the last committed checkpoint to resume from (None: none)
    # Where the attempt's checkpoints and progress reports go (the worker's), if anywhere.
    reports: ReportSink | None = field(default=None, repr=False, compare=False)

    def document(self) -> dict[str, Any]:
        """The task document a backend receives on stdin (as JSON)."""
        return {
            "run_id": self.run_id,
            "task_id": self.task_id,
            "symbol": self.symbol,
            "type": self.type,
            "context": self.context,
            "dispatch": self.dispatch,
            "parameters": self.parameters,
            "attempt": self.attempt,
            "timeout": self.timeout_ms,
            "checkpoint": self.checkpoint,
        }

    def environment(self) -> dict[str, str]:
        """The variables added to the worker's environment for this attempt: the symbol's
        secrets, then ours (secret names may not start with SWARM_ anyway)."""
        return {
            **self.env,
            "SWARM_RUN_ID": self.run_id,
            "SWARM_TASK_ID": self.task_id,
            "SWARM_SYMBOL": self.symbol,
            "SWARM_ATTEMPT": str(self.attempt),
            **({"SWARM_RESUMED": "1"} if self.checkpoint is not None else {}),
        }


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one attempt came to. `run()` returns one for every failure instead of raising."""

    ok: bool
    output: Any  # stdout as JSON if it is JSON, else trimmed text; internal: the return value
    error: str = ""
    exit_code: int | None = None
    retryable: bool = True
    timed_out: bool = False
    duration_ms: float = 0.0
    stderr: str = ""
    stdout_truncated: bool = False
    stderr_truncated: bool = False


def build_argv(dispatch: str, command: str, script: str, inv: Invocation) -> list[str]:
    """The exact command line of DESIGN §4 for `dispatch` (script is unused for rust).

    Parameters whose names look secret (`password`, `api_key`...) are left out of the
    argv JSON, which every local user can read; the stdin document has them all."""
    params = json.dumps(argv_parameters(inv.parameters))
    if dispatch == "rust_injector":
        return [command, *_flags(inv, params)]
    if dispatch == "php_engine":
        return [command, script, *_flags(inv, params)]
    if dispatch == "powershell_engine":
        return [command, "-NoProfile", "-NonInteractive", "-File", script,
                "-SymbolName", inv.symbol, "-SymbolType", inv.type,
                "-Context", inv.context, "-Parameters", params]
    raise ValueError(f"no command line for dispatch {dispatch!r}")


def _flags(inv: Invocation, params: str) -> list[str]:
    return ["--symbol", inv.symbol, "--type", inv.type, "--context", inv.context,
            "--params", params]


class _Capture(asyncio.SubprocessProtocol):
    """Keeps the first `cap` bytes of stdout and stderr and counts the rest."""

    def __init__(self, cap: int, reports: ReportSink | None = None,
                 line_limit: int = 0) -> None:
        loop = asyncio.get_running_loop()
        self.cap = cap
        # With somebody to report to, stdout is read line by line: `::swarm::` lines are
        # reports, taken as they are printed and left out of the output.
        self.reports = reports
        self.line_limit = (line_limit or 1 << 20) + MAX_LINE_SLACK
        self.line = bytearray()  # the start of a stdout line not yet ended
        self.mode = ""  # of that line: "" undecided, "text" output, "long" an oversized report
        self.skipped = 0  # bytes of an oversized report line so far
        self.kept = {1: bytearray(), 2: bytearray()}
        self.dropped = {1: 0, 2: 0}
        self.tail = b""
        self.exited: asyncio.Future[None] = loop.create_future()
        self.closed: asyncio.Future[None] = loop.create_future()  # stdout and stderr at EOF
        self._open = {1, 2}
        self.transport: asyncio.SubprocessTransport | None = None
        self.abandoned = False  # nobody awaits this attempt: close the transport on exit
        self.cage: Cage | None = None  # what the attempt's processes are kept in, if any

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.SubprocessTransport, transport)

    def pipe_data_received(self, fd: int, data: bytes | bytearray) -> None:
        if fd == 1 and self.reports is not None:
            self._lines(data)
        else:
            self._keep(fd, data)

    def _lines(self, data: bytes | bytearray) -> None:
        pending = self.line
        pending += data
        start = 0
        while (end := pending.find(b"\n", start)) >= 0:
            self._line_done(bytes(pending[start:end + 1]))
            start = end + 1
        del pending[:start]
        if not pending:
            return
        if not self.mode:  # output unless it may still turn out to be a report
            head = bytes(pending[:len(LINE_PREFIX)])
            if not LINE_PREFIX.startswith(head):
                self.mode = "text"
            elif len(pending) > self.line_limit:
                self.mode = "long"
        if self.mode == "text":
            self._keep(1, pending)
            pending.clear()
        elif self.mode == "long":
            self.skipped += len(pending)
            pending.clear()

    def _line_done(self, line: bytes) -> None:
        mode, self.mode = self.mode, ""
        if mode == "text":
            self._keep(1, line)
        elif mode == "long" or (len(line) > self.line_limit and line.startswith(LINE_PREFIX)):
            size, self.skipped = self.skipped + len(line), 0
            self._report(Report(oversize=size))
        else:
            report = parse_line(line.rstrip(b"\r\n"))
            if report is None:
                self._keep(1, line)
            else:
                self._report(report)

    def _report(self, report: Report) -> None:
        assert self.reports is not None
        try:
            self.reports(report)
        except Exception:  # a report must never cost the attempt its output
            logging.getLogger("swarm.backends").exception("progress report failed")

    def flush_line(self) -> None:
        """At EOF: a last line without its newline is output like any other."""
        if self.line or self.mode:
            line, self.line = bytes(self.line), bytearray()
            if self.mode == "long" or line.startswith(LINE_PREFIX):
                self._line_done(line + b"\n")
            else:
                self.mode = ""
                self._keep(1, line)

    def _keep(self, fd: int, data: bytes | bytearray) -> None:
        kept = self.kept[fd]
        room = max(self.cap - len(kept), 0)
        if room:
            kept += data[:room]
        self.dropped[fd] += max(len(data) - room, 0)
        if fd == 2:
            self.tail = (self.tail + data[-_TAIL:])[-_TAIL:]

    def pipe_connection_lost(self, fd: int, exc: Exception | None) -> None:
        if fd == 1 and self.reports is not None:
            self.flush_line()
        self._open.discard(fd)
        if not self._open and not self.closed.done():
            self.closed.set_result(None)

    def process_exited(self) -> None:
        if not self.exited.done():
            self.exited.set_result(None)
        if self.abandoned and self.transport is not None:
            self.transport.close()

    def abandon(self) -> None:
        """Kill the group and close the transport once the leader is reaped.

        Closing earlier would make asyncio reap the child itself (Popen.poll), racing the
        child watcher ("Unknown child process pid ...")."""
        assert self.transport is not None
        _kill_all(self.transport.get_pid(), self)
        self.abandoned = True
        if self.exited.done():
            self.transport.close()


def _killpg(pgid: int, sig: signal.Signals) -> None:
    # Lookup error: the group is empty already (PermissionError: only zombies, on some OSes).
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _kill_all(pgid: int, proto: _Capture) -> None:
    """SIGKILL the group, and what left it if the attempt runs in a cage."""
    _killpg(pgid, signal.SIGKILL)
    if proto.cage is not None:
        proto.cage.kill(leader_exited=proto.exited.done())


async def _spawn(
    argv: Sequence[str], env: Mapping[str, str] | None, proto: _Capture
) -> asyncio.SubprocessTransport:
    loop = asyncio.get_running_loop()
    start = loop.subprocess_exec(
        lambda: proto,
        *argv,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        start_new_session=True,
    )
    spawn = asyncio.ensure_future(proto.cage.spawn(start) if proto.cage else start)
    try:
        transport, _ = await asyncio.shield(spawn)
    except asyncio.CancelledError:
        # Cancelled while forking: the child may exist already; kill its group once known.
        def abandon(fut: asyncio.Future[Any]) -> None:
            if not fut.cancelled() and fut.exception() is None:
                proto.abandon()

        spawn.add_done_callback(abandon)
        raise
    return transport


def _feed(transport: asyncio.SubprocessTransport, data: bytes) -> None:
    pipe = transport.get_pipe_transport(0)
    if not isinstance(pipe, asyncio.WriteTransport):
        return
    try:
        if data:
            pipe.write(data)
        pipe.write_eof()  # closes stdin once the data is flushed
    except (BrokenPipeError, ConnectionResetError):
        pass  # the backend does not read stdin, or is gone already: not our failure


async def _stop(pgid: int, proto: _Capture, grace_s: float) -> None:
    """SIGTERM the group; SIGKILL it once the leader and the pipes are done, or after grace."""
    _killpg(pgid, signal.SIGTERM)
    # Pipes at EOF mean no member still holds them; until then someone may be cleaning up.
    await asyncio.wait({proto.exited, proto.closed}, timeout=grace_s)
    _kill_all(pgid, proto)
    await asyncio.wait({proto.exited}, timeout=_REAP_S)


async def run_process(
    argv: Sequence[str],
    *,
    stdin: bytes = b"",
    env: Mapping[str, str] | None = None,
    timeout_ms: int = 0,
    output_cap: int = 1 << 20,
    kill_grace_ms: int = 2000,
    cage: Cage | None = None,
    reports: ReportSink | None = None,
    line_limit: int = 0,
) -> Outcome:
    """Run `argv` in a new process group and report how it went.

    `timeout_ms` <= 0 means no limit. Raises only CancelledError (after the group is
    stopped: SIGTERM, then SIGKILL after `kill_grace_ms`). With a `cage`, the backend
    starts in it and all of it is killed with the group; releasing it is the caller's.
    """
    started = time.monotonic()
    proto = _Capture(output_cap, reports, line_limit)
    proto.cage = cage
    try:
        transport = await _spawn(argv, env, proto)
    except (OSError, ValueError) as e:
        # E2BIG (parameters too long for argv) and NUL bytes will fail the same way again.
        retryable = isinstance(e, OSError) and e.errno != errno.E2BIG
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        return Outcome(
            ok=False,
            output="",
            error=f"cannot start {argv[0]}: {reason}",
            retryable=retryable,
            duration_ms=(time.monotonic() - started) * 1000,
        )
    pgid = transport.get_pid()  # the leader of a new session leads its own group
    grace_s = max(kill_grace_ms, 0) / 1000
    timed_out = False
    try:
        _feed(transport, stdin)
        limit = timeout_ms / 1000 if timeout_ms > 0 else None
        done, _ = await asyncio.wait({proto.exited}, timeout=limit)
        if not done:
            timed_out = True
            await _stop(pgid, proto, grace_s)
        # The leader is gone: whatever is left in its group is an orphan holding our pipes.
        _kill_all(pgid, proto)
        await asyncio.wait({proto.closed}, timeout=max(grace_s, _DRAIN_MIN_S))
    except asyncio.CancelledError:
        await _stop(pgid, proto, grace_s)
        raise
    finally:
        if proto.exited.done():
            _kill_all(pgid, proto)
            transport.close()
        else:  # cancelled again while stopping, or a leader stuck in the kernel
            proto.abandon()
    return _outcome(proto, transport.get_returncode(), timed_out, timeout_ms, started)


def _outcome(
    proto: _Capture, code: int | None, timed_out: bool, timeout_ms: int, started: float
) -> Outcome:
    if proto.reports is not None:
        proto.flush_line()
    output = parse_output(proto.kept[1].decode("utf-8", errors="replace"))
    common: dict[str, Any] = {
        "output": output,
        "exit_code": code,
        "duration_ms": (time.monotonic() - started) * 1000,
        "stderr": proto.kept[2].decode("utf-8", errors="replace"),
        "stdout_truncated": proto.dropped[1] > 0,
        "stderr_truncated": proto.dropped[2] > 0,
    }
    if timed_out:
        error = f"timed out after {timeout_ms} ms"
        return Outcome(ok=False, error=error, timed_out=True, **common)
    if code == 0:
        return Outcome(ok=True, **common)
    said_no = isinstance(output, dict) and output.get("retryable") is False
    error = _exit_error(code, bytes(proto.kept[2]) + b"\n" + proto.tail, output)
    return Outcome(ok=False, error=error, retryable=not said_no, **common)


def parse_output(text: str) -> Any:
    """stdout as JSON if the whole of it is JSON, else the trimmed text ("" if none)."""
    text = text.strip()
    if not text:
        return ""
    try:
        return json.loads(text)
    except ValueError:
        return text


def telling_line(stderr: str) -> str:
    """The stderr line that best says why: the first starting with "error" (clap, anyhow,
    PHP and most CLIs put the cause there and follow it with usage or log noise), else
    the last one."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    for line in lines:
        if line.lower().startswith("error"):
            return line
    return lines[-1] if lines else ""


def _exit_error(code: int | None, stderr: bytes, output: Any) -> str:
    if code is None:
        head = "did not exit after SIGKILL"
    elif code < 0:
        try:
            head = f"killed by signal {signal.Signals(-code).name}"
        except ValueError:
            head = f"killed by signal {-code}"
    else:
        head = f"exit code {code}"
    # `stderr` is the kept head and the tail: an error line early in a long stderr counts.
    detail = telling_line(stderr.decode("utf-8", errors="replace"))
    if not detail and isinstance(output, dict) and isinstance(output.get("error"), str):
        detail = output["error"]
    return f"{head}: {detail[:500]}" if detail else head
