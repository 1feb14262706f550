"""Shared fixtures: one real local Ray for the session, generated sources, temp configs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def ray_session():
    """A real local Ray instance for the whole session. Two CPUs on any machine, so that
    the fractional-CPU settings the code uses are exercised as on a 2-vCPU box."""
    import ray

    if not ray.is_initialized():
        # address="local": never the cluster a stale ray_current_cluster file names
        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING",
                 runtime_env={"env_vars": {"NO_ALBUMENTATIONS_UPDATE": "1"}})
    yield ray
    ray.shutdown()


@pytest.fixture
def write_config(tmp_path: Path):
    """Write a pipelines.yaml under tmp_path (storage there too) and return its path."""

    def write(datasets: dict | None = None, **sections) -> Path:
        raw = {"storage": {"root": str(tmp_path / "data")}, "datasets": datasets or {}, **sections}
        path = tmp_path / "pipelines.yaml"
        path.write_text(yaml.safe_dump(raw, sort_keys=False))
        return path

    return write


S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 API server on 127.0.0.1 (moto's standalone server, as s3fs's own tests use),
    for the session. This process's environment points boto/s3fs at it (AWS_ENDPOINT_URL and
    test credentials), as a user's would point at their object store; yields the endpoint."""
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(endpoint, timeout=2).close()
            break
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("moto's S3 server did not start") from None
            time.sleep(0.2)
    saved = {k: os.environ.get(k) for k in (*S3_ENV, "AWS_ENDPOINT_URL")}
    os.environ.update({**S3_ENV, "AWS_ENDPOINT_URL": endpoint})
    yield endpoint
    server.terminate()
    server.wait(timeout=30)
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture
def s3_bucket(s3_server, request):
    """A fresh bucket on the session's S3 server: its s3:// URI."""
    import re
    import uuid

    import s3fs

    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-") + "-" + uuid.uuid4().hex[:8]
    s3fs.S3FileSystem(endpoint_url=s3_server).mkdir(name)
    return f"s3://{name}"
