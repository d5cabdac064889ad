"""The SSRF guard: which addresses a webhook may point at. Literal addresses resolve offline, so
no test here contacts anything."""

from __future__ import annotations

import ipaddress

import pytest

from shears import ssrf

REFUSED = [
    "127.0.0.1",  # loopback
    "127.8.9.10",
    "10.1.2.3",  # private
    "172.16.0.1",
    "192.168.1.1",
    "169.254.169.254",  # link-local: cloud metadata
    "100.64.0.1",  # shared address space (carrier-grade NAT)
    "0.0.0.0",  # unspecified
    "224.0.0.1",  # multicast
    "240.0.0.1",  # reserved
    "255.255.255.255",
    "192.0.2.10",  # documentation
    "::1",
    "::",
    "fe80::1",  # link-local
    "fc00::1",  # unique local
    "ff02::1",  # multicast
    "::ffff:127.0.0.1",  # IPv4-mapped loopback
    "::ffff:10.0.0.1",
    "::ffff:169.254.169.254",
    "64:ff9b::7f00:1",  # NAT64 of 127.0.0.1
    "2002:7f00:1::1",  # 6to4 of 127.0.0.1
    "2002:a00:1::1",  # 6to4 of 10.0.0.1
]
ALLOWED = ["93.184.215.14", "8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "::ffff:8.8.8.8"]


@pytest.mark.parametrize("address", REFUSED)
def test_non_public_addresses_are_not_public(address: str) -> None:
    assert not ssrf.is_public(ipaddress.ip_address(address))


@pytest.mark.parametrize("address", ALLOWED)
def test_public_addresses_are_public(address: str) -> None:
    assert ssrf.is_public(ipaddress.ip_address(address))


def _url(address: str, path: str = "/hook") -> str:
    host = f"[{address}]" if ":" in address else address
    return f"https://{host}{path}"


@pytest.mark.parametrize("address", REFUSED)
def test_urls_on_non_public_addresses_are_refused(address: str) -> None:
    with pytest.raises(ssrf.UnsafeURL, match="not a public address"):
        ssrf.check(_url(address))


@pytest.mark.parametrize("address", REFUSED)
def test_allow_private_lets_them_through(address: str) -> None:
    target = ssrf.check(_url(address), allow_private=True)
    assert target.address == ipaddress.ip_address(address)


def test_a_public_literal_is_allowed_and_pinned() -> None:
    target = ssrf.check("https://93.184.215.14:8443/hooks/shears?x=1")
    assert target.address == ipaddress.ip_address("93.184.215.14")
    assert (target.scheme, target.host, target.port) == ("https", "93.184.215.14", 8443)


@pytest.mark.parametrize(
    "url",
    [
        "http://localhost:8000/hook",  # a name that resolves to loopback
        "http://2130706433/",  # 127.0.0.1 as one integer
        "http://0x7f000001/",  # ... in hex
        "http://127.1/",  # ... shortened
    ],
)
def test_names_and_odd_spellings_are_judged_by_what_they_resolve_to(url: str) -> None:
    with pytest.raises(ssrf.UnsafeURL, match="not a public address"):
        ssrf.check(url)


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("ftp://93.184.215.14/x", "only http and https"),
        ("file:///etc/passwd", "only http and https"),
        ("gopher://93.184.215.14/", "only http and https"),
        ("93.184.215.14/hook", "only http and https"),
        ("https:///nohost", "no host"),
        ("https://user:pw@93.184.215.14/", "credentials"),
        ("https://93.184.215.14:99999/", "not a valid URL"),
        ("https://no-such-host.invalid/", "does not resolve"),
    ],
)
def test_malformed_or_unusable_urls_are_refused(url: str, why: str) -> None:
    with pytest.raises(ssrf.UnsafeURL, match=why):
        ssrf.check(url, allow_private=True)
