"""URL safety policy and download limits: only http(s) URLs to public addresses are fetched,
each within a deadline and a size cap.

Dataset rows come from the open web (LAION parquet rows are scraped, not vetted), so
a URL can point at cloud metadata (169.254.169.254), the cluster's own services or a
local file, and a server can answer slowly or without end. Two layers keep that out:

* `check_url` filters URLs before they are handed to a downloader. It catches
  everything visible in the URL itself plus what DNS says at that moment.
* `guarded_urlopen` / `build_guarded_opener` give a urllib opener that checks every
  redirect target and the address each socket is actually connected to (DNS can change
  between the check and the fetch, and redirects can point anywhere, so the peer check is
  the authoritative one), and that bounds each fetch: one deadline over connecting, every
  redirect hop, the headers and the body (each blocking socket call waits at most for
  the time left, and the time is checked after each), and a cap on the bytes of each
  response body, refused from its Content-Length when announced, else as the bytes
  arrive, so an oversized body is never held whole.

img2dataset fetches with `urllib.request.urlopen(req, timeout=...)` and `.read()`: with
the guarded opener installed, its fetches get every one of these guarantees.

Private addresses are only allowed when a dataset's config says so: either named hosts
and networks (`PrivateAllowlist`, checked on every hop and on the connected address), or
all of them at once (`allow_private_urls`, the old all-or-nothing switch); never by default.
"""

from __future__ import annotations

import contextlib
import functools
import http.client
import ipaddress
import logging
import socket
import threading
import time
import urllib.parse
import urllib.request
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from shardkit.addresses import (  # PrivateAllowlist and is_public_address are re-exported for the downloaders
    ANY_PRIVATE, NO_PRIVATE, Address, PrivateAllowlist, is_localhost_name, is_public, is_public_address,
    literal_address, parse_address, valid_hostname,
)

logger = logging.getLogger(__name__)

REASON_SCHEME = "unsafe_url:scheme"
REASON_PRIVATE = "unsafe_url:private_address"
REASON_HOST = "unsafe_url:bad_host"
REASON_REDIRECT = "unsafe_url:redirect_refused"
REASON_DEADLINE = "deadline"
REASON_TOO_LARGE = "too_large"

ALLOWED_SCHEMES = frozenset({"http", "https"})

# Bound at import so tests can swap the resolver here without touching the socket
# module that real connections use.
_getaddrinfo = socket.getaddrinfo

_RESOLVE_CACHE_SIZE = 8192



class UnsafeURLError(Exception):
    """A fetch refused by the policy.

    Deliberately not an OSError: urllib wraps OSErrors raised while connecting in
    URLError("<urlopen error ...>"), which would hide the reason at the start of
    the message that downloaders record.
    """

    def __init__(self, reason: str, detail: str, url: str | None = None) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.url = url


