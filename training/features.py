"""The `features/<name>/` stage: VAE posteriors and T5 embeddings, extracted once, offline.

Per sample it stores the VAE posterior mean and std (not a sampled latent: the trainer
samples a fresh latent every time it sees the image, as PixArt does), and the T5 embedding
of the valid tokens only, both in fp16 (bf16 if configured). At T5-XXL's 4096 dims and up
to 120 tokens that is up to ~1 MB a caption padded, so padding is never stored: the trainer
pads per batch. The caption used, its field and the image size go in the json.
"""

from __future__ import annotations

import hashlib
import io
import logging
from typing import Any

import numpy as np
from PIL import Image

from shardkit import pipeline, storage
from shardkit.config import FeaturesConfig, PipelinesConfig, TextEncoderConfig, VaeConfig
from shardkit.runner import PoolSpec, ShardTask, map_shard_in_batches, run_stage
from shardkit.shards import CAPTION, IMAGE, META, Failure, Sample, ShardRecord, StageOutput, StagePlan

log = logging.getLogger(__name__)

VAE_FIELD = "vae.npy"
TEXT_FIELD = "t5.npy"
NULL_CAPTION = "_null_caption.npy"
"""T5 embedding of the empty caption: what caption dropout trains towards, and what the
pipeline feeds as the unconditional input at sampling time."""


def stage_name(name: str) -> str:
    return f"features/{name}"


def caption_field(cfg: FeaturesConfig) -> str:
    return CAPTION if cfg.caption == "txt" else f"{cfg.caption}.txt"


def input_stage(cfg: FeaturesConfig) -> str:
    return "shards" if cfg.caption == "txt" else f"captions/{cfg.caption}"


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def npy_array(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def to_stored(tensor, dtype: str) -> np.ndarray:  # noqa: ANN001 - a torch tensor
    """fp16 as numpy float16; bf16, which numpy lacks, as its raw 16-bit patterns (int16)."""
    import torch

    if dtype == "bfloat16":
        return tensor.detach().to(torch.bfloat16).cpu().view(torch.int16).numpy()
    return tensor.detach().to(torch.float16).cpu().numpy()


def from_stored(array: np.ndarray):  # -> torch.Tensor (float32)
    import torch

    tensor = torch.from_numpy(np.ascontiguousarray(array))
    return (tensor.view(torch.bfloat16) if array.dtype == np.int16 else tensor).float()


def center_crop(image: Image.Image, size: int) -> Image.Image:
    scale = size / min(image.size)
    resized = image.resize((max(size, round(image.width * scale)), max(size, round(image.height * scale))), Image.BICUBIC)
    left, top = (resized.width - size) // 2, (resized.height - size) // 2
    return resized.crop((left, top, left + size, top + size))


def choose_caption(cfg: FeaturesConfig, sample: Sample) -> tuple[str, str]:
    """(field, text) for a sample: the configured caption, or with `alt_text_probability`
    the alt text, decided from the key so a rerun decides the same way."""
    field = caption_field(cfg)
    if cfg.alt_text_probability > 0 and field != CAPTION:
        digest = hashlib.sha256(f"{cfg.seed}:{sample.key}".encode()).digest()
        if int.from_bytes(digest[:8], "big") / 2**64 < cfg.alt_text_probability:
            field = CAPTION
    return field, sample.text(field)


def load_text_encoder(cfg: TextEncoderConfig, device: str):  # -> (tokenizer, encoder)
    import torch
    from transformers import AutoTokenizer, T5EncoderModel

    tokenizer = AutoTokenizer.from_pretrained(cfg.model)
    encoder = T5EncoderModel.from_pretrained(cfg.model, dtype=getattr(torch, cfg.dtype)).to(device).eval()
    return tokenizer, encoder


def load_vae(cfg: VaeConfig, device: str):
    import torch
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(cfg.model, torch_dtype=getattr(torch, cfg.dtype)).to(device).eval()


class FeatureStage:
    progress_counters = ("tokens",)

    def __init__(self, name: str, cfg: FeaturesConfig, text_cfg: TextEncoderConfig, vae_cfg: VaeConfig,
                 source: StageOutput, output_uri: str) -> None:
        self.name, self.cfg, self.text_cfg, self.vae_cfg = name, cfg, text_cfg, vae_cfg
        self.source, self.output_uri = source, output_uri
        self.num_shards = source.read_plan().num_shards
        self.task_cpus = cfg.num_cpus
        self.pool = PoolSpec(actors=cfg.actors, num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus)
        self.models = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "models": None}

    def plan(self) -> StagePlan:
        return StagePlan(dataset=self.cfg.dataset, stage=stage_name(self.name), num_shards=self.num_shards,
                         input_stage=input_stage(self.cfg), fields=[META, CAPTION, VAE_FIELD, TEXT_FIELD],
                         config={"features": self.cfg.model_dump(mode="json"), "text_encoder": self.text_cfg.model_dump(mode="json"),
                                 "vae": self.vae_cfg.model_dump(mode="json")})

    def tasks(self) -> list[ShardTask]:
        return [ShardTask(i) for i in range(self.num_shards)]

    def setup(self) -> None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
        tokenizer, encoder = load_text_encoder(self.text_cfg, device)
        self.models = (device, tokenizer, encoder, load_vae(self.vae_cfg, device))
        null = self.encode_texts([""])[0]
        storage.atomic_write(storage.join(self.output_uri, NULL_CAPTION), npy_bytes(null))

    def encode_texts(self, texts: list[str]) -> list[np.ndarray]:
        import torch

        device, tokenizer, encoder, _ = self.models
        tokens = tokenizer(texts, max_length=self.text_cfg.max_length, truncation=True, padding="longest",
                           add_special_tokens=True, return_tensors="pt").to(device)
        with torch.inference_mode():
            hidden = encoder(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).last_hidden_state
        lengths = tokens.attention_mask.sum(dim=1).tolist()
        return [to_stored(hidden[i, :n], self.cfg.dtype) for i, n in enumerate(lengths)]

    def encode_images(self, images: list[Image.Image]) -> list[np.ndarray]:
        import torch

        device, _, _, vae = self.models
        pixels = torch.stack([torch.from_numpy(np.asarray(im, dtype=np.float32)).permute(2, 0, 1) for im in images])
        pixels = (pixels / 127.5 - 1.0).to(device, vae.dtype)
        with torch.inference_mode():
            posterior = vae.encode(pixels).latent_dist
        return list(to_stored(torch.stack([posterior.mean, posterior.std], dim=1), self.cfg.dtype))

    def run_shard(self, task: ShardTask, shard_uri: str) -> ShardRecord:
        if self.models is None:
            self.setup()
        return map_shard_in_batches(task.index, self.source.shard_uri(task.index), shard_uri, self.cfg.batch_size,
                                    lambda chunk, _number, failures, counters: self._batch(chunk, failures, counters))

    def _batch(self, chunk: list[Sample], failures: list[Failure], counters: dict[str, int]) -> list[Sample]:
        ready = []
        for sample in chunk:
            try:
                with Image.open(io.BytesIO(sample.fields[IMAGE])) as image:
                    picture = center_crop(image.convert("RGB"), self.cfg.resolution)
            except Exception as exc:  # noqa: BLE001 - a bad image is this sample's failure
                failures.append(Failure(sample.key, "decode_error", str(exc)[:300]))
                continue
            ready.append((sample, picture, *choose_caption(self.cfg, sample)))
        if not ready:
            return []
        latents = self.encode_images([r[1] for r in ready])
        embeddings = self.encode_texts([r[3] for r in ready])
        out = []
        for (sample, _, field, text), latent, embedding in zip(ready, latents, embeddings):
            counters["tokens"] = counters.get("tokens", 0) + len(embedding)
            counters[f"caption:{field}"] = counters.get(f"caption:{field}", 0) + 1
            meta = sample.meta
            meta["features"] = {"name": self.name, "caption_field": field, "resolution": self.cfg.resolution,
                                "vae": self.vae_cfg.model, "text_encoder": self.text_cfg.model,
                                "tokens": len(embedding), "latent_shape": list(latent.shape[1:]), "dtype": self.cfg.dtype}
            fields = sample.with_meta(meta).fields
            out.append(Sample(sample.key, {META: fields[META], CAPTION: text.encode("utf-8"),
                                           VAE_FIELD: npy_bytes(latent), TEXT_FIELD: npy_bytes(embedding)}))
        return out


