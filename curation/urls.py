"""URL safety policy for downloads: only http(s) URLs to public addresses are fetched.

Dataset rows come from the open web (LAION parquet rows are scraped, not vetted), so
a URL can point at cloud metadata (169.254.169.254), the cluster's own services or a
local file. Two layers keep that out:

* `check_url` filters URLs before they are handed to a downloader. It catches
  everything visible in the URL itself plus what DNS says at that moment.
* `guarded_urlopen` installs a urllib opener that checks the address the socket is
  actually connected to. DNS can change between the check and the fetch (rebinding),
  and redirects can point anywhere, so the peer check is the authoritative one.

Private addresses are only allowed when a dataset's config says so (the tests'
loopback server); never by default.
"""

from __future__ import annotations

import contextlib
import functools
import http.client
import ipaddress
import logging
import re
import socket
import threading
import urllib.parse
import urllib.request
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

logger = logging.getLogger(__name__)

REASON_SCHEME = "unsafe_url:scheme"
REASON_PRIVATE = "unsafe_url:private_address"
REASON_HOST = "unsafe_url:bad_host"

ALLOWED_SCHEMES = frozenset({"http", "https"})

# Bound at import so tests can swap the resolver here without touching the socket
# module that real connections use.
_getaddrinfo = socket.getaddrinfo

_RESOLVE_CACHE_SIZE = 8192

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


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


# ---------------------------------------------------------------------------
# Addresses

# Listed explicitly rather than trusting ipaddress.is_global alone: its tables differ
# between Python patch releases and it calls multicast (224/4) global.
_NON_PUBLIC_V4 = tuple(ipaddress.IPv4Network(n) for n in (
    "0.0.0.0/8",          # "this network"; 0.0.0.0 reaches the local host on Linux
    "10.0.0.0/8",
    "100.64.0.0/10",      # CGNAT: provider-internal
    "127.0.0.0/8",
    "169.254.0.0/16",     # link-local, incl. cloud metadata endpoints
    "172.16.0.0/12",
    "192.0.0.0/24",
    "192.0.2.0/24",
    "192.88.99.0/24",     # deprecated 6to4 relay anycast
    "192.168.0.0/16",
    "198.18.0.0/15",
    "198.51.100.0/24",
    "203.0.113.0/24",
    "224.0.0.0/4",        # multicast
    "240.0.0.0/4",        # reserved, incl. 255.255.255.255
))
_NON_PUBLIC_V6 = tuple(ipaddress.IPv6Network(n) for n in (
    "::/8",               # unspecified, loopback, IPv4-compatible (deprecated)
    "64:ff9b:1::/48",     # local-use NAT64
    "100::/64",           # discard-only
    "2001::/23",          # IETF protocol assignments, incl. Teredo
    "2001:db8::/32",      # documentation
    "fc00::/7",           # unique local
    "fe80::/10",          # link-local
    "fec0::/10",          # deprecated site-local, still routed by some stacks
    "ff00::/8",           # multicast
))
_NAT64_WKP = ipaddress.IPv6Network("64:ff9b::/96")


def _parse_address(ip: Any) -> Address | None:
    if isinstance(ip, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
        return ip
    if not isinstance(ip, str):
        return None
    # Zone ids ("fe80::1%eth0") name an interface, not a different address.
    try:
        return ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return None


def _public(addr: Address) -> bool:
    if isinstance(addr, ipaddress.IPv6Address):
        # Addresses that embed an IPv4 one end up at that IPv4 host, so judge that.
        if addr.ipv4_mapped is not None:
            return _public(addr.ipv4_mapped)
        if addr.sixtofour is not None:
            return _public(addr.sixtofour)
        if addr in _NAT64_WKP:
            return _public(ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF))
        if any(addr in net for net in _NON_PUBLIC_V6):
            return False
    elif any(addr in net for net in _NON_PUBLIC_V4):
        return False
    return not (addr.is_private or addr.is_loopback or addr.is_link_local or addr.is_multicast
                or addr.is_reserved or addr.is_unspecified or not addr.is_global)


def is_public_address(ip: str) -> bool:
    """True when `ip` (a literal address) is routable on the public internet.

    Anything unparsable is not public: callers use this to decide whether to fetch.
    """
    addr = _parse_address(ip)
    return addr is not None and _public(addr)


# ---------------------------------------------------------------------------
# Hosts

_NUMBER_LABEL = re.compile(r"(?:0[xX][0-9a-fA-F]*|[0-9]+)")
_HOST_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?")


