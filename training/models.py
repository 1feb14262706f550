"""PixArt-α's models: the transformer by name, tiny text encoders and VAEs, pipeline export.

The transformer is diffusers' ``PixArtTransformer2DModel``. Sizes live in a name → factory
registry, as facebookresearch/DiT's ``DiT_models`` does: each factory returns the
architecture kwargs, and ``transformer_config`` adds what depends on the data (resolution,
latent channels, caption width, learned sigma).

There is no model hub here, so a T5 text encoder with its sentencepiece tokenizer and an
``AutoencoderKL`` are built from configs with seeded random weights, saved with
``save_pretrained`` and loaded back through ``from_pretrained(folder)``, the path a real
checkpoint (google/flan-t5-xxl's encoder, stabilityai/sd-vae-ft-ema) takes. The same
arguments give byte-identical weights, and a folder already built with them is kept.

``export_pipeline`` assembles a ``PixArtAlphaPipeline`` folder and ``generate`` samples from
it with PixArt's settings (DPM-Solver, 20 steps, guidance 4.5, 120 T5 tokens).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import shutil
import string
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping

if TYPE_CHECKING:
    from diffusers import PixArtAlphaPipeline, PixArtTransformer2DModel
    from PIL import Image
    from transformers import T5Tokenizer

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
VAE_SCALING_FACTOR = 0.18215  # SD's VAE (sd-vae-ft-ema), which PixArt-α uses

MARKER = "tiny_model.json"
_MARKER_VERSION = 1


# --------------------------------------------------------------------------- registry
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


# --------------------------------------------------------------------------- folders
def _read_marker(folder: Path) -> dict | None:
    try:
        return json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None


def _complete(folder: Path, marker: dict, needed: Iterable[str]) -> bool:
    return _read_marker(folder) == marker and all((folder / name).is_file() for name in needed)


def _open_permissions(root: Path) -> None:
    """mkdtemp makes 0700 folders and some writers 0600 files: give the umask's usual modes."""
    umask = os.umask(0)
    os.umask(umask)
    root.chmod(0o777 & ~umask)
    for path in root.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def _write_folder(target: Path, write: Callable[[Path], None],
                  done: Callable[[], bool] = lambda: False) -> None:
    """Write into a temporary sibling, then swap it in, so readers never see a half-written
    folder. ``done()`` is asked before the swap: another process may have finished first."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    old = None
    try:
        write(tmp)
        _open_permissions(tmp)
        if done():
            return
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
            os.replace(target, old)  # a directory rename cannot overwrite a non-empty one
        os.replace(tmp, target)
    finally:
        for path in (tmp, old):
            if path is not None and path.exists():
                shutil.rmtree(path, ignore_errors=True)


def _build_once(folder: str, marker: dict, needed: tuple[str, ...], build: Callable[[Path], None]) -> str:
    """Build into ``folder`` unless it already holds a complete build with the same marker; an
    existing folder is replaced only if it is empty or was built here."""
    target = Path(folder)
    if _complete(target, marker, needed):
        log.debug("%s already built in %s", marker["kind"], target)
        return folder
    if target.exists() and any(target.iterdir()) and _read_marker(target) is None:
        raise FileExistsError(f"{target} is not empty and holds no {MARKER}: not built here")

    def write(tmp: Path) -> None:
        build(tmp)
        (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n")

    _write_folder(target, write, done=lambda: _complete(target, marker, needed))
    return folder


def _seeded(seed: int, make: Callable[[], Any]) -> Any:
    """Build under a fixed seed without touching the caller's RNG."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return make()


# --------------------------------------------------------------------------- text encoder
def _corpus_lines(corpus: Iterable[str]) -> list[str]:
    return [line.strip() for text in corpus for line in text.splitlines() if line.strip()]


def train_sentencepiece(corpus: Iterable[str], vocab_size: int = 1000) -> bytes:
    """A sentencepiece unigram model (serialised) with T5's special ids: <pad> 0, </s> 1,
    <unk> 2, no <s>. Trained in memory, single-threaded so that it is deterministic."""
    import sentencepiece as spm

    lines = _corpus_lines(corpus)
    if not lines:
        raise ValueError("the tokenizer corpus is empty")
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=buffer, model_type="unigram",
        vocab_size=vocab_size,
        hard_vocab_limit=False,  # a small corpus yields fewer pieces: take what there is
        character_coverage=1.0,
        # Every printable ASCII character is a piece, so any English prompt encodes without <unk>.
        required_chars=string.ascii_letters + string.digits + string.punctuation,
        normalization_rule_name="nmt_nfkc",  # T5's
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
        num_threads=1, minloglevel=2,
    )
    return buffer.getvalue()


def tokenizer_from_sentencepiece(model_proto: bytes, model_max_length: int = 512) -> T5Tokenizer:
    """Wrap a sentencepiece unigram model as transformers' T5Tokenizer (tokenizers-backed):
    same pieces, scores and NFKC normaliser, no sentinel <extra_id_*> tokens."""
    from sentencepiece import sentencepiece_model_pb2
    from transformers import T5Tokenizer

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model_proto)
    vocab = [(piece.piece, piece.score) for piece in proto.pieces]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=model_max_length,
                       _spm_precompiled_charsmap=proto.normalizer_spec.precompiled_charsmap)


