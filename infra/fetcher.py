"""The safe image fetcher of the Faust agent.

Photo URLs come from tweets, so they are untrusted input: the fetcher only speaks
http/https, refuses private and other non-public addresses (server-side request forgery),
follows at most a few redirects and checks every hop, caps the bytes it reads, trusts the
bytes rather than the Content-Type header, and bounds its concurrency overall and per
host. Failures are split the way the pipeline acts on them: `TransientFetchError` (timeouts,
connection errors, 5xx, 429; retried here with back-off first) and `RejectedFetchError`
(never worth a retry). Messages name the URL; each error's `cause` names the kind of
failure in a word, the label of ``tagstream_fetch_failures_total`` (infra/metrics.py),
beside the latency and the bytes of the fetches that worked.

Address checks: IP literals are checked before connecting; host names are checked inside
a custom aiohttp resolver, so the addresses checked are the very addresses the connector
dials. That closes the DNS-rebinding gap a separate resolve-then-connect check would leave
(a hostile name server answering a public address to the check and 127.0.0.1 to aiohttp).
"""

from __future__ import annotations

import asyncio
import ipaddress
import random
import socket
import time
import weakref
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import hdrs
from aiohttp.abc import AbstractResolver, ResolveResult
from yarl import URL

from infra import metrics
from infra.exceptions import FetchError, RejectedFetchError, TransientFetchError

if TYPE_CHECKING:
    from infra.settings import Settings

#: Redirect hops followed before giving up.
MAX_REDIRECTS = 3
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_SCHEMES = frozenset({"http", "https"})
_CHUNK = 64 * 1024
_NUMERIC_FLAGS = socket.AI_NUMERICHOST | socket.AI_NUMERICSERV
_USER_AGENT = "tagstream-image-fetcher/0.1"

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class FetchedImage:
    """The bytes of one image and how they were got."""

    url: str
    final_url: str
    content_type: str
    data: bytes
    elapsed_ms: float
    attempts: int


