"""TLS for `wss://` and the rule about where a dispatcher may listen.

Server: `[security] tls_cert` + `tls_key` serve wss://; with `tls_require_client_cert`
every peer must present a certificate signed by `tls_ca` (mTLS). Clients and workers
verify the server (the system's CAs, or `tls_ca` for a private CA) and present
`tls_client_cert` + `tls_client_key` when set.
"""

from __future__ import annotations

import ipaddress
import logging
import ssl

from .config import Config
from .errors import ConfigError

log = logging.getLogger("swarm.security")


def server_context(cfg: Config) -> ssl.SSLContext | None:
    sec = cfg.security
    if not (sec.tls_cert or sec.tls_key):
        if sec.tls_require_client_cert:
            raise ConfigError("[security] tls_require_client_cert needs tls_cert and tls_key")
        return None
    if not (sec.tls_cert and sec.tls_key):
        raise ConfigError("[security] tls_cert and tls_key go together")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cfg.resolve(sec.tls_cert), cfg.resolve(sec.tls_key))
        if sec.tls_require_client_cert:
            if not sec.tls_ca:
                raise ConfigError("[security] tls_require_client_cert needs tls_ca "
                                  "(the CA that signs client certificates)")
            ctx.load_verify_locations(cfg.resolve(sec.tls_ca))
            ctx.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(f"[security] TLS files: {e}") from None
    return ctx


def client_context(cfg: Config, url: str) -> ssl.SSLContext | None:
    """The context for `wss://` URLs (None for ws://)."""
    if not url.lower().startswith("wss://"):
        return None
    sec = cfg.security
    try:
        ctx = ssl.create_default_context(cafile=cfg.resolve(sec.tls_ca) if sec.tls_ca else None)
        if sec.tls_client_cert or sec.tls_client_key:
            ctx.load_cert_chain(cfg.resolve(sec.tls_client_cert),
                                cfg.resolve(sec.tls_client_key or sec.tls_client_cert))
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(f"[security] TLS files: {e}") from None
    return ctx


def is_loopback(host: str) -> bool:
    if host in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def check_listen(host: str, cfg: Config, insecure: bool) -> None:
    """A dispatcher makes workers run things: off loopback it needs a token."""
    if is_loopback(host) or cfg.security.token:
        if not is_loopback(host) and not cfg.security.tls_cert:
            log.warning("listening on %s without TLS: the token is never sent, but frames "
                        "(parameters, outputs) cross the network in clear", host)
        return
    if not insecure:
        raise ConfigError(
            f"refusing to listen on {host} without a token: anyone who reaches it could "
            "make the workers run symbols. Set [security] token (or SWARM_TOKEN), or pass "
            "--insecure if this network is yours alone")
    log.warning("INSECURE: listening on %s without a token; anyone who can connect can "
                "deploy workflows to the workers", host)
