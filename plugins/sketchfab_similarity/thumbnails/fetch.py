"""Fetch one thumbnail over HTTP, safely: the SSRF guard, redirects checked hop by hop, byte caps.

Only hosts on the allow-list are contacted, over http(s), and every redirect hop is
checked again (the API decides what URLs we see, so this is an SSRF boundary). What a
host resolves to is checked too: a host whose DNS answer is a private, loopback or
link-local address is refused unless it is listed in `thumbnail_private_hosts`, which
defeats DNS tricks that the name check cannot see.

Failures are `FetchFailed` with a kind, a detail and whether a later try may succeed.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

import aiohttp
from aiohttp.resolver import ThreadedResolver

from ..core.httpretry import RETRY_STATUSES, redact, retry_delay
from ..core.settings import Settings

MAX_REDIRECTS = 3


REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})


ACCEPT = "image/jpeg, image/png, image/webp;q=0.9"


TRANSIENT = "transient"


PERMANENT = "permanent"


class FetchFailed(Exception):
    """One thumbnail could not be taken; `kind` and `detail` become the recorded reason."""

    def __init__(self, kind: str, detail: str, transient: bool) -> None:
        super().__init__(f"{kind}: {detail}")
        self.transient = transient

    @property
    def recorded(self) -> str:
        return f"[{TRANSIENT if self.transient else PERMANENT}] {self}"


class PrivateAddressRefused(OSError):
    """A DNS answer we refuse; an OSError because that is what aiohttp expects from a resolver."""


NAT64_PREFIX = ipaddress.IPv6Network("64:ff9b::/96")
"""The well-known NAT64 prefix: the last 32 bits are an IPv4 address a NAT64 gateway connects to."""
DEFAULT_PORTS = {"http": 80, "https": 443}


def is_public_address(address: str) -> bool:
    """Globally routable unicast only: no private, loopback, link-local, CGNAT, reserved or multicast.

    IPv6 forms that carry an IPv4 address (mapped, NAT64, 6to4, Teredo) are judged by that
    address: 64:ff9b::a00:1 reaches 10.0.0.1 through a NAT64 gateway.
    """
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        elif ip in NAT64_PREFIX:
            ip = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        elif ip.sixtofour is not None:
            ip = ip.sixtofour
        elif ip.teredo is not None:
            return False  # a tunnel to an address we cannot check
    return ip.is_global and not ip.is_multicast


class GuardedResolver(ThreadedResolver):
    """DNS answers for hosts outside `private_hosts` must all be public addresses.

    aiohttp connects only to the addresses its resolver returns, so the check
    cannot be undone by a second, different DNS answer (DNS rebinding).
    """

    def __init__(self, private_hosts: Iterable[str]) -> None:
        super().__init__()
        self.private_hosts = frozenset(h.lower() for h in private_hosts)

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET) -> list:
        answers = await super().resolve(host, port, family)
        if host.lower() not in self.private_hosts:
            for answer in answers:
                if not is_public_address(answer["host"]):
                    raise PrivateAddressRefused(f"{host!r} resolved to non-public address {answer['host']}")
        return answers


def check_allowed(url: str, allowed_hosts: tuple[str, ...], private_hosts: tuple[str, ...] = ()) -> None:
    """Only http(s), only allow-listed hosts (exact names), no credentials, no private IP literals."""
    try:
        parts = urlsplit(url)
        host = (parts.hostname or "").lower()
        parts.port  # noqa: B018 - raises ValueError for a malformed port
    except ValueError as exc:
        raise FetchFailed("bad URL", str(exc), transient=False) from None
    if parts.scheme not in ("http", "https"):
        raise FetchFailed("scheme not allowed", f"{parts.scheme!r} is not http(s)", transient=False)
    if parts.username is not None or parts.password is not None:
        raise FetchFailed("bad URL", "URL carries credentials", transient=False)
    if host not in allowed_hosts:
        raise FetchFailed(
            "host not allowed", f"{host!r} is not in similarity_thumbnail_hosts", transient=False
        )
    try:
        literal = ipaddress.ip_address(host)
    except ValueError:
        literal = None  # a name: the resolver checks what it resolves to
    if literal is not None and host not in private_hosts and not is_public_address(str(literal)):
        raise FetchFailed("private address", f"{host} is not a public address", transient=False)
    if parts.port not in (None, DEFAULT_PORTS[parts.scheme]) and host not in private_hosts:
        # An allow-listed host serves images on its web port; another port is another service.
        raise FetchFailed("port not allowed", f"{parts.port} on {host!r}", transient=False)


@dataclass(frozen=True)
class _Redirect:
    location: str


async def fetch_bytes(session: aiohttp.ClientSession, url: str, settings: Settings) -> bytes:
    """GET under a whole-download deadline, following redirects by hand so every hop is checked again."""
    try:
        async with asyncio.timeout(settings.download_deadline_s):
            for hop in range(MAX_REDIRECTS + 1):
                try:
                    check_allowed(url, settings.thumbnail_hosts, settings.thumbnail_private_hosts)
                except FetchFailed as exc:
                    if hop:
                        raise FetchFailed(
                            "redirect refused", f"{exc} ({redact(url)})", transient=False
                        ) from None
                    raise
                answer = await _get_with_retries(session, url, settings)
                if isinstance(answer, bytes):
                    return answer
                url = urljoin(url, answer.location)
    except TimeoutError:
        raise FetchFailed("too slow", f"over {settings.download_deadline_s:g}s", transient=True) from None
    raise FetchFailed("too many redirects", f"more than {MAX_REDIRECTS}", transient=False)


async def _get_with_retries(
    session: aiohttp.ClientSession, url: str, settings: Settings
) -> bytes | _Redirect:
    """One hop: retries connection errors, 429 and 5xx (capped Retry-After, jittered backoff)."""
    attempt = 0
    while True:
        retry_after = None
        try:
            async with session.get(url, allow_redirects=False) as resp:
                if resp.status in REDIRECT_STATUSES:
                    return _Redirect(resp.headers.get("Location", ""))
                if resp.status in RETRY_STATUSES:
                    failure = FetchFailed(f"HTTP {resp.status}", f"after {attempt} retries", transient=True)
                    retry_after = resp.headers.get("Retry-After")
                elif resp.status != 200:
                    raise FetchFailed(f"HTTP {resp.status}", resp.reason or "", transient=False)
                else:
                    return await _read_body(resp, settings.max_image_bytes)
        except aiohttp.ClientConnectorDNSError as exc:
            if isinstance(exc.os_error, PrivateAddressRefused):
                raise FetchFailed("private address", str(exc.os_error), transient=False) from None
            failure = FetchFailed("connection failed", f"DNS: {exc.os_error}", transient=True)
        except (aiohttp.ClientError, TimeoutError) as exc:
            failure = FetchFailed("connection failed", type(exc).__name__, transient=True)
        if attempt >= settings.download_retries:
            raise failure
        delay = retry_delay(
            attempt, retry_after, settings.download_backoff_s, settings.download_retry_after_cap_s
        )
        attempt += 1
        await asyncio.sleep(delay)


async def _read_body(resp: aiohttp.ClientResponse, max_bytes: int) -> bytes:
    """The body, refusing non-images and anything over the byte cap (declared or streamed)."""
    ctype = resp.headers.get("Content-Type", "").split(";")[0].strip().lower()
    if not ctype.startswith("image/"):
        raise FetchFailed("not an image", f"content type {ctype or 'missing'!r}", transient=False)
    declared = resp.headers.get("Content-Length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise FetchFailed("too large", f"{declared} bytes, over the {max_bytes} cap", transient=False)
    chunks, size = [], 0
    async for chunk in resp.content.iter_chunked(64 * 1024):
        size += len(chunk)
        if size > max_bytes:
            raise FetchFailed("too large", f"over the {max_bytes} byte cap", transient=False)
        chunks.append(chunk)
    return b"".join(chunks)
