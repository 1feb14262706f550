"""Kill -9 the curation driver mid-run; the same command then finishes the job, and the
output holds every successful sample exactly once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from curation.curate import curate, shards_output
from shardkit.config import load_config
from shardkit.shards import StageOutput, make_key
from shardkit.validate import validate_stage
from tests.conftest import REPO

ROWS, PER_SHARD = 200, 10


def test_kill_and_rerun_resumes_without_losing_or_repeating(ray_session, write_config, tmp_path):
    path = write_config({"laion": {
        "source": "laion", "parquet": "${storage}/sources/laion/sample-laion.parquet", "allow_private_urls": True,
        "generate": {"count": ROWS, "seed": 9}, "samples_per_shard": PER_SHARD, "threads": 2,
    }}, cluster={"num_cpus": 1})
    config = load_config(path)
    fetched = StageOutput.of(config.storage.root, "laion", "fetched")
    driver = subprocess.Popen([sys.executable, "-m", "curation", "curate", "laion", "--config", str(path)],
                              cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while len(fetched.complete_shards()) < 3 and time.monotonic() < deadline and driver.poll() is None:
            time.sleep(0.05)
        assert driver.poll() is None, "the job finished before it could be killed; make it bigger"
        os.killpg(driver.pid, signal.SIGKILL)  # the driver and the Ray it started, mid-run
        driver.wait()
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    done_before = fetched.complete_shards()
    assert 3 <= len(done_before) < ROWS // PER_SHARD
    stamps = {i: os.stat(fetched.record_uri(i)).st_mtime_ns for i in done_before}

    summary = curate(config, "laion")  # the same command again

    assert {i: os.stat(fetched.record_uri(i)).st_mtime_ns for i in done_before} == stamps  # not redone
    truth = [json.loads(line) for line in (tmp_path / "data/sources/laion/scenes.jsonl").read_text().splitlines()]
    expected = [make_key(t["row"] // PER_SHARD, t["row"] % PER_SHARD) for t in truth if not t["defect"]]
    keys = [s.key for s in shards_output(config, "laion").samples()]
    assert keys == expected  # each successful sample exactly once, in order
    assert summary["samples_in"] == ROWS
    assert validate_stage(fetched.uri) == [] and validate_stage(shards_output(config, "laion").uri) == []
