"""PixArt-α's transformer by name: the size registry and the builders of PixArt and DiT models.

The transformer is diffusers' ``PixArtTransformer2DModel``. Sizes live in a name → factory
registry, as facebookresearch/DiT's ``DiT_models`` does: each factory returns the
architecture kwargs, and ``transformer_config`` adds what depends on the data (resolution,
latent channels, caption width, learned sigma). ``build_dit`` builds stage 1's
class-conditional ``DiTTransformer2DModel`` at the same sizes.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from diffusers import PixArtTransformer2DModel

log = logging.getLogger(__name__)


# Factories return architecture kwargs; overrides win, as in DiT's DiT_XL_2(**kwargs).

def PixArt_XL_2(**overrides: Any) -> dict:
    """The paper's model: DiT-XL/2 blocks (28 × 1152, 16 heads × 72) with cross-attention
    to T5-XXL (4096-wide) embeddings; ~611M parameters."""
    return {"num_layers": 28, "num_attention_heads": 16, "attention_head_dim": 72, "patch_size": 2,
            "caption_channels": 4096, **overrides}


def PixArt_mini_2(**overrides: Any) -> dict:
    """~7M parameters (6 × 256): the largest size a CPU trains in minutes."""
    return {"num_layers": 6, "num_attention_heads": 8, "attention_head_dim": 32, "patch_size": 2,
            "caption_channels": 64, **overrides}


def PixArt_tiny_2(**overrides: Any) -> dict:
    """~1.8M parameters (6 × 128): for tests and CPU demos. caption_channels matches
    build_text_encoder's default d_model."""
    return {"num_layers": 6, "num_attention_heads": 4, "attention_head_dim": 32, "patch_size": 2,
            "caption_channels": 64, **overrides}


def PixArt_tiny_8(**overrides: Any) -> dict:
    """8x8 patches, 96 wide: 16x16 tokens at sample size 128, which is where
    PixArtAlphaPipeline feeds the micro-conditions, for CPU tests of that path. The width is
    a multiple of 3 because the size and aspect-ratio embeddings each take a third of it."""
    return {"num_layers": 4, "num_attention_heads": 6, "attention_head_dim": 16, "patch_size": 8,
            "caption_channels": 64, **overrides}


def PixArt_tiny_4(**overrides: Any) -> dict:
    """~3M parameters (8 × 128), 4x4 patches: 8x8 tokens on a 64 px image's 32x32 latent,
    a quarter of /2's tokens, so a CPU sees four times the images in the same hours. The
    shipped synthetic checkpoint's size."""
    return {"num_layers": 8, "num_attention_heads": 4, "attention_head_dim": 32, "patch_size": 4,
            "caption_channels": 64, **overrides}


TRANSFORMERS: dict[str, Callable[..., dict]] = {
    "PixArt-XL/2": PixArt_XL_2,
    "PixArt-mini/2": PixArt_mini_2,
    "PixArt-tiny/2": PixArt_tiny_2,
    "PixArt-tiny/4": PixArt_tiny_4,
    "PixArt-tiny/8": PixArt_tiny_8,
}
# DiT's blocks at PixArt's sizes (stage 1 trains them class-conditionally): `DiT-XL/2` is
# DiT-XL/2, the model PixArt-α starts from.
TRANSFORMERS.update({name.replace("PixArt-", "DiT-"): factory for name, factory in list(TRANSFORMERS.items())})

DIT_NUM_CLASSES = 1000
"""A stage-1 DiT always has ImageNet's 1000 class rows (+ the null class 1000), whatever the
dataset's class count: DiTPipeline hard-codes 1000 as the unconditional class, and DiT-XL/2's
released weights load into it unchanged. Classes 0..k-1 are the dataset's."""


def _architecture(name: str) -> dict:
    try:
        return TRANSFORMERS[name]()
    except KeyError:
        raise ValueError(f"unknown transformer {name!r}; known: {sorted(TRANSFORMERS)}") from None


def _sample_size(resolution: int, vae_scale_factor: int, patch_size: int) -> int:
    if resolution % (vae_scale_factor * patch_size):
        raise ValueError(f"resolution {resolution} is not a multiple of VAE factor {vae_scale_factor}"
                         f" × patch {patch_size}")
    return resolution // vae_scale_factor


