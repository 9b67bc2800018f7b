"""The web dashboard, served by the dispatcher on its own port: `/` (the page and its
assets), `/api/...` (JSON read from the state DB) and `/ws/dashboard` (live events and
run actions, as JSON text frames).

Why a socket of its own rather than the msgpack protocol: a browser signed in by cookie
should never hold the token its proof needs; the page needs a few compact fields per
event, not whole events; and its events are coalesced into one frame every FLUSH
seconds, so that a run at full speed costs the browser a few frames per second and the
dispatcher nothing when no dashboard is open. Actions go over the same socket: a
WebSocket handshake carries its Origin, which is checked, and the websockets server
answers GET only (no forms to forge).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable
from importlib import resources
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, unquote, urlsplit

from websockets.asyncio.server import ServerConnection
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request as HttpRequest
from websockets.http11 import Response

from .. import __version__
from .. import journal as jn
from ..errors import SwarmError
from ..tasks import RUN_FINAL, RunState
from .auth import Auth, same_origin
from .queries import Queries
from .why import why_not_running

if TYPE_CHECKING:
    from ..dispatcher import Dispatcher

log = logging.getLogger("swarm.web")

FLUSH = 0.25  # seconds between two frames of events to one dashboard
BACKLOG = 20_000  # events held for one dashboard; past this it is told to reload instead
SOCKET_PATH = "/ws/dashboard"
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
          ".css": "text/css; charset=utf-8", ".png": "image/png", ".svg": "image/svg+xml",
          ".txt": "text/plain; charset=utf-8"}


def _info(r: jn.Record) -> dict[str, Any] | None:
    """The few fields of a record's data the page uses."""
    match r:
        case jn.AttemptFinished():
            return {"ok": r.ok, "timed_out": r.timed_out, "exit_code": r.exit_code}
        case jn.SymbolRetrying():
            return {"due": r.due}
        case jn.AttemptLost():
            return {"reason": r.reason}
    return {"status": getattr(r, "status", None)} if r.kind[:4] == "run." else None


class _Socket:
    """One open dashboard: what it follows, and the events waiting for its next frame."""

    def __init__(self, ws: ServerConnection) -> None:
        self.ws = ws
        self.run: str | None = None
        self.buf: list[list[Any]] = []
        self.activity = 0  # symbol starts and ends elsewhere: slot counts changed
        self.reload = False
        self.wake = asyncio.Event()

    def send_json(self, msg: dict[str, Any]) -> Awaitable[None]:
        return self.ws.send(json.dumps(msg, separators=(",", ":")))


