"""PixArt-α pipelines: export a trained transformer with its encoders as a diffusers
pipeline folder, load one, and sample from it with the paper's settings.

``export_pipeline`` assembles a ``PixArtAlphaPipeline`` folder (``export_dit_pipeline`` stage
1's ``DiTPipeline``) and ``generate`` samples from it with PixArt's settings (DPM-Solver, 20
steps, guidance 4.5, 120 T5 tokens).
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shardkit.folders import write_folder
from training.encoders import vae_scale_factor

if TYPE_CHECKING:
    from diffusers import PixArtAlphaPipeline
    from PIL import Image

log = logging.getLogger(__name__)

# PixArt-α's diffusion: DDPM with 1000 steps and linear betas 1e-4..0.02 (its repo's
# IDDPM(timestep_respacing="") defaults). The training loop and the samplers share it.
NOISE_SCHEDULE: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
}
MAX_SEQUENCE_LENGTH = 120  # PixArt-α's T5 token budget


def default_scheduler():
    """PixArt-α's sampler as published with its diffusers weights: DPM-Solver++ (2nd order)
    over the training schedule, ε-prediction (the pipeline drops the learned-sigma half)."""
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler(**NOISE_SCHEDULE, prediction_type="epsilon",
                                       algorithm_type="dpmsolver++", solver_order=2,
                                       solver_type="midpoint", lower_order_final=True,
                                       timestep_spacing="linspace")


def _check_compatible(transformer: Any, text_encoder: Any, vae: Any) -> None:
    cfg = transformer.config
    if cfg.caption_channels != text_encoder.config.d_model:
        raise ValueError(f"transformer caption_channels {cfg.caption_channels} != text encoder "
                         f"d_model {text_encoder.config.d_model}")
    if cfg.in_channels != vae.config.latent_channels:
        raise ValueError(f"transformer in_channels {cfg.in_channels} != VAE latent_channels "
                         f"{vae.config.latent_channels}")


def export_pipeline(folder: str, *, transformer: Any, text_encoder_dir: str, vae_dir: str,
                    scheduler: Any = None) -> str:
    """Save a ``PixArtAlphaPipeline`` (transformer — a model or a saved folder — plus the T5
    encoder and tokenizer from ``text_encoder_dir``, the VAE and ``scheduler``, default
    ``default_scheduler()``) into ``folder``, replacing a pipeline there atomically."""
    from diffusers import AutoencoderKL, PixArtAlphaPipeline, PixArtTransformer2DModel
    from transformers import AutoTokenizer, T5EncoderModel

    if isinstance(transformer, (str, os.PathLike)):
        transformer = PixArtTransformer2DModel.from_pretrained(transformer)
    text_encoder = T5EncoderModel.from_pretrained(text_encoder_dir)
    vae = AutoencoderKL.from_pretrained(vae_dir)
    _check_compatible(transformer, text_encoder, vae)
    pipe = PixArtAlphaPipeline(tokenizer=AutoTokenizer.from_pretrained(text_encoder_dir),
                               text_encoder=text_encoder, vae=vae, transformer=transformer,
                               scheduler=scheduler if scheduler is not None else default_scheduler())
    target = Path(folder)
    if target.exists() and any(target.iterdir()) and not (target / "model_index.json").is_file():
        raise FileExistsError(f"{target} is not empty and holds no pipeline")
    write_folder(target, lambda tmp: pipe.save_pretrained(tmp, safe_serialization=True))
    log.info("exported PixArtAlphaPipeline to %s", target)
    return folder


def export_dit_pipeline(folder: str, *, transformer: Any, vae_dir: str, classes: list[str],
                        scheduler: Any = None) -> str:
    """Save a ``DiTPipeline`` (stage 1's class-conditional model, the VAE, ``scheduler``) into
    ``folder``; ``id2label`` (class id → name) goes into model_index.json, where
    ``DiTPipeline.from_pretrained`` reads it back (``pipe.labels``, ``get_label_ids``)."""
    from diffusers import AutoencoderKL, DiTPipeline

    vae = AutoencoderKL.from_pretrained(vae_dir)
    if transformer.config.in_channels != vae.config.latent_channels:
        raise ValueError(f"transformer in_channels {transformer.config.in_channels} != VAE latent_channels "
                         f"{vae.config.latent_channels}")
    id2label = {str(i): name for i, name in enumerate(classes)}
    pipe = DiTPipeline(transformer=transformer, vae=vae, scheduler=scheduler if scheduler is not None else default_scheduler(),
                       id2label=id2label)
    target = Path(folder)
    if target.exists() and any(target.iterdir()) and not (target / "model_index.json").is_file():
        raise FileExistsError(f"{target} is not empty and holds no pipeline")

    def write(tmp: Path) -> None:
        pipe.save_pretrained(tmp, safe_serialization=True)
        index = json.loads((tmp / "model_index.json").read_text())
        (tmp / "model_index.json").write_text(json.dumps({**index, "id2label": id2label}, indent=2) + "\n")

    write_folder(target, write)
    log.info("exported DiTPipeline (%d classes) to %s", len(classes), target)
    return folder


def load_pipeline(folder: str, device: str | None = None) -> PixArtAlphaPipeline:
    import torch
    from diffusers import PixArtAlphaPipeline

    from shardkit import storage

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    # an export on an object store is read from a local copy (from_pretrained reads folders)
    return PixArtAlphaPipeline.from_pretrained(storage.local_folder(folder)).to(device)


def generate(folder_or_pipeline: Any, prompts: list[str], *, height: int, width: int, steps: int = 20,
             guidance_scale: float = 4.5, seed: int = 0, negative_prompt: str = "",
             device: str | None = None) -> list[Image.Image]:
    """Sample one image per prompt with PixArt's settings. Sizes are taken as given (no
    resolution binning) and must be multiples of VAE factor × patch size. Captions are not
    cleaned (that needs bs4/ftfy). The noise comes from a CPU generator, so a seed gives the
    same images on any device."""
    import torch
    from diffusers import PixArtAlphaPipeline

    pipe = (folder_or_pipeline if isinstance(folder_or_pipeline, PixArtAlphaPipeline)
            else load_pipeline(folder_or_pipeline, device))
    multiple = vae_scale_factor(pipe.vae) * pipe.transformer.config.patch_size
    if height % multiple or width % multiple or height % 8 or width % 8:
        raise ValueError(f"height and width must be multiples of {math.lcm(multiple, 8)}, got {height}×{width}")
    pipe.set_progress_bar_config(disable=True)
    with torch.inference_mode():
        out = pipe(
            prompt=list(prompts), negative_prompt=negative_prompt, height=height, width=width,
            num_inference_steps=steps, guidance_scale=guidance_scale,
            generator=torch.Generator("cpu").manual_seed(seed),
            use_resolution_binning=False, clean_caption=False,
            max_sequence_length=min(MAX_SEQUENCE_LENGTH, pipe.tokenizer.model_max_length),
            output_type="pil",
        )
    return out.images
