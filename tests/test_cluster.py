"""Ray start-up: an embedded instance whatever a dead cluster left in Ray's temp folder, and
the environment every worker gets (cluster.env, cluster.forward_env). Each case runs in its
own process: a process connects to one Ray only."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile

import psutil

from tests.conftest import REPO

SCRIPT = """
import json, os, ray
from shardkit import cluster
from shardkit.config import ClusterConfig
cluster.connect(ClusterConfig(num_cpus=1, env={"PIXART_TEST_SET": "from-config"}))

@ray.remote(num_cpus=0.1)
def seen():
    return {k: os.environ.get(k) for k in ("PIXART_TEST_SET", "AWS_TEST_TOKEN")}

print(json.dumps({"cpus": ray.cluster_resources().get("CPU"), "worker": ray.get(seen.remote()),
                  "driver": os.environ.get("PIXART_TEST_SET")}))
ray.shutdown()
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _stop_ray_under(folder: str) -> None:
    """Kill the Ray processes of the instance whose files are under `folder` (never `ray
    stop`: it would stop every Ray on the machine, the test session's too)."""
    for process in psutil.process_iter(["cmdline"]):
        try:
            if any(folder in part for part in process.info["cmdline"] or []):
                process.kill()
        except psutil.Error:
            continue


def test_an_embedded_ray_starts_beside_another_live_cluster_and_workers_get_the_env():
    # a short temp folder: Ray's socket paths must stay under 108 characters
    with tempfile.TemporaryDirectory(prefix="r", dir="/tmp") as ray_tmp:
        env = {**os.environ, "RAY_TMPDIR": ray_tmp, "AWS_TEST_TOKEN": "secret-from-driver", "NO_ALBUMENTATIONS_UPDATE": "1"}
        env.pop("RAY_ADDRESS", None)
        # another cluster (no CPUs) started on this machine: its address is now in Ray's temp
        # folder (ray_current_cluster), and a bare ray.init() joins it and waits for CPUs forever
        head = subprocess.run([os.path.join(os.path.dirname(sys.executable), "ray"), "start", "--head", "--num-cpus=0",
                               f"--port={_free_port()}", f"--temp-dir={ray_tmp}", "--include-dashboard=false"],
                              env=env, capture_output=True, text=True, timeout=120)
        try:
            assert head.returncode == 0, head.stderr[-2000:]
            assert os.path.exists(os.path.join(ray_tmp, "ray_current_cluster"))
            done = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, env=env, capture_output=True, text=True,
                                  timeout=240)
        finally:
            _stop_ray_under(ray_tmp)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["cpus"] == 1.0  # its own instance, with the configured CPUs, not the other one's 0
    # an embedded instance's workers inherit the driver's whole environment anyway; what
    # forward_env holds back from a joined cluster's nodes is tested on one (test_cluster_s3)
    assert result["worker"]["PIXART_TEST_SET"] == "from-config"
    assert result["worker"]["AWS_TEST_TOKEN"] == "secret-from-driver"
    assert result["driver"] == "from-config"
