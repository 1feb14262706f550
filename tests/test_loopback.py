import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from synthetic.loopback import LoopbackServer


def fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return resp.read()


@pytest.fixture
def served(tmp_path):
    (tmp_path / "sub").mkdir()
    payload = bytes(range(256)) * 40
    (tmp_path / "sub" / "blob.bin").write_bytes(payload)
    return tmp_path, payload


def test_serves_files_and_404s(served):
    root, payload = served
    with LoopbackServer(root) as server:
        assert server.base_url == f"http://127.0.0.1:{server.port}" and server.port > 0
        assert fetch(f"{server.base_url}/sub/blob.bin") == payload
        with pytest.raises(urllib.error.HTTPError) as err:
            fetch(f"{server.base_url}/sub/missing.jpg")
        assert err.value.code == 404
        with ThreadPoolExecutor(8) as pool:
            assert all(b == payload for b in pool.map(fetch, [f"{server.base_url}/sub/blob.bin"] * 16))
    assert not server.running
    with pytest.raises(RuntimeError):
        server.port


def test_stops_on_exit(served):
    root, _ = served
    with LoopbackServer(root) as server:
        port = server.port
    with pytest.raises(urllib.error.URLError):
        fetch(f"http://127.0.0.1:{port}/sub/blob.bin")


def test_preferred_port_used_when_free_else_another(served):
    root, payload = served
    with LoopbackServer(root) as first:
        taken = first.port
        with LoopbackServer(root, port=taken) as second:
            assert second.port != taken
            assert fetch(f"{second.base_url}/sub/blob.bin") == payload
    with LoopbackServer(root, port=taken) as again:
        assert again.port == taken


def test_missing_root_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        LoopbackServer(tmp_path / "nope").start()
