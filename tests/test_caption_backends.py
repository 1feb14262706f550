"""The captioner interface's backends, without Ray: config validation, one loaded model per
process, the hf backend's static-shape path, and the checkpoint layout the vllm backend hands
to vLLM (checked by loading it back through transformers)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image
from safetensors import safe_open

from captioning.backend import BACKENDS, Sampling, load_backend
from captioning.hf_backend import HfBackend
from captioning.tiny_models import build_tiny_llava
from captioning.vllm_backend import LEGACY_PREFIX, legacy_layout_copy, needs_legacy_layout
from shardkit.config import CaptionerConfig, ConfigError, parse_config
from tests.conftest import REPO

SHIPPED = REPO / "captioning" / "models" / "synthetic-captioner"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_llava(str(tmp_path_factory.mktemp("models") / "llava"), seed=0)


def _images(n: int) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (48 + 8 * i, 64, 3), dtype=np.uint8)) for i in range(n)]


@pytest.mark.parametrize("captioner, message", [
    ({"backend": "hf", "vllm": {"max_num_seqs": 8}}, "vllm: options of the vllm backend, but backend is hf"),
    ({"backend": "vllm", "hf": {"compile": True}}, "hf: options of the hf backend, but backend is vllm"),
    ({"backend": "vllm", "num_gpus": 1, "vllm": {"tensor_parallel_size": 2}}, "less than vllm.tensor_parallel_size"),
    ({"backend": "vllm", "generation": {"num_beams": 2}}, "beam search"),
    ({"backend": "sglang"}, "backend"),
    ({"generation": {"min_new_tokens": 9, "max_new_tokens": 8}}, "min_new_tokens"),
])
def test_backend_settings_are_validated(captioner, message):
    with pytest.raises(ConfigError, match=message):
        parse_config({"captioners": {"x": {"model": "m", **captioner}}})


def test_every_configurable_backend_is_registered():
    names = CaptionerConfig.model_fields["backend"].annotation.__args__
    assert set(names) == set(BACKENDS)


def test_one_model_per_process_whatever_the_batch(tiny):
    first = load_backend(CaptionerConfig(model=tiny, dtype="float32", batch_size=4))
    # batch size, prompt and quality checks do not change the loaded model
    assert load_backend(CaptionerConfig(model=tiny, dtype="float32", batch_size=64, prompt="Hi {}")) is first
    other = load_backend(CaptionerConfig(model=tiny, dtype="bfloat16", batch_size=4))
    assert other is not first and other.info.backend == "hf"


def test_static_shapes_pad_the_batch_and_caption_the_same(tiny):
    prompts = ["Describe this image.", "Describe this image and its style in a very detailed manner", "A cat"]
    captions = {}
    for cache in ("dynamic", "static"):
        backend = HfBackend(CaptionerConfig(model=tiny, dtype="float32", batch_size=8, hf={"cache_implementation": cache},
                                            generation={"max_new_tokens": 12}))
        prepared = backend.prepare(_images(3), prompts)
        rows, length = prepared.inputs["input_ids"].shape
        if cache == "static":  # a full batch, prompts padded to a multiple of 64 tokens
            assert rows == 8 and length % 64 == 0
        else:
            assert rows == 3
        captions[cache] = backend.generate(prepared, Sampling(max_new_tokens=12), seed=0)
    assert len(captions["static"]) == 3
    assert captions["static"] == captions["dynamic"]


def test_a_transformers5_checkpoint_gets_vllms_layout_and_still_loads(tmp_path):
    """vLLM 0.32-0.34 load LLaVA's vision tower only as `vision_tower.vision_model.*` (how
    llava-hf's checkpoints, saved by transformers 4, name it); transformers 5 saves
    `vision_tower.*`. The vllm backend hands vLLM a renamed copy. Checked here by loading the
    copy back through transformers: the same captions."""
    folder = tmp_path / "captioner"
    shutil.copytree(SHIPPED, folder)
    assert needs_legacy_layout(folder)
    copy = legacy_layout_copy(folder, tmp_path / "cache")
    assert not needs_legacy_layout(copy)
    with safe_open(str(copy / "model.safetensors"), "pt") as renamed, safe_open(str(folder / "model.safetensors"), "pt") as original:
        keys = set(renamed.keys())
        assert {k for k in keys if k.startswith("vision_tower.")} == {
            LEGACY_PREFIX + k.removeprefix("vision_tower.") for k in original.keys() if k.startswith("vision_tower.")}
        assert len(keys) == len(list(original.keys()))
    assert legacy_layout_copy(folder, tmp_path / "cache") == copy  # made once
    assert json.loads((copy / "config.json").read_text()) == json.loads((folder / "config.json").read_text())

    images = _images(4)
    prompts = ["Describe this image and its style in a very detailed manner"] * 4
    texts = []
    for model in (folder, copy):
        backend = HfBackend(CaptionerConfig(model=str(model), dtype="float32", generation={"max_new_tokens": 40}))
        texts.append([g.text for g in backend.generate(backend.prepare(images, prompts), Sampling(max_new_tokens=40), 0)])
    assert texts[0] == texts[1] and all(texts[0])
