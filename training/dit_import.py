"""DiT → PixArt-α: start a PixArt transformer from class-conditional DiT weights.

PixArt-α's first training stage starts from DiT-XL/2's ImageNet weights. The paper's
reparameterisation makes the loaded model reproduce DiT exactly at one timestep:

* shared weights are copied by name and shape: the patch embedding, self-attention (attn1),
  feed-forward (ff), and the output projection (DiT's ``proj_out_2`` → ``proj_out``);
* adaLN-single's global timestep MLP and its ``linear`` (d → 6d) are seeded from DiT block 0's
  ``norm1.emb.timestep_embedder`` and ``norm1.linear``, which have the same shapes;
* each block's ``scale_shift_table`` is set to DiT's modulation for the null (CFG) class at
  timestep ``t`` (500) minus adaLN-single's output at ``t``, so ``table + adaln_single(t)`` is
  exactly what DiT feeds that block at (``t``, null class);
* the final layer: DiT computes (shift, scale) = ``proj_out_1(silu(c))`` from the class and
  timestep embedding ``c``; PixArt adds its final ``scale_shift_table`` to the bare timestep
  embedding, so that table gets DiT's (shift, scale) at (``t``, null) minus that embedding;
* cross-attention (attn2) and the caption projection are new: PixArt's initialisation
  (``architectures.pixart_init_``, seeded), with attn2's output projection zero, so cross-attention
  adds nothing and any caption gives DiT's null-class output at ``t``.

Away from ``t`` the two models differ: DiT's per-block modulation is a separate nonlinear
function of t per block, PixArt's is one shared function plus a constant per block.

Sources: a diffusers ``DiTTransformer2DModel`` folder (or a pipeline folder with a
``transformer/`` subfolder), or an original facebookresearch/DiT ``.pt``. The original keys are
mapped onto the diffusers DiT layout first and loaded into a ``DiTTransformer2DModel``, so one
reparameterisation path serves both and DiT's own modules compute the modulations. Two
differences between the implementations are kept so that each source is reproduced as it
runs: diffusers' DiT makes its timestep sinusoid with ``downscale_freq_shift=1`` where the
original (and PixArt) uses 0, and the original DiT uses LayerNorm eps 1e-6 throughout where
diffusers' DiT uses 1e-6 before attention and ``norm_eps`` (default 1e-5) before the MLP.

``python -m training.dit_import SRC DST --caption-channels N [--t 500]``
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    import torch
    from diffusers import DiTTransformer2DModel, PixArtTransformer2DModel

log = logging.getLogger(__name__)

REPORT = "import_report.json"
PAPER_T = 500  # the paper's reparameterisation timestep
# The original DiT's LayerNorms (blocks and final layer) all use eps 1e-6.
ORIGINAL_NORM_EPS = 1e-6
# Original DiT sizes by width (DiT_models: S 384/6, B 768/12, L 1024/16, XL 1152/16): the
# checkpoint's tensors do not record the head count.
ORIGINAL_HEADS = {384: 6, 768: 12, 1024: 16, 1152: 16}
# Tolerance of the self-check, relative to the output's magnitude: well above float32 noise
# and the 1e-5/1e-6 eps difference of a diffusers DiT, far below a wrong mapping.
CHECK_RTOL = 1e-4


@dataclass
class ImportReport:
    """What happened to every tensor. ``copied`` pairs are (PixArt key, source key); source
    keys are in the source's own naming (original DiT names for a ``.pt``, with a row slice
    where DiT's fused qkv was split). ``dropped`` source tensors have no PixArt counterpart;
    some of them (class table, per-block adaLN, final adaLN) were folded into the
    ``reparameterised`` tables."""

    source: str
    source_format: str  # "diffusers" or "original"
    t: int
    null_class: int
    norm_eps: float
    copied: list[tuple[str, str]] = field(default_factory=list)
    reparameterised: list[str] = field(default_factory=list)
    new: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    max_abs_diff: float | None = None  # DiT (null class) vs PixArt (any caption) at t
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        check = "not checked" if self.max_abs_diff is None else f"max |DiT - PixArt| {self.max_abs_diff:.2g}"
        return (f"{self.source_format} DiT → PixArt at t={self.t}, class {self.null_class}: "
                f"{len(self.copied)} copied, {len(self.reparameterised)} reparameterised, "
                f"{len(self.new)} new, {len(self.dropped)} dropped; {check}")

    def to_json(self) -> dict:
        data = asdict(self)
        data["copied"] = [list(pair) for pair in self.copied]
        data["summary"] = self.summary()
        return data


@dataclass
class _Source:
    """A DiT as a diffusers model that computes what the source computes, plus naming."""

    model: DiTTransformer2DModel
    source_format: str
    keys: list[str]  # every tensor of the source, in its own naming
    origin: dict[str, str]  # diffusers DiT key -> source key (possibly with a [a:b] row slice)


# --------------------------------------------------------------------------- sources
def _load_diffusers(folder: Path) -> _Source:
    from diffusers import DiTTransformer2DModel

    # A DiTPipeline folder (facebook/DiT-XL-2-256's layout) holds the model in transformer/.
    if not (folder / "config.json").is_file() and (folder / "transformer" / "config.json").is_file():
        folder = folder / "transformer"
    model = DiTTransformer2DModel.from_pretrained(folder).float().eval()
    keys = list(model.state_dict())
    return _Source(model, "diffusers", keys, {key: key for key in keys})


def _read_original(path: Path) -> dict[str, torch.Tensor]:
    import torch

    # A training checkpoint of DiT's train.py also stores its argparse.Namespace; allowing that
    # one plain class keeps weights_only loading (no arbitrary code) for both kinds of file.
    with torch.serialization.safe_globals([argparse.Namespace]):
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(ckpt, dict) and not all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        # DiT's sample.py (find_model) samples with the EMA weights of a training checkpoint.
        for name in ("ema", "model"):
            if isinstance(ckpt.get(name), dict):
                log.info("%s: using the checkpoint's %r weights", path, name)
                ckpt = ckpt[name]
                break
        else:
            raise ValueError(f"{path}: neither a DiT state dict nor a checkpoint with 'ema'/'model' weights")
    if not isinstance(ckpt, dict) or "x_embedder.proj.weight" not in ckpt:
        raise ValueError(f"{path}: not an original DiT state dict (no x_embedder.proj.weight)")
    return {key: value.float() for key, value in ckpt.items()}


def _original_config(sd: dict[str, torch.Tensor], num_heads: int | None) -> dict:
    hidden, in_channels, patch, _ = sd["x_embedder.proj.weight"].shape
    depth = 1 + max(int(m.group(1)) for key in sd if (m := re.match(r"blocks\.(\d+)\.", key)))
    heads = num_heads or ORIGINAL_HEADS.get(hidden)
    if heads is None or hidden % heads:
        raise ValueError(f"cannot tell the head count of a {hidden}-wide DiT: pass num_heads")
    if "pos_embed" not in sd:
        raise ValueError("the checkpoint has no pos_embed, so its sample size is unknown")
    grid = math.isqrt(sd["pos_embed"].shape[1])
    if sd["blocks.0.mlp.fc1.weight"].shape[0] != 4 * hidden:
        # diffusers' DiT and PixArt blocks both have a 4× MLP (DiT's default mlp_ratio).
        raise ValueError(f"MLP width {sd['blocks.0.mlp.fc1.weight'].shape[0]} is not 4 × {hidden}")
    return {
        "num_attention_heads": heads,
        "attention_head_dim": hidden // heads,
        "in_channels": in_channels,
        "out_channels": sd["final_layer.linear.weight"].shape[0] // (patch * patch),
        "num_layers": depth,
        "sample_size": grid * patch,
        "patch_size": patch,
        # LabelEmbedder has num_classes + 1 rows: the last is the null (CFG) class.
        "num_embeds_ada_norm": sd["y_embedder.embedding_table.weight"].shape[0] - 1,
        "norm_eps": ORIGINAL_NORM_EPS,
        "activation_fn": "gelu-approximate",
        "attention_bias": True,
        "norm_elementwise_affine": False,
    }


def _original_to_diffusers(sd: dict[str, torch.Tensor], depth: int) -> tuple[dict, dict]:
    """Original DiT keys → diffusers DiT keys: (state dict, diffusers key → source name)."""
    out: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}

    def put(dst: str, src: str, rows: slice | None = None) -> None:
        tensor = sd[src] if rows is None else sd[src][rows]
        out[dst] = tensor
        origin[dst] = src if rows is None else f"{src}[{rows.start}:{rows.stop}]"

    for kind in ("weight", "bias"):
        put(f"pos_embed.proj.{kind}", f"x_embedder.proj.{kind}")
        put(f"proj_out_1.{kind}", f"final_layer.adaLN_modulation.1.{kind}")
        put(f"proj_out_2.{kind}", f"final_layer.linear.{kind}")
        for i in range(depth):
            block, dit = f"transformer_blocks.{i}", f"blocks.{i}"
            d = sd[f"{dit}.attn.qkv.{kind}"].shape[0] // 3
            # timm's Attention lays its fused qkv out as [q; k; v] along the output rows.
            for j, name in enumerate(("to_q", "to_k", "to_v")):
                put(f"{block}.attn1.{name}.{kind}", f"{dit}.attn.qkv.{kind}", slice(j * d, (j + 1) * d))
            put(f"{block}.attn1.to_out.0.{kind}", f"{dit}.attn.proj.{kind}")
            put(f"{block}.ff.net.0.proj.{kind}", f"{dit}.mlp.fc1.{kind}")
            put(f"{block}.ff.net.2.{kind}", f"{dit}.mlp.fc2.{kind}")
            put(f"{block}.norm1.linear.{kind}", f"{dit}.adaLN_modulation.1.{kind}")
            # The original has one timestep and one class embedder; diffusers' DiT gives every
            # block its own copy (the forward reads block 0's for the final layer).
            put(f"{block}.norm1.emb.timestep_embedder.linear_1.{kind}", f"t_embedder.mlp.0.{kind}")
            put(f"{block}.norm1.emb.timestep_embedder.linear_2.{kind}", f"t_embedder.mlp.2.{kind}")
    for i in range(depth):
        put(f"transformer_blocks.{i}.norm1.emb.class_embedder.embedding_table.weight",
            "y_embedder.embedding_table.weight")
    return out, origin


def _load_original(path: Path, num_heads: int | None) -> _Source:
    from diffusers import DiTTransformer2DModel

    sd = _read_original(path)
    config = _original_config(sd, num_heads)
    mapped, origin = _original_to_diffusers(sd, config["num_layers"])
    used = {name.split("[")[0] for name in origin.values()}
    unknown = sorted(set(sd) - used - {"pos_embed"})
    if unknown:
        raise ValueError(f"{path}: keys an original DiT does not have: {unknown[:8]}")
    model = DiTTransformer2DModel(**config)
    model.load_state_dict(mapped, strict=True)
    model.eval()
    for block in model.transformer_blocks:
        # The original DiT's sinusoid (exp(-ln(1e4)·i/half), cos first) is diffusers'
        # Timesteps with flip_sin_to_cos and shift 0; diffusers' DiT was built with shift 1.
        block.norm1.emb.time_proj.downscale_freq_shift = 0
    # DiT stores its fixed sin-cos positions; diffusers recomputes the same grid as a buffer.
    stored, computed = sd["pos_embed"], model.pos_embed.pos_embed
    if stored.shape != computed.shape or (stored - computed).abs().max() > 1e-5:
        log.warning("%s: the stored pos_embed differs from the sin-cos grid diffusers computes", path)
    return _Source(model, "original", list(sd), origin)


def _load_source(src: str | os.PathLike, num_heads: int | None) -> _Source:
    path = Path(src)
    if path.is_dir():
        return _load_diffusers(path)
    if path.is_file():
        return _load_original(path, num_heads)
    raise FileNotFoundError(f"{src}: no such DiT folder or .pt checkpoint")


# --------------------------------------------------------------------------- PixArt
def _pixart_config(dit: DiTTransformer2DModel, caption_channels: int, norm_eps: float) -> dict:
    cfg = dit.config
    inner_dim = cfg.num_attention_heads * cfg.attention_head_dim
    return {
        "num_attention_heads": cfg.num_attention_heads,
        "attention_head_dim": cfg.attention_head_dim,
        "in_channels": cfg.in_channels,
        "out_channels": dit.out_channels,  # 8 for DiT-XL/2: ε and the learned variance
        "num_layers": cfg.num_layers,
        "dropout": cfg.dropout,
        "cross_attention_dim": inner_dim,  # captions arrive after caption_projection
        "attention_bias": cfg.attention_bias,
        "sample_size": cfg.sample_size,
        "patch_size": cfg.patch_size,
        "activation_fn": cfg.activation_fn,
        "num_embeds_ada_norm": 1000,  # unused by ada_norm_single; as architectures.transformer_config
        "upcast_attention": cfg.upcast_attention,
        "norm_type": "ada_norm_single",
        "norm_elementwise_affine": cfg.norm_elementwise_affine,
        "norm_eps": norm_eps,
        # DiT's positional grid (PatchEmbed's default); PixArt would otherwise derive a scale
        # from sample_size.
        "interpolation_scale": 1,
        # DiT has no size conditions; diffusers would switch them on at sample_size 128.
        "use_additional_conditions": False,
        "caption_channels": caption_channels,
    }


def _shared_source_key(key: str) -> str | None:
    """The diffusers DiT key a PixArt tensor is copied from, or None."""
    if key.startswith("pos_embed.") or re.match(r"transformer_blocks\.\d+\.(attn1|ff)\.", key):
        return key
    if key.startswith("proj_out."):
        return "proj_out_2." + key.removeprefix("proj_out.")
    if key.startswith("adaln_single.emb.timestep_embedder."):
        return "transformer_blocks.0.norm1.emb." + key.removeprefix("adaln_single.emb.")
    if key.startswith("adaln_single.linear."):
        return "transformer_blocks.0.norm1." + key.removeprefix("adaln_single.")
    return None


def _is_reparameterised(key: str) -> bool:
    return key == "scale_shift_table" or re.fullmatch(r"transformer_blocks\.\d+\.scale_shift_table", key) is not None


def _is_new(key: str) -> bool:
    return key.startswith("caption_projection.") or re.match(r"transformer_blocks\.\d+\.attn2\.", key) is not None


def _build_pixart(source: _Source, caption_channels: int, norm_eps: float, t: int, null_class: int,
                  seed: int) -> tuple[PixArtTransformer2DModel, ImportReport]:
    import torch
    import torch.nn.functional as F
    from diffusers import PixArtTransformer2DModel

    from training.architectures import pixart_init_

    dit = source.model
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = PixArtTransformer2DModel(**_pixart_config(dit, caption_channels, norm_eps))
        # The new tensors get PixArt's own initialisation, attn2's output projection zero.
        pixart_init_(model)
    model.eval()

    report = ImportReport(source="", source_format=source.source_format, t=t, null_class=null_class,
                          norm_eps=norm_eps)
    dit_sd = dit.state_dict()
    own = model.state_dict()
    copied: dict[str, torch.Tensor] = {}
    for key, tensor in own.items():
        src_key = _shared_source_key(key)
        if src_key is not None:
            if dit_sd[src_key].shape != tensor.shape:
                raise ValueError(f"{key} {tuple(tensor.shape)} vs DiT {src_key} {tuple(dit_sd[src_key].shape)}")
            copied[key] = dit_sd[src_key]
            report.copied.append((key, source.origin[src_key]))
        elif _is_reparameterised(key):
            report.reparameterised.append(key)
        elif _is_new(key):
            report.new.append(key)
        else:
            # A tensor this import has no rule for (a newer diffusers?): refuse rather than
            # leave it at a random value that breaks the equivalence.
            raise ValueError(f"no rule for PixArt tensor {key}")
    model.load_state_dict(copied, strict=False)

    d = model.config.num_attention_heads * model.config.attention_head_dim
    timestep = torch.tensor([t])
    label = torch.tensor([null_class])
    with torch.no_grad():
        adaln, embedded = model.adaln_single(timestep, None, batch_size=1, hidden_dtype=torch.float32)
        for pix_block, dit_block in zip(model.transformer_blocks, dit.transformer_blocks):
            # What DiT's AdaLayerNormZero computes for this block at (t, null class).
            cond = dit_block.norm1.emb(timestep, label, hidden_dtype=torch.float32)
            modulation = dit_block.norm1.linear(F.silu(cond))
            pix_block.scale_shift_table.copy_((modulation - adaln).view(6, d))
        # DiT's final layer reads block 0's (timestep + class) embedding.
        cond = dit.transformer_blocks[0].norm1.emb(timestep, label, hidden_dtype=torch.float32)
        shift_scale = dit.proj_out_1(F.silu(cond)).view(2, d)  # rows (shift, scale), as PixArt's table
        # PixArt adds the same timestep embedding to both rows.
        model.scale_shift_table.copy_(shift_scale - embedded)

    used = {name.split("[")[0] for _, name in report.copied}
    report.dropped = [key for key in source.keys if key not in used]
    return model, report


def _check(dit: DiTTransformer2DModel, model: PixArtTransformer2DModel, t: int, null_class: int,
           caption_channels: int) -> float:
    """Max |DiT(null class) - PixArt(random caption)| at t on a seeded random latent."""
    import torch

    generator = torch.Generator().manual_seed(0)
    size = dit.config.sample_size
    latent = torch.randn(1, dit.config.in_channels, size, size, generator=generator)
    caption = torch.randn(1, 8, caption_channels, generator=generator)
    timestep = torch.tensor([t])
    with torch.no_grad():
        expected = dit(latent, timestep=timestep, class_labels=torch.tensor([null_class])).sample
        got = model(latent, encoder_hidden_states=caption, timestep=timestep).sample
    diff = float((expected - got).abs().max())
    if diff > CHECK_RTOL * max(1.0, float(expected.abs().max())):
        log.warning("PixArt differs from DiT at t=%d by %.3g: the import is not equivalent", t, diff)
    return diff


def _notes(source: _Source, norm_eps: float) -> list[str]:
    notes = []
    if source.source_format == "diffusers":
        notes.append("diffusers' DiT makes its timestep sinusoid with downscale_freq_shift=1, PixArt with 0: "
                     "the tables absorb the difference at t only")
        if norm_eps != ORIGINAL_NORM_EPS:
            notes.append(f"DiT's pre-attention norm uses eps 1e-6, its pre-MLP norm {norm_eps}; PixArt has one "
                         f"norm_eps for both, kept at {norm_eps}: outputs at t agree to about that eps difference")
    else:
        notes.append("original DiT: pos_embed is recomputed by diffusers (fixed sin-cos grid), "
                     "LayerNorm eps 1e-6 as in DiT")
    return notes


# --------------------------------------------------------------------------- entry points
def convert_dit(src: str | os.PathLike, *, caption_channels: int, null_class: int | None = None, t: int = PAPER_T,
                num_heads: int | None = None, norm_eps: float | None = None, seed: int = 0,
                check: bool = True) -> tuple[PixArtTransformer2DModel, ImportReport]:
    """DiT weights from ``src`` (a diffusers ``DiTTransformer2DModel`` folder or an original
    DiT ``.pt``) as a ``PixArtTransformer2DModel`` in memory, reparameterised so that at
    timestep ``t`` PixArt with any caption reproduces DiT for class ``null_class`` (default:
    the null class, ``num_classes``).

    ``caption_channels`` is the text encoder's d_model (4096 for T5-XXL). ``num_heads`` is
    needed only for an original checkpoint whose width is not one of DiT's sizes. ``seed``
    initialises the new tensors (cross-attention, caption projection). ``check`` runs both
    models once at ``t`` and records the largest output difference."""
    if caption_channels < 1:
        raise ValueError(f"caption_channels must be positive, got {caption_channels}")
    if t < 0:
        raise ValueError(f"t must be a timestep >= 0, got {t}")
    source = _load_source(src, num_heads)
    dit = source.model
    num_classes = dit.config.num_embeds_ada_norm
    table = dit.transformer_blocks[0].norm1.emb.class_embedder.embedding_table.weight
    if table.shape[0] != num_classes + 1:
        raise ValueError(f"the class table has {table.shape[0]} rows, expected {num_classes} classes + the null class")
    if null_class is None:
        null_class = num_classes
    if not 0 <= null_class <= num_classes:
        raise ValueError(f"null_class must be in 0..{num_classes}, got {null_class}")
    if norm_eps is None:
        # PixArt has one eps for both block norms: the original DiT's 1e-6, or the diffusers
        # DiT's norm_eps (its pre-MLP norm's; its pre-attention norm is fixed at 1e-6).
        norm_eps = ORIGINAL_NORM_EPS if source.source_format == "original" else float(dit.config.norm_eps)

    model, report = _build_pixart(source, caption_channels, norm_eps, t, null_class, seed)
    report.source = str(src)
    report.notes = _notes(source, norm_eps)
    if check:
        report.max_abs_diff = _check(dit, model, t, null_class, caption_channels)
    log.info("%s", report.summary())
    return model, report


def import_dit(src: str | os.PathLike, dst: str | os.PathLike, *, caption_channels: int,
               null_class: int | None = None, t: int = PAPER_T, num_heads: int | None = None,
               norm_eps: float | None = None, seed: int = 0, check: bool = True) -> ImportReport:
    """``convert_dit``, saved in ``dst`` (atomically, with ``import_report.json``)."""
    from shardkit.folders import write_folder

    target = Path(dst)
    if target.exists() and (not target.is_dir() or (any(target.iterdir()) and not (target / REPORT).is_file())):
        raise FileExistsError(f"{target} exists and holds no {REPORT}: not an import of ours")
    model, report = convert_dit(src, caption_channels=caption_channels, null_class=null_class, t=t,
                                num_heads=num_heads, norm_eps=norm_eps, seed=seed, check=check)

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        (tmp / REPORT).write_text(json.dumps(report.to_json(), indent=2) + "\n")

    write_folder(target, write)
    log.info("saved to %s", target)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    from shardkit.cli import setup_logging

    parser = argparse.ArgumentParser(prog="python -m training.dit_import", description=__doc__.split("\n\n")[0])
    parser.add_argument("src", help="diffusers DiT folder (or DiTPipeline folder) or original DiT .pt")
    parser.add_argument("dst", help="output PixArtTransformer2DModel folder")
    parser.add_argument("--caption-channels", type=int, required=True, help="text encoder d_model (T5-XXL: 4096)")
    parser.add_argument("--t", type=int, default=PAPER_T, help="timestep at which PixArt reproduces DiT")
    parser.add_argument("--null-class", type=int, default=None, help="class to reproduce (default: the null class)")
    parser.add_argument("--num-heads", type=int, default=None, help="head count, for a non-standard original DiT")
    parser.add_argument("--seed", type=int, default=0, help="seed of the new cross-attention / caption weights")
    parser.add_argument("--no-check", action="store_true", help="skip running both models at t")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    try:
        import_dit(args.src, args.dst, caption_channels=args.caption_channels, null_class=args.null_class,
                   t=args.t, num_heads=args.num_heads, seed=args.seed, check=not args.no_check)
    except (ValueError, FileExistsError, FileNotFoundError) as exc:
        log.error("%s", exc)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
