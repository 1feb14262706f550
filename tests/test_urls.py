"""URL safety policy: pre-fetch checks and the guarded urllib opener.

No traffic leaves loopback: private and metadata addresses are exercised through the
checks made before connecting, names through a fake resolver, and the peer check
against a real server on 127.0.0.1.
"""

from __future__ import annotations

import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from io import BytesIO

import pytest

from curation import urls
from curation.urls import (REASON_HOST, REASON_PRIVATE, REASON_REDIRECT, REASON_SCHEME, PrivateAllowlist,
                           check_url, guarded_urlopen)

PAYLOAD = b"\x89PNG not really, but bytes\x00\x01"


def reason(url: str, **kwargs) -> str | None:
    refused = check_url(url, **kwargs)
    return refused[0] if refused else None


@pytest.mark.parametrize("url", [
    "file:///etc/passwd",
    "ftp://example.com/a.jpg",
    "ftp://",
    "data:image/png;base64,AAAA",
    "javascript:alert(1)",
    "not a url",
    "//example.com/a.jpg",
    "",
])
def test_non_http_schemes_are_refused(url):
    assert reason(url, resolve=False) == REASON_SCHEME


@pytest.mark.parametrize("url", [
    "http://169.254.169.254/latest/meta-data",
    "http://10.1.2.3/x",
    "http://192.168.0.1",
    "http://172.16.5.4",
    "http://127.0.0.1:8080/",
    "http://0.0.0.0/",
    "http://0/",
    "http://100.64.0.1/",            # CGNAT
    "http://224.0.0.1/",             # multicast
    "http://240.0.0.1/",             # reserved
    "http://[::1]/",
    "http://[::]/",
    "http://[::ffff:127.0.0.1]/",
    "http://[::ffff:a9fe:a9fe]/",    # mapped 169.254.169.254
    "http://[fc00::1]/",
    "http://[fd12:3456::1]/",
    "http://[fe80::1%25eth0]/",
    "http://[ff02::1]/",
    "http://[2002:a00:1::]/",        # 6to4 wrapping 10.0.0.1
    "http://[64:ff9b::a9fe:a9fe]/",  # NAT64 wrapping 169.254.169.254
    "http://2130706433/",            # 127.0.0.1 as one integer
    "http://2852039166/",            # 169.254.169.254 as one integer
    "http://0x7f000001/",
    "http://0x7f.1/",
    "http://0177.0.0.1/",            # octal
    "http://127.1/",
    "http://127.0.0.1./",
    "http://LOCALHOST/",
    "http://api.localhost/",
])
def test_private_literals_are_refused_without_resolving(url, monkeypatch):
    def no_dns(*args, **kwargs):
        raise AssertionError("literal addresses must not be resolved")

    monkeypatch.setattr(urls, "_getaddrinfo", no_dns)
    assert reason(url) == REASON_PRIVATE


def test_refusal_detail_names_the_address():
    assert check_url("http://0x7f.1/") == (REASON_PRIVATE, "127.0.0.1")


@pytest.mark.parametrize("url", [
    "http://user:pass@example.com/",
    "http://user@example.com/",
    "http://evil.example\\@good.example/",
    "http:///path-only",
    "http://",
    "http://example.com:99999/",
    "http://example.com:port/",
    "http://exa mple.com/",
    "http://-bad-.example/",
    "http://1.2.3.4.5/",             # ends in a number but is no address
    "http://256.1.1.1/",
    "http://[not-an-ip]/",
    "http://" + "a" * 64 + ".example/",
])
def test_bad_hosts_are_refused(url):
    assert reason(url, resolve=False) == REASON_HOST
    assert reason(url, allow_private=True) == REASON_HOST


@pytest.mark.parametrize("url", [
    "https://8.8.8.8/x.jpg",
    "HTTP://93.184.216.34:8080/a.png?x=1#y",
    "https://[2606:4700:4700::1111]/",
])
def test_public_literals_pass_without_resolving(url, monkeypatch):
    monkeypatch.setattr(urls, "_getaddrinfo", lambda *a, **k: pytest.fail("resolved a literal"))
    assert check_url(url) is None


@pytest.fixture
def fake_dns(monkeypatch) -> dict[str, int]:
    """Resolver for a few names; counts lookups to show the cache works."""
    table = {
        "evil.example": ["10.0.0.1"],
        "good.example": ["93.184.216.34"],
        "mixed.example": ["93.184.216.34", "127.0.0.1"],
        "v6.example": ["2606:4700:4700::1111", "fe80::1%eth0"],
    }
    calls: dict[str, int] = {}

    def getaddrinfo(host, port, family=0, type=0, proto=0, flags=0):
        calls[host] = calls.get(host, 0) + 1
        if host not in table:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [(socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, 0))
                for a in table[host]]

    urls.clear_resolve_cache()
    monkeypatch.setattr(urls, "_getaddrinfo", getaddrinfo)
    yield calls
    urls.clear_resolve_cache()


