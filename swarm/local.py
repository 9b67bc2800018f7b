"""A whole swarm on this host: an in-process dispatcher on loopback and N workers, as
processes (the default, what `swarm run` uses) or as tasks of this process (so that
handlers registered here with `@swarm.handler` run).

    async with swarm.LocalSwarm(workers=2) as ls:
        run = await ls.client.deploy("examples/hello.yaml")
        result = await run.wait()
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
from pathlib import Path

from . import interrupt
from .client import Client
from .config import Config
from .dispatcher import Dispatcher
from .errors import SwarmError
from .tls import client_context
from .worker import Worker

log = logging.getLogger("swarm.local")


class LocalSwarm:
    def __init__(self, config: Config | None = None, *, workers: int = 2,
                 slots: int | None = None, db_path: str | None = None,
                 processes: bool = True, worker_log_level: str = "warning",
                 start_timeout: float = 30.0) -> None:
        self.config = config or Config()
        self.workers = workers
        self.slots = slots
        self.db_path = db_path
        self.processes = processes
        self.worker_log_level = worker_log_level
        self.start_timeout = start_timeout
        self.dispatcher: Dispatcher | None = None
        self.procs: list[subprocess.Popen[bytes]] = []
        self._in_process: list[tuple[Worker, asyncio.Task[int]]] = []
        self._client: Client | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None

    @property
    def url(self) -> str:
        assert self.dispatcher is not None
        return self.dispatcher.url

    @property
    def client(self) -> Client:
        """A client connected to this swarm's dispatcher (for the life of the swarm)."""
        if self._client is None:
            raise SwarmError("the local swarm is not started: use `async with LocalSwarm()`")
        return self._client

    def connect(self) -> Client:
        """Another client of this swarm (use it with `async with`)."""
        return Client(self.url, token=self.config.security.token, name="local",
                      ssl=client_context(self.config, self.url))

    async def __aenter__(self) -> LocalSwarm:
        if self.db_path is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="swarm-run-")
            self.db_path = os.path.join(self._tmp.name, "state.db")
        cfg = dataclasses.replace(self.config, dispatcher=dataclasses.replace(
            self.config.dispatcher, host="127.0.0.1", websocket_port=0))
        self.dispatcher = Dispatcher(cfg, db_path=self.db_path)
        try:
            await self.dispatcher.start()
            if self.processes:
                self._spawn_workers()
            else:
                self._start_workers()
            await self._wait_for_workers()
            self._client = self.connect()
            await self._client.connect()
        except BaseException:
            await self.__aexit__(None, None, None)
            raise
        return self

    def _spawn_workers(self) -> None:
        env = dict(os.environ)
        if self.config.security.token:
            env["SWARM_TOKEN"] = self.config.security.token
        env.pop("SWARM_URL", None)
        # Works from a checkout too: the workers import this very package.
        root = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
        for i in range(self.workers):
            argv = [sys.executable, "-m", "swarm", "start-worker"]
            if self.config.path:
                argv.append(self.config.path)
            argv += ["--url", self.url, "--name", f"local-{i + 1}",
                     "--log-level", self.worker_log_level]
            if self.slots:
                argv += ["--slots", str(self.slots)]
            proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL)
            interrupt.started(proc)  # killed at once by a second Ctrl-C
            self.procs.append(proc)

    def _start_workers(self) -> None:
        loop = asyncio.get_running_loop()
        for i in range(self.workers):
            w = Worker(self.config, name=f"local-{i + 1}", url=self.url, slots=self.slots)
            self._in_process.append((w, loop.create_task(w.run())))

    async def _wait_for_workers(self) -> None:
        assert self.dispatcher is not None and self.dispatcher.core is not None
        deadline = time.monotonic() + self.start_timeout
        while len(self.dispatcher.core.snapshot()["nodes"]) < self.workers:
            dead = [p for p in self.procs if p.poll() is not None]
            if dead:
                raise SwarmError(f"a local worker exited with code {dead[0].returncode} "
                                 "before joining")
            if any(t.done() for _, t in self._in_process):
                raise SwarmError("a local worker stopped before joining")
            if time.monotonic() > deadline:
                raise SwarmError(f"local workers did not join within {self.start_timeout} s")
            await asyncio.sleep(0.02)

    async def __aexit__(self, *exc: object) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for w, _ in self._in_process:
            w.request_stop()
        deadline = time.monotonic() + 15
        for proc in self.procs:
            while proc.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if self._in_process:
            await asyncio.wait([t for _, t in self._in_process], timeout=15)
        for proc in self.procs:
            interrupt.ended(proc)
        self.procs.clear()
        self._in_process.clear()
        if self.dispatcher is not None:
            await self.dispatcher.stop()
        if self._tmp is not None:
            with contextlib.suppress(OSError):
                self._tmp.cleanup()
