"""The SSRF guard for URLs that Shears itself connects to (webhook targets).

A URL is allowed when it is ``http``/``https`` and every address its host resolves to is publicly
routable. The API checks at creation; the sender checks again at every attempt and then connects to
the very address it checked (see ``worker.webhooks``), so a DNS answer that changes between the
check and the connection (DNS rebinding) cannot reach an internal service.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

SCHEMES = frozenset({"http", "https"})
DEFAULT_PORTS = {"http": 80, "https": 443}


class UnsafeURL(ValueError):
    """The URL may not be contacted; the message says why, for a person to act on."""


@dataclass(frozen=True)
class Target:
    """A checked URL: where to connect (``address``) and what to call the host (Host, SNI)."""

    url: str
    scheme: str
    host: str
    port: int
    address: IPAddress


def _embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one carries: mapped (::ffff:a.b.c.d), 6to4, Teredo, NAT64."""
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address.teredo is not None:
        return address.teredo[1]
    if address in ipaddress.IPv6Network("64:ff9b::/96"):  # NAT64: the low 32 bits are IPv4
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


_TRANSLATED = (ipaddress.IPv6Network("::ffff:0:0/96"), ipaddress.IPv6Network("64:ff9b::/96"))


def is_public(address: IPAddress) -> bool:
    """Whether ``address`` is globally routable unicast (and so is any IPv4 address inside it)."""
    if isinstance(address, ipaddress.IPv6Address) and any(address in n for n in _TRANSLATED):
        # A mapped or NAT64 address reaches its IPv4 address: that one decides.
        inner = _embedded_ipv4(address)
        return inner is not None and is_public(inner)
    if (
        not address.is_global
        or address.is_multicast
        or address.is_reserved
        or address.is_unspecified
        or address.is_loopback
        or address.is_link_local
        or address.is_private
    ):
        return False
    if isinstance(address, ipaddress.IPv6Address):
        inner = _embedded_ipv4(address)
        if inner is not None:
            return is_public(inner)
    return True


def parse(url: str) -> tuple[str, str, int]:
    """``(scheme, host, port)`` of an absolute http(s) URL; raises ``UnsafeURL`` otherwise."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise UnsafeURL(f"not a valid URL: {exc}") from exc
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise UnsafeURL("only http and https URLs are allowed")
    host = parts.hostname
    if not host:
        raise UnsafeURL("the URL has no host")
    if parts.username is not None or parts.password is not None:
        raise UnsafeURL("credentials in the URL are not allowed; authenticate by the signature")
    return scheme, host, port or DEFAULT_PORTS[scheme]


def resolve(host: str, port: int) -> list[IPAddress]:
    """Every address ``host`` resolves to (a literal address resolves to itself, offline)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise UnsafeURL(f"the host {host!r} does not resolve: {exc}") from exc
    addresses: list[IPAddress] = []
    for info in infos:
        # An IPv6 answer may carry a zone ("fe80::1%eth0"); the zone is not part of the address.
        address = ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])
        if address not in addresses:
            addresses.append(address)
    if not addresses:
        raise UnsafeURL(f"the host {host!r} does not resolve")
    return addresses


def check(url: str, *, allow_private: bool = False) -> Target:
    """Parse and resolve ``url``; refuse it unless every address is public (or ``allow_private``).

    All addresses, not just one: a name that answers with both a public and an internal address
    is refused rather than left to chance."""
    scheme, host, port = parse(url)
    addresses = resolve(host, port)
    if not allow_private:
        for address in addresses:
            if not is_public(address):
                shown = host if host == str(address) else f"{host} ({address})"
                raise UnsafeURL(
                    f"{shown} is not a public address (loopback, private, link-local, multicast "
                    "or reserved); webhooks must point at a publicly reachable host"
                )
    return Target(url=url, scheme=scheme, host=host, port=port, address=addresses[0])