def test_hostnames_are_judged_by_every_resolved_address(fake_dns):
    assert check_url("http://evil.example/a.jpg") == (REASON_PRIVATE, "evil.example -> 10.0.0.1")
    assert check_url("https://good.example/a.jpg") is None
    assert reason("http://Good.Example./b.jpg") is None
    assert reason("http://mixed.example/") == REASON_PRIVATE
    assert reason("http://v6.example/") == REASON_PRIVATE
    assert reason("http://nowhere.example/") == REASON_HOST
    assert fake_dns["good.example"] == 1  # cached across calls and spellings
    # Without resolution a name is judged by syntax only; the peer check covers it.
    assert check_url("http://evil.example/", resolve=False) is None
    assert check_url("http://evil.example/", allow_private=True) is None


def test_allow_private_checks_only_scheme_and_host_syntax():
    assert check_url("http://127.0.0.1:8000/x.jpg", allow_private=True) is None
    assert check_url("http://169.254.169.254/", allow_private=True) is None
    assert check_url("http://localhost/", allow_private=True) is None
    assert reason("file:///etc/passwd", allow_private=True) == REASON_SCHEME
    assert reason("http://u:p@127.0.0.1/", allow_private=True) == REASON_HOST


def test_allowlist_admits_only_its_hosts_and_networks(fake_dns):
    allow = PrivateAllowlist.parse(["127.0.0.1", "10.0.0.0/8", "Evil.Example."])
    assert check_url("http://127.0.0.1:8000/x.jpg", allow_private=allow) is None
    assert reason("http://127.0.0.2/x.jpg", allow_private=allow) == REASON_PRIVATE
    assert check_url("http://10.200.3.4/", allow_private=allow) is None
    assert check_url("http://[::ffff:10.1.1.1]/", allow_private=allow) is None  # mapped: the IPv4 host
    assert reason("http://192.168.1.1/", allow_private=allow) == REASON_PRIVATE
    assert reason("http://169.254.169.254/", allow_private=allow) == REASON_PRIVATE
    assert check_url("http://evil.example/", allow_private=allow) is None  # a named host: its DNS is trusted
    assert check_url("http://mixed.example/", allow_private=allow) is None  # 127.0.0.1 is admitted however reached
    assert reason("http://v6.example/", allow_private=allow) == REASON_PRIVATE  # fe80::1 is not
    assert check_url("https://good.example/", allow_private=allow) is None
    assert reason("file:///etc/passwd", allow_private=allow) == REASON_SCHEME
    # localhost names are loopback: admitted when the allowlist admits loopback
    assert check_url("http://localhost:8000/", allow_private=allow) is None
    assert reason("http://localhost/", allow_private=PrivateAllowlist.parse(["10.0.0.0/8"])) == REASON_PRIVATE
    # a named host never admits link-local (cloud metadata); only a network entry does
    assert not allow.admits("169.254.169.254", "evil.example")
    assert allow.admits("10.9.9.9", "anything.example") and allow.admits("192.168.0.5", "evil.example")
    assert PrivateAllowlist.parse(["169.254.0.0/16"]).admits("169.254.169.254")
    assert PrivateAllowlist.parse(["::ffff:10.0.0.0/104"]).admits("10.3.2.1")
    assert PrivateAllowlist.parse([], everything=True).admits("169.254.169.254")


@pytest.mark.parametrize("entry", ["10.0.0.1/8", "mirror.internal:8080", "http://mirror.internal", "*.internal",
                                   "", "127.1", "1.2.3.4.5", "a b"])
def test_allowlist_entries_are_validated(entry):
    with pytest.raises(ValueError, match="^'"):
        PrivateAllowlist.parse([entry])


def test_is_public_address():
    assert urls.is_public_address("8.8.8.8")
    assert urls.is_public_address("2606:4700:4700::1111")
    for ip in ("127.0.0.1", "10.0.0.5", "169.254.169.254", "100.100.100.200", "::1",
               "::ffff:10.0.0.1", "fe80::1%eth0", "0.0.0.0", "255.255.255.255", "garbage", ""):
        assert not urls.is_public_address(ip), ip