class Dashboard:
    def __init__(self, dispatcher: Dispatcher) -> None:
        self.d = dispatcher
        self.sockets: set[_Socket] = set()
        self._auth: Auth | None = None
        self._queries: Queries | None = None
        self._static: dict[str, tuple[bytes, str]] = {}

    @property
    def auth(self) -> Auth:
        if self._auth is None:  # the node key is read when the dispatcher starts
            cfg = self.d.config.security
            self._auth = Auth(cfg.token, self.d.node_key, bool(cfg.tls_cert))
        return self._auth

    @property
    def queries(self) -> Queries:
        if self._queries is None:
            self._queries = Queries(self.d.db_path)
        return self._queries

    def close(self) -> None:
        if self._queries is not None:
            self._queries.close()

    # --- HTTP ---------------------------------------------------------------------------

    async def http(self, conn: ServerConnection, request: HttpRequest) -> Response | None:
        """The dashboard's answer, or None to go on (to the WebSocket handshake)."""
        url = urlsplit(request.path)
        path, headers = url.path, request.headers
        upgrade = "websocket" in headers.get("Upgrade", "").lower()
        peer = str((conn.remote_address or ("",))[0])
        if upgrade and path != SOCKET_PATH:
            return None  # workers and clients
        if not (path == "/" or path == "/index.html" or path.startswith(
                ("/static/", "/api/", SOCKET_PATH))):
            return None
        verdict = self.auth.admit(headers, peer, data=path.startswith(("/api/", SOCKET_PATH))
                                  and not path.startswith("/api/auth/"))
        if not verdict.ok:
            return _json(verdict.status, {"error": verdict.reason})
        if path == SOCKET_PATH:
            if not upgrade:
                return _json(400, {"error": "a WebSocket endpoint"})
            if not same_origin(headers, self._scheme):
                log.warning("refused a dashboard socket from origin %r", headers.get("Origin"))
                return _json(403, {"error": "cross-origin request refused"})
            return None
        if path.startswith("/api/"):
            if headers.get("X-Swarm-Request") != "1" or not same_origin(headers, self._scheme):
                # A page of another site cannot set this header without a preflight we
                # never grant: nothing here answers a cross-site request.
                return _json(403, {"error": "missing X-Swarm-Request header"})
            try:
                return await self._api(path[5:], parse_qs(url.query), headers)
            except (ValueError, KeyError) as e:
                return _json(400, {"error": f"bad request: {e}"})
        return self._asset("index.html" if path in ("/", "/index.html") else path[8:])

    @property
    def _scheme(self) -> str:
        return "https" if self.d.config.security.tls_cert else "http"

    def _asset(self, name: str) -> Response:
        if not self._static:
            root = resources.files("swarm.web") / "static"
            for f in root.iterdir():
                suffix = "." + f.name.rsplit(".", 1)[-1]
                if f.is_file() and suffix in _TYPES:
                    self._static[f.name] = (f.read_bytes(), _TYPES[suffix])
        found = self._static.get(name)
        if found is None:
            return _json(404, {"error": "not found"})
        body, ctype = found
        return _response(200, body, ctype, cache="no-cache")

    async def _api(self, path: str, q: dict[str, list[str]], headers: Headers) -> Response:
        def arg(name: str, default: str = "") -> str:
            return q.get(name, [default])[0]

        if path == "auth/challenge":
            return _json(200, {"auth": self.auth.required, "version": __version__,
                               "signed_in": not self.auth.required
                               or self.auth.session(headers) is not None,
                               "challenge": self.auth.challenge()})
        if path == "auth/session":
            if not self.auth.required:
                return _json(200, {"signed_in": True})
            challenge, _, proof = headers.get("X-Swarm-Proof", "").partition(" ")
            value = self.auth.sign_in(challenge, proof)
            if value is None:
                log.warning("dashboard sign-in refused: bad or stale proof")
                return _json(401, {"error": "wrong token"})
            return _json(200, {"signed_in": True},
                         extra=[("Set-Cookie", self.auth.set_cookie(value))])
        if path == "auth/signout":
            self.auth.sign_out(headers)
            return _json(200, {"signed_in": False},
                         extra=[("Set-Cookie", self.auth.set_cookie("", 0))])
        qs = self.queries
        if path == "cluster":
            return _json(200, {**self._cluster(), "queue": await qs.call(qs.queue),
                               "known_nodes": await qs.call(qs.nodes)})
        if path == "runs":
            data = await qs.call(qs.runs, arg("status"), arg("workflow"), arg("sort", "start"),
                                 arg("dir", "desc") != "asc", max(0, int(arg("offset", "0"))),
                                 min(200, max(1, int(arg("limit", "50")))))
            live = self._live_runs()
            for r in data["runs"]:
                if r["run_id"] in live:
                    r["status"] = live[r["run_id"]]
            return _json(200, data)
        parts = [unquote(p) for p in path.split("/")]
        if len(parts) >= 2 and parts[0] == "run":
            run_id = parts[1]
            if len(parts) == 2:
                found = await qs.call(qs.run, run_id)
                if found is not None:
                    found["run"]["status"] = self._live_runs().get(run_id,
                                                                   found["run"]["status"])
            elif parts[2:] == ["attempts"]:
                found = await qs.call(qs.attempts, run_id)
            elif len(parts) == 4 and parts[2] == "symbol":
                found = await qs.call(qs.symbol, run_id, parts[3])
                if found is not None:
                    found["why"] = why_not_running(self.d.core, run_id, parts[3])
            else:
                found = None
            if found is None:
                return _json(404, {"error": f"no such run or symbol: {'/'.join(parts[1:])}"})
            # A run of 100,000 symbols is megabytes of JSON: encoded on a thread, so that
            # dispatch goes on meanwhile.
            return await asyncio.to_thread(_json, 200, found)
        return _json(404, {"error": "not found"})

    def _live_runs(self) -> dict[str, str]:
        """Run states as the scheduler has them (the DB's `paused` is a status too)."""
        core = self.d.core
        if core is None:
            return {}
        return {r.id: RunState.PAUSED.value if r.paused else r.state.value
                for r in core._runs.values()}  # noqa: SLF001 - read only

    def _cluster(self) -> dict[str, Any]:
        """The live part of the cluster view: cheap whatever the size of the runs (the
        counts come from the DB, on the query thread)."""
        core = self.d.core
        assert core is not None
        now = self.d.now()
        nodes = []
        for n in sorted(core._nodes.values(), key=lambda n: n.seq):  # noqa: SLF001
            row: dict[str, Any] = {
                "node_id": n.id, "name": n.name, "capabilities": sorted(n.caps),
                "labels": n.labels, "slots": n.slots, "running": len(n.running),
                "draining": n.draining, "heartbeat_age": max(0.0, now - n.last_seen)}
            breaker = getattr(n, "breaker", None)  # circuit breakers come with another issue
            if breaker is not None:
                row["breaker"] = str(getattr(breaker, "value", breaker))
            nodes.append(row)
        runs = [{"run_id": r.id, "workflow": r.workflow.name, "started": r.started,
                 "status": RunState.PAUSED.value if r.paused else r.state.value,
                 "total": len(r.tasks)}
                for r in core._runs.values() if r.state not in RUN_FINAL]  # noqa: SLF001
        return {"nodes": nodes, "runs": runs, "now": time.time(),
                "waiting_for_capability": core._unrunnable(50)}  # noqa: SLF001

    # --- the live socket ----------------------------------------------------------------

    async def serve(self, ws: ServerConnection) -> None:
        """One dashboard's socket: its subscriptions and actions in, its events out."""
        ws.protocol.max_message_size = 4096  # it only ever sends small requests
        sock = _Socket(ws)
        self.sockets.add(sock)
        writer = asyncio.get_running_loop().create_task(self._write(sock))
        try:
            await sock.send_json({"t": "hello", "version": __version__})
            async for frame in ws:
                try:
                    msg = json.loads(frame)
                    if not isinstance(msg, dict):
                        raise ValueError("not an object")
                except ValueError:
                    await ws.close(1003, "bad frame")
                    break
                if msg.get("t") == "sub":
                    run = msg.get("run")
                    sock.run = run if isinstance(run, str) else None
                    sock.buf.clear()
                elif msg.get("t") == "act":
                    await sock.send_json(await self._act(ws, msg))
        except ConnectionClosed:
            pass
        finally:
            self.sockets.discard(sock)
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await writer

    async def _write(self, sock: _Socket) -> None:
        with contextlib.suppress(ConnectionClosed):
            while True:
                await sock.wake.wait()
                await asyncio.sleep(FLUSH)  # what arrives meanwhile shares the frame
                sock.wake.clear()
                msg: dict[str, Any] = {"t": "ev", "ev": sock.buf, "activity": sock.activity}
                if sock.reload:
                    msg = {"t": "reload", "activity": sock.activity}
                sock.buf, sock.activity, sock.reload = [], 0, False
                await sock.send_json(msg)

    def publish(self, records: list[jn.Record]) -> None:
        """Committed entries to the open dashboards: the followed run's in full (compact),
        runs' and nodes' own events to every dashboard, and a count of the rest."""
        for sock in self.sockets:
            run, buf = sock.run, sock.buf
            before = len(buf)
            for r in records:
                k = r.kind
                if r.run_id == run and run is not None or k[:4] in ("run.", "node"):
                    buf.append([k, r.ts, r.run_id, r.symbol, r.node, r.attempt, _info(r)])
                elif isinstance(r, jn.SymbolStarted | jn.AttemptFinished):
                    sock.activity += 1
            if len(buf) > BACKLOG:
                buf.clear()
                sock.reload = True  # cheaper for both sides to read the DB again
            if len(buf) != before or sock.activity or sock.reload:
                sock.wake.set()

    async def _act(self, ws: ServerConnection, msg: dict[str, Any]) -> dict[str, Any]:
        """pause / resume / cancel / rollback, journaled like the CLI's; the reply once
        the change is committed."""
        rid = msg.get("id")
        op, run_id = msg.get("op"), msg.get("run_id")
        if self.auth.required and (ws.request is None
                                   or self.auth.session(ws.request.headers) is None):
            return {"t": "reply", "id": rid, "ok": False, "error": "signed out"}
        if not isinstance(run_id, str) or op not in ("pause", "resume", "cancel", "rollback"):
            return {"t": "reply", "id": rid, "ok": False, "error": "unknown action"}
        try:
            message = await self._apply(op, run_id)
        except SwarmError as e:
            return {"t": "reply", "id": rid, "ok": False, "error": str(e)}
        log.info("run %s: %s from the dashboard", run_id, op, extra={"run_id": run_id})
        return {"t": "reply", "id": rid, "ok": True, "op": op, "run_id": run_id,
                "message": message}

    async def _apply(self, op: str, run_id: str) -> str:
        """The same operations as the CLI's (Operations.rollback / control), answered once
        committed; a message for the page ("" if none)."""
        if op == "rollback":
            data = await self.d.ops.rollback(run_id)
        else:
            data = self.d.ops.control(op, run_id)
        await self.d.stored()
        return str(data.get("message", ""))


def _response(status: int, body: bytes, ctype: str, cache: str = "no-store",
              extra: list[tuple[str, str]] | None = None) -> Response:
    headers = Headers([
        ("Content-Type", ctype), ("Content-Length", str(len(body))), ("Connection", "close"),
        ("Content-Security-Policy", CSP), ("X-Content-Type-Options", "nosniff"),
        ("X-Frame-Options", "DENY"), ("Referrer-Policy", "no-referrer"),
        ("Cache-Control", cache), *(extra or [])])
    reason = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden",
              404: "Not Found"}.get(status, "")
    return Response(status, reason, headers, body)


def _json(status: int, data: Any, extra: list[tuple[str, str]] | None = None) -> Response:
    body = json.dumps(data, separators=(",", ":"), default=str).encode()
    return _response(status, body, "application/json", extra=extra)