class DownloadLimitError(Exception):
    """A fetch stopped by its deadline (`deadline`) or its size cap (`too_large`).

    Not an OSError, for the same reason as UnsafeURLError: the message starts with the
    reason, which is what downloaders (img2dataset) record.
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


# ---------------------------------------------------------------------------
# Resolution

_resolve_cache: OrderedDict[str, tuple[str, ...]] = OrderedDict()
_resolve_lock = threading.Lock()


def clear_resolve_cache() -> None:
    with _resolve_lock:
        _resolve_cache.clear()


def _resolve(host: str) -> tuple[str, ...]:
    """Addresses `host` resolves to (LRU-cached); raises OSError when it does not."""
    with _resolve_lock:
        cached = _resolve_cache.get(host)
        if cached is not None:
            _resolve_cache.move_to_end(host)
            return cached
    # Looked up outside the lock so one slow name server does not stall every thread.
    # Failures are not cached: a transient DNS error should not condemn a host.
    infos = _getaddrinfo(host, None, 0, socket.SOCK_STREAM)
    addresses = tuple(sorted({str(info[4][0]) for info in infos}))
    if not addresses:
        raise OSError(f"no addresses for {host}")
    with _resolve_lock:
        _resolve_cache[host] = addresses
        _resolve_cache.move_to_end(host)
        while len(_resolve_cache) > _RESOLVE_CACHE_SIZE:
            _resolve_cache.popitem(last=False)
    return addresses


def _as_allowlist(allow_private: bool | PrivateAllowlist | None) -> PrivateAllowlist:
    if isinstance(allow_private, PrivateAllowlist):
        return allow_private
    return ANY_PRIVATE if allow_private else NO_PRIVATE


def _admitted(addr: Address, host: str | None, allow: PrivateAllowlist) -> bool:
    return is_public(addr) or allow.admits(addr, host)


# ---------------------------------------------------------------------------
# The policy

def check_url(url: str, allow_private: bool | PrivateAllowlist = False,
              resolve: bool = True) -> tuple[str, str] | None:
    """None when `url` may be fetched, else (reason, detail).

    Literal addresses (any form a resolver accepts) are judged directly; names are
    resolved when `resolve` and every address must be public or admitted by the
    allowlist. `allow_private=True` (every private address) checks only the scheme and
    the host's syntax; a PrivateAllowlist admits its hosts and networks only.
    """
    allow = _as_allowlist(allow_private)
    if not isinstance(url, str):
        return REASON_SCHEME, f"not a URL string: {type(url).__name__}"
    # urllib.request.Request strips surrounding whitespace too; judge the URL it would use.
    url = url.strip()
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError as err:
        # Raised for malformed bracketed hosts ("http://[evil]/").
        return REASON_HOST, f"unparsable URL: {err}"
    scheme = parts.scheme.lower()
    if scheme not in ALLOWED_SCHEMES:
        return REASON_SCHEME, f"scheme {scheme!r} not allowed" if scheme else "no scheme"

    netloc = parts.netloc
    if "@" in netloc:
        # Credentials could reach whatever host they were written for; and "a@b" is
        # a classic way to make a URL look like it points elsewhere.
        return REASON_HOST, "credentials in URL"
    try:
        parts.port  # noqa: B018 - raises on an out-of-range or non-numeric port
    except ValueError as err:
        return REASON_HOST, f"bad port: {err}"
    host = parts.hostname or ""
    if host.endswith("."):
        host = host[:-1]
    if not host:
        return REASON_HOST, "no host"
    bracketed = netloc.startswith("[")

    address, is_literal = literal_address(host, bracketed)
    if is_literal:
        if address is None:
            return REASON_HOST, f"malformed address {host!r}"
        if not _admitted(address, None, allow):
            return REASON_PRIVATE, str(address)
        return None

    name = valid_hostname(host)
    if name is None:
        return REASON_HOST, f"invalid host {host!r}"
    if allow.everything:
        return None
    if is_localhost_name(name):
        # RFC 6761: loopback whatever DNS says; the peer check judges the address used
        if allow.admits(ipaddress.IPv4Address("127.0.0.1"), name) or allow.admits(ipaddress.IPv6Address("::1"), name):
            return None
        return REASON_PRIVATE, name
    if not resolve:
        return None
    try:
        addresses = _resolve(name)
    except (OSError, UnicodeError, ValueError) as err:
        return REASON_HOST, f"unresolvable host {name}: {err}"
    for resolved in addresses:
        addr = parse_address(resolved)
        if addr is None or not _admitted(addr, name, allow):
            return REASON_PRIVATE, f"{name} -> {resolved}"
    return None


# ---------------------------------------------------------------------------
# Download limits

CHUNK = 1 << 16
"""Bytes asked of the socket per read: a body is read in pieces of at most this, so the
deadline and the size cap are checked between them."""


@dataclass(frozen=True)
class FetchLimits:
    """Bounds of one fetch. `deadline_s`: seconds from the start of the request (the
    first hop) to the last byte of the body, redirects included; `max_bytes`: bytes of any
    one response body (a Content-Length above it is refused before the body is read).
    None: unbounded (the per-operation socket timeout still applies)."""

    deadline_s: float | None = None
    max_bytes: int | None = None

    def start(self) -> "_Budget":
        return _Budget(self, None if self.deadline_s is None else time.monotonic() + self.deadline_s)


NO_LIMITS = FetchLimits()


@dataclass
class _Budget:
    """One fetch's deadline (absolute, monotonic) and its size cap, shared by its hops."""

    limits: FetchLimits
    deadline: float | None

    @property
    def max_bytes(self) -> int | None:
        return self.limits.max_bytes

    def remaining(self) -> float | None:
        return None if self.deadline is None else self.deadline - time.monotonic()

    def expired(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline

    def deadline_error(self, received: int | None = None) -> DownloadLimitError:
        got = "" if received is None else f" ({received} bytes of the body received)"
        return DownloadLimitError(REASON_DEADLINE, f"not done within {self.limits.deadline_s:g} s{got}")

    def too_large(self, detail: str) -> DownloadLimitError:
        return DownloadLimitError(REASON_TOO_LARGE, f"{detail}; the limit is {self.limits.max_bytes} bytes")


def _timeout_value(timeout: Any) -> float | None:
    return float(timeout) if isinstance(timeout, (int, float)) and not isinstance(timeout, bool) else None


class _BoundedReader:
    """Stands in for an HTTPResponse's buffered socket file (its `fp`), through which
    http.client reads the status line, the headers, chunk framing and the body.

    Every call does at most one blocking socket read (read1/readinto1/peek on the
    buffer), with the socket's timeout first lowered to the time left before the deadline;
    loops that need more (read(n), readline) are made here of such calls, checking the
    deadline between them. Bytes after the headers are counted (chunk framing included)
    and refused past the cap, so no read ever holds more than the cap plus one chunk.
    """

    def __init__(self, fp: Any, sock: socket.socket, budget: _Budget) -> None:
        self._fp = fp
        self._sock = sock
        self._budget = budget
        self._op_timeout = _timeout_value(sock.gettimeout())
        self.counting = False
        self.received = 0

    def _arm(self) -> None:
        remaining = self._budget.remaining()
        if remaining is None:
            return
        if remaining <= 0:
            raise self._budget.deadline_error(self.received if self.counting else None)
        timeout = remaining if self._op_timeout is None else min(self._op_timeout, remaining)
        try:
            self._sock.settimeout(timeout)
        except OSError:  # already closed: the read below says so
            pass

    def _io(self, call: Any, *args: Any) -> Any:
        self._arm()
        try:
            return call(*args)
        except (OSError, ValueError):
            # a timeout we set to the time left, or a socket closed under us at the end
            if self._budget.expired():
                raise self._budget.deadline_error(self.received if self.counting else None) from None
            raise

    def _count(self, n: int) -> None:
        if not self.counting:
            return
        self.received += n
        cap = self._budget.max_bytes
        if cap is not None and self.received > cap:
            raise self._budget.too_large(f"more than {cap} bytes received")

    def read1(self, n: int = -1) -> bytes:
        data = self._io(self._fp.read1, CHUNK if n is None or n < 0 else min(n, CHUNK))
        self._count(len(data))
        return data

    def read(self, n: int | None = -1) -> bytes:
        parts: list[bytes] = []
        got = 0
        while n is None or n < 0 or got < n:
            data = self._io(self._fp.read1, CHUNK if n is None or n < 0 else min(CHUNK, n - got))
            if not data:
                break
            self._count(len(data))
            parts.append(data)
            got += len(data)
        return b"".join(parts)

    def readinto(self, b: Any) -> int:
        view = memoryview(b).cast("B")
        got = 0
        while got < len(view):
            n = self._io(self._fp.readinto1, view[got:got + CHUNK])
            if not n:
                break
            self._count(n)
            got += n
        return got

    def readinto1(self, b: Any) -> int:
        view = memoryview(b).cast("B")
        n = self._io(self._fp.readinto1, view[:CHUNK])
        self._count(n)
        return n

    def readline(self, limit: int | None = -1) -> bytes:
        line = bytearray()
        while limit is None or limit < 0 or len(line) < limit:
            buffered = self._io(self._fp.peek, 1)
            if not buffered:
                break
            want = len(buffered) if limit is None or limit < 0 else min(len(buffered), limit - len(line))
            end = buffered.find(b"\n", 0, want)
            data = self._fp.read(end + 1 if end >= 0 else want)  # already buffered: no socket read
            self._count(len(data))
            line += data
            if end >= 0:
                break
        return bytes(line)

    def peek(self, n: int = 0) -> bytes:
        return self._io(self._fp.peek, n)

    def close(self) -> None:
        self._fp.close()

    @property
    def closed(self) -> bool:
        return self._fp.closed

    def __getattr__(self, name: str) -> Any:  # flush, fileno, readable ...
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._fp, name)


