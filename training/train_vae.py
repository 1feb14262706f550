"""Train the synthetic domain's VAE: a small diffusers ``AutoencoderKL``, from scratch, here.

The CPU demo trains PixArt in a VAE's latent space, as the paper does with SD's VAE. A
random VAE's latents keep the image only by accident; this one is trained on scenes of the
synthetic generator to reconstruct them, so that what the diffusion model learns in latent
space decodes back to the objects and colours the prompts ask for.

Choices, and why:
* The shape of ``training.encoders.build_vae``'s VAE (two blocks, factor 2, 4 latent
  channels): a drop-in for the random tiny VAE, so feature sets and stage configs keep their
  sizes; at 64 px a latent is 32x32x4. Narrower (16 and 32 channels) and without the
  mid-block attention (over 32x32 positions it cost most of a step; a factor-2 code needs no
  global context): a CPU trains it in minutes, and flat colours need no more.
* GroupNorm with 4 groups: at 16 channels, SD's rule (up to 32 groups) gives one channel per
  group, an instance norm, and a first run decoded a recurring coloured blotch beside objects,
  the "droplet" artefact StyleGAN2 traced to per-channel normalisation.
* Loss: L1 + MSE reconstruction of a posterior sample plus a small KL term (1e-6, the order
  SD's autoencoders use); no perceptual or adversarial loss, which flat colours and hard edges
  do not need. L1 alone left colours off by a few levels over large flat areas.
* ``scaling_factor`` is measured, not assumed: 1 / std of the posterior means over held-out
  scenes, as SD's 0.18215 was, so scaled latents have unit variance for the diffusion.
* Fresh scenes every step (seeded by step), centre-cropped to 64 px as the feature stage does;
  held-out scenes come from a disjoint seed stream. Deterministic given the seed.

``python -m training.train_vae OUT [--steps N] [--seed S]``; ``make train-vae``.
"""

from __future__ import annotations

import logging
import math
import sys
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np
import torch

from synthetic import scenes

log = logging.getLogger(__name__)

HELD_OUT_STREAM = 1_000_003


@dataclass
class VaeTrainConfig:
    seed: int = 0
    steps: int = 2400
    batch_size: int = 24
    lr: float = 8e-4
    warmup_steps: int = 50
    kl_weight: float = 1e-6
    resolution: int = 64
    block_out_channels: tuple[int, ...] = (16, 32)
    norm_num_groups: int = 4
    latent_channels: int = 4
    eval_images: int = 256
    log_every: int = 50
    checkpoint_every: int = 200


def images(seed: int, stream: int, index: int, count: int, resolution: int) -> torch.Tensor:
    """``count`` rendered scenes, centre-cropped to ``resolution``, in [-1, 1], NCHW."""
    from training.features import center_crop

    rng = np.random.default_rng([seed, stream, index])
    pictures = [center_crop(scenes.render(scenes.sample_scene(rng)), resolution) for _ in range(count)]
    array = np.stack([np.asarray(p, dtype=np.float32) for p in pictures]) / 127.5 - 1.0
    return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()


def build(cfg: VaeTrainConfig):  # -> AutoencoderKL
    from diffusers import AutoencoderKL

    from training.encoders import VAE_SCALING_FACTOR, vae_config

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return AutoencoderKL(**vae_config(cfg.latent_channels, tuple(cfg.block_out_channels), VAE_SCALING_FACTOR,
                                            cfg.norm_num_groups),
                             mid_block_add_attention=False)


def evaluate(vae, cfg: VaeTrainConfig) -> dict[str, float]:  # noqa: ANN001
    """Reconstruction of held-out scenes from the posterior mean, in 0-255 pixel units, and
    the latent statistics that set the scaling factor."""
    vae.eval()
    errors, squared, means = [], [], []
    with torch.inference_mode():
        for start in range(0, cfg.eval_images, 32):
            x = images(cfg.seed, HELD_OUT_STREAM, start, min(32, cfg.eval_images - start), cfg.resolution)
            mean = vae.encode(x).latent_dist.mean
            out = vae.decode(mean).sample.clamp(-1, 1)
            diff = (out - x) * 127.5
            errors.append(diff.abs().mean().item())
            squared.append((diff ** 2).mean().item())
            means.append(mean)
    vae.train()
    latents = torch.cat(means)
    mse = float(np.mean(squared))
    return {"mae": round(float(np.mean(errors)), 3), "psnr_db": round(10 * math.log10(255 ** 2 / max(mse, 1e-12)), 2),
            "latent_mean": round(latents.mean().item(), 4), "latent_std": round(latents.std().item(), 4)}


