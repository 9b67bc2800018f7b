"""The web dashboard over HTTP and its socket, against a real dispatcher process: who may
see it (token sign-in, session cookie, loopback without a token, no cross-site use), what
its API reads from the state DB, and the live socket's events and actions.
The browser tests are in test_dashboard_browser.py."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import http.client
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from e2e_support import Cluster, wait_for, write_manifest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from swarm.web.auth import Auth
from swarm.web.queries import _levels

pytestmark = pytest.mark.e2e
TOKEN = "dash-s3cret"

SLOW = """
name: slow
version: "1"
symbols:
  - {name: first, type: action, parameters: {handler: delay, ms: 50}}
  - {name: second, type: action, dependencies: [first], parameters: {handler: delay, ms: 1500}}
  - {name: third, type: action, dependencies: [second], parameters: {handler: delay, ms: 50}}
"""
FAILING = """
name: failing
version: "2"
on_failure: continue
symbols:
  - {name: ok, type: action, parameters: {handler: echo, password: hunter2, note: hi}}
  - {name: broken, type: action, retries: 1, parameters: {handler: fail}}
  - {name: after, type: action, dependencies: [broken], parameters: {handler: noop}}
"""


def get(port: int, path: str, headers: dict[str, str] | None = None
        ) -> tuple[int, dict[str, str], bytes]:
    con = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        con.request("GET", path, headers={"X-Swarm-Request": "1", **(headers or {})})
        r = con.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        con.close()


def api(port: int, path: str, cookie: str = "") -> Any:
    status, _, body = get(port, "/api/" + path, {"Cookie": cookie} if cookie else None)
    assert status == 200, (status, body)
    return json.loads(body)


def sign_in(port: int, token: str) -> tuple[int, str]:
    """(status, Set-Cookie) of a sign-in with the proof of `token`."""
    challenge = json.loads(get(port, "/api/auth/challenge")[2])["challenge"]
    proof = hmac.new(token.encode(), challenge.encode(), hashlib.sha256).hexdigest()
    status, headers, _ = get(port, "/api/auth/session", {"X-Swarm-Proof": f"{challenge} {proof}"})
    return status, headers.get("set-cookie", "")


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A dispatcher with a token, a worker, and a finished run that failed one symbol."""
    root = tmp_path_factory.mktemp("dash-secured")
    cl = Cluster(root, f'\n[security]\ntoken = "{TOKEN}"\n')
    try:
        cl.start_dispatcher()
        cl.start_worker("w1", extra_env={"SWARM_TOKEN": TOKEN})
        cp = cl.deploy(write_manifest(root, FAILING))
        assert cp.returncode == 1, cp.stderr
        yield cl
    finally:
        cl.close()


def port_of(cl: Cluster) -> int:
    return int(cl.url.rsplit(":", 1)[1])


def test_signed_out_sees_the_page_shell_and_no_data(secured: Cluster) -> None:
    port = port_of(secured)
    status, headers, body = get(port, "/")
    assert status == 200 and b"<script src=\"/static/app.js\">" in body
    assert "script-src 'self'" in headers["content-security-policy"]
    assert "unsafe-inline" not in headers["content-security-policy"]
    for path in ("/api/runs", "/api/cluster", "/api/run/x", "/api/run/x/attempts"):
        status, _, body = get(port, path)
        assert status == 401, (path, status)
        assert b"failing" not in body
    challenge = json.loads(get(port, "/api/auth/challenge")[2])
    assert challenge["auth"] is True and challenge["signed_in"] is False


def test_sign_in_gives_a_strict_http_only_cookie_and_the_token_never_travels(
        secured: Cluster) -> None:
    port = port_of(secured)
    status, cookie = sign_in(port, "wrong")
    assert status == 401 and not cookie
    status, cookie = sign_in(port, TOKEN)
    assert status == 200
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Max-Age=" in cookie
    assert TOKEN not in cookie
    session = cookie.split(";", 1)[0]
    runs = api(port, "runs", session)
    assert [r["workflow"] for r in runs["runs"]] == ["failing"]
    # A tampered cookie is nobody's.
    name, value = session.split("=", 1)
    tampered = value[:-1] + ("1" if value[-1] == "0" else "0")  # a different last character
    assert get(port, "/api/runs", {"Cookie": f"{name}={tampered}"})[0] == 401
    # Signing out ends that session on the dispatcher too.
    get(port, "/api/auth/signout", {"Cookie": session})
    assert get(port, "/api/runs", {"Cookie": session})[0] == 401
    assert TOKEN not in secured.log("dispatcher")