class _GuardedResponse(http.client.HTTPResponse):
    """An HTTPResponse read through _BoundedReader, refusing an announced oversized body
    before reading it."""

    def __init__(self, sock: socket.socket, debuglevel: int = 0, method: str | None = None,
                 url: str | None = None, *, budget: _Budget) -> None:
        super().__init__(sock, debuglevel, method, url)
        self._budget = budget
        self.fp = _BoundedReader(self.fp, sock, budget)

    def begin(self) -> None:
        super().begin()
        cap = self._budget.max_bytes
        if cap is not None and self.length is not None and self.length > cap:
            raise self._budget.too_large(f"Content-Length is {self.length} bytes")
        if isinstance(self.fp, _BoundedReader):
            self.fp.counting = True


# ---------------------------------------------------------------------------
# The guarded opener

def _refuse(url: str | None, reason: str, detail: str) -> UnsafeURLError:
    logger.debug("refused %s: %s: %s", url, reason, detail)
    return UnsafeURLError(reason, detail, url)


@contextlib.contextmanager
def _deadline_on_error(budget: "_Budget") -> Iterator[None]:
    """A socket error once the deadline has passed is the deadline's doing: say so."""
    try:
        yield
    except OSError:
        if budget.expired():
            raise budget.deadline_error() from None
        raise


