"""Fetching an http(s) media URL for a request, when the server allows remote media (--allow-remote-media).

A URL in a request is fetched by the server, from inside its network: a request must not be able to reach what
the server can reach and the client cannot (SSRF). So every host name is resolved here and refused unless
every address it resolves to is public (`ipaddress.is_global`: not loopback, private, link-local, cloud
metadata such as 169.254.169.254, carrier-grade NAT, multicast or reserved); the connection goes to the checked
address itself (a second lookup could answer differently), and redirects are followed by hand, each target
checked again. A fetch has one deadline for all of it (connect, redirects, every read), so a server that drips
bytes cannot hold a worker for longer, and at most `max_bytes` are read. Whatever goes wrong, the client is told
one thing ("could not fetch the media URL"): which internal hosts or ports answer is not its business; the
server's log has the reason.
"""
from __future__ import annotations

import http.client
import ipaddress
import logging
import socket
import ssl
import time
import urllib.parse

from ..media import MediaError

log = logging.getLogger("gemma4.fetch")

MAX_REDIRECTS = 5
FAILED = "could not fetch the media URL"  # the only text a client sees


class _Refused(Exception):
    """Why a fetch failed, for the server's log."""


def public_address(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Can a client's URL point the server at this address?"""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:  # ::ffff:127.0.0.1 is 127.0.0.1
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


def _resolve(host: str, port: int) -> str:
    """One public address of `host`; refused if any of its addresses is not public (a name that resolves to
    both would let the connection pick the internal one)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        raise _Refused(f"cannot resolve {host!r}: {e}") from None
    addresses = [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]
    if not addresses:
        raise _Refused(f"{host!r} has no address")
    blocked = [str(a) for a in addresses if not public_address(a)]
    if blocked:
        raise _Refused(f"{host!r} resolves to a non-public address {blocked[0]}")
    return str(addresses[0])


def _get(url: str, deadline: float, max_bytes: int) -> tuple[int, str | None, bytes]:
    """One GET without following redirects: (status, Location header, body)."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise _Refused(f"not an http(s) URL: {url[:200]!r}")
    if parts.username or parts.password:
        raise _Refused("URLs with credentials are not fetched")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as e:
        raise _Refused(str(e)) from None
    ip = _resolve(parts.hostname, port)

    def remaining() -> float:
        left = deadline - time.monotonic()
        if left <= 0:
            raise _Refused("deadline exceeded")
        return left

    sock = socket.create_connection((ip, port), timeout=remaining())
    if parts.scheme == "https":  # certificate checked against the host name, not the address connected to
        sock = ssl.create_default_context().wrap_socket(sock, server_hostname=parts.hostname)
    cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    conn = cls(parts.hostname, port, timeout=remaining())
    conn.sock = sock  # already connected to the checked address: http.client does not connect again
    try:
        path = urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, ""))
        conn.request("GET", path, headers={"User-Agent": "gemma4", "Accept-Encoding": "identity"})
        sock.settimeout(remaining())
        response = conn.getresponse()
        if response.status in (301, 302, 303, 307, 308):
            return response.status, response.getheader("Location"), b""
        if response.status != 200:
            raise _Refused(f"HTTP {response.status}")
        declared = response.getheader("Content-Length")
        if declared and declared.isdigit() and int(declared) > max_bytes:
            raise _Refused(f"Content-Length {declared} is over the {max_bytes}-byte limit")
        body = bytearray()
        while True:
            sock.settimeout(remaining())
            chunk = response.read1(min(1 << 16, max_bytes + 1 - len(body)))
            if not chunk:
                if response.length:  # read1 returns b"" when the connection closes early
                    raise _Refused(f"the body ended {response.length} bytes short of its Content-Length")
                return 200, None, bytes(body)
            body += chunk
            if len(body) > max_bytes:
                raise _Refused(f"more than the {max_bytes}-byte limit")
    finally:
        conn.close()


def fetch(url: str, max_bytes: int, timeout: float) -> bytes:
    """The body of `url` (http or https, public addresses only, redirects followed and checked), read within
    `timeout` seconds in all; MediaError with one generic message otherwise."""
    deadline = time.monotonic() + timeout
    try:
        for _ in range(MAX_REDIRECTS + 1):
            status, location, body = _get(url, deadline, max_bytes)
            if status == 200:
                return body
            if not location:
                raise _Refused(f"HTTP {status} without a Location")
            url = urllib.parse.urljoin(url, location)
        raise _Refused(f"more than {MAX_REDIRECTS} redirects")
    except (_Refused, OSError, http.client.HTTPException, ValueError) as e:  # timeouts, ssl errors: OSErrors
        log.warning("media URL %.200s not fetched: %s: %s", url, type(e).__name__, e)
        raise MediaError(FAILED) from None