def _parse_ipv4_number(part: str) -> int | None:
    """One dotted part as inet_aton reads it: 0x hex, leading-0 octal, else decimal."""
    try:
        if part[:2].lower() == "0x":
            return int(part[2:], 16) if len(part) > 2 else 0
        if len(part) > 1 and part.startswith("0"):
            return int(part[1:], 8)
        return int(part, 10)
    except ValueError:
        return None


def _parse_lenient_ipv4(host: str) -> ipaddress.IPv4Address | None:
    """inet_aton forms: 2130706433, 0x7f000001, 0177.0.0.1, 127.1, 0x7f.1 ...

    Resolvers (glibc getaddrinfo) and browsers accept these, so they must be judged
    as the address they denote, not as names.
    """
    parts = host.split(".")
    if not 1 <= len(parts) <= 4 or any(p == "" for p in parts):
        return None
    numbers = [_parse_ipv4_number(p) for p in parts]
    if any(n is None for n in numbers):
        return None
    *head, last = numbers
    # The last part fills every byte the earlier parts did not.
    if any(n > 255 for n in head) or last >= 256 ** (4 - len(head)):
        return None
    value = last
    for i, n in enumerate(head):
        value |= n << (8 * (3 - i))
    return ipaddress.IPv4Address(value)


def _literal_address(host: str, bracketed: bool) -> tuple[Address | None, bool]:
    """(address, is_literal). is_literal with address None means a malformed literal."""
    if bracketed:
        try:
            return ipaddress.IPv6Address(host.split("%", 1)[0]), True
        except ValueError:
            return None, True
    try:
        return ipaddress.IPv4Address(host), True
    except ValueError:
        pass
    # As in the WHATWG URL standard: a host whose last label is a number is an IPv4
    # address or invalid, never a name to look up.
    if _NUMBER_LABEL.fullmatch(host.rsplit(".", 1)[-1]):
        return _parse_lenient_ipv4(host), True
    return None, False


def _valid_hostname(host: str) -> str | None:
    """The ASCII form of a syntactically valid DNS name, else None."""
    if not host.isascii():
        try:
            host = host.encode("idna").decode("ascii")
        except UnicodeError:
            return None
    if len(host) > 253:
        return None
    labels = host.split(".")
    if not all(_HOST_LABEL.fullmatch(label) for label in labels):
        return None
    return host


def _is_localhost_name(host: str) -> bool:
    # RFC 6761: these always mean this machine, whatever DNS says.
    return host == "localhost" or host.endswith(".localhost")


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


# ---------------------------------------------------------------------------
# The policy

def check_url(url: str, allow_private: bool = False, resolve: bool = True) -> tuple[str, str] | None:
    """None when `url` may be fetched, else (reason, detail).

    Literal addresses (any form a resolver accepts) are judged directly; names are
    resolved when `resolve` and every address must be public. With `allow_private`
    only the scheme and the host's syntax are checked.
    """
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

    address, is_literal = _literal_address(host, bracketed)
    if is_literal:
        if address is None:
            return REASON_HOST, f"malformed address {host!r}"
        if not allow_private and not _public(address):
            return REASON_PRIVATE, str(address)
        return None

    name = _valid_hostname(host)
    if name is None:
        return REASON_HOST, f"invalid host {host!r}"
    if allow_private:
        return None
    if _is_localhost_name(name):
        return REASON_PRIVATE, name
    if not resolve:
        return None
    try:
        addresses = _resolve(name)
    except (OSError, UnicodeError, ValueError) as err:
        return REASON_HOST, f"unresolvable host {name}: {err}"
    for resolved in addresses:
        if not is_public_address(resolved):
            return REASON_PRIVATE, f"{name} -> {resolved}"
    return None


# ---------------------------------------------------------------------------
# The guarded opener

def _refuse(url: str | None, reason: str, detail: str) -> UnsafeURLError:
    logger.debug("refused %s: %s: %s", url, reason, detail)
    return UnsafeURLError(reason, detail, url)