def _blocked_reason(ip: IPAddress) -> str | None:
    """Why `ip` must not be fetched from, or None for a public unicast address."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # ::ffff:127.0.0.1 reaches 127.0.0.1
    for reason, hit in (
        ("unspecified", ip.is_unspecified),
        ("loopback", ip.is_loopback),
        ("link-local", ip.is_link_local),
        ("multicast", ip.is_multicast),
        ("private", ip.is_private),
        ("reserved", ip.is_reserved),
        # Catches what the flags above miss, e.g. 100.64.0.0/10 (carrier-grade NAT).
        ("not globally routable", not ip.is_global),
    ):
        if hit:
            return reason
    return None


def _ip_literal(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


class _BlockedAddress(OSError):
    """Raised by the resolver; aiohttp wraps it in ClientConnectorDNSError, we unwrap it."""


class _GuardedResolver(AbstractResolver):
    """getaddrinfo that refuses names resolving to any non-public address, unless allowed."""

    def __init__(self, *, allowed: Callable[[str], bool], timeout_s: float) -> None:
        self._allowed = allowed
        self._timeout_s = timeout_s

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        loop = asyncio.get_running_loop()
        # getaddrinfo has no timeout of its own and sock_connect does not cover it.
        infos = await asyncio.wait_for(
            loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, family=family),
            self._timeout_s,
        )
        allowed = self._allowed(host)
        results: list[ResolveResult] = []
        for fam, _, proto, _, address in infos:
            addr, addr_port = str(address[0]), int(address[1])
            if fam == socket.AF_INET6 and len(address) >= 4 and address[3]:
                # A scoped (link-local) IPv6 address needs its scope in the numeric host.
                addr, port_text = await loop.getnameinfo(
                    address, socket.NI_NUMERICHOST | socket.NI_NUMERICSERV
                )
                addr_port = int(port_text)
            if not allowed:
                ip = ipaddress.ip_address(addr.split("%", 1)[0])
                reason = _blocked_reason(ip)
                if reason is not None:
                    # One bad address condemns the name: connecting would try them all.
                    raise _BlockedAddress(f"blocked address {ip} ({reason}) for host {host!r}")
            results.append(
                ResolveResult(
                    hostname=host,
                    host=addr,
                    port=addr_port,
                    family=fam,
                    proto=proto,
                    flags=_NUMERIC_FLAGS,
                )
            )
        return results

    async def close(self) -> None:
        return None


def sniff_image_type(data: bytes) -> str | None:
    """The MIME type of a raster image format recognised from its magic bytes, else None."""
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data.startswith((b"GIF87a", b"GIF89a")):
        return "image/gif"
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    # "BM" alone is common in text; the header's two reserved words are zero in real BMPs.
    if len(data) >= 26 and data[:2] == b"BM" and data[6:10] == b"\x00\x00\x00\x00":
        return "image/bmp"
    return None


def _looks_like(data: bytes) -> str:
    """A best guess at what a non-image body is, for the error message."""
    head = data[:1024].lstrip()
    if not head:
        return "an empty body"
    lower = head.lower()
    if lower.startswith((b"<!doctype html", b"<html")) or b"<html" in lower or b"<body" in lower:
        return "text/html"
    if lower.startswith((b"<?xml", b"<svg")):
        return "XML or SVG (not a raster image)"
    if head[:1] in (b"{", b"["):
        return "application/json"
    if any(b < 9 or 13 < b < 32 for b in head[:256]):
        return "unrecognised binary data"
    return "text/plain"


def _with_attempts(exc: FetchError, attempts: int) -> FetchError:
    # The exception classes are shared project-wide; the attempt count rides as an attribute.
    exc.attempts = attempts  # type: ignore[attr-defined]
    return exc


class ImageFetcher:
    """Fetches images from untrusted URLs over one aiohttp session.

    Use as ``async with ImageFetcher(...) as fetcher: await fetcher.fetch(url)``.
    `allow_hosts` lists host names or IP literals fetched even if they resolve to
    private or loopback addresses (the demo image server on 127.0.0.1).
    Errors raised by `fetch` carry an ``attempts`` attribute.
    """

    def __init__(
        self,
        *,
        concurrency: int,
        per_host: int,
        connect_timeout_s: float,
        read_timeout_s: float,
        max_bytes: int,
        retries: int,
        allow_hosts: Iterable[str] = (),
        backoff_base_s: float = 0.2,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
    ) -> None:
        if concurrency < 1 or per_host < 1:
            raise ValueError("concurrency and per_host must be at least 1")
        if connect_timeout_s <= 0 or read_timeout_s <= 0:
            raise ValueError("timeouts must be positive")
        if max_bytes < 1 or retries < 0 or backoff_base_s < 0:
            raise ValueError("max_bytes must be >= 1, retries and backoff_base_s >= 0")
        metrics.expose(metrics.FETCH)
        self._concurrency = concurrency
        self._per_host = per_host
        self._connect_timeout_s = connect_timeout_s
        self._read_timeout_s = read_timeout_s
        self._max_bytes = max_bytes
        self._retries = retries
        self._backoff_base_s = backoff_base_s
        self._sleep = sleep
        names: set[str] = set()
        ips: set[IPAddress] = set()
        for host in allow_hosts:
            ip = _ip_literal(host.strip())
            if ip is not None:
                ips.add(ip)
            else:
                names.add(host.strip().rstrip(".").lower())
        self._allow_names = frozenset(names)
        self._allow_ips = frozenset(ips)
        # sock_read bounds each wait for bytes; total bounds a server that trickles a byte
        # just often enough to never trip sock_read.
        self._timeout = aiohttp.ClientTimeout(
            total=connect_timeout_s + 4 * read_timeout_s,
            sock_connect=connect_timeout_s,
            sock_read=read_timeout_s,
        )
        self._global_slots = asyncio.Semaphore(concurrency)
        # Weak values: a host's semaphore lives only while some fetch holds a reference,
        # so a stream touching many hosts does not grow this forever.
        self._host_slots: weakref.WeakValueDictionary[str, asyncio.Semaphore] = (
            weakref.WeakValueDictionary()
        )
        self._session: aiohttp.ClientSession | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> ImageFetcher:
        """A fetcher configured by the ``fetch_*`` settings."""
        return cls(
            concurrency=settings.fetch_concurrency,
            per_host=settings.fetch_per_host,
            connect_timeout_s=settings.fetch_connect_timeout_s,
            read_timeout_s=settings.fetch_read_timeout_s,
            max_bytes=settings.fetch_max_bytes,
            retries=settings.fetch_retries,
            allow_hosts=settings.fetch_allow_hosts,
        )

    async def __aenter__(self) -> ImageFetcher:
        if self._session is not None:
            raise RuntimeError("ImageFetcher is already open")
        connector = aiohttp.TCPConnector(
            resolver=_GuardedResolver(
                allowed=self._host_allowed, timeout_s=self._connect_timeout_s
            ),
            limit=self._concurrency,
            limit_per_host=self._per_host,
        )
        # trust_env=False: an HTTP(S)_PROXY from the environment would connect on our behalf
        # and bypass the address checks.
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=self._timeout,
            headers={hdrs.USER_AGENT: _USER_AGENT, hdrs.ACCEPT: "image/*"},
            trust_env=False,
        )
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _host_allowed(self, host: str) -> bool:
        ip = _ip_literal(host)
        if ip is not None:
            return ip in self._allow_ips
        return host.rstrip(".").lower() in self._allow_names

    async def fetch(self, url: str) -> FetchedImage:
        """Fetch one image, retrying transient failures with exponential back-off."""
        if self._session is None:
            raise RuntimeError("use ImageFetcher as `async with ImageFetcher(...) as f:`")
        started = time.perf_counter()
        attempt = 0
        while True:
            attempt += 1
            try:
                # Back-off sleeps happen outside the slot, so waiting never blocks others.
                async with self._global_slots:
                    final_url, content_type, data = await self._fetch_once(self._session, url)
            except TransientFetchError as exc:
                if attempt > self._retries:
                    metrics.FETCH_FAILURES.labels(cause=exc.cause).inc()
                    raise _with_attempts(
                        TransientFetchError(
                            f"{exc} (gave up after {attempt} attempts)", cause=exc.cause
                        ),
                        attempt,
                    ) from exc
                metrics.FETCH_RETRIES.labels(cause=exc.cause).inc()
                # Full-ish jitter: many tweets point at the same host, and retrying them in
                # lock-step would hit it again all at once.
                delay = self._backoff_base_s * 2 ** (attempt - 1)
                await self._sleep(delay * random.uniform(0.5, 1.0))
                continue
            except RejectedFetchError as exc:
                metrics.FETCH_FAILURES.labels(cause=exc.cause).inc()
                raise _with_attempts(exc, attempt) from None
            elapsed = time.perf_counter() - started
            metrics.FETCH_SECONDS.observe(elapsed)
            metrics.FETCH_BYTES.inc(len(data))
            return FetchedImage(
                url=url,
                final_url=final_url,
                content_type=content_type,
                data=data,
                elapsed_ms=elapsed * 1000.0,
                attempts=attempt,
            )

    def _check_url(self, url: str, current: str) -> URL:
        """Parse one hop and refuse bad schemes and blocked IP literals before connecting."""
        try:
            target = URL(current)
            # yarl parses lazily: a bad host (an empty IDNA label, say) raises only here.
            host, port = target.host, target.port
        except (ValueError, TypeError) as exc:
            raise RejectedFetchError(
                f"{url}: invalid URL {current!r}: {exc}", cause="invalid_url"
            ) from None
        if target.scheme.lower() not in _SCHEMES:
            raise RejectedFetchError(
                f"{url}: scheme {target.scheme or '(none)'!r} refused; only http and https",
                cause="scheme",
            )
        if port is not None and not 0 < port < 65536:
            raise RejectedFetchError(f"{url}: port {port} out of range", cause="invalid_url")
        if not host:
            raise RejectedFetchError(f"{url}: no host in {current!r}", cause="invalid_url")
        ip = _ip_literal(host)
        if ip is not None and not self._host_allowed(host):
            reason = _blocked_reason(ip)
            if reason is not None:
                via = "" if current == url else f" (redirected to {current})"
                raise RejectedFetchError(
                    f"{url}: blocked address {ip} ({reason}){via}", cause="blocked"
                )
        return target

    async def _fetch_once(self, session: aiohttp.ClientSession, url: str) -> tuple[str, str, bytes]:
        current = url
        for _hop in range(MAX_REDIRECTS + 1):
            target = self._check_url(url, current)
            key = f"{target.host}:{target.port}"
            slot = self._host_slots.get(key)
            if slot is None:
                slot = self._host_slots[key] = asyncio.Semaphore(self._per_host)
            async with slot:
                try:
                    async with session.get(target, allow_redirects=False) as resp:
                        if resp.status in _REDIRECT_STATUSES:
                            location = resp.headers.get(hdrs.LOCATION)
                            if not location:
                                raise RejectedFetchError(
                                    f"{url}: HTTP {resp.status} redirect without a Location",
                                    cause="bad_redirect",
                                )
                            current = str(target.join(URL(location)))
                            continue
                        self._check_status(url, current, resp.status)
                        data = await self._read_capped(url, resp)
                        declared = resp.headers.get(hdrs.CONTENT_TYPE, "(none)")
                except FetchError:
                    raise
                except TimeoutError as exc:
                    raise TransientFetchError(
                        f"{url}: {self._timeout_text(exc)}", cause="timeout"
                    ) from None
                except aiohttp.ClientConnectorError as exc:
                    raise self._connect_error(url, exc) from None
                except aiohttp.InvalidURL as exc:
                    raise RejectedFetchError(
                        f"{url}: invalid URL: {exc}", cause="invalid_url"
                    ) from None
                except aiohttp.ClientResponseError as exc:
                    raise RejectedFetchError(
                        f"{url}: malformed response: {exc}", cause="bad_response"
                    ) from None
                except (aiohttp.ClientError, OSError) as exc:
                    # Dropped connections and truncated bodies: the next try may well work.
                    raise TransientFetchError(
                        f"{url}: connection error: {type(exc).__name__}: {exc}",
                        cause="connection",
                    ) from None
                except ValueError as exc:  # an unparsable Location header
                    raise RejectedFetchError(
                        f"{url}: bad redirect: {exc}", cause="bad_redirect"
                    ) from None
            content_type = sniff_image_type(data)
            if content_type is None:
                raise RejectedFetchError(
                    f"{url}: not an image: looks like {_looks_like(data)} "
                    f"(Content-Type said {declared})",
                    cause="not_image",
                )
            return current, content_type, data
        raise RejectedFetchError(f"{url}: more than {MAX_REDIRECTS} redirects", cause="redirects")

    @staticmethod
    def _check_status(url: str, current: str, status: int) -> None:
        via = "" if current == url else f" (at {current})"
        if 200 <= status < 300:
            return
        if status == 429:
            raise TransientFetchError(f"{url}: HTTP {status}{via}", cause="http_429")
        if status >= 500:
            raise TransientFetchError(f"{url}: HTTP {status}{via}", cause="http_5xx")
        if 400 <= status < 500:
            raise RejectedFetchError(f"{url}: HTTP {status}{via}", cause="http_4xx")
        raise RejectedFetchError(f"{url}: unexpected HTTP {status}{via}", cause="http_other")

    async def _read_capped(self, url: str, resp: aiohttp.ClientResponse) -> bytes:
        cap = self._max_bytes
        if resp.content_length is not None and resp.content_length > cap:
            resp.close()
            raise RejectedFetchError(
                f"{url}: too large: Content-Length {resp.content_length} exceeds {cap} bytes",
                cause="too_large",
            )
        body = bytearray()
        async for chunk in resp.content.iter_chunked(_CHUNK):
            body += chunk
            if len(body) > cap:
                # close(), not release(): drop the connection instead of draining the rest.
                resp.close()
                raise RejectedFetchError(
                    f"{url}: too large: body passed the {cap}-byte cap; stopped reading",
                    cause="too_large",
                )
        return bytes(body)

    def _timeout_text(self, exc: TimeoutError) -> str:
        if isinstance(exc, aiohttp.ConnectionTimeoutError):
            return f"timed out connecting (connect timeout {self._connect_timeout_s} s)"
        if isinstance(exc, aiohttp.SocketTimeoutError):
            return f"timed out reading (read timeout {self._read_timeout_s} s)"
        return f"timed out (total timeout {self._timeout.total} s)"

    @staticmethod
    def _connect_error(url: str, exc: aiohttp.ClientConnectorError) -> FetchError:
        cause = exc.os_error
        if isinstance(cause, _BlockedAddress):
            return RejectedFetchError(f"{url}: {cause}", cause="blocked")
        if isinstance(exc, (aiohttp.ClientConnectorCertificateError, aiohttp.ClientSSLError)):
            return RejectedFetchError(f"{url}: TLS error: {exc}", cause="tls")
        if isinstance(cause, socket.gaierror) and cause.errno in (
            socket.EAI_NONAME,
            getattr(socket, "EAI_NODATA", socket.EAI_NONAME),
        ):
            return RejectedFetchError(f"{url}: host not found: {cause}", cause="dns")
        return TransientFetchError(f"{url}: cannot connect: {exc}", cause="connect")