def _t5_config(vocab_size: int, d_model: int, layers: int, heads: int):
    from transformers import T5Config

    return T5Config(
        vocab_size=vocab_size, d_model=d_model, d_kv=d_model // heads,
        d_ff=d_model * 5 // 2,  # Flan-T5-XXL's ratio (10240 / 4096)
        num_layers=layers, num_heads=heads,
        feed_forward_proj="gated-gelu",  # T5 v1.1 / Flan-T5, as PixArt's encoder
        dropout_rate=0.0,  # a frozen feature extractor
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
        tie_word_embeddings=False, use_cache=False,
    )


def _build_text_encoder(tmp: Path, corpus: list[str], d_model: int, layers: int, heads: int,
                        vocab_size: int, seed: int) -> None:
    from transformers import T5EncoderModel

    tokenizer = tokenizer_from_sentencepiece(train_sentencepiece(corpus, vocab_size))
    config = _t5_config(len(tokenizer), d_model, layers, heads)
    model = _seeded(seed, lambda: T5EncoderModel(config).eval())
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    log.info("built tiny T5 encoder (%d params, vocab %d, d_model %d) in %s",
             num_parameters(model), len(tokenizer), d_model, tmp)


def build_text_encoder(folder: str, *, corpus: list[str], d_model: int = 64, layers: int = 2,
                       heads: int = 4, vocab_size: int = 1000, seed: int = 0) -> str:
    """Build a tiny T5 encoder (random, seeded) and a sentencepiece tokenizer trained on
    ``corpus`` into ``folder``; load them with ``AutoTokenizer`` / ``T5EncoderModel``
    ``.from_pretrained(folder)``. Returns ``folder``. Kept if already built with these arguments."""
    if d_model % heads:
        raise ValueError(f"d_model {d_model} is not a multiple of heads {heads}")
    lines = _corpus_lines(corpus)
    marker = {"version": _MARKER_VERSION, "kind": "t5_encoder", "d_model": d_model, "layers": layers,
              "heads": heads, "vocab_size": vocab_size, "seed": seed, "corpus_lines": len(lines),
              "corpus_sha256": hashlib.sha256("\n".join(lines).encode()).hexdigest()}
    needed = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
    return _build_once(folder, marker, needed,
                       lambda tmp: _build_text_encoder(tmp, lines, d_model, layers, heads, vocab_size, seed))


# --------------------------------------------------------------------------- VAE
def vae_scale_factor(vae: Any) -> int:
    """Pixels per latent along each side: 2 ** (number of encoder blocks - 1), as diffusers'
    pipelines compute it (8 for SD's VAE). Takes an AutoencoderKL or its config."""
    config = vae if isinstance(vae, Mapping) else vae.config
    return 2 ** (len(config["block_out_channels"]) - 1)


def _vae_config(latent_channels: int, block_out_channels: tuple[int, ...], scaling_factor: float,
                norm_num_groups: int | None = None) -> dict:
    blocks = len(block_out_channels)
    return {
        "in_channels": 3, "out_channels": 3, "latent_channels": latent_channels,
        "down_block_types": ["DownEncoderBlock2D"] * blocks,
        "up_block_types": ["UpDecoderBlock2D"] * blocks,
        "block_out_channels": list(block_out_channels),
        "layers_per_block": 1,
        # GroupNorm needs a group count dividing every width; 32 as SD's where possible.
        "norm_num_groups": norm_num_groups or math.gcd(32, *block_out_channels),
        "sample_size": 64 * 2 ** (blocks - 1),
        "scaling_factor": scaling_factor,
    }


def build_vae(folder: str, *, latent_channels: int = 4, block_out_channels: tuple[int, ...] = (32, 64),
              seed: int = 0, scaling_factor: float = VAE_SCALING_FACTOR) -> str:
    """Build a small random (seeded) diffusers AutoencoderKL into ``folder`` and return it;
    its downsampling factor is 2 ** (len(block_out_channels) - 1). ``scaling_factor`` is SD's
    by default (a random VAE's posterior means have std ≈ 0.25 on uniform-noise images).
    Kept if already built with these arguments."""
    from diffusers import AutoencoderKL

    config = _vae_config(latent_channels, tuple(block_out_channels), scaling_factor)
    marker = {"version": _MARKER_VERSION, "kind": "vae", **config, "seed": seed}

    def build(tmp: Path) -> None:
        vae = _seeded(seed, lambda: AutoencoderKL(**config).eval())
        vae.save_pretrained(tmp, safe_serialization=True)
        log.info("built tiny VAE (%d params, factor %d, %d latent channels) in %s",
                 num_parameters(vae), vae_scale_factor(vae), latent_channels, tmp)

    return _build_once(folder, marker, ("config.json", "diffusion_pytorch_model.safetensors"), build)


# --------------------------------------------------------------------------- pipeline
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
    _write_folder(target, lambda tmp: pipe.save_pretrained(tmp, safe_serialization=True))
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

    _write_folder(target, write)
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