def _ensure_tiny_models(config: PipelinesConfig, cfg: FeaturesConfig, corpus: list[str]) -> None:
    from training import models

    text_cfg, vae_cfg = config.training.text_encoders[cfg.text_encoder], config.training.vaes[cfg.vae]
    if text_cfg.tiny is not None:
        models.build_text_encoder(text_cfg.model, corpus=corpus, seed=text_cfg.tiny.seed)
    if vae_cfg.tiny is not None:
        models.build_vae(vae_cfg.model, seed=vae_cfg.tiny.seed)


def extract(config: PipelinesConfig, name: str, restart: bool = False) -> dict[str, Any]:
    """Make `features/<name>` of its dataset (captioning, and curating, first if needed)."""
    if name not in config.training.features:
        raise ValueError(f"training.features: no feature set {name!r}; defined: {', '.join(config.training.features) or 'none'}")
    cfg = config.training.features[name]
    source = pipeline.ensure(config, cfg.dataset, input_stage(cfg))
    corpus = [s.text(caption_field(cfg)) or s.text() for _, s in zip(range(2000), source.samples())]
    _ensure_tiny_models(config, cfg, corpus)
    output = StageOutput.of(config.storage.root, cfg.dataset, stage_name(name))
    stage = FeatureStage(name, cfg, config.training.text_encoders[cfg.text_encoder], config.training.vaes[cfg.vae],
                         source, output.uri)
    summary = run_stage(stage, output, config.cluster, restart=restart)
    fs, _ = storage.filesystem(output.uri)
    bytes_total = sum(fs.size(storage.filesystem(output.shard_uri(i))[1]) for i in range(stage.num_shards))
    summary["bytes_per_sample"] = round(bytes_total / max(summary["samples_out"], 1))
    output.write_summary(summary)
    log.info("%s/%s: %d samples, %d failures %s, %d bytes per sample, %.1f s", cfg.dataset, stage_name(name),
             summary["samples_out"], summary["failures"], summary["failures_by_reason"], summary["bytes_per_sample"],
             summary["wall_seconds"])
    return summary


def make_stage(config: PipelinesConfig, dataset: str, stage: str) -> None:
    """shardkit.pipeline's hook: `features/<name>` made on request of the trainer."""
    extract(config, stage.split("/", 1)[1])
