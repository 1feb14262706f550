"""Tiny stand-ins for PixArt-α's frozen encoders: a T5 text encoder with its sentencepiece
tokenizer, and an ``AutoencoderKL``.

There is no model hub here, so they are built from configs with seeded random weights, saved
with ``save_pretrained`` and loaded back through ``from_pretrained(folder)``, the path a real
checkpoint (google/flan-t5-xxl's encoder, stabilityai/sd-vae-ft-ema) takes. The same
arguments give byte-identical weights, and a folder already built with them is kept.
``t5_config`` and ``vae_config`` are the shapes the trained ones (training/train_text_encoder.py,
training/train_vae.py) share with them.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import string
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping

from shardkit.folders import write_folder
from training.architectures import num_parameters

if TYPE_CHECKING:
    from transformers import T5Tokenizer

log = logging.getLogger(__name__)

VAE_SCALING_FACTOR = 0.18215  # SD's VAE (sd-vae-ft-ema), which PixArt-α uses

MARKER = "tiny_model.json"
_MARKER_VERSION = 1


# --------------------------------------------------------------------------- folders
def _read_marker(folder: Path) -> dict | None:
    try:
        return json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None


def _complete(folder: Path, marker: dict, needed: Iterable[str]) -> bool:
    return _read_marker(folder) == marker and all((folder / name).is_file() for name in needed)


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

    write_folder(target, write, done=lambda: _complete(target, marker, needed))
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


def t5_config(vocab_size: int, d_model: int, layers: int, heads: int):  # -> T5Config
    """A Flan-T5-shaped ``T5Config`` (gated GELU, d_ff 2.5 x d_model, no dropout) of this size."""
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
    config = t5_config(len(tokenizer), d_model, layers, heads)
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


def vae_config(latent_channels: int, block_out_channels: tuple[int, ...], scaling_factor: float,
               norm_num_groups: int | None = None) -> dict:
    """``AutoencoderKL`` kwargs: one down and one up block per width, one layer each, so the
    downsampling factor is 2 ** (len(block_out_channels) - 1)."""
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

    config = vae_config(latent_channels, tuple(block_out_channels), scaling_factor)
    marker = {"version": _MARKER_VERSION, "kind": "vae", **config, "seed": seed}

    def build(tmp: Path) -> None:
        vae = _seeded(seed, lambda: AutoencoderKL(**config).eval())
        vae.save_pretrained(tmp, safe_serialization=True)
        log.info("built tiny VAE (%d params, factor %d, %d latent channels) in %s",
                 num_parameters(vae), vae_scale_factor(vae), latent_channels, tmp)

    return _build_once(folder, marker, ("config.json", "diffusion_pytorch_model.safetensors"), build)