class _PeerCheckedHTTPConnection(http.client.HTTPConnection):
    """Refuses the connection when the peer it reached is neither public nor admitted by
    the allowlist, and bounds connecting, sending and the response by the fetch's budget.

    The peer is checked after connecting, on the socket itself, so no DNS answer given
    between check_url and the fetch can steer it. For HTTPS this runs before the TLS
    handshake (see the MRO of _GuardedHTTPSConnection), so nothing is sent to the peer.
    Set up by `_guard` after construction: HTTPSConnection's constructor takes no extra
    arguments.
    """

    _allow: PrivateAllowlist = NO_PRIVATE
    _budget: _Budget = NO_LIMITS.start()

    def _guard(self, allow: PrivateAllowlist, budget: _Budget) -> "_PeerCheckedHTTPConnection":
        self._allow, self._budget = allow, budget
        self.response_class = functools.partial(_GuardedResponse, budget=budget)
        return self

    def _tcp_timeout(self) -> None:
        remaining = self._budget.remaining()
        if remaining is None:
            return
        if remaining <= 0:
            raise self._budget.deadline_error()
        own = _timeout_value(self.timeout)
        self.timeout = remaining if own is None else min(own, remaining)

    def connect(self) -> None:
        self._tcp_timeout()
        with _deadline_on_error(self._budget):
            super().connect()
        if self._allow.everything:
            return
        try:
            peer = self.sock.getpeername()[0]
        except OSError as err:
            self.close()
            raise _refuse(self.host, REASON_HOST, f"no peer address: {err}") from None
        if is_public_address(peer):
            return
        if not self._allow.admits(peer, self.host):
            self.close()
            raise _refuse(self.host, REASON_PRIVATE, str(peer).split("%", 1)[0])

    def send(self, data: Any) -> None:
        with _deadline_on_error(self._budget):
            super().send(data)


class _GuardedHTTPSConnection(http.client.HTTPSConnection, _PeerCheckedHTTPConnection):
    # MRO: HTTPSConnection.connect -> _PeerCheckedHTTPConnection.connect ->
    # HTTPConnection.connect, so the peer check sits between TCP connect and TLS; the
    # handshake runs under the socket timeout that connect lowered to the time left.
    def connect(self) -> None:
        with _deadline_on_error(self._budget):
            super().connect()


def _connection_factory(cls: type, allow: PrivateAllowlist, budget: _Budget) -> Any:
    def make(*args: Any, **kwargs: Any) -> http.client.HTTPConnection:
        return cls(*args, **kwargs)._guard(allow, budget)
    return make


class _GuardedOpener(urllib.request.OpenerDirector):
    """Starts a budget (deadline and cap) for each outermost open() on a thread; redirects
    followed inside it (nested opens) spend the same one."""

    def __init__(self, limits: FetchLimits) -> None:
        super().__init__()
        self.limits = limits
        self._local = threading.local()

    def current_budget(self) -> _Budget:
        budget = getattr(self._local, "budget", None)
        return budget if budget is not None else self.limits.start()

    @contextlib.contextmanager
    def one_fetch(self) -> Iterator[None]:
        """Every open() in the block (e.g. a HEAD then a GET of one file) shares one budget."""
        outer = getattr(self._local, "budget", None) is None
        if outer:
            self._local.budget = self.limits.start()
        try:
            yield
        finally:
            if outer:
                self._local.budget = None

    def open(self, fullurl: Any, data: Any = None, timeout: Any = socket._GLOBAL_DEFAULT_TIMEOUT) -> Any:
        with self.one_fetch():
            return super().open(fullurl, data, timeout)


class _GuardedHTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, allow: PrivateAllowlist) -> None:
        super().__init__()
        self._allow = allow

    def do_open(self, http_class: Any, req: urllib.request.Request, **kwargs: Any) -> Any:
        budget = self.parent.current_budget() if isinstance(self.parent, _GuardedOpener) else NO_LIMITS.start()
        return super().do_open(_connection_factory(_PeerCheckedHTTPConnection, self._allow, budget), req, **kwargs)


