"""Ctrl-C for the commands that follow or run work (`run`, `deploy`, `watch`, ...).

The first Ctrl-C stops gracefully: the command's main task is cancelled, so its own
clean-up runs (local workers are told to stop, the dispatcher commits, the terminal is
restored). A second one stops at once: every process the command started is killed by
PID, and the process exits 130 without a traceback. Processes a command starts register
here (`started`), so nothing it started outlives it.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Coroutine
from typing import Any

EXIT_INTERRUPTED = 130

_children: set[subprocess.Popen[bytes]] = set()


def started(proc: subprocess.Popen[bytes]) -> None:
    """A process this command started, to be killed should the user insist."""
    _children.add(proc)


def ended(proc: subprocess.Popen[bytes]) -> None:
    _children.discard(proc)


def kill_started() -> None:
    for proc in list(_children):
        if proc.poll() is None:
            proc.kill()  # by PID: only what we started
    _children.clear()


def run(coro: Coroutine[Any, Any, int]) -> int:
    """`asyncio.run(coro)` with the two-step Ctrl-C above; returns the exit code."""
    return asyncio.run(_guarded(coro))


async def _guarded(coro: Coroutine[Any, Any, int]) -> int:
    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    assert main is not None
    hits = 0

    def on_sigint() -> None:
        nonlocal hits
        hits += 1
        if hits == 1:
            print("\nswarm: stopping (Ctrl-C again to stop at once)", file=sys.stderr,
                  flush=True)
            main.cancel()
            return
        kill_started()
        print("swarm: stopped at once", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(EXIT_INTERRUPTED)  # no clean-up left to wait for, and no traceback

    try:
        loop.add_signal_handler(signal.SIGINT, on_sigint)
    except (NotImplementedError, RuntimeError, ValueError):  # not the main thread
        return await coro
    try:
        return await coro
    except asyncio.CancelledError:
        if hits:
            return EXIT_INTERRUPTED
        raise
    finally:
        loop.remove_signal_handler(signal.SIGINT)