def interpolation_scale(resolution: int) -> int | float:
    """PixArt's positional-embedding interpolation (`lewei_scale`): resolution / 512, at least 1,
    so 256 and 512 share the 512 model's positions and 1024 stretches them by 2."""
    scale = max(resolution / 512, 1.0)
    return int(scale) if scale.is_integer() else scale


def transformer_config(name: str, *, resolution: int, latent_channels: int = 4,
                       caption_channels: int | None = None, learned_sigma: bool = True,
                       use_additional_conditions: bool | None = None, vae_scale_factor: int = 8) -> dict:
    """``PixArtTransformer2DModel`` kwargs for registry model ``name`` at image ``resolution``.

    ``caption_channels`` defaults to the registry's (4096 = T5-XXL for PixArt-XL/2) and must
    equal the text encoder's d_model. ``learned_sigma`` doubles the output channels (PixArt's
    ε and variance). Size and aspect-ratio conditions default to on only at 1024 px, as the
    paper's multi-scale model; ``vae_scale_factor`` is 8 for SD's VAE, see ``vae_scale_factor``.
    """
    arch = _architecture(name)
    if caption_channels is not None:
        arch["caption_channels"] = caption_channels
    sample_size = _sample_size(resolution, vae_scale_factor, arch["patch_size"])
    if use_additional_conditions is None:
        use_additional_conditions = resolution == 1024
    elif use_additional_conditions and sample_size != 128:
        # PixArtAlphaPipeline feeds resolution/aspect ratio only when sample_size == 128.
        log.warning("use_additional_conditions with sample_size %d: PixArtAlphaPipeline will not "
                    "pass size conditions (it does only at sample_size 128)", sample_size)
    inner_dim = arch["num_attention_heads"] * arch["attention_head_dim"]
    return {
        **arch,
        "in_channels": latent_channels,
        "out_channels": 2 * latent_channels if learned_sigma else latent_channels,
        # Cross-attention reads the caption after caption_projection, which maps it to inner_dim.
        "cross_attention_dim": inner_dim,
        "sample_size": sample_size,
        "interpolation_scale": interpolation_scale(resolution),
        # Explicit: diffusers would switch it on for any sample_size 128 (e.g. 256 px, VAE /2).
        "use_additional_conditions": bool(use_additional_conditions),
        "norm_type": "ada_norm_single",
        "num_embeds_ada_norm": 1000,
        "activation_fn": "gelu-approximate",
        "attention_bias": True,
        "norm_elementwise_affine": False,
        "norm_eps": 1e-6,
    }


