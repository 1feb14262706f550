"""The captioning stage with tiny LLaVA and LLaVA-NeXT models, built here and loaded through
from_pretrained(folder), on a real local Ray."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest

from captioning.prompts import ALT_TEXT_PROMPT, PAPER_PROMPT
from captioning.stage import caption, stage_name
from captioning.tiny_models import build_tiny_llava
from curation.sample import make_sample
from shardkit.config import load_config
from shardkit.shards import ShardRecord, StageOutput, StagePlan, make_key, summarise, write_shard
from shardkit.validate import validate_stage
from tests.conftest import REPO
from tests.imaging import jpeg_bytes

DATASET = {"syn": {"source": "synthetic", "count": 14, "seed": 4, "samples_per_shard": 5}}
FORBIDDEN = ("<image>", "<pad>", "<s>", "</s>", "USER:", "ASSISTANT:", PAPER_PROMPT)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {kind: build_tiny_llava(str(root / kind), kind=kind, seed=0) for kind in ("llava", "llava_next")}


def _captioners(tiny_models, **extra):
    common = {"dtype": "float32", "batch_size": 4, "generation": {"max_new_tokens": 10}, **extra}
    return {
        "tiny": {"model": tiny_models["llava"], **common},
        "next": {"model": tiny_models["llava_next"], "prompt": ALT_TEXT_PROMPT, **common},
    }


def _captions(output: StageOutput, name: str) -> dict[str, str]:
    return {s.key: s.text(f"{name}.txt") for s in output.samples()}


@pytest.mark.parametrize("name", ["tiny", "next"])
def test_every_sample_is_captioned_once_with_clean_text(ray_session, write_config, tiny_models, name):
    config = load_config(write_config(DATASET, captioners=_captioners(tiny_models)))
    summary = caption(config, "syn", name)  # curates the dataset first: its shards are missing
    source = StageOutput.of(config.storage.root, "syn", "shards")
    output = StageOutput.of(config.storage.root, "syn", stage_name(name))
    assert validate_stage(output.uri) == []
    inputs = list(source.samples())
    outputs = list(output.samples())
    assert [s.key for s in outputs] == [s.key for s in inputs]
    assert summary["samples_out"] == 14 and summary["failures"] == 0
    for before, after in zip(inputs, outputs):
        assert after.fields["jpg"] == before.fields["jpg"]  # image bytes untouched
        text = after.text(f"{name}.txt")
        assert text.strip() and not any(f in text for f in FORBIDDEN)
        info = after.meta["captioners"][name]
        assert info["model"] == config.captioner(name).model and 0 < info["tokens"] <= 10
        assert info["generation"]["max_new_tokens"] == 10
        assert after.meta["description"] == before.meta["description"]  # earlier metadata kept
        if name == "next":  # the alt-text prompt carries each sample's own caption
            expected = ALT_TEXT_PROMPT.replace("{}", before.text().replace('"', "'")) if before.text().strip() else PAPER_PROMPT
            assert info["prompt"] == expected
        else:
            assert info["prompt"] == PAPER_PROMPT
    lengths = summary["lengths"]
    assert lengths["captioned"] == 14 and lengths["truncated"] == summary["counters"]["truncated"]
    assert lengths["mean_tokens"] == summary["counters"]["tokens"] / 14


def test_greedy_captions_are_deterministic(ray_session, write_config, tiny_models):
    config = load_config(write_config(DATASET, captioners=_captioners(tiny_models)))
    caption(config, "syn", "tiny")
    output = StageOutput.of(config.storage.root, "syn", stage_name("tiny"))
    first = _captions(output, "tiny")
    caption(config, "syn", "tiny", restart=True)
    assert _captions(output, "tiny") == first


def test_bad_images_are_recorded_and_the_shard_goes_on(ray_session, write_config, tiny_models, tmp_path):
    config = load_config(write_config({"hand": {"source": "folder", "path": str(tmp_path)}},
                                      captioners=_captioners(tiny_models)))
    shards = StageOutput.of(config.storage.root, "hand", "shards")
    good = [make_sample(make_key(0, i), jpeg_bytes(i), width=16, height=12, original_width=16, original_height=12,
                        source="test", origin=f"mem://{i}") for i in range(3)]
    corrupt = make_sample(make_key(0, 3), b"\xff\xd8 not really a jpeg", width=1, height=1, original_width=1,
                          original_height=1, source="test", origin="mem://bad")
    samples = [good[0], corrupt, good[1], good[2]]
    plan = StagePlan("hand", "shards", num_shards=1)
    shards.write_plan(plan)
    write_shard(shards.shard_uri(0), samples)
    shards.write_record(ShardRecord(0, 4, 4, 0.0))
    shards.write_summary(summarise(plan, shards.records(), 0.0))
    summary = caption(config, "hand", "tiny")
    assert summary["failures_by_reason"] == {"decode_error": 1}
    output = StageOutput.of(config.storage.root, "hand", stage_name("tiny"))
    assert [s.key for s in output.samples()] == [good[0].key, good[1].key, good[2].key]
    assert output.records()[0].failures[0].key == corrupt.key


def _actor_processes() -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["cmdline"]):
        try:
            if any("_ShardActor" in part for part in process.info["cmdline"] or []):
                found.append(process)
        except psutil.Error:
            continue
    return found


def test_a_killed_actor_does_not_lose_or_repeat_samples(ray_session, write_config, tiny_models):
    dataset = {"syn": {**DATASET["syn"], "count": 30}}
    config = load_config(write_config(dataset, captioners=_captioners(tiny_models)))
    output = StageOutput.of(config.storage.root, "syn", stage_name("tiny"))
    killed: list[int] = []

    def kill_one_actor_after_the_first_shard() -> None:
        deadline = time.monotonic() + 120
        while not output.complete_shards() and time.monotonic() < deadline:
            time.sleep(0.02)
        for process in _actor_processes()[:1]:
            process.send_signal(signal.SIGKILL)
            killed.append(process.pid)

    killer = threading.Thread(target=kill_one_actor_after_the_first_shard, daemon=True)
    killer.start()
    summary = caption(config, "syn", "tiny")
    killer.join()
    assert killed, "no actor process was found to kill"
    keys = [s.key for s in output.samples()]
    source_keys = [s.key for s in StageOutput.of(config.storage.root, "syn", "shards").samples()]
    assert keys == source_keys and summary["samples_out"] == 30


def test_kill_the_driver_and_rerun(ray_session, write_config, tiny_models):
    dataset = {"syn": {**DATASET["syn"], "count": 40, "samples_per_shard": 4}}
    path = write_config(dataset, captioners=_captioners(tiny_models, batch_size=1), cluster={"num_cpus": 1})
    config = load_config(path)
    output = StageOutput.of(config.storage.root, "syn", stage_name("tiny"))
    driver = subprocess.Popen([sys.executable, "-m", "captioning", "caption", "syn", "--captioner", "tiny",
                               "--config", str(path)], cwd=REPO, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 180
        while len(output.complete_shards()) < 2 and time.monotonic() < deadline and driver.poll() is None:
            time.sleep(0.05)
        assert driver.poll() is None, "captioning finished before it could be killed"
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    done = output.complete_shards()
    assert 2 <= len(done) < 10
    summary = caption(config, "syn", "tiny")
    assert summary["samples_out"] == 40
    assert [s.key for s in output.samples()] == [s.key for s in StageOutput.of(config.storage.root, "syn", "shards").samples()]
    assert validate_stage(output.uri) == []
