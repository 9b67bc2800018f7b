"""A whole swarm on this host: an in-process dispatcher on loopback and N worker processes.

`swarm run` uses it; so can tests and scripts:

    async with LocalSwarm(workers=2) as ls:
        async with ls.client() as c: ...
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

from .client import Client
from .config import Config
from .dispatcher import Dispatcher
from .errors import StateError, SwarmError
from .protocol import Event

log = logging.getLogger("swarm.local")


class LocalSwarm:
    def __init__(self, config: Config | None = None, *, workers: int = 2,
                 slots: int | None = None, db_path: str | None = None,
                 worker_log_level: str = "warning", start_timeout: float = 30.0) -> None:
        self.config = config or Config()
        self.workers = workers
        self.slots = slots
        self.db_path = db_path
        self.worker_log_level = worker_log_level
        self.start_timeout = start_timeout
        self.dispatcher: Dispatcher | None = None
        self.procs: list[subprocess.Popen[bytes]] = []
        self._tmp: tempfile.TemporaryDirectory[str] | None = None

    @property
    def url(self) -> str:
        assert self.dispatcher is not None
        return self.dispatcher.url

    async def wait(self, client: Client, run_id: str,
                   on_event: Callable[[Event], None] | None = None) -> dict[str, Any]:
        """Follow a run to its end, unless the in-process dispatcher dies first."""
        assert self.dispatcher is not None
        follow = asyncio.ensure_future(client.wait(run_id, on_event))
        died = asyncio.ensure_future(self.dispatcher.stopped.wait())
        await asyncio.wait({follow, died}, return_when=asyncio.FIRST_COMPLETED)
        died.cancel()
        if not follow.done():
            follow.cancel()
            raise StateError(f"the dispatcher stopped: {self.dispatcher.failed}")
        return follow.result()

    def client(self) -> Client:
        return Client(self.url, token=self.config.security.token, name="swarm-run")

    async def __aenter__(self) -> LocalSwarm:
        if self.db_path is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="swarm-run-")
            self.db_path = os.path.join(self._tmp.name, "state.db")
        cfg = dataclasses.replace(self.config, dispatcher=dataclasses.replace(
            self.config.dispatcher, host="127.0.0.1", websocket_port=0))
        self.dispatcher = Dispatcher(cfg, db_path=self.db_path)
        try:
            await self.dispatcher.start()
            self._spawn_workers()
            await self._wait_for_workers()
        except BaseException:
            await self.__aexit__(None, None, None)
            raise
        return self

    def _spawn_workers(self) -> None:
        env = dict(os.environ)
        if self.config.security.token:
            env["SWARM_TOKEN"] = self.config.security.token
        env.pop("SWARM_URL", None)
        for i in range(self.workers):
            argv = [sys.executable, "-m", "swarm", "start-worker"]
            if self.config.path:
                argv.append(self.config.path)
            argv += ["--url", self.url, "--name", f"local-{i + 1}",
                     "--log-level", self.worker_log_level]
            if self.slots:
                argv += ["--slots", str(self.slots)]
            self.procs.append(subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL))

    async def _wait_for_workers(self) -> None:
        assert self.dispatcher is not None and self.dispatcher.core is not None
        deadline = time.monotonic() + self.start_timeout
        while len(self.dispatcher.core.snapshot()["nodes"]) < self.workers:
            dead = [p for p in self.procs if p.poll() is not None]
            if dead:
                raise SwarmError(f"a local worker exited with code {dead[0].returncode} "
                                 "before joining")
            if time.monotonic() > deadline:
                raise SwarmError(f"local workers did not join within {self.start_timeout} s")
            await asyncio.sleep(0.02)

    async def __aexit__(self, *exc: object) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 15
        for proc in self.procs:
            while proc.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        self.procs.clear()
        if self.dispatcher is not None:
            await self.dispatcher.stop()
        if self._tmp is not None:
            with contextlib.suppress(OSError):
                self._tmp.cleanup()