def build_transformer(name: str, *, resolution: int, latent_channels: int = 4,
                      caption_channels: int | None = None, learned_sigma: bool = True,
                      use_additional_conditions: bool | None = None, vae_scale_factor: int = 8,
                      seed: int = 0, init: str = "pixart", device: str | None = None) -> PixArtTransformer2DModel:
    """A randomly initialised ``PixArtTransformer2DModel`` (see ``transformer_config``).

    ``init="pixart"`` applies PixArt-α's initialisation (zero final layer and cross-attention
    output, so an untrained model predicts 0); ``"default"`` keeps PyTorch's. The caller's RNG
    is untouched. ``device="meta"`` builds shapes only (no memory, no init), e.g. to count the
    parameters of PixArt-XL/2.
    """
    import torch
    from diffusers import PixArtTransformer2DModel

    if init not in ("pixart", "default"):
        raise ValueError(f"init must be 'pixart' or 'default', got {init!r}")
    config = transformer_config(name, resolution=resolution, latent_channels=latent_channels,
                                caption_channels=caption_channels, learned_sigma=learned_sigma,
                                use_additional_conditions=use_additional_conditions,
                                vae_scale_factor=vae_scale_factor)
    if device is not None and torch.device(device).type == "meta":
        with torch.device("meta"):
            return PixArtTransformer2DModel(**config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = PixArtTransformer2DModel(**config)
        if init == "pixart":
            pixart_init_(model)
    return model.to(device) if device is not None else model


def pixart_init_(model: PixArtTransformer2DModel) -> None:
    """PixArt-α's ``initialize_weights`` on diffusers' module names: xavier-uniform linears
    with zero bias, the patch embedding initialised as a linear, N(0, 0.02) timestep, size and
    caption MLPs, zero cross-attention output projections and a zero final projection."""
    import torch
    from torch import nn

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        patch = model.pos_embed.proj.weight
        nn.init.xavier_uniform_(patch.view(patch.shape[0], -1))
        for mlp in _small_normal_mlps(model):
            nn.init.normal_(mlp.linear_1.weight, std=0.02)
            nn.init.normal_(mlp.linear_2.weight, std=0.02)
        nn.init.normal_(model.adaln_single.linear.weight, std=0.02)
        for block in model.transformer_blocks:
            nn.init.zeros_(block.attn2.to_out[0].weight)
            nn.init.zeros_(block.attn2.to_out[0].bias)
        nn.init.zeros_(model.proj_out.weight)
        nn.init.zeros_(model.proj_out.bias)


def _small_normal_mlps(model: PixArtTransformer2DModel) -> list:
    emb = model.adaln_single.emb
    mlps = [emb.timestep_embedder]
    if getattr(emb, "use_additional_conditions", False):
        mlps += [emb.resolution_embedder, emb.aspect_ratio_embedder]
    if model.caption_projection is not None:
        mlps.append(model.caption_projection)
    return mlps


def build_dit(name: str, *, resolution: int, latent_channels: int = 4, learned_sigma: bool = True,
              vae_scale_factor: int = 8, seed: int = 0) -> Any:  # -> DiTTransformer2DModel
    """A class-conditional diffusers ``DiTTransformer2DModel`` of registry size ``name`` with
    DiT's initialisation (xavier linears, N(0, 0.02) class and timestep embeddings, zero
    adaLN-Zero modulations and final layer), LayerNorm eps 1e-6 everywhere as the original
    DiT (so that training/dit_import.py's reparameterisation is exact)."""
    import torch
    from diffusers import DiTTransformer2DModel
    from torch import nn

    arch = _architecture(name)
    config = {
        "num_attention_heads": arch["num_attention_heads"], "attention_head_dim": arch["attention_head_dim"],
        "num_layers": arch["num_layers"], "patch_size": arch["patch_size"],
        "in_channels": latent_channels, "out_channels": 2 * latent_channels if learned_sigma else latent_channels,
        "sample_size": _sample_size(resolution, vae_scale_factor, arch["patch_size"]),
        "num_embeds_ada_norm": DIT_NUM_CLASSES, "norm_type": "ada_norm_zero", "norm_eps": 1e-6,
        "activation_fn": "gelu-approximate", "attention_bias": True, "norm_elementwise_affine": False,
    }
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DiTTransformer2DModel(**config)
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, nn.Linear):
                    nn.init.xavier_uniform_(module.weight)
                    nn.init.zeros_(module.bias)
            patch = model.pos_embed.proj.weight
            nn.init.xavier_uniform_(patch.view(patch.shape[0], -1))
            for block in model.transformer_blocks:
                emb = block.norm1.emb
                nn.init.normal_(emb.class_embedder.embedding_table.weight, std=0.02)
                nn.init.normal_(emb.timestep_embedder.linear_1.weight, std=0.02)
                nn.init.normal_(emb.timestep_embedder.linear_2.weight, std=0.02)
                nn.init.zeros_(block.norm1.linear.weight)
                nn.init.zeros_(block.norm1.linear.bias)
            for layer in (model.proj_out_1, model.proj_out_2):
                nn.init.zeros_(layer.weight)
                nn.init.zeros_(layer.bias)
    return model


def disable_label_dropout(dit: Any) -> None:
    """diffusers' DiT drops class labels inside every block, each block independently (its
    ``LabelEmbedding``s draw their own coin at a hard-coded 10%). The trainer drops a sample's
    label once, for all blocks, at its configured rate, as the original DiT does, so the
    blocks' own dropout is switched off; the null-class row stays."""
    for block in dit.transformer_blocks:
        block.norm1.emb.class_embedder.dropout_prob = 0.0


def num_parameters(model: Any, trainable_only: bool = False) -> int:
    """Parameter count; works on the meta device."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