def test_a_challenge_serves_once(secured: Cluster) -> None:
    port = port_of(secured)
    challenge = json.loads(get(port, "/api/auth/challenge")[2])["challenge"]
    proof = hmac.new(TOKEN.encode(), challenge.encode(), hashlib.sha256).hexdigest()
    header = {"X-Swarm-Proof": f"{challenge} {proof}"}
    assert get(port, "/api/auth/session", header)[0] == 200
    assert get(port, "/api/auth/session", header)[0] == 401  # a replayed proof


def test_api_refuses_requests_a_foreign_page_could_make(secured: Cluster) -> None:
    port = port_of(secured)
    session = sign_in(port, TOKEN)[1].split(";", 1)[0]
    con = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    con.request("GET", "/api/runs", headers={"Cookie": session})  # no X-Swarm-Request
    assert con.getresponse().status == 403
    con.close()
    status, _, _ = get(port, "/api/runs", {"Cookie": session, "Origin": "http://evil.example"})
    assert status == 403


def test_run_symbol_and_attempts_come_from_the_state_db_with_outputs_redacted(
        secured: Cluster) -> None:
    port = port_of(secured)
    session = sign_in(port, TOKEN)[1].split(";", 1)[0]
    run_id = api(port, "runs", session)["runs"][0]["run_id"]
    run = api(port, f"run/{run_id}", session)
    assert run["names"] == ["ok", "broken", "after"]
    assert run["state"] == ["completed", "failed", "skipped"]
    assert run["levels"] == [0, 0, 1] and run["deps"] == [[], [], [1]]
    broken = api(port, f"run/{run_id}/symbol/broken", session)
    assert [a["outcome"] for a in broken["attempts"]] == ["failed", "failed"]
    assert broken["task"]["error"] == "failed on purpose"
    ok = api(port, f"run/{run_id}/symbol/ok", session)
    assert ok["task"]["result"] == {"password": "[redacted]", "note": "hi"}
    assert ok["spec"]["parameters"]["password"] == "[redacted]"
    attempts = api(port, f"run/{run_id}/attempts", session)
    assert sorted(attempts["symbol"]) == ["broken", "broken", "ok"]
    filtered = api(port, "runs?status=completed", session)
    assert filtered["total"] == 0 and filtered["runs"] == []


async def test_dashboard_socket_needs_a_session_and_our_origin(secured: Cluster) -> None:
    port = port_of(secured)
    url = f"ws://127.0.0.1:{port}/ws/dashboard"
    with pytest.raises(InvalidStatus) as refused:
        async with connect(url):
            pass
    assert refused.value.response.status_code == 401
    session = sign_in(port, TOKEN)[1].split(";", 1)[0]
    with pytest.raises(InvalidStatus) as foreign:
        async with connect(url, additional_headers={"Cookie": session},
                           origin="http://evil.example"):  # type: ignore[arg-type]
            pass
    assert foreign.value.response.status_code == 403
    async with connect(url, additional_headers={"Cookie": session},
                       origin=f"http://127.0.0.1:{port}") as ws:  # type: ignore[arg-type]
        hello = json.loads(await ws.recv())
        assert hello["t"] == "hello"


