"""Tiny LLaVA / LLaVA-NeXT models built offline, loaded back through the Auto classes the
captioning stage uses for any LLaVA-family checkpoint, and run with batched greedy generate."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from captioning.tiny_models import MARKER, TINY_KINDS, build_tiny_llava, build_tokenizer

PROMPT_TEXT = "Describe this image and its style in a very detailed manner"
CONVERSATION = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT_TEXT}]}]
EXPECTED_PROMPT = f"USER: <image>\n{PROMPT_TEXT} ASSISTANT:"
MODEL_CLASS = {"llava": "LlavaForConditionalGeneration", "llava_next": "LlavaNextForConditionalGeneration"}
PROCESSOR_CLASS = {"llava": "LlavaProcessor", "llava_next": "LlavaNextProcessor"}
MAX_NEW = 12


def _images() -> list[Image.Image]:
    """Three noise images of different sizes and aspect ratios (square, wide, tall)."""
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
            for w, h in ((64, 64), (150, 40), (30, 100))]


def _greedy(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=MAX_NEW, do_sample=False)


@pytest.fixture(scope="module", params=TINY_KINDS)
def loaded(request, tmp_path_factory):
    kind = request.param
    folder = build_tiny_llava(str(tmp_path_factory.mktemp(kind) / "model"), kind=kind)
    processor = AutoProcessor.from_pretrained(folder)
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    return kind, folder, processor, model


def test_auto_classes_and_chat_template(loaded):
    kind, _, processor, model = loaded
    assert type(model).__name__ == MODEL_CLASS[kind]
    assert type(processor).__name__ == PROCESSOR_CLASS[kind]
    assert processor.tokenizer.padding_side == "left"
    assert model.generation_config.pad_token_id == processor.tokenizer.pad_token_id
    assert model.generation_config.eos_token_id == processor.tokenizer.eos_token_id
    assert model.config.image_token_id == processor.tokenizer.convert_tokens_to_ids("<image>")
    prompt = processor.apply_chat_template(CONVERSATION, add_generation_prompt=True)
    assert prompt == EXPECTED_PROMPT
    assert processor.apply_chat_template(CONVERSATION) == EXPECTED_PROMPT.removesuffix("ASSISTANT:")
    # The tokenizer carries the same template.
    assert processor.tokenizer.apply_chat_template(
        CONVERSATION, add_generation_prompt=True, tokenize=False) == EXPECTED_PROMPT


def test_batched_greedy_generate(loaded):
    kind, _, processor, model = loaded
    prompt = processor.apply_chat_template(CONVERSATION, add_generation_prompt=True)
    images = _images()
    inputs = processor(images=images, text=[prompt] * 3, padding=True, return_tensors="pt")
    lengths = inputs["attention_mask"].sum(1)
    if kind == "llava_next":  # anyres: the number of image tokens depends on the aspect ratio
        assert len(set(lengths.tolist())) == 3
    prompt_len = inputs["input_ids"].shape[1]

    out = _greedy(model, inputs)
    assert out.shape[0] == 3 and prompt_len < out.shape[1] <= prompt_len + MAX_NEW
    assert torch.equal(out[:, :prompt_len], inputs["input_ids"])
    new = out[:, prompt_len:]
    texts = processor.batch_decode(new, skip_special_tokens=True)
    assert len(texts) == 3 and all(isinstance(t, str) for t in texts)
    assert not any("<image>" in t or "<pad>" in t or "</s>" in t for t in texts)

    assert torch.equal(_greedy(model, inputs), out), "greedy decoding is not deterministic"

    # Each row of the left-padded batch equals the image run alone.
    for i, image in enumerate(images):
        single = processor(images=[image], text=[prompt], return_tensors="pt")
        assert single["input_ids"].shape[1] == lengths[i]
        alone = _greedy(model, single)[0, single["input_ids"].shape[1]:]
        row = new[i]
        assert torch.equal(row[: len(alone)], alone), f"{kind}: batch row {i} differs from single run"
        assert (row[len(alone):] == processor.tokenizer.pad_token_id).all()


def test_left_padding_with_prompts_of_different_lengths(loaded):
    """Same image, prompts of different lengths: padding also shows for plain LLaVA."""
    kind, _, processor, model = loaded
    image = _images()[1]
    prompts = [processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}],
        add_generation_prompt=True) for text in (PROMPT_TEXT, "Describe the image.")]
    batch = processor(images=[image, image], text=prompts, padding=True, return_tensors="pt")
    lengths = batch["attention_mask"].sum(1)
    assert lengths[0] > lengths[1] and batch["input_ids"][1, 0] == processor.tokenizer.pad_token_id
    new = _greedy(model, batch)[:, batch["input_ids"].shape[1]:]
    for i, prompt in enumerate(prompts):
        single = processor(images=[image], text=[prompt], return_tensors="pt")
        alone = _greedy(model, single)[0, single["input_ids"].shape[1]:]
        assert torch.equal(new[i, : len(alone)], alone), f"{kind}: padded row {i} differs"


def test_bfloat16_load_and_generate(loaded):
    kind, folder, processor, _ = loaded
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.bfloat16).eval()
    assert model.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    prompt = processor.apply_chat_template(CONVERSATION, add_generation_prompt=True)
    inputs = processor(images=_images()[:2], text=[prompt] * 2, padding=True,
                       return_tensors="pt").to(torch.bfloat16)
    assert inputs["pixel_values"].dtype == torch.bfloat16 and inputs["input_ids"].dtype == torch.long
    out = _greedy(model, inputs)
    prompt_len = inputs["input_ids"].shape[1]
    assert prompt_len < out.shape[1] <= prompt_len + MAX_NEW
    processor.batch_decode(out[:, prompt_len:], skip_special_tokens=True)


@pytest.mark.parametrize("kind", TINY_KINDS)
def test_same_seed_gives_identical_bytes(kind, tmp_path):
    a = build_tiny_llava(str(tmp_path / "a"), kind=kind, seed=7)
    b = build_tiny_llava(str(tmp_path / "b"), kind=kind, seed=7)
    c = build_tiny_llava(str(tmp_path / "c"), kind=kind, seed=8)
    weights = {name: (tmp_path / name / "model.safetensors").read_bytes() for name in "abc"}
    assert weights["a"] == weights["b"]
    assert weights["a"] != weights["c"]
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (tmp_path / "b" / "tokenizer.json").read_bytes()
    assert a == str(tmp_path / "a") and b == str(tmp_path / "b") and c == str(tmp_path / "c")


def test_build_is_idempotent_and_rebuilds_on_new_arguments(tmp_path):
    folder = str(tmp_path / "m")
    build_tiny_llava(folder, seed=1)
    weights = tmp_path / "m" / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    assert build_tiny_llava(folder, seed=1) == folder
    assert weights.stat().st_mtime_ns == stamp  # not rebuilt
    build_tiny_llava(folder, kind="llava_next", seed=1)
    assert json.loads((tmp_path / "m" / MARKER).read_text())["kind"] == "llava_next"
    assert json.loads((tmp_path / "m" / "config.json").read_text())["model_type"] == "llava_next"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_refuses_foreign_folder_and_bad_arguments(tmp_path):
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(FileExistsError):
        build_tiny_llava(str(tmp_path))
    with pytest.raises(ValueError):
        build_tiny_llava(str(tmp_path / "x"), kind="blip")
    with pytest.raises(ValueError):
        build_tiny_llava(str(tmp_path / "x"), image_size=60, patch_size=8)


def test_tokenizer_round_trip_and_extra_words():
    tokenizer = build_tokenizer(["zebra", "quokka"])
    assert tokenizer.padding_side == "left"
    assert [tokenizer.pad_token, tokenizer.bos_token, tokenizer.eos_token, tokenizer.unk_token] == \
        ["<pad>", "<s>", "</s>", "<unk>"]
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    assert image_id != tokenizer.unk_token_id
    assert tokenizer("<image>", add_special_tokens=False).input_ids == [image_id]
    for word in ("zebra", " quokka", " circle"):
        assert len(tokenizer(word, add_special_tokens=False).input_ids) == 1, word
    text = "A zebra, 3 quokkas & a café — 日本!"
    ids = tokenizer(text).input_ids
    assert ids[0] == tokenizer.bos_token_id and tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
