"""Where a stage's model comes from, and how it is fitted to the stage.

A stage starts from nothing (a registry size, with PixArt's or DiT's initialisation), from
one of our checkpoints (its EMA weights), or from a diffusers folder: another stage's export
(`init_stage`) or a released model (`init`). A text stage that starts from a DiT imports it by
the paper's reparameterisation (training/dit_import.py): that is how stage 2 starts from
stage 1. A PixArt model is then fitted to the stage:

* a new resolution keeps the weights and stretches the positional grid (``interpolation_scale``,
  PixArt's ``lewei_scale``) by new/old size, so the larger grid spans exactly the positions
  the model was trained on instead of extrapolating past them: 512 -> 1024 gives PixArt's
  1 -> 2. PixArt's table keeps 1 from 256 to 512 (it extrapolates there); a stage's
  ``interpolation_scale`` sets the value explicitly to follow it;
* switching the micro-conditions on (PixArt-α 1024's size and aspect-ratio embeddings) adds
  those two MLPs with a zero output layer, so the model computes exactly what it did until
  training moves them.
"""

from __future__ import annotations

import json
import logging
import os
from typing import TYPE_CHECKING, Any

import torch

from shardkit.config import StageConfig
from training import checkpoint

if TYPE_CHECKING:
    from training.trainer import TrainContext

log = logging.getLogger(__name__)

PIXART, DIT = "PixArtTransformer2DModel", "DiTTransformer2DModel"
CONDITIONS_SAMPLE_SIZE = 128
"""PixArtAlphaPipeline passes the micro-conditions only to a transformer of sample size 128."""


class StartError(ValueError):
    pass


def model_folder(init: str) -> str:
    """A diffusers pipeline folder's transformer, or a transformer folder itself."""
    return os.path.join(init, "transformer") if os.path.isdir(os.path.join(init, "transformer")) else init


def is_checkpoint(init: str) -> bool:
    return os.path.exists(os.path.join(init, "state.pt"))


def model_config(init: str) -> dict[str, Any]:
    path = os.path.join(model_folder(init), "config.json")
    try:
        with open(path) as f:
            config = json.load(f)
    except (OSError, ValueError):
        config = None
    if not isinstance(config, dict) or "_class_name" not in config:
        raise StartError(f"{init}: no diffusers model (no readable {path})")
    return config


def model_class(init: str) -> str:
    return model_config(init)["_class_name"]


def check(cfg: StageConfig, init: str | None, ctx: TrainContext) -> None:
    """Refuse, before any worker starts, a starting model that cannot read these features."""
    sample_size = ctx.resolution // ctx.vae_scale_factor
    if cfg.use_additional_conditions and sample_size != CONDITIONS_SAMPLE_SIZE:
        raise StartError(f"use_additional_conditions needs sample size {CONDITIONS_SAMPLE_SIZE} (1024 px with SD's VAE); "
                         f"this stage has {sample_size}: PixArtAlphaPipeline passes the conditions at no other size")
    if not init or is_checkpoint(init):
        return  # a checkpoint of ours: built from the registry with these features' sizes
    config = model_config(init)
    kind = config["_class_name"]
    allowed = {"text": (PIXART, DIT), "class": (DIT,)}[cfg.conditioning]
    if kind not in allowed:
        raise StartError(f"{init}: a {cfg.conditioning}-conditioned stage cannot start from a {kind}")
    if config["in_channels"] != ctx.latent_channels:
        raise StartError(f"{init}: the model takes {config['in_channels']} latent channels, the VAE makes "
                         f"{ctx.latent_channels}")
    if kind == PIXART and config["caption_channels"] != ctx.caption_channels:
        raise StartError(f"{init}: the model takes {config['caption_channels']}-dim captions, the features "
                         f"hold {ctx.caption_channels}-dim T5 embeddings: use the text encoder it was trained with")


def build(ctx: TrainContext) -> tuple[Any, dict[str, Any]]:
    """The stage's model, and a note of how it started (written to the run folder)."""
    from diffusers import DiTTransformer2DModel, PixArtTransformer2DModel

    from training.architectures import disable_label_dropout

    cfg, init = ctx.stage, ctx.init
    note: dict[str, Any] = {"init": init}
    if init and is_checkpoint(init):
        model = _registry_model(cfg, ctx)
        model.load_state_dict(checkpoint.load(init, rank=-1)[0]["ema"])
        note["from"] = "checkpoint"
    elif init and cfg.conditioning == "class":
        model = DiTTransformer2DModel.from_pretrained(model_folder(init))
        note["from"] = "dit"
    elif init and model_class(init) == DIT:
        from training.dit_import import convert_dit

        model, report = convert_dit(model_folder(init), caption_channels=ctx.caption_channels, seed=cfg.seed)
        note.update({"from": "dit_import", "import_report": report.to_json()})
    elif init:
        model = PixArtTransformer2DModel.from_pretrained(model_folder(init))
        note["from"] = "pixart"
    else:
        model = _registry_model(cfg, ctx)
        note["from"] = "registry"
    if cfg.conditioning == "class":
        disable_label_dropout(model)
        return model, note
    model, changes = fit(model, resolution=ctx.resolution, vae_scale_factor=ctx.vae_scale_factor,
                         use_additional_conditions=cfg.use_additional_conditions,
                         interpolation_scale=cfg.interpolation_scale)
    note["fitted"] = changes
    return model, note


