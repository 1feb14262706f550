"""The synthetic T5's trainer (training/train_text_encoder.py) on a tiny budget."""

from __future__ import annotations

import hashlib
import json

import numpy as np

from synthetic import scenes
from training.train_text_encoder import TextEncoderTrainConfig, restatement, train

TINY = dict(steps=3, batch_size=8, eval_lines=8, log_every=1, encoder_layers=1, decoder_layers=1)


def test_restatement_lists_objects_kind_first_sorted_by_kind():
    caption = "A small red star at the top left and a large blue circle in the center, on a striped white background."
    assert restatement(caption) == "circle blue large center; star red small top left; background white stripes"
    assert restatement("Blue star png transparent") == "Blue star png transparent"  # alt text: itself
    rng = np.random.default_rng(5)
    for _ in range(50):  # every fact of a scene survives the restatement
        scene = scenes.sample_scene(rng, scenes.SceneOptions(max_objects=6))
        said = restatement(scenes.describe(scene))
        for o in scene.objects:
            assert f"{o.kind} {o.colour} {o.size} {o.position}" in said
        assert said.endswith(f"background {scene.background} {scene.texture}")


def test_text_encoder_trainer_is_deterministic_and_ships_an_encoder(tmp_path):
    from transformers import AutoTokenizer, T5EncoderModel

    first = train(str(tmp_path / "a"), TextEncoderTrainConfig(**TINY))
    train(str(tmp_path / "b"), TextEncoderTrainConfig(**TINY))
    digests = [hashlib.sha256((tmp_path / n / "model.safetensors").read_bytes()).hexdigest() for n in "ab"]
    assert digests[0] == digests[1]  # same seed, same weights
    encoder = T5EncoderModel.from_pretrained(tmp_path / "a")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "a")
    assert encoder.config.d_model == 64  # the demo PixArt's caption_channels
    assert not any(name.startswith("decoder") for name in encoder.state_dict())
    states = encoder(**tokenizer(["A large red circle in the center, on a plain blue background."], return_tensors="pt"))
    assert states.last_hidden_state.shape[-1] == 64
    assert first["encoder_parameters"] < first["parameters"]
    summary = json.loads((tmp_path / "a" / "training.json").read_text())
    assert summary["held_out"]["dense_lines"] + summary["held_out"]["alt_text_lines"] == 8
    assert (tmp_path / "a" / "README.md").read_text().startswith("# synthetic-t5")
    assert not (tmp_path / ".a.training" / "state.pt").exists()
