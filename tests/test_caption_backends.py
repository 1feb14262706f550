"""The captioner interface's backends, without Ray: config validation, one loaded model per
process under each captioner's own settings, the hf backend's static-shape path and its
compile count, and the checkpoint layout the vllm backend hands to vLLM (checked by loading it
back through transformers)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image
from safetensors import safe_open

from transformers import CompileConfig

from captioning.backend import BACKENDS, Sampling, load_backend, loaded_model, model_spec
from captioning.stage import caption, stage_name
from captioning.tiny_models import build_tiny_llava
from captioning.vllm_backend import LEGACY_PREFIX, legacy_layout_copy, needs_legacy_layout
from shardkit.config import CaptionerConfig, ConfigError, parse_config
from shardkit.shards import StageOutput
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
    # batch size, prompt, generation, quality checks and the cache/compile options do not
    # change the loaded model; each captioner still gets its own settings over it
    second = load_backend(CaptionerConfig(model=tiny, dtype="float32", batch_size=64, prompt="Hi {}",
                                          generation={"max_new_tokens": 3}, hf={"cache_implementation": "static"}))
    assert second.loaded is first.loaded and second.cfg.batch_size == 64 and first.cfg.batch_size == 4
    other = load_backend(CaptionerConfig(model=tiny, dtype="bfloat16", batch_size=4))
    assert other.loaded is not first.loaded and other.info.backend == "hf"
    # attn_implementation is read when the weights load: another one is another model
    assert model_spec(CaptionerConfig(model=tiny, hf={"attn_implementation": "eager"})) != model_spec(
        CaptionerConfig(model=tiny))


PROMPTS = ["Describe this image.", "Describe this image and its style in a very detailed manner", "A cat"]


def _compile_counted(model_folder: str) -> list[int]:
    """The process's loaded model for `model_folder`, with transformers' compiled decoding
    turned on for the CPU (it compiles on accelerators only unless told) through a torch.compile
    backend that runs each captured graph as is and counts the captures: every new shape the
    compiled decoding step meets is one more. Returns the list the count is appended to."""
    graphs: list[int] = []

    def counting(graph, example_inputs):  # noqa: ANN001, ANN202 - torch.compile's backend signature
        graphs.append(len(example_inputs))
        return graph.forward

    # a function, not an object: transformers deep-copies the compile config, and a counter
    # object would be counted in its copy
    compile_config = CompileConfig(backend=counting, mode=None)
    compile_config._compile_all_devices = True  # transformers' switch for compiling on a CPU
    loaded_model(model_spec(CaptionerConfig(model=model_folder, dtype="float32"))).model.generation_config.compile_config = compile_config
    return graphs


def test_a_loaded_captioner_acts_on_its_configured_settings(tiny, tmp_path):
    """The model is loaded for one captioner, then asked for by another with the same model and
    other settings: the second pads to its own batch size, warms up at its own caption length
    (so a shard's batches, short last one included, compile nothing after the warm-up), and
    samples from its own seed."""
    folder = str(tmp_path / "llava")
    shutil.copytree(tiny, folder)  # a model of its own: its compile counter starts at zero
    load_backend(CaptionerConfig(model=folder, dtype="float32"))  # loaded under the defaults (batch 8, 256 tokens)
    graphs = _compile_counted(folder)
    cfg = CaptionerConfig(model=folder, dtype="float32", batch_size=12, generation={"max_new_tokens": 9},
                          hf={"cache_implementation": "static", "compile": True})
    backend = load_backend(cfg)
    warm_up = backend.warm_up()
    assert (warm_up.rows, warm_up.max_new_tokens) == (12, 9)
    assert graphs  # the warm-up compiled the decoding step
    compiled = len(graphs)
    prepared = backend.prepare(_images(3), PROMPTS)
    assert prepared.inputs["input_ids"].shape[0] == 12  # a short batch, padded to the configured size
    rng = np.random.default_rng(1)
    shard = [Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)) for _ in range(14)]
    for batch in (shard[:12], shard[12:]):  # a full batch and the short last one
        generations = backend.generate(backend.prepare(batch, [PROMPTS[1]] * len(batch)), Sampling(max_new_tokens=9), 0)
        assert len(generations) == len(batch) and all(g.tokens <= 9 for g in generations)
    assert len(graphs) == compiled, "a batch after the warm-up compiled the decoding step again"

    # the seed: the stage seeds every batch from generation.seed, the shard and the batch number
    sampled = {}
    for seed in (0, 1, 0):
        config = parse_config({"cluster": {"in_process": True}, "storage": {"root": str(tmp_path / f"data-{seed}")},
                               "datasets": {"syn": {"source": "synthetic", "count": 6, "seed": 4, "samples_per_shard": 6}},
                               "captioners": {"c": {"model": folder, "dtype": "float32", "batch_size": 12,
                                                    "hf": {"cache_implementation": "static", "compile": True},
                                                    "quality": {"retry": []},
                                                    "generation": {"max_new_tokens": 9, "do_sample": True,
                                                                   "temperature": 1.5, "seed": seed}}}})
        caption(config, "syn", "c")
        texts = [s.text("c.txt") for s in StageOutput.of(config.storage.root, "syn", stage_name("c")).samples()]
        assert seed not in sampled or sampled[seed] == texts  # the same seed, the same captions
        sampled[seed] = texts
    assert sampled[0] != sampled[1]
    assert load_backend(config.captioner("c")).loaded is backend.loaded  # all of it on the one loaded model
    assert len(graphs) == compiled  # sampling runs outside the compiled step: nothing new


def test_two_captioners_sharing_a_model_keep_their_own_settings(tiny, tmp_path):
    """Two captioners of one model, in one process, one after the other and back: each pads to
    its batch size, captions to its length and records its own generation settings."""
    common = {"model": tiny, "dtype": "float32", "quality": {"retry": []}}
    config = parse_config({
        "cluster": {"in_process": True}, "storage": {"root": str(tmp_path / "data")},
        "datasets": {"syn": {"source": "synthetic", "count": 7, "seed": 4, "samples_per_shard": 7}},
        "captioners": {
            "short": {**common, "batch_size": 3, "generation": {"max_new_tokens": 4, "min_new_tokens": 4}},
            "long": {**common, "batch_size": 5, "hf": {"cache_implementation": "static"},
                     "generation": {"max_new_tokens": 11, "min_new_tokens": 11}}}})
    short, long = load_backend(config.captioner("short")), load_backend(config.captioner("long"))
    assert short.loaded is long.loaded
    assert short.prepare(_images(2), PROMPTS[:2]).inputs["input_ids"].shape[0] == 2  # dynamic: no padding
    assert long.prepare(_images(2), PROMPTS[:2]).inputs["input_ids"].shape[0] == 5
    for name, tokens in (("short", 4), ("long", 11), ("short", 4)):
        summary = caption(config, "syn", name, restart=True)
        assert summary["samples_out"] == 7
        infos = [s.meta["captioners"][name] for s in StageOutput.of(config.storage.root, "syn", stage_name(name)).samples()]
        assert {i["tokens"] for i in infos} == {tokens}
        assert {i["generation"]["max_new_tokens"] for i in infos} == {tokens}


def test_static_shapes_pad_the_batch_and_caption_the_same(tiny):
    captions = {}
    for cache in ("dynamic", "static"):
        backend = load_backend(CaptionerConfig(model=tiny, dtype="float32", batch_size=8, hf={"cache_implementation": cache},
                                               generation={"max_new_tokens": 12}))
        prepared = backend.prepare(_images(3), PROMPTS)
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
        backend = load_backend(CaptionerConfig(model=str(model), dtype="float32", generation={"max_new_tokens": 40}))
        texts.append([g.text for g in backend.generate(backend.prepare(images, prompts), Sampling(max_new_tokens=40), 0)])
    assert texts[0] == texts[1] and all(texts[0])
