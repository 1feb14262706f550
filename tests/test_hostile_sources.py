"""Hostile servers and folders: slow drips, endless bodies, redirects into the private
network, symlinks out of a folder, named pipes.

Real parts only: HTTP(S) servers on 127.0.0.1/127.0.0.2 started here, the guarded urllib
opener, img2dataset's own download function and Downloader (through `curate`, on a real
local Ray), real files, links and pipes. Deadlines and caps are set small through the same
options a config gives, so each case takes seconds.
"""

from __future__ import annotations

import io
import json
import os
import socket
import ssl
import tarfile
import threading
import time
import tracemalloc
import urllib.parse
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from curation.curate import curate, shards_output
from curation.urls import (REASON_DEADLINE, REASON_PRIVATE, REASON_REDIRECT, REASON_TOO_LARGE, DownloadLimitError,
                           FetchLimits, PrivateAllowlist, UnsafeURLError, build_guarded_opener, guarded_urlopen)
from shardkit.config import load_config
from shardkit.runner import StageError
from shardkit.shards import StageOutput

HUGE = 300 * 2**20  # a 300 MB body, streamed from a generator, never allocated
PIECE = 1 << 16
DRIP = (16, 2.0)  # 16 bytes every 2 s


def _jpeg(colour: str, size=(64, 48)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _noise_png(seed: int, size=(64, 64)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize(size, Image.NEAREST)


# ---------------------------------------------------------------------------
# A hostile server


class _Hostile(BaseHTTPRequestHandler):
    """GET paths: /ok.jpg, /drip (16 bytes every 2 s of a 4 KB body), /drip-headers (one
    header line every 2 s), /huge (300 MB, no length: read until the server closes),
    /huge-announced (300 MB with its Content-Length), /redirect-to?<url>, /sa.tar (a small
    SA-1B tar), /drip.tar. Bytes of body sent are counted per path in `server.sent`."""

    protocol_version = "HTTP/1.0"  # bodies without a length end when the server closes

    def log_message(self, format, *args):  # noqa: A002
        pass

    def _count(self, n: int) -> None:
        with self.server.lock:
            self.server.sent[self.path] = self.server.sent.get(self.path, 0) + n

    def _body(self, data: bytes, content_type: str = "image/jpeg") -> None:
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
            self._count(len(data))

    def _stream(self, total: int, announce: bool) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        if announce:
            self.send_header("Content-Length", str(total))
        self.end_headers()
        if self.command == "HEAD":
            return
        piece = b"\xff" * PIECE
        chunks = (piece for _ in range(total // PIECE))  # one 64 KB piece, sent again and again
        try:
            for chunk in chunks:
                self.wfile.write(chunk)
                self._count(len(chunk))
        except OSError:  # the client stopped reading: what the test wants
            pass

    def _drip(self, total: int) -> None:
        size, every = DRIP
        self.send_response(200)
        self.send_header("Content-Length", str(total))
        self.end_headers()
        if self.command == "HEAD":
            return
        try:
            for _ in range(total // size):
                self.wfile.write(b"\0" * size)
                self.wfile.flush()
                self._count(size)
                time.sleep(every)
        except OSError:
            pass

    def do_HEAD(self):  # noqa: N802
        self.do_GET()

    def do_GET(self):  # noqa: N802
        path, _, query = self.path.partition("?")
        if path == "/ok.jpg":
            self._body(self.server.jpeg)
        elif path == "/sa.tar":
            self._body(self.server.tar, "application/x-tar")
        elif path == "/drip" or path == "/drip.tar":
            self._drip(4096)
        elif path == "/drip-headers":
            try:
                self.wfile.write(b"HTTP/1.0 200 OK\r\n")
                for i in range(100):
                    self.wfile.write(f"X-Slow-{i}: y\r\n".encode())
                    self.wfile.flush()
                    time.sleep(DRIP[1])
            except OSError:
                pass
        elif path in ("/huge", "/huge.tar"):
            self._stream(HUGE, announce=False)
        elif path == "/huge-announced":
            self._stream(HUGE, announce=True)
        elif path == "/redirect-to":
            self.send_response(302)
            self.send_header("Location", urllib.parse.unquote(query))
            self.send_header("Content-Length", "0")
            self.end_headers()
        else:
            self.send_error(404)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 64


def _sa1b_tar(colours=("blue", "green")) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for i, colour in enumerate(colours, start=1):
            for name, data in ((f"sa_{i}.jpg", _jpeg(colour)),
                               (f"sa_{i}.json", json.dumps({"image": {"image_id": i}, "annotations": []}).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


class HostileServer:
    def __init__(self, host: str = "127.0.0.1", context: ssl.SSLContext | None = None) -> None:
        self.httpd = _Server((host, 0), _Hostile)
        self.httpd.sent, self.httpd.lock = {}, threading.Lock()
        self.httpd.jpeg, self.httpd.tar = _jpeg("red"), _sa1b_tar()
        if context is not None:
            self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        scheme = "https" if context is not None else "http"
        self.base = f"{scheme}://{host}:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def sent(self) -> dict[str, int]:
        return self.httpd.sent

    def __enter__(self) -> "HostileServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def hostile() -> Iterator[HostileServer]:
    with HostileServer() as server:
        yield server


@pytest.fixture(scope="module")
def elsewhere() -> Iterator[HostileServer]:
    """Another private address (127.0.0.2, loopback on Linux) that is NOT on the allowlist."""
    try:
        server = HostileServer("127.0.0.2")
    except OSError as err:
        pytest.skip(f"cannot bind 127.0.0.2: {err}")
    with server:
        yield server


LOOPBACK_ONLY = PrivateAllowlist.parse(["127.0.0.1"])


def _fetch(url: str, timeout: float = 30) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read()


# ---------------------------------------------------------------------------
# The guarded opener, and img2dataset's own fetch under it


def test_a_drip_is_cut_at_the_deadline(hostile):
    with guarded_urlopen(LOOPBACK_ONLY, FetchLimits(deadline_s=1.5)):
        assert _fetch(hostile.base + "/ok.jpg") == hostile.httpd.jpeg
        for path in ("/drip", "/drip-headers"):
            started = time.monotonic()
            with pytest.raises(DownloadLimitError, match=f"^{REASON_DEADLINE}: not done within 1.5 s"):
                _fetch(hostile.base + path)  # the per-operation timeout (30 s) would never fire
            assert 1.4 < time.monotonic() - started < 2.5, path


def test_the_deadline_spans_every_hop_and_each_fetch_gets_its_own(hostile):
    drip_behind_redirect = hostile.base + "/redirect-to?" + urllib.parse.quote(hostile.base + "/drip")
    with guarded_urlopen(LOOPBACK_ONLY, FetchLimits(deadline_s=1.0)):
        started = time.monotonic()
        with pytest.raises(DownloadLimitError, match=f"^{REASON_DEADLINE}"):
            _fetch(drip_behind_redirect)
        assert time.monotonic() - started < 2.0
        # a later fetch on the same thread starts a budget of its own
        assert _fetch(hostile.base + "/ok.jpg") == hostile.httpd.jpeg


@pytest.mark.parametrize("path", ["/huge", "/huge-announced"])
def test_a_300_mb_body_is_refused_at_the_cap_without_being_read(hostile, path):
    cap = 2**20
    tracemalloc.start()
    try:
        with guarded_urlopen(LOOPBACK_ONLY, FetchLimits(deadline_s=30, max_bytes=cap)):
            with pytest.raises(DownloadLimitError, match=f"^{REASON_TOO_LARGE}: ") as err:
                _fetch(hostile.base + path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * cap, f"peak {peak} bytes while refusing a {HUGE}-byte body"
    if path == "/huge-announced":
        assert "Content-Length is 314572800 bytes" in str(err.value)  # refused before the body
    time.sleep(0.2)
    assert hostile.sent.get(path, 0) < 64 * cap  # the client hung up; socket buffers hold the rest


def test_img2dataset_download_image_is_bounded_by_the_guarded_opener(hostile):
    """img2dataset's own fetch (urllib.request.urlopen(...).read()) under the opener the
    laion source installs: the cap and the deadline hold, and the reason leads its message."""
    from img2dataset.downloader import download_image

    tracemalloc.start()
    try:
        with guarded_urlopen(LOOPBACK_ONLY, FetchLimits(deadline_s=1.0, max_bytes=2**20)):
            _, stream, error = download_image((0, hostile.base + "/huge"), 30, None, None)
            assert stream is None and error.startswith(f"{REASON_TOO_LARGE}: ")
            started = time.monotonic()
            _, stream, error = download_image((1, hostile.base + "/drip"), 30, None, None)
            assert stream is None and error.startswith(f"{REASON_DEADLINE}: ")
            assert time.monotonic() - started < 2.0
            _, stream, error = download_image((2, hostile.base + "/ok.jpg"), 30, None, None)
            assert error is None and stream.getvalue() == hostile.httpd.jpeg
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 * 2**20


def test_a_redirect_from_an_allowed_host_to_another_private_address_is_refused(hostile, elsewhere):
    target = elsewhere.base + "/ok.jpg"
    before = dict(elsewhere.sent)
    with guarded_urlopen(LOOPBACK_ONLY):
        with pytest.raises(UnsafeURLError, match=f"^{REASON_REDIRECT}: redirect to {target}: {REASON_PRIVATE}: 127.0.0.2"):
            _fetch(hostile.base + "/redirect-to?" + urllib.parse.quote(target))
    assert elsewhere.sent == before  # never contacted
    # with the old all-or-nothing switch the same redirect is followed
    with guarded_urlopen(allow_private=True):
        assert _fetch(hostile.base + "/redirect-to?" + urllib.parse.quote(target)) == elsewhere.httpd.jpeg


def test_a_name_that_resolves_elsewhere_is_refused_on_the_connected_address(hostile, elsewhere, monkeypatch):
    """DNS rebinding: the redirect names a host that passes the pre-check (a name on no
    list), then resolves to a private address off the allowlist at connect time."""
    real = socket.getaddrinfo
    monkeypatch.setattr(socket, "getaddrinfo",
                        lambda host, *a, **k: real("127.0.0.2" if host == "rebind.example" else host, *a, **k))
    target = elsewhere.base.replace("127.0.0.2", "rebind.example") + "/ok.jpg"
    with guarded_urlopen(LOOPBACK_ONLY):
        with pytest.raises(UnsafeURLError, match=f"^{REASON_PRIVATE}: 127.0.0.2$"):
            _fetch(hostile.base + "/redirect-to?" + urllib.parse.quote(target))
    # named on the allowlist, the host may be private
    with guarded_urlopen(PrivateAllowlist.parse(["127.0.0.1", "rebind.example"])):
        assert _fetch(hostile.base + "/redirect-to?" + urllib.parse.quote(target)) == elsewhere.httpd.jpeg


@pytest.fixture(scope="module")
def tls(tmp_path_factory) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(server context, client context trusting it) for a certificate made here for 127.0.0.1
    (with `cryptography`, which the tests' S3 server, moto, installs anyway)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                   .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
                   .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                   .sign(key, hashes.SHA256()))
    folder = tmp_path_factory.mktemp("tls")
    cert, key_file = folder / "cert.pem", folder / "key.pem"
    cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert, key_file)
    return server, ssl.create_default_context(cafile=str(cert))


def test_https_goes_through_the_same_guards(tls):
    server_context, client_context = tls
    with HostileServer(context=server_context) as server:
        opener = build_guarded_opener(LOOPBACK_ONLY, FetchLimits(deadline_s=1.5, max_bytes=2**20), client_context)
        with opener.open(server.base + "/ok.jpg", timeout=10) as response:
            assert response.read() == server.httpd.jpeg
        with pytest.raises(DownloadLimitError, match=f"^{REASON_DEADLINE}"):
            opener.open(server.base + "/drip", timeout=10).read()
        with pytest.raises(DownloadLimitError, match=f"^{REASON_TOO_LARGE}"):
            opener.open(server.base + "/huge", timeout=10).read()
        with pytest.raises(UnsafeURLError, match=f"^{REASON_PRIVATE}"):
            build_guarded_opener(False, ssl_context=client_context).open(server.base + "/ok.jpg", timeout=10)


# ---------------------------------------------------------------------------
# The laion source end to end: real img2dataset Downloader on real Ray


def test_laion_rows_from_hostile_servers_are_recorded_and_the_rest_kept(ray_session, write_config, tmp_path,
                                                                          hostile, elsewhere):
    base = hostile.base
    rows = {
        f"{base}/ok.jpg": None,
        f"{base}/drip": REASON_DEADLINE,
        f"{base}/drip-headers": REASON_DEADLINE,
        f"{base}/huge": REASON_TOO_LARGE,
        f"{base}/huge-announced": REASON_TOO_LARGE,
        f"{base}/redirect-to?" + urllib.parse.quote(f"{elsewhere.base}/ok.jpg"): REASON_REDIRECT,
        f"{base}/redirect-to?" + urllib.parse.quote(f"{base}/ok.jpg?again"): None,
        f"{elsewhere.base}/ok.jpg": REASON_PRIVATE,
    }
    pq.write_table(pa.table({"URL": list(rows), "TEXT": [f"row {i}" for i in range(len(rows))]}),
                   tmp_path / "rows.parquet")
    config = load_config(write_config({"web": {
        "source": "laion", "parquet": str(tmp_path / "rows.parquet"), "allowed_private": ["127.0.0.1"],
        "deadline_s": 1.5, "max_download_bytes": 2**20, "timeout_s": 30,
        "filters": {"dedup_exact": False},
    }}))
    started, elsewhere_before = time.monotonic(), dict(elsewhere.sent)
    summary = curate(config, "web")
    fetch_seconds = max(r.seconds for r in StageOutput.of(config.storage.root, "web", "fetched").records().values())
    assert fetch_seconds < 10, "the shard must not wait on the drips"
    assert summary["samples_out"] == 2
    record = StageOutput.of(config.storage.root, "web", "fetched").records()[0]
    by_key = {f.key: f.reason for f in record.failures}
    assert [by_key.get(f"00000{i:05d}") for i in range(len(rows))] == list(rows.values())
    assert elsewhere.sent == elsewhere_before  # the refused redirect never reached it
    assert hostile.sent.get("/huge", 0) < 64 * 2**20 and hostile.sent.get("/huge-announced", 0) < 64 * 2**20
    assert time.monotonic() - started < 120


# ---------------------------------------------------------------------------
# The sam source: tars from links, and members


def test_sam_tars_too_large_are_recorded_and_slow_ones_fail_resumably(ray_session, write_config, tmp_path, hostile):
    links = tmp_path / "links.txt"
    links.write_text("file_name\tcdn_link\n"
                     f"sa_000000.tar\t{hostile.base}/sa.tar\n"
                     f"sa_000001.tar\t{hostile.base}/huge.tar\n"
                     f"sa_000002.tar\t{hostile.base}/drip.tar\n"
                     f"sa_000003.tar\t{hostile.base}/redirect-to?http://10.1.2.3/sa.tar\n")
    config = load_config(write_config({"sam": {
        "source": "sam", "links": str(links), "allowed_private": ["127.0.0.1"], "deadline_s": 1.5,
        "max_download_bytes": 2**20, "filters": {"dedup_exact": False},
    }}))
    with pytest.raises(StageError, match=r"shards \[2\] failed; rerun"):
        curate(config, "sam")
    records = StageOutput.of(config.storage.root, "sam", "fetched").records()
    assert sorted(records) == [0, 1, 3]
    assert records[0].samples_out == 2 and not records[0].failures
    assert [(f.key, f.reason) for f in records[1].failures] == [("sa_000001.tar", REASON_TOO_LARGE)]
    assert [(f.key, f.reason) for f in records[3].failures] == [("sa_000003.tar", REASON_REDIRECT)]
    downloads = tmp_path / "data" / "sam" / "downloads"
    assert sorted(p.name for p in downloads.iterdir()) == ["sa_000000.tar", "sa_000002.tar.part"]
    assert 0 < (downloads / "sa_000002.tar.part").stat().st_size < 4096  # kept for the rerun to resume


def test_sam_members_over_the_cap_are_skipped_unread(ray_session, write_config, tmp_path):
    folder = tmp_path / "tars"
    folder.mkdir()
    with tarfile.open(folder / "sa_000000.tar", "w") as tar:
        for name, data in (("sa_1.jpg", _jpeg("blue")), ("sa_2.jpg", _jpeg("green", size=(640, 480)) + b"\0" * 300_000)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    config = load_config(write_config({"sam": {"source": "sam", "tars": str(folder), "max_member_bytes": 200_000}}))
    summary = curate(config, "sam")
    assert summary["failures_by_reason"] == {REASON_TOO_LARGE: 1} and summary["samples_out"] == 1


# ---------------------------------------------------------------------------
# The folder source


@pytest.mark.timeout(120)
def test_folder_with_links_out_pipes_and_oversized_files(ray_session, write_config, tmp_path):
    root, outside = tmp_path / "images", tmp_path / "outside"
    (root / "nested").mkdir(parents=True)
    outside.mkdir()
    _noise_png(1).save(root / "a.png")
    (root / "a.txt").write_text("kept with its caption")
    _noise_png(2).save(root / "nested" / "b.png")
    _noise_png(3).save(root / "c.png")
    os.mkfifo(root / "c.txt")  # a sidecar that is a pipe: reading it would block forever
    _noise_png(4).save(outside / "secret.png")
    _noise_png(5).save(outside / "other.png")
    os.symlink(outside / "secret.png", root / "escape.png")  # absolute link out
    os.symlink("../../outside/other.png", root / "nested" / "escape2.png")  # relative link out
    os.symlink("a.png", root / "inside-link.png")  # a link within the folder is read
    os.symlink(outside, root / "linked-dir.png")  # a directory link out: never descended
    os.symlink(outside, root / "linked-dir")
    os.mkfifo(root / "pipe.png")
    (root / "big.png").write_bytes(b"\x89PNG" + b"\0" * 300_000)
    config = load_config(write_config({"mine": {
        "source": "folder", "path": str(root), "samples_per_shard": 4, "max_file_bytes": 200_000,
        "filters": {"dedup_exact": False},
    }}))
    started = time.monotonic()
    summary = curate(config, "mine")
    assert time.monotonic() - started < 60
    assert summary["failures_by_reason"] == {"symlink_outside": 3, "not_regular_file": 1, "too_large": 1}
    kept = {Path(s.meta["origin"]).name: s for s in shards_output(config, "mine").samples()}
    assert sorted(kept) == ["a.png", "b.png", "c.png", "inside-link.png"]
    assert kept["a.png"].text() == "kept with its caption" and kept["c.png"].text() == ""
    counters = {}
    for record in StageOutput.of(config.storage.root, "mine", "fetched").records().values():
        for name, value in record.counters.items():
            counters[name] = counters.get(name, 0) + value
    assert counters.get("sidecar:not_regular_file") == 1
