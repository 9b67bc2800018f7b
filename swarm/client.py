"""A client of the dispatcher: what `swarm deploy`, `swarm status` and scripts use.

    async with Client(url, token=...) as c:
        run_id = await c.deploy(workflow)
        result = await c.wait(run_id)
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
from collections.abc import AsyncIterator
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from . import protocol as p
from .errors import (
    AuthenticationFailed,
    DispatcherUnreachable,
    InputError,
    ManifestError,
    Problem,
    RemoteProtocolError,
    RequestRefused,
)
from .model import Workflow

FINAL_RUN_STATES = frozenset({"completed", "failed", "rolled_back", "cancelled"})
FINAL_RUN_EVENTS = frozenset(f"run.{s}" for s in FINAL_RUN_STATES)


class Client:
    def __init__(self, url: str, *, token: str = "", name: str = "cli",
                 open_timeout: float = 10.0, max_size: int = 1 << 20) -> None:
        self.url = url
        self.token = token
        self.name = name
        self.open_timeout = open_timeout
        self.max_size = max_size
        self.version = ""
        self._ws: ClientConnection | None = None
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[p.Reply]] = {}
        self._events: asyncio.Queue[p.Event | None] = asyncio.Queue()
        self._reader: asyncio.Task[None] | None = None
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
                               close_timeout=2)
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
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
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
                elif isinstance(msg, p.Event):
                    self._events.put_nowait(msg)
        except ConnectionClosed:
            pass
        except RemoteProtocolError as e:
            error = e
        self._closed_error = error
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(error)
        self._pending.clear()
        self._events.put_nowait(None)

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
            if reply.code == 2 and op == "deploy":
                raise ManifestError([Problem(reply.error, file="<dispatcher>")])
            err = RequestRefused(reply.error)
            err.exit_code = reply.code or 2
            raise err
        return reply.data

    async def events(self) -> AsyncIterator[p.Event]:
        """Events of the runs this client watches, until the connection ends."""
        while True:
            ev = await self._events.get()
            if ev is None:
                self._events.put_nowait(None)
                if self._closed_error is not None:
                    raise self._closed_error
                return
            yield ev

    # --- conveniences -----------------------------------------------------------------

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

    async def deploy(self, workflow: Workflow, *, follow: bool = True) -> str:
        return str((await self.submit(workflow, follow=follow))["run_id"])

    async def rollback(self, run_id: str, *, follow: bool = True) -> None:
        await self.request("rollback", run_id=run_id, follow=follow)

    async def status(self) -> dict[str, Any]:
        data: dict[str, Any] = await self.request("status")
        return data

    async def run(self, run_id: str) -> dict[str, Any]:
        data: dict[str, Any] = await self.request("run", run_id=run_id)
        return data

    async def watch(self, run_id: str | None = None) -> str:
        data = await self.request("watch", **({"run_id": run_id} if run_id else {}))
        return str(data.get("state", ""))

    async def wait(self, run_id: str, on_event: Any = None) -> dict[str, Any]:
        """Follow a run (deployed with follow=True, or watched) to its end; return its record."""
        if (await self.run(run_id))["status"] in FINAL_RUN_STATES:
            return await self.run(run_id)
        async for ev in self.events():
            if on_event is not None:
                on_event(ev)
            if ev.run_id == run_id and ev.kind in FINAL_RUN_EVENTS:
                break
        return await self.run(run_id)