class _PeerCheckedHTTPConnection(http.client.HTTPConnection):
    """Refuses the connection when the peer it reached is not public.

    Checked after connecting, on the socket itself, so no DNS answer given between
    check_url and the fetch can steer it. For HTTPS this runs before the TLS
    handshake (see the MRO of _GuardedHTTPSConnection), so nothing is sent to the peer.
    """

    def __init__(self, *args: Any, allow_private: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._allow_private = allow_private

    def connect(self) -> None:
        super().connect()
        if self._allow_private:
            return
        try:
            peer = self.sock.getpeername()[0]
        except OSError as err:
            self.close()
            raise _refuse(self.host, REASON_HOST, f"no peer address: {err}") from None
        if not is_public_address(peer):
            self.close()
            raise _refuse(self.host, REASON_PRIVATE, str(peer).split("%", 1)[0])


class _GuardedHTTPSConnection(http.client.HTTPSConnection, _PeerCheckedHTTPConnection):
    # MRO: HTTPSConnection.connect -> _PeerCheckedHTTPConnection.connect ->
    # HTTPConnection.connect, so the peer check sits between TCP connect and TLS.
    pass


class _GuardedHTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, allow_private: bool) -> None:
        super().__init__()
        self._allow_private = allow_private

    def do_open(self, http_class: Any, req: urllib.request.Request, **kwargs: Any) -> Any:
        conn = functools.partial(_PeerCheckedHTTPConnection, allow_private=self._allow_private)
        return super().do_open(conn, req, **kwargs)


class _GuardedHTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, allow_private: bool) -> None:
        super().__init__()
        self._allow_private = allow_private

    def do_open(self, http_class: Any, req: urllib.request.Request, **kwargs: Any) -> Any:
        # The parent's https_open passes the TLS arguments its Python version expects.
        conn = functools.partial(_GuardedHTTPSConnection, allow_private=self._allow_private)
        return super().do_open(conn, req, **kwargs)


class _PrecheckHandler(urllib.request.BaseHandler):
    """Refuses, before connecting, what the URL alone shows to be unsafe.

    Runs for the first request and for every redirect. It does not resolve names:
    the peer check sees the address actually used, and resolving here would only
    double the DNS traffic.
    """

    def __init__(self, allow_private: bool) -> None:
        self._allow_private = allow_private

    def http_request(self, req: urllib.request.Request) -> urllib.request.Request:
        refused = check_url(req.full_url, allow_private=self._allow_private, resolve=False)
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
    def __init__(self, allow_private: bool) -> None:
        self._allow_private = allow_private

    def http_error_302(self, req: urllib.request.Request, fp: Any, code: int, msg: str,
                       headers: Any) -> Any:
        # Checked before the parent, which would turn a file: target into an HTTPError
        # whose message does not carry the reason (and lets ftp: through).
        location = headers.get("location") or headers.get("uri")
        if location:
            target = urllib.parse.urljoin(req.full_url, location)
            refused = check_url(target, allow_private=self._allow_private, resolve=False)
            if refused:
                fp.close()
                reason, detail = refused
                raise _refuse(target, reason, f"redirect to {target}: {detail}")
        return super().http_error_302(req, fp, code, msg, headers)

    # The parent aliases these to its own http_error_302, bypassing the override.
    http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302


def build_guarded_opener(allow_private: bool = False) -> urllib.request.OpenerDirector:
    """An opener that fetches only http(s) from public peers (unless allow_private).

    Proxies from the environment are not used: through a proxy the peer is the proxy,
    and the peer check could no longer see where the request goes.
    """
    opener = urllib.request.OpenerDirector()
    for handler in (
        _PrecheckHandler(allow_private),
        _GuardedHTTPHandler(allow_private),
        _GuardedHTTPSHandler(allow_private),
        _GuardedRedirectHandler(allow_private),
        _RefuseOtherSchemes(),
        urllib.request.HTTPDefaultErrorHandler(),
        urllib.request.HTTPErrorProcessor(),
    ):
        opener.add_handler(handler)
    return opener


@contextlib.contextmanager
def guarded_urlopen(allow_private: bool = False) -> Iterator[None]:
    """Route urllib.request.urlopen through the guarded opener for the block.

    Process-global (urllib has one installed opener): enter it from the thread that
    starts the downloads; worker threads only call urlopen. Worker processes see it
    only if they are forked inside the block. urlopen(..., context=...) builds its own
    opener and is not guarded.
    """
    previous = getattr(urllib.request, "_opener", None)
    opener = build_guarded_opener(allow_private)
    urllib.request.install_opener(opener)
    logger.debug("guarded urlopen installed (allow_private=%s)", allow_private)
    try:
        yield
    finally:
        if getattr(urllib.request, "_opener", None) is not opener:
            logger.warning("urllib opener was replaced inside guarded_urlopen; restoring the one from before")
        urllib.request.install_opener(previous)