def _registry_model(cfg: StageConfig, ctx: TrainContext) -> Any:
    from training.architectures import build_dit, build_transformer

    if cfg.conditioning == "class":
        return build_dit(cfg.model, resolution=ctx.resolution, latent_channels=ctx.latent_channels,
                         learned_sigma=cfg.learned_sigma, vae_scale_factor=ctx.vae_scale_factor, seed=cfg.seed)
    return build_transformer(cfg.model, resolution=ctx.resolution, latent_channels=ctx.latent_channels,
                             caption_channels=ctx.caption_channels, learned_sigma=cfg.learned_sigma,
                             use_additional_conditions=cfg.use_additional_conditions,
                             vae_scale_factor=ctx.vae_scale_factor, seed=cfg.seed)


def _interpolation_scale(config: Any) -> float:
    # diffusers' PixArtTransformer2DModel default when the config leaves it unset
    return config.interpolation_scale if config.interpolation_scale is not None else max(config.sample_size // 64, 1)


def fit(model: Any, *, resolution: int, vae_scale_factor: int, use_additional_conditions: bool | None,
        interpolation_scale: float | None = None) -> tuple[Any, list[str]]:
    """``model`` (a PixArtTransformer2DModel) at ``resolution`` with the micro-conditions as
    asked (None: as it is); returns it (the same object if nothing changes) and what changed.
    ``interpolation_scale`` None: stretched by new/old size (see the module's docstring)."""
    from diffusers import PixArtTransformer2DModel

    old = model.config
    if resolution % vae_scale_factor or (resolution // vae_scale_factor) % old.patch_size:
        raise StartError(f"resolution {resolution} is not a multiple of VAE factor {vae_scale_factor} x patch {old.patch_size}")
    sample_size = resolution // vae_scale_factor
    conditions = old.use_additional_conditions if use_additional_conditions is None else use_additional_conditions
    if conditions and sample_size != CONDITIONS_SAMPLE_SIZE:
        raise StartError(f"micro-conditions need sample size {CONDITIONS_SAMPLE_SIZE} (1024 px with SD's VAE), this "
                         f"stage has {sample_size}: PixArtAlphaPipeline passes them at no other size, so the exported "
                         f"model could not generate")
    if conditions and (old.num_attention_heads * old.attention_head_dim) % 3:
        raise StartError(f"micro-conditions need a width divisible by 3 (the size and aspect-ratio embeddings take a "
                         f"third each); this model is {old.num_attention_heads * old.attention_head_dim} wide")
    scale = _interpolation_scale(old)
    if sample_size != old.sample_size:
        scale = interpolation_scale if interpolation_scale is not None else scale * sample_size / old.sample_size
        scale = int(scale) if float(scale).is_integer() else scale
    if sample_size == old.sample_size and conditions == old.use_additional_conditions:
        return model, []
    changes = []
    config = {k: v for k, v in old.items() if not k.startswith("_")}
    if sample_size != old.sample_size:
        changes.append(f"sample size {old.sample_size} -> {sample_size}, positional interpolation scale "
                       f"{_interpolation_scale(old)} -> {scale}")
        config.update(sample_size=sample_size, interpolation_scale=scale)
    if conditions != old.use_additional_conditions:
        changes.append(f"micro-conditions {'added (zero output layers)' if conditions else 'removed'}")
        config["use_additional_conditions"] = conditions
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        fitted = PixArtTransformer2DModel(**config)
    state = model.state_dict()
    missing, unexpected = fitted.load_state_dict(state, strict=False)
    condition_keys = ("adaln_single.emb.resolution_embedder.", "adaln_single.emb.aspect_ratio_embedder.")
    stray = [k for k in list(missing) + list(unexpected) if not k.startswith(condition_keys)]
    if stray:
        raise StartError(f"cannot fit the model: unexpected differences in {stray[:5]}")
    if conditions and missing:
        emb = fitted.adaln_single.emb
        with torch.no_grad():
            for mlp in (emb.resolution_embedder, emb.aspect_ratio_embedder):
                torch.nn.init.normal_(mlp.linear_1.weight, std=0.02)
                torch.nn.init.zeros_(mlp.linear_1.bias)
                torch.nn.init.zeros_(mlp.linear_2.weight)
                torch.nn.init.zeros_(mlp.linear_2.bias)
    for change in changes:
        log.info("starting model: %s", change)
    return fitted, changes