# ---------------------------------------------------------------------------
# guarded_urlopen against a real loopback server


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - http.server's naming
        if self.path == "/file.bin":
            self.send_response(200)
            self.send_header("Content-Length", str(len(PAYLOAD)))
            self.end_headers()
            self.wfile.write(PAYLOAD)
        elif self.path.startswith("/redirect"):
            target = {"/redirect-file": "file:///etc/passwd",
                      "/redirect-ftp": "ftp://127.0.0.1/x",
                      "/redirect-local": "/file.bin"}[self.path]
            self.send_response(302)
            self.send_header("Location", target)
            self.send_header("Content-Length", "0")
            self.end_headers()
        else:
            self.send_error(404)

    def log_message(self, format, *args):  # noqa: A002
        pass


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture
def rebinding_dns(monkeypatch, server):
    """A name that passes the pre-fetch check but resolves to loopback at connect time."""
    real = socket.getaddrinfo

    def getaddrinfo(host, *args, **kwargs):
        return real("127.0.0.1" if host == "rebind.example" else host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return server.replace("127.0.0.1", "rebind.example")


def fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.read()


def test_private_peer_is_refused_by_default(server, rebinding_dns):
    with guarded_urlopen():
        # A literal loopback URL never gets as far as connecting ...
        with pytest.raises(urls.UnsafeURLError, match=f"^{REASON_PRIVATE}: 127.0.0.1$"):
            fetch(server + "/file.bin")
        # ... and a name rebinding to loopback is caught on the connected socket.
        assert check_url(rebinding_dns, resolve=False) is None
        with pytest.raises(urls.UnsafeURLError) as err:
            fetch(rebinding_dns + "/file.bin")
    assert str(err.value) == f"{REASON_PRIVATE}: 127.0.0.1"


def test_allow_private_fetches_from_loopback(server, rebinding_dns):
    with guarded_urlopen(allow_private=True):
        assert fetch(server + "/file.bin") == PAYLOAD
        assert fetch(rebinding_dns + "/file.bin") == PAYLOAD
        assert fetch(server + "/redirect-local") == PAYLOAD
        with pytest.raises(urllib.error.HTTPError):
            fetch(server + "/missing")


def test_worker_threads_use_the_installed_opener(server):
    results: list[bytes] = []
    with guarded_urlopen(allow_private=True):
        threads = [threading.Thread(target=lambda: results.append(fetch(server + "/file.bin")))
                   for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(5)
    assert results == [PAYLOAD] * 8


@pytest.mark.parametrize("allow_private", [False, True])
@pytest.mark.parametrize("path", ["/redirect-file", "/redirect-ftp"])
def test_redirects_to_other_schemes_are_refused(server, rebinding_dns, monkeypatch, allow_private, path):
    if not allow_private:
        # The default mode must reach the loopback server for its redirect handler to be
        # exercised: let the peer check pass, through a name the pre-check lets by.
        monkeypatch.setattr(urls, "is_public_address", lambda ip: True)
    base = server if allow_private else rebinding_dns
    with guarded_urlopen(allow_private=allow_private):
        with pytest.raises(urls.UnsafeURLError, match=f"^{REASON_REDIRECT}: redirect to .*: {REASON_SCHEME}: "):
            fetch(base + path)


def test_redirect_to_private_host_is_refused_before_connecting():
    handler = urls._GuardedRedirectHandler(urls.NO_PRIVATE)
    request = urllib.request.Request("https://good.example/a.jpg")
    headers = Message()
    headers["Location"] = "http://169.254.169.254/latest/meta-data"
    with pytest.raises(urls.UnsafeURLError, match=f"^{REASON_REDIRECT}: redirect to .*: {REASON_PRIVATE}: "):
        handler.http_error_301(request, BytesIO(), 301, "Moved", headers)


def test_direct_non_http_urls_are_refused():
    with guarded_urlopen(allow_private=True):
        with pytest.raises(urls.UnsafeURLError, match=f"^{REASON_SCHEME}"):
            fetch("file:///etc/passwd")
        with pytest.raises(urls.UnsafeURLError, match=f"^{REASON_HOST}: credentials"):
            fetch("http://u:p@127.0.0.1/")


def test_previous_opener_is_restored_even_on_error():
    previous = urllib.request.build_opener()
    urllib.request.install_opener(previous)
    try:
        with pytest.raises(RuntimeError):
            with guarded_urlopen():
                assert urllib.request._opener is not previous
                raise RuntimeError("boom")
        assert urllib.request._opener is previous
        urllib.request.install_opener(None)
        with guarded_urlopen(allow_private=True):
            pass
        assert urllib.request._opener is None
    finally:
        urllib.request.install_opener(None)
