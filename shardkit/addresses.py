"""Which addresses and hosts are public, and which private ones a dataset may reach.

Pure standard library, so the config schema can check `allowed_private` entries when the
config loads (shardkit.config) and the downloaders enforce the same rules when they fetch
(curation.urls, which adds resolution, redirects and connection checks on top).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


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


def parse_address(ip: Any) -> Address | None:
    if isinstance(ip, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
        return ip
    if not isinstance(ip, str):
        return None
    # Zone ids ("fe80::1%eth0") name an interface, not a different address.
    try:
        return ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return None


def is_public(addr: Address) -> bool:
    if isinstance(addr, ipaddress.IPv6Address):
        # Addresses that embed an IPv4 one end up at that IPv4 host, so judge that.
        if addr.ipv4_mapped is not None:
            return is_public(addr.ipv4_mapped)
        if addr.sixtofour is not None:
            return is_public(addr.sixtofour)
        if addr in _NAT64_WKP:
            return is_public(ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF))
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
    addr = parse_address(ip)
    return addr is not None and is_public(addr)


# ---------------------------------------------------------------------------
# Hosts

NUMBER_LABEL = re.compile(r"(?:0[xX][0-9a-fA-F]*|[0-9]+)")
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


def literal_address(host: str, bracketed: bool) -> tuple[Address | None, bool]:
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
    if NUMBER_LABEL.fullmatch(host.rsplit(".", 1)[-1]):
        return _parse_lenient_ipv4(host), True
    return None, False


def valid_hostname(host: str) -> str | None:
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


def is_localhost_name(host: str) -> bool:
    # RFC 6761: these always mean this machine, whatever DNS says.
    return host == "localhost" or host.endswith(".localhost")


# ---------------------------------------------------------------------------
# Which private hosts may be fetched

def canonical(addr: Address) -> Address:
    """IPv4-mapped IPv6 (::ffff:10.0.0.1) is the IPv4 host it names."""
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def normal_host(host: str) -> str:
    host = host.strip().lower()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host[:-1] if host.endswith(".") else host


@dataclass(frozen=True)
class PrivateAllowlist:
    """The non-public hosts a dataset may fetch from: `networks` (addresses and CIDR
    networks, matched against literal URL hosts, resolved addresses and connected peers)
    and `hosts` (exact DNS names whose addresses may be private: whatever their DNS says,
    except link-local addresses such as cloud metadata, which only a network entry admits).
    `everything` is the old `allow_private_urls: true`: any address, any redirect."""

    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    hosts: frozenset[str] = field(default_factory=frozenset)
    everything: bool = False

    @classmethod
    def parse(cls, entries: Iterable[str] = (), everything: bool = False) -> "PrivateAllowlist":
        """From config entries such as "127.0.0.1", "10.0.0.0/8", "fd00::/8", "mirror.internal".
        Raises ValueError naming the first entry that is neither an address, a network nor a
        host name (ports, schemes and wildcards are not accepted)."""
        networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        hosts: set[str] = set()
        for entry in entries:
            if not isinstance(entry, str) or not entry.strip():
                raise ValueError(f"{entry!r}: expected a host name, an address or a CIDR network")
            text = normal_host(entry)
            try:
                network = ipaddress.ip_network(text.split("%", 1)[0])
            except ValueError as err:
                if "/" in text or ":" in text or NUMBER_LABEL.fullmatch(text.rsplit(".", 1)[-1]):
                    # looks like an address or network but is not one (host bits set, a port...)
                    raise ValueError(f"{entry!r}: not an address or CIDR network ({err}); "
                                     "give a host name, an address or a network, without port or scheme") from None
                name = valid_hostname(text)
                if name is None:
                    raise ValueError(f"{entry!r}: not a valid host name, address or CIDR network") from None
                hosts.add(name)
                continue
            if isinstance(network, ipaddress.IPv6Network) and network.prefixlen >= 96 \
                    and network.network_address.ipv4_mapped is not None:
                # ::ffff:10.0.0.1 is 10.0.0.1: match it where peers are compared (as IPv4)
                network = ipaddress.IPv4Network((network.network_address.ipv4_mapped, network.prefixlen - 96))
            networks.append(network)
        return cls(tuple(networks), frozenset(hosts), everything)

    def __bool__(self) -> bool:
        return self.everything or bool(self.networks or self.hosts)

    def admits(self, address: Address | str, host: str | None = None) -> bool:
        """Whether a non-public `address`, reached for the URL host `host`, may be fetched."""
        if self.everything:
            return True
        addr = parse_address(address)
        if addr is None:
            return False
        addr = canonical(addr)
        if any(addr.version == net.version and addr in net for net in self.networks):
            return True
        return host is not None and normal_host(host) in self.hosts and not addr.is_link_local


NO_PRIVATE = PrivateAllowlist()
ANY_PRIVATE = PrivateAllowlist(everything=True)