class _GuardedHTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, allow: PrivateAllowlist, context: Any = None) -> None:
        super().__init__(context=context)
        self._allow = allow

    def do_open(self, http_class: Any, req: urllib.request.Request, **kwargs: Any) -> Any:
        # The parent's https_open passes the TLS arguments its Python version expects.
        budget = self.parent.current_budget() if isinstance(self.parent, _GuardedOpener) else NO_LIMITS.start()
        return super().do_open(_connection_factory(_GuardedHTTPSConnection, self._allow, budget), req, **kwargs)


class _PrecheckHandler(urllib.request.BaseHandler):
    """Refuses, before connecting, what the URL alone shows to be unsafe.

    Runs for the first request and for every redirect. It does not resolve names:
    the peer check sees the address actually used, and resolving here would only
    double the DNS traffic.
    """

    def __init__(self, allow: PrivateAllowlist) -> None:
        self._allow = allow

    def http_request(self, req: urllib.request.Request) -> urllib.request.Request:
        refused = check_url(req.full_url, allow_private=self._allow, resolve=False)
        if refused:
            raise _refuse(req.full_url, *refused)
        return req

    https_request = http_request


class _RefuseOtherSchemes(urllib.request.BaseHandler):
    # Without a handler for the scheme OpenerDirector would return None, and the
    # default opener's file:, ftp: and data: handlers are deliberately left out.
    def unknown_open(self, req: urllib.request.Request) -> None:
        raise _refuse(req.full_url, REASON_SCHEME, f"scheme {req.type!r} not allowed")


class _GuardedRedirectHandler(urllib.request.HTTPRedirectHandler):
    """Every redirect target is judged like a URL of its own (scheme, host, literal
    address against the allowlist) before it is followed; a refusal is recorded as
    `unsafe_url:redirect_refused`, naming the target and why."""

    def __init__(self, allow: PrivateAllowlist) -> None:
        self._allow = allow

    def http_error_302(self, req: urllib.request.Request, fp: Any, code: int, msg: str,
                       headers: Any) -> Any:
        # Checked before the parent, which would turn a file: target into an HTTPError
        # whose message does not carry the reason (and lets ftp: through).
        location = headers.get("location") or headers.get("uri")
        if location:
            target = urllib.parse.urljoin(req.full_url, location)
            refused = check_url(target, allow_private=self._allow, resolve=False)
            if refused:
                fp.close()
                reason, detail = refused
                raise _refuse(target, REASON_REDIRECT, f"redirect to {target}: {reason}: {detail}")
        return super().http_error_302(req, fp, code, msg, headers)

    # The parent aliases these to its own http_error_302, bypassing the override.
    http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302


def build_guarded_opener(allow_private: bool | PrivateAllowlist = False, limits: FetchLimits = NO_LIMITS,
                         ssl_context: Any = None) -> _GuardedOpener:
    """An opener that fetches only http(s) from public peers (or those the allowlist
    admits), each open() within `limits`. `ssl_context`: for a private CA (and tests).

    Proxies from the environment are not used: through a proxy the peer is the proxy,
    and the peer check could no longer see where the request goes.
    """
    allow = _as_allowlist(allow_private)
    opener = _GuardedOpener(limits)
    for handler in (
        _PrecheckHandler(allow),
        _GuardedHTTPHandler(allow),
        _GuardedHTTPSHandler(allow, ssl_context),
        _GuardedRedirectHandler(allow),
        _RefuseOtherSchemes(),
        urllib.request.HTTPDefaultErrorHandler(),
        urllib.request.HTTPErrorProcessor(),
    ):
        opener.add_handler(handler)
    return opener


@contextlib.contextmanager
def guarded_urlopen(allow_private: bool | PrivateAllowlist = False, limits: FetchLimits = NO_LIMITS,
                    ssl_context: Any = None) -> Iterator[_GuardedOpener]:
    """Route urllib.request.urlopen through the guarded opener for the block.

    Process-global (urllib has one installed opener): enter it from the thread that
    starts the downloads; worker threads only call urlopen, and each urlopen call gets
    its own budget. Worker processes see it only if they are forked inside the block.
    urlopen(..., context=...) builds its own opener and is not guarded.
    """
    previous = getattr(urllib.request, "_opener", None)
    opener = build_guarded_opener(allow_private, limits, ssl_context)
    urllib.request.install_opener(opener)
    logger.debug("guarded urlopen installed (allow=%s, limits=%s)", allow_private, limits)
    try:
        yield opener
    finally:
        if getattr(urllib.request, "_opener", None) is not opener:
            logger.warning("urllib opener was replaced inside guarded_urlopen; restoring the one from before")
        urllib.request.install_opener(previous)
