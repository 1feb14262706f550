"""The demo's shipped encoders (training/models/), loaded as any real one is: through
from_pretrained(folder), checked on scenes they never saw."""

from __future__ import annotations

import json

import numpy as np
import torch

from synthetic import scenes
from tests.conftest import REPO
from training.train_vae import images

MODELS = REPO / "training" / "models"


def test_shipped_vae_reconstructs_unseen_scenes_and_matches_its_card():
    from diffusers import AutoencoderKL

    folder = MODELS / "synthetic-vae"
    vae = AutoencoderKL.from_pretrained(folder).eval()
    card = json.loads((folder / "training.json").read_text())
    x = images(seed=12345, stream=7, index=0, count=8, resolution=64)  # a seed stream neither training nor its card used
    with torch.inference_mode():
        latents = vae.encode(x).latent_dist.mean
        out = vae.decode(latents).sample.clamp(-1, 1)
    mae = ((out - x).abs().mean() * 127.5).item()
    assert mae < 2 * card["held_out"]["mae"]  # the card's figure, within noise of 8 scenes
    assert latents.shape[1:] == (4, 32, 32)  # factor 2: 64 px -> 32x32x4, as the feature sets expect
    assert abs((latents * vae.config.scaling_factor).std().item() - 1) < 0.2  # unit-variance latents


def test_shipped_t5_knows_the_grammar_and_tells_captions_apart():
    from transformers import AutoTokenizer, T5EncoderModel

    folder = MODELS / "synthetic-t5"
    tokenizer = AutoTokenizer.from_pretrained(folder)
    encoder = T5EncoderModel.from_pretrained(folder).eval()
    assert encoder.config.d_model == 64  # the demo PixArt's caption_channels
    for word in scenes.vocabulary():
        assert tokenizer.unk_token_id not in tokenizer(word).input_ids, word
    red = "A large red circle on the left and a small blue star on the right, on a plain white background."
    swapped = "A large blue circle on the left and a small red star on the right, on a plain white background."
    with torch.inference_mode():
        a, b = (encoder(**tokenizer([t], return_tensors="pt")).last_hidden_state[0] for t in (red, swapped))
    assert a.shape == b.shape
    # the colour words differ, and so do the states of the shapes they bind to ("circle", "star")
    ids = tokenizer(red).input_ids
    circle = ids.index(tokenizer("circle", add_special_tokens=False).input_ids[-1])
    assert not torch.allclose(a[circle], b[circle], atol=1e-3)
    assert json.loads((folder / "training.json").read_text())["held_out"]["dense_exact"] > 0.5
    assert np.isfinite(a.numpy()).all()


def test_shipped_pixart_draws_asked_backgrounds_object_colours_and_shapes_above_chance():
    """The shipped stage-2 checkpoint, judged as `make eval` judges it, on prompts of its own
    suite seed: backgrounds, one object's colour and its shape follow the prompt above
    chance. Its card holds the full evaluation (two-object binding does not follow yet)."""
    from analysis.alignment import passes, sample_case
    from analysis.scene_check import judge, read_image
    from training.pipelines import generate, load_pipeline

    folder = MODELS / "synthetic-pixart"
    pipe = load_pipeline(str(folder), device="cpu")
    pipe.transformer.float()
    # Measured 30 of 32 backgrounds, 30 of 32 colours and 23 of 64 shapes. Chance is 6.8%,
    # 7.8% and 20.4% (2.2, 2.5 and 13 of the prompts): a prompt-blind model reaches the colour
    # thresholds with p < 1e-15 and the shape one with p = 0.027; shape gets 64 prompts as its
    # chance is high and its rate modest (40% in the card's evaluation).
    for category, count, threshold in (("background", 32, 24), ("colour", 32, 24), ("shape", 64, 20)):
        cases = [sample_case(category, i, seed=77) for i in range(count)]
        images = generate(pipe, [c.prompt for c in cases], height=64, width=64, steps=20, seed=3)
        right = sum(passes(category, judge(c.scene, read_image(image))) for c, image in zip(cases, images))
        assert right >= threshold, f"{right} of {count} {category} prompts followed"
        card = json.loads((folder / "alignment.json").read_text())["categories"][category]
        assert card["ci95"][0] > card["chance"]
