"""What a stage conditions on: T5 captions (PixArt, stages 2 and 3) or class labels (DiT,
stage 1). The training loop is the same; these say how a batch enters the model, how its
condition is dropped for classifier-free guidance, how validation grids are sampled and
which diffusers pipeline is exported.
"""

from __future__ import annotations

import functools
import os
from typing import TYPE_CHECKING

import torch
from PIL import Image

from shardkit.config import StageConfig

if TYPE_CHECKING:
    from training.trainer import TrainContext


def _save_grid(images: list[Image.Image], path: str) -> None:
    width, height = images[0].size
    grid = Image.new("RGB", (width * len(images), height))
    for i, image in enumerate(images):
        grid.paste(image, (i * width, 0))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    grid.save(path + ".tmp.png")
    os.replace(path + ".tmp.png", path)


def grid_paths(path: str, sizes: list[tuple[int, int]]) -> list[str]:
    """The first size's grid is `path`, the others get their size in the name."""
    stem = path.removesuffix(".png")
    return [path if i == 0 else f"{stem}_{h}x{w}.png" for i, (h, w) in enumerate(sizes)]


class Conditioning:
    """What both conditionings share: the worker's context, and the VAE that decodes their
    sample grids."""

    def __init__(self, ctx: TrainContext) -> None:
        self.ctx = ctx

    @functools.cached_property
    def vae(self):  # -> AutoencoderKL
        """Loaded at the first grid, kept for the run's others."""
        from diffusers import AutoencoderKL

        return AutoencoderKL.from_pretrained(self.ctx.vae_dir)


class TextConditioning(Conditioning):
    """PixArtTransformer2DModel on padded T5 embeddings; the empty caption's embedding is
    both the dropped caption in training and the unconditional input at sampling time."""

    def __init__(self, ctx: TrainContext, micro_conditions: bool) -> None:
        super().__init__(ctx)
        self.null_text = torch.tensor(ctx.null_embed, dtype=torch.float32)
        self.micro_conditions = micro_conditions

    def drop(self, batch: dict[str, torch.Tensor], probability: float) -> dict[str, torch.Tensor]:
        if probability <= 0:
            return batch
        drop = torch.rand(len(batch["text"])) < probability
        if not drop.any():
            return batch
        text, mask = batch["text"], batch["mask"]
        n = len(self.null_text)
        if n > text.shape[1]:
            text = torch.nn.functional.pad(text, (0, 0, 0, n - text.shape[1]))
            mask = torch.nn.functional.pad(mask, (0, n - mask.shape[1]))
        text, mask = text.clone(), mask.clone()
        text[drop], mask[drop] = 0.0, 0
        text[drop, :n], mask[drop, :n] = self.null_text, 1
        return {**batch, "text": text, "mask": mask}

    def predict(self, model, x_t: torch.Tensor, t: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:  # noqa: ANN001
        device = x_t.device
        added = {"resolution": None, "aspect_ratio": None}
        if self.micro_conditions:
            added = {"resolution": batch["resolution"].to(device), "aspect_ratio": batch["aspect_ratio"].to(device)}
        return model(x_t, encoder_hidden_states=batch["text"].to(device), encoder_attention_mask=batch["mask"].to(device),
                     timestep=t, added_cond_kwargs=added, return_dict=False)[0]

    def sample_grids(self, ema, cfg: StageConfig, path: str) -> None:  # noqa: ANN001
        """Validation prompts through PixArtAlphaPipeline with the EMA weights and precomputed
        prompt embeddings, so no text encoder has to stay loaded on the trainer."""
        from diffusers import PixArtAlphaPipeline

        from training.pipelines import default_scheduler

        pipe = PixArtAlphaPipeline(tokenizer=None, text_encoder=None, vae=self.vae, transformer=ema.float().to("cpu"),
                                   scheduler=default_scheduler())
        pipe.set_progress_bar_config(disable=True)
        prompts = torch.tensor(self.ctx.prompt_embeds, dtype=torch.float32)
        masks = torch.tensor(self.ctx.prompt_masks, dtype=torch.long)
        null, null_mask = torch.zeros_like(prompts), torch.zeros_like(masks)
        null[:, : len(self.null_text)], null_mask[:, : len(self.null_text)] = self.null_text, 1
        sizes = self.ctx.sample_sizes
        for (height, width), target in zip(sizes, grid_paths(path, sizes)):
            with torch.inference_mode():
                images = pipe(prompt=None, negative_prompt=None, prompt_embeds=prompts, prompt_attention_mask=masks,
                              negative_prompt_embeds=null, negative_prompt_attention_mask=null_mask,
                              height=height, width=width, num_inference_steps=cfg.sample_steps,
                              guidance_scale=cfg.guidance_scale, generator=torch.Generator("cpu").manual_seed(0),
                              use_resolution_binning=False, output_type="pil").images
            _save_grid(images, target)

    def export(self, ema, folder: str) -> None:  # noqa: ANN001
        from training.pipelines import export_pipeline

        export_pipeline(folder, transformer=ema.to("cpu").float(), text_encoder_dir=self.ctx.text_encoder_dir,
                        vae_dir=self.ctx.vae_dir)


class ClassConditioning(Conditioning):
    """DiTTransformer2DModel on class ids; a dropped label becomes the null class (1000,
    what DiTPipeline feeds as the unconditional input)."""

    def __init__(self, ctx: TrainContext, micro_conditions: bool) -> None:
        from training.architectures import DIT_NUM_CLASSES

        super().__init__(ctx)
        self.null_class = DIT_NUM_CLASSES

    def drop(self, batch: dict[str, torch.Tensor], probability: float) -> dict[str, torch.Tensor]:
        if probability <= 0:
            return batch
        drop = torch.rand(len(batch["label"])) < probability
        return {**batch, "label": torch.where(drop, self.null_class, batch["label"])}

    def predict(self, model, x_t: torch.Tensor, t: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:  # noqa: ANN001
        return model(x_t, timestep=t, class_labels=batch["label"].to(x_t.device), return_dict=False)[0]

    def sample_grids(self, ema, cfg: StageConfig, path: str) -> None:  # noqa: ANN001
        from diffusers import DiTPipeline

        from training.pipelines import default_scheduler

        pipe = DiTPipeline(transformer=ema.float().to("cpu"), vae=self.vae, scheduler=default_scheduler())
        pipe.set_progress_bar_config(disable=True)
        classes = self.ctx.classes
        with torch.inference_mode():
            images = pipe(class_labels=[classes.index(name) for name in cfg.validation_prompts],
                          guidance_scale=cfg.guidance_scale, num_inference_steps=cfg.sample_steps,
                          generator=torch.Generator("cpu").manual_seed(0), output_type="pil").images
        _save_grid(images, path)

    def export(self, ema, folder: str) -> None:  # noqa: ANN001
        from training.pipelines import export_dit_pipeline

        export_dit_pipeline(folder, transformer=ema.to("cpu").float(), vae_dir=self.ctx.vae_dir,
                            classes=self.ctx.classes)


CONDITIONINGS = {"text": TextConditioning, "class": ClassConditioning}
