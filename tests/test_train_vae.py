"""The synthetic VAE's trainer (training/train_vae.py) on a tiny budget."""

from __future__ import annotations

import hashlib
import json

from training.train_vae import VaeTrainConfig, train

TINY = dict(steps=3, batch_size=4, eval_images=8, log_every=1, block_out_channels=(8, 16), norm_num_groups=4)


def test_vae_trainer_is_deterministic_and_measures_its_scaling_factor(tmp_path):
    from diffusers import AutoencoderKL

    first = train(str(tmp_path / "a"), VaeTrainConfig(**TINY))
    train(str(tmp_path / "b"), VaeTrainConfig(**TINY))
    digests = [hashlib.sha256((tmp_path / n / "diffusion_pytorch_model.safetensors").read_bytes()).hexdigest() for n in "ab"]
    assert digests[0] == digests[1]  # same seed, same weights
    vae = AutoencoderKL.from_pretrained(tmp_path / "a")
    assert vae.config.scaling_factor == first["scaling_factor"]
    assert abs(first["scaling_factor"] * first["held_out"]["latent_std"] - 1) < 1e-3  # unit-variance latents
    assert 2 ** (len(vae.config.block_out_channels) - 1) == 2 and vae.config.latent_channels == 4
    assert json.loads((tmp_path / "a" / "training.json").read_text())["steps"] == 3
    assert (tmp_path / "a" / "README.md").read_text().startswith("# synthetic-vae")
    assert not (tmp_path / ".a.training" / "state.pt").exists()
