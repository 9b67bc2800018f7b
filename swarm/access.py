"""Which peers a dispatcher serves: `[security] allowed_hosts` (the original's key).

Entries are IP addresses, networks ("10.0.0.0/8") or host names, resolved once at
start-up. An empty list serves any peer. A peer from elsewhere is refused before the
WebSocket handshake (HTTP 403), for the WebSocket and the HTTP endpoints alike.
"""

from __future__ import annotations

import asyncio
import ipaddress

from .errors import ConfigError

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


async def resolve_allowed(hosts: tuple[str, ...]) -> tuple[Network, ...]:
    """The networks `hosts` name; ConfigError for a name that does not resolve."""
    out: list[Network] = []
    loop = asyncio.get_running_loop()
    for host in hosts:
        try:
            out.append(ipaddress.ip_network(host.strip(), strict=False))
            continue
        except ValueError:
            pass
        try:
            infos = await loop.getaddrinfo(host.strip(), None)
        except OSError as e:
            raise ConfigError(f"[security] allowed_hosts: cannot resolve {host!r}: "
                              f"{e.strerror or e}") from None
        for info in infos:
            address = str(info[4][0]).split("%", 1)[0]  # an IPv6 scope is not part of it
            out.append(ipaddress.ip_network(address))
    return tuple(dict.fromkeys(out))


def peer_allowed(address: str, allowed: tuple[Network, ...]) -> bool:
    """True if `allowed` is empty or holds the peer's address."""
    if not allowed:
        return True
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:  # not an IP peer (a Unix socket): only an open list serves it
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # a dual-stack socket shows IPv4 peers this way
    return any(ip in net for net in allowed)
