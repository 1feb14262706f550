"""Beyond one machine: a 3-node Ray cluster on loopback (a head without CPUs and two worker
nodes, each its own raylet, started with `ray start` as on real machines) whose nodes know
nothing of the object store: the endpoint and credentials reach their workers only through
cluster.forward_env. Storage is a real S3 API server (moto's). Through the real command
lines, as a user runs them: curate (its driver killed with SIGKILL, then rerun), caption on
actors (one worker node's raylet killed mid-stage, a replacement node added), nouns,
features, a few training steps on Ray Train, and a resumed training run. Every stage must
hold every sample exactly once."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

import psutil
import pytest
import s3fs

from captioning.tiny_models import build_tiny_llava
from shardkit import storage
from shardkit.config import load_config
from shardkit.shards import StageOutput
from shardkit.validate import validate_stage
from tests.conftest import REPO
from tests.processes import kill_driver_when
from training import checkpoint
from training.encoders import build_text_encoder, build_vae
from training.layout import run_layout

RAY = os.path.join(os.path.dirname(sys.executable), "ray")
COUNT, PER_SHARD = 40, 5


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class LoopbackCluster:
    address: str
    temp: str
    node_env: dict[str, str]
    workers: dict[str, int] = field(default_factory=dict)
    """worker node name -> its raylet's node manager port"""

    def add_worker(self, name: str) -> None:
        port = _free_port()
        done = subprocess.run([RAY, "start", f"--address={self.address}", "--num-cpus=1", "--node-ip-address=127.0.0.1",
                               f"--node-manager-port={port}", "--object-store-memory=200000000",
                               f"--resources={json.dumps({name: 1})}"],
                              env=self.node_env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        self.workers[name] = port

    def kill_worker(self, name: str) -> int:
        """SIGKILL the worker node's raylet (its workers lose their node with it)."""
        port = self.workers.pop(name)
        for process in psutil.process_iter(["cmdline"]):
            cmdline = " ".join(process.info["cmdline"] or [])
            if "raylet" in cmdline and f"--node_manager_port={port}" in cmdline:
                process.kill()
                return process.pid
        raise AssertionError(f"no raylet found for {name}")

    def stop(self) -> None:
        """Kill every process of this cluster (never `ray stop`: it stops every Ray here)."""
        for process in psutil.process_iter(["cmdline"]):
            try:
                if any(self.temp in part for part in process.info["cmdline"] or []):
                    process.kill()
            except psutil.Error:
                continue


@pytest.fixture(scope="module")
def loopback_cluster(s3_server):
    temp = tempfile.mkdtemp(prefix="r", dir="/tmp")  # short: Ray's socket paths stay under 108 characters
    # the nodes' environment has no S3 endpoint or credentials: only forwarding gets them there
    node_env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    node_env.update(RAY_TMPDIR=temp, RAY_AUTH_MODE="disabled", NO_ALBUMENTATIONS_UPDATE="1")
    node_env.pop("RAY_ADDRESS", None)
    port = _free_port()
    head = subprocess.run([RAY, "start", "--head", "--num-cpus=0", f"--port={port}", f"--temp-dir={temp}",
                           "--node-ip-address=127.0.0.1", "--include-dashboard=false",
                           "--object-store-memory=200000000"], env=node_env, capture_output=True, text=True, timeout=120)
    assert head.returncode == 0, head.stderr[-2000:]
    cluster = LoopbackCluster(f"127.0.0.1:{port}", temp, node_env)
    try:
        cluster.add_worker("worker1")
        cluster.add_worker("worker2")
        yield cluster
    finally:
        cluster.stop()


def _write_config(write_config, bucket: str, cluster: LoopbackCluster):
    models = f"{bucket}/models"
    return write_config(
        {"syn": {"source": "synthetic", "count": COUNT, "seed": 5, "samples_per_shard": PER_SHARD,
                 "caption": "description"}},
        storage={"root": f"{bucket}/data"},
        cluster={"address": cluster.address},  # forward_env's default, AWS_*, carries endpoint and keys
        captioners={"tiny": {"model": f"{models}/tiny-llava", "dtype": "float32", "batch_size": 4, "actors": 2,
                             "num_cpus": 0.5, "generation": {"max_new_tokens": 8}, "quality": {"retry": []}}},
        analysis={"nouns": {"task_cpus": 0.5}},
        training={
            "text_encoders": {"t5": {"model": f"{models}/t5", "dtype": "float32"}},
            "vaes": {"vae": {"model": f"{models}/vae"}},
            "features": {"f": {"dataset": "syn", "caption": "tiny", "text_encoder": "t5", "vae": "vae",
                               "resolution": 32, "batch_size": 8, "actors": 2, "num_cpus": 0.5}},
            "stages": {"s": {"features": "f", "model": "PixArt-tiny/2", "steps": 4, "batch_size": 8, "lr": 1e-3,
                             "warmup_steps": 2, "checkpoint_every": 2, "sample_every": 4, "log_every": 1,
                             "validation_prompts": ["A large red circle in the center."], "sample_steps": 2,
                             "workers": 1, "cpus_per_worker": 1}},
        })


def _run(path, *args: str, env: dict[str, str], timeout: int = 600) -> str:  # noqa: ANN001
    done = subprocess.run([sys.executable, "-m", *args, "--config", str(path)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{args}: {done.stderr[-3000:]}"
    return done.stderr


def _keys(output: StageOutput) -> list[str]:
    return [s.key for s in output.samples()]


def test_the_pipeline_on_a_cluster_whose_nodes_share_no_disk(loopback_cluster, s3_bucket, write_config, tmp_path):
    local = tmp_path / "models"
    build_tiny_llava(str(local / "tiny-llava"), seed=0)
    build_text_encoder(str(local / "t5"), corpus=["a large red circle in the center of a plain white background"], seed=0)
    build_vae(str(local / "vae"), seed=0)
    for name in ("tiny-llava", "t5", "vae"):  # the models live on the store too, as on a cluster
        storage.put_folder(str(local / name), f"{s3_bucket}/models/{name}")
    path = _write_config(write_config, s3_bucket, loopback_cluster)
    config = load_config(path)
    env = {**os.environ, "RAY_TMPDIR": loopback_cluster.temp, "RAY_AUTH_MODE": "disabled", "NO_ALBUMENTATIONS_UPDATE": "1"}

    # curate; its driver killed once the first fetched shard is recorded, then the same command again
    fetched = StageOutput.of(config.storage.root, "syn", "fetched")
    kill_driver_when(["curation", "curate", "syn", "--config", str(path)], lambda: bool(fetched.complete_shards()),
                     env=env)
    assert len(fetched.complete_shards()) < COUNT // PER_SHARD
    _run(path, "curation", "curate", "syn", env=env)
    shards = StageOutput.of(config.storage.root, "syn", "shards")
    assert validate_stage(shards.uri) == []
    source_keys = _keys(shards)
    assert len(source_keys) == len(set(source_keys)) > 0

    # caption on two actors; one worker node's raylet killed mid-stage, a new node joins
    captions = StageOutput.of(config.storage.root, "syn", "captions/tiny")
    driver = subprocess.Popen([sys.executable, "-m", "captioning", "caption", "syn", "--captioner", "tiny",
                               "--config", str(path)], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not captions.complete_shards() and time.monotonic() < deadline and driver.poll() is None:
        time.sleep(0.1)
    assert driver.poll() is None, "captioning ended before a node could be killed"
    loopback_cluster.kill_worker("worker2")
    loopback_cluster.add_worker("worker3")
    _, stderr = driver.communicate(timeout=600)
    assert driver.returncode == 0, stderr[-3000:]
    assert _keys(captions) == source_keys  # every sample once, in order
    assert validate_stage(captions.uri) == []

    _run(path, "analysis", "nouns", "--fields", "txt,tiny", env=env)
    report = json.loads(storage.read_text(f"{config.storage.root}/reports/nouns/nouns.json"))
    assert {r["field"]: r["images"] for r in report["rows"]} == {"txt": len(source_keys), "tiny.txt": len(source_keys)}

    _run(path, "training", "features", "f", env=env)
    features = StageOutput.of(config.storage.root, "syn", "features/f")
    assert _keys(features) == source_keys and validate_stage(features.uri) == []

    trained = _run(path, "training", "train", "s", env=env)
    assert "Failed to query" not in trained  # Ray Train's cleaner, quieted: training output stays readable
    layout = run_layout(config, "s")
    assert checkpoint.latest(layout.checkpoints)[0] == 4
    _run(path, "training", "train", "s", "--set", "training.stages.s.steps=6", env=env)
    metrics = [json.loads(line) for line in storage.read_text(layout.metrics).splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5, 6]
    fs = s3fs.S3FileSystem()
    assert fs.exists(f"{layout.root}/pipeline/model_index.json".removeprefix("s3://"))