@pytest.mark.timeout(90)
async def test_socket_streams_a_followed_run_and_pauses_and_resumes_it(tmp_path: Path) -> None:
    cl = Cluster(tmp_path)
    try:
        cl.start_dispatcher()
        cl.start_worker("w1")
        run_id = cl.detach(write_manifest(tmp_path, SLOW))
        port = port_of(cl)
        async with connect(f"ws://127.0.0.1:{port}/ws/dashboard") as ws:
            assert json.loads(await ws.recv())["t"] == "hello"
            await ws.send(json.dumps({"t": "sub", "run": run_id}))
            await asyncio.to_thread(wait_for, lambda: cl.tasks(run_id)["second"]["state"]
                                    == "running", what="second to start")
            await ws.send(json.dumps({"t": "act", "id": 1, "op": "pause", "run_id": run_id}))
            kinds: list[str] = []
            reply: dict[str, Any] = {}
            async with asyncio.timeout(30):
                while not reply or "run.paused" not in kinds:
                    msg = json.loads(await ws.recv())
                    if msg["t"] == "reply":
                        reply = msg
                    elif msg["t"] == "ev":
                        kinds += [e[0] for e in msg["ev"] if e[2] == run_id]
            assert reply == {"t": "reply", "id": 1, "ok": True, "op": "pause", "run_id": run_id,
                             "message": ""}
            assert cl.run_status(run_id) == "paused"
            # Paused: second finishes, third does not start.
            await asyncio.to_thread(wait_for, lambda: cl.tasks(run_id)["second"]["state"]
                                    == "completed", what="second to finish")
            assert cl.tasks(run_id)["third"]["state"] in ("pending", "ready")
            why = api(port, f"run/{run_id}/symbol/third")["why"]
            assert [w["kind"] for w in why] == ["paused"]
            await ws.send(json.dumps({"t": "act", "id": 2, "op": "resume", "run_id": run_id}))
            async with asyncio.timeout(30):
                while "run.completed" not in kinds:
                    msg = json.loads(await ws.recv())
                    if msg["t"] == "ev":
                        kinds += [e[0] for e in msg["ev"] if e[2] == run_id]
            assert kinds.index("run.resumed") < kinds.index("run.completed")
            assert "symbol.completed" in kinds
            await ws.send(json.dumps({"t": "act", "id": 3, "op": "pause", "run_id": run_id}))
            async with asyncio.timeout(10):
                while (msg := json.loads(await ws.recv()))["t"] != "reply":
                    pass
            assert msg["ok"] is False and "not active" in msg["error"]
    finally:
        cl.close()


def test_without_a_token_only_loopback_names_are_served(tmp_path: Path) -> None:
    cl = Cluster(tmp_path)
    try:
        cl.start_dispatcher()
        port = port_of(cl)
        assert get(port, "/api/cluster")[0] == 200
        # A page of another site whose name was rebound to 127.0.0.1 (DNS rebinding).
        assert get(port, "/api/cluster", {"Host": f"evil.example:{port}"})[0] == 403
        assert get(port, "/", {"Host": "evil.example"})[0] == 403
        assert get(port, "/api/cluster", {"Host": f"localhost:{port}"})[0] == 200
        # The WebSocket of workers and clients is not the dashboard's business.
        assert get(port, "/metrics")[0] == 200
    finally:
        cl.close()


def test_session_cookies_are_signed_and_expire() -> None:
    auth = Auth("tok", b"node-key", secure=True)
    challenge = auth.challenge(now=1000.0)
    proof = hmac.new(b"tok", challenge.encode(), hashlib.sha256).hexdigest()
    assert auth.sign_in(challenge, proof, now=1100.0) is None  # the challenge went stale
    value = auth.sign_in(challenge, proof, now=1010.0)
    assert value is not None
    assert "Secure" in auth.set_cookie(value)
    from websockets.datastructures import Headers
    headers = Headers([("Cookie", f"other=1; swarm_session={value}")])
    assert auth.session(headers, now=1020.0) is not None
    assert auth.session(headers, now=1010.0 + 13 * 3600) is None
    other = Auth("another token", b"node-key", secure=False)
    assert other.session(headers, now=1020.0) is None


def test_levels_follow_dependencies_in_any_order() -> None:
    assert _levels(((1,), (), (0, 1), (2,))) == (1, 0, 2, 3)
    chain = tuple((i - 1,) if i else () for i in range(100_000))
    assert _levels(chain)[-1] == 99_999