def train(out: str, cfg: VaeTrainConfig) -> dict:
    """Train (resuming from an interrupted run's state), measure, save into ``out``."""
    from training.script_training import ScriptRun

    run = ScriptRun(out, cfg.seed, log)
    vae = build(cfg)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=cfg.lr, weight_decay=0.0)
    run.resume(vae, optimizer)
    parameters = sum(p.numel() for p in vae.parameters())
    log.info("VAE: %.2fM parameters, %d steps of %d", parameters / 1e6, cfg.steps, cfg.batch_size)

    def step_loss(step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = images(cfg.seed, 0, step, cfg.batch_size, cfg.resolution)
        posterior = vae.encode(x).latent_dist
        out_ = vae.decode(posterior.sample()).sample
        reconstruction = (out_ - x).abs().mean()
        squared = ((out_ - x) ** 2).mean()
        kl = posterior.kl().mean() / x[0].numel()
        return reconstruction + squared + cfg.kl_weight * kl * x[0].numel(), reconstruction, kl

    def report(result: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> tuple[dict, str]:
        _, reconstruction, kl = result
        fields = {"l1": round(reconstruction.item(), 5), "kl": round(kl.item(), 5)}
        return fields, f"L1 {fields['l1']:.4f}, KL/dim {fields['kl']:.3f}"

    run.train(step_loss, steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr, warmup_steps=cfg.warmup_steps,
              floor=0.05, log_every=cfg.log_every, checkpoint_every=cfg.checkpoint_every, report=report)
    metrics = evaluate(vae, cfg)
    vae.register_to_config(scaling_factor=round(1.0 / metrics["latent_std"], 5))
    log.info("held-out reconstruction: %s; scaling_factor %s", metrics, vae.config.scaling_factor)
    summary = {"parameters": parameters, "steps": cfg.steps, "batch_size": cfg.batch_size, "held_out": metrics,
               "scaling_factor": vae.config.scaling_factor, "config": asdict(cfg), "torch": torch.__version__,
               "median_images_per_s": run.median_rate()}

    run.finish(lambda tmp: vae.save_pretrained(tmp, safe_serialization=True), summary, model_card(summary))
    return summary


def model_card(summary: dict) -> str:
    cfg, held = summary["config"], summary["held_out"]
    factor = 2 ** (len(cfg["block_out_channels"]) - 1)
    return f"""# synthetic-vae

A diffusers `AutoencoderKL` ({summary['parameters'] / 1e6:.2f}M parameters; blocks
{list(cfg['block_out_channels'])}, factor {factor}, {cfg['latent_channels']} latent channels) trained from scratch by
`make train-vae` (training/train_vae.py, seed {cfg['seed']}) to reconstruct this project's
synthetic scenes at {cfg['resolution']} px. For the embedded demo only.

- Training: {summary['steps']} steps of {summary['batch_size']} fresh scenes, AdamW lr {cfg['lr']} (warm-up, cosine),
  L1 + MSE reconstruction of a posterior sample + {cfg['kl_weight']} x KL, GroupNorm in {cfg['norm_num_groups']} groups, float32 on CPU, about
  {summary['median_images_per_s'] or float('nan'):.0f} images/s on the 2-vCPU development machine.
- `scaling_factor` {summary['scaling_factor']}: 1 / std of held-out posterior means (std {held['latent_std']}).

## Reconstruction of {cfg['eval_images']} held-out scenes (posterior mean)

| measure | value |
|---|---|
| mean absolute error (0-255) | {held['mae']} |
| PSNR | {held['psnr_db']} dB |
"""


def main(argv: Sequence[str] | None = None) -> int:
    from training.script_training import script_main, script_parser

    parser = script_parser("python -m training.train_vae", __doc__, "output folder (a diffusers AutoencoderKL + card)",
                           VaeTrainConfig)
    return script_main(parser, argv, lambda args: train(args.out, VaeTrainConfig(steps=args.steps, seed=args.seed)))


if __name__ == "__main__":
    sys.exit(main())
