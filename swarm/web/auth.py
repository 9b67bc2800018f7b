"""Who may see the dashboard: sign-in by token proof, signed session cookies, and the
checks against cross-site use and DNS rebinding.

With a token configured, the browser never sends it: it fetches a challenge, computes
HMAC-SHA256(token, challenge) in JavaScript (as workers and clients do over the
WebSocket) and trades the proof for a session cookie (HttpOnly, SameSite=Strict,
signed, expiring; Secure under TLS). Without a token the dashboard, like the WebSocket,
is for loopback only: the peer and the Host header must both be loopback, so a page
of another site that rebinds its name to 127.0.0.1 is refused.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass

from websockets.datastructures import Headers

from ..tls import is_loopback

COOKIE = "swarm_session"
SESSION_SECONDS = 12 * 3600
CHALLENGE_SECONDS = 60.0
_USED_KEPT = 4096  # challenges spent in the last minute, kept so each serves once


@dataclass(frozen=True, slots=True)
class Verdict:
    """The answer to "may this request go on": `status` 0 means yes."""

    status: int = 0
    reason: str = ""

    @property
    def ok(self) -> bool:
        return self.status == 0


class Auth:
    """Sessions of one dispatcher. The signing key is derived from the token and the DB's
    node key: sessions survive a restart of the dispatcher, and end when the token changes."""

    def __init__(self, token: str, node_key: bytes, secure: bool) -> None:
        self.token = token
        self.secure = secure
        self._key = hmac.new(node_key or b"-", b"swarm-dashboard:" + token.encode(),
                             hashlib.sha256).digest()
        self._used: OrderedDict[str, float] = OrderedDict()
        self._revoked: set[str] = set()  # session ids signed out before their expiry

    @property
    def required(self) -> bool:
        return bool(self.token)

    def _sign(self, text: str) -> str:
        return hmac.new(self._key, text.encode(), hashlib.sha256).hexdigest()

    def challenge(self, now: float | None = None) -> str:
        """A fresh, signed challenge: nothing to store until it is spent."""
        nonce = f"{int(now or time.time())}.{secrets.token_hex(16)}"
        return f"{nonce}.{self._sign(nonce)}"

    def sign_in(self, challenge: str, proof: str, now: float | None = None) -> str | None:
        """A session cookie value for a valid proof of the token, else None."""
        now = now or time.time()
        try:
            issued, rand, sig = challenge.split(".")
            age = now - int(issued)
        except ValueError:
            return None
        if not (0 <= age <= CHALLENGE_SECONDS and rand.isalnum()) or challenge in self._used:
            return None
        if not hmac.compare_digest(sig, self._sign(f"{issued}.{rand}")):
            return None
        want = hmac.new(self.token.encode(), challenge.encode(), hashlib.sha256).hexdigest()
        if not hmac.compare_digest(proof.lower(), want):
            return None
        self._used[challenge] = now
        while self._used and (len(self._used) > _USED_KEPT
                              or now - next(iter(self._used.values())) > CHALLENGE_SECONDS):
            self._used.popitem(last=False)
        session = f"{int(now) + SESSION_SECONDS}.{secrets.token_hex(16)}"
        return f"{session}.{self._sign(session)}"

    def session(self, headers: Headers, now: float | None = None) -> str | None:
        """The id of the valid session the request's cookie carries, or None."""
        value = cookie(headers, COOKIE)
        if not value:
            return None
        try:
            expires, sid, sig = value.split(".")
            live = int(expires) > (now or time.time())
        except ValueError:
            return None
        if not live or sid in self._revoked:
            return None
        return sid if hmac.compare_digest(sig, self._sign(f"{expires}.{sid}")) else None

    def sign_out(self, headers: Headers) -> None:
        sid = self.session(headers)
        if sid is not None:
            self._revoked.add(sid)

    def set_cookie(self, value: str, max_age: int = SESSION_SECONDS) -> str:
        secure = "; Secure" if self.secure else ""
        return (f"{COOKIE}={value}; Path=/; Max-Age={max_age}; HttpOnly; "
                f"SameSite=Strict{secure}")

    def admit(self, headers: Headers, peer: str, *, data: bool) -> Verdict:
        """May this request see data (`data`) or only the signed-out page and assets?"""
        if not self.required:
            # No token, no proof: like the WebSocket, loopback only, and by a loopback
            # name (a rebound foreign name would carry this browser's requests here).
            if not is_loopback(_host_name(headers.get("Host", ""))) or not is_loopback(peer):
                return Verdict(403, "without a [security] token the dashboard is served on "
                                    "loopback only")
            return Verdict()
        if data and self.session(headers) is None:
            return Verdict(401, "sign in first")
        return Verdict()


def same_origin(headers: Headers, scheme: str) -> bool:
    """A browser's request from our own pages: its Origin is this very host. Requests
    without an Origin come from programs, not from a page of another site."""
    origin = headers.get("Origin")
    if origin is None:
        return True
    return origin == f"{scheme}://{headers.get('Host', '')}"


def cookie(headers: Headers, name: str) -> str:
    for line in headers.get_all("Cookie"):
        for part in line.split(";"):
            k, _, v = part.strip().partition("=")
            if k == name:
                return v
    return ""


def _host_name(host: str) -> str:
    """`127.0.0.1:8080` -> `127.0.0.1`, `[::1]:80` -> `::1`."""
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host
