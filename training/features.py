"""The `features/<name>/` stage: VAE posteriors and T5 embeddings, extracted once, offline.

Per sample it stores the VAE posterior mean and std (not a sampled latent: the trainer
samples a fresh latent every time it sees the image, as PixArt does), and the T5 embedding
of the valid tokens only, both in fp16 (bf16 if configured). At T5-XXL's 4096 dims and up
to 120 tokens that is up to ~1 MB a caption padded, so padding is never stored: the trainer
pads per batch. The caption used, its field and the image size go in the json.

A class-conditional set (`label`, stage 1) stores the class id as `cls` instead of text. A
`select` keeps only samples whose metadata meets its conditions (stage 3's high-quality
subset; the others are recorded as `not_selected`). With `buckets`, each image is fitted to
its nearest aspect-ratio bucket instead of a square crop, and its json records the bucket
and the original size (PixArt's micro-conditions).
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
from typing import Any

import numpy as np
from PIL import Image

from shardkit import pipeline, storage
from shardkit.config import FeaturesConfig, PipelinesConfig, TextEncoderConfig, VaeConfig
from shardkit.inputs import IMAGE_FOLDER_FROM, require_model, require_path
from shardkit.runner import PoolSpec, ShardTask, StageError, map_shard_in_batches, run_stage
from shardkit.shards import CAPTION, IMAGE, META, Failure, Sample, ShardRecord, StageOutput, StagePlan, encode_meta

log = logging.getLogger(__name__)

VAE_FIELD = "vae.npy"
TEXT_FIELD = "t5.npy"
LABEL_FIELD = "cls"
"""The class id as ASCII digits: webdataset's convention for ImageNet shards."""
NULL_CAPTION = "_null_caption.npy"
"""T5 embedding of the empty caption: what caption dropout trains towards, and what the
pipeline feeds as the unconditional input at sampling time."""


def stage_name(name: str) -> str:
    return f"features/{name}"


def caption_field(cfg: FeaturesConfig) -> str:
    return CAPTION if cfg.caption in (None, "txt") else f"{cfg.caption}.txt"


def input_stage(cfg: FeaturesConfig) -> str:
    if cfg.scores is not None:  # the scorer's stage carries its input's fields and the scores
        return f"scores/{cfg.scores}"
    return "shards" if cfg.caption in (None, "txt") else f"captions/{cfg.caption}"


_MISSING = object()


def lookup(meta: Any, path: str) -> Any:
    """The value at a dotted path (`scene.objects.0.kind`) of a sample's json, or _MISSING."""
    node = meta
    for part in path.split("."):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return _MISSING
    return node


def rejection(cfg: FeaturesConfig, meta: dict) -> str | None:
    """Why `select` leaves this sample out, or None to keep it."""
    for condition in cfg.select:
        value = lookup(meta, condition.field)
        if value is _MISSING or isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"{condition.field}: no numeric value"
        if condition.min is not None and value < condition.min:
            return f"{condition.field} {value} < {condition.min}"
        if condition.max is not None and value > condition.max:
            return f"{condition.field} {value} > {condition.max}"
    return None


def class_id(cfg: FeaturesConfig, meta: dict) -> int:
    value = lookup(meta, cfg.label.field)
    if value is _MISSING:
        raise LookupError(f"no {cfg.label.field}")
    try:
        return cfg.label.classes.index(str(value))
    except ValueError:
        raise LookupError(f"{cfg.label.field} {str(value)[:80]!r} is not one of the classes") from None


def original_size(meta: dict, image: Image.Image) -> tuple[int, int]:
    """(height, width) before curation resized it: PixArt's `img_hw` micro-condition."""
    height, width = meta.get("original_height"), meta.get("original_width")
    if isinstance(height, int) and isinstance(width, int) and height > 0 and width > 0:
        return height, width
    return image.height, image.width


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


def fingerprint(folder: str) -> str | None:
    """sha256 of a model folder's small files (configs, tokenizer, tiny-model marker), not
    of its weights (gigabytes for T5-XXL); None for a hub id or a remote folder."""
    if not os.path.isdir(folder):
        return None
    digest = hashlib.sha256()
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if os.path.isfile(path) and not name.endswith((".safetensors", ".bin", ".pt")) and os.path.getsize(path) < 50 << 20:
            digest.update(name.encode())
            with open(path, "rb") as f:
                digest.update(hashlib.sha256(f.read()).digest())
    return digest.hexdigest()


def choose_caption(cfg: FeaturesConfig, sample: Sample) -> tuple[str | None, str]:
    """(field, text) for a sample: the configured caption, or with `alt_text_probability`
    the alt text, decided from the key so a rerun decides the same way."""
    if cfg.caption is None:
        return None, ""
    field = caption_field(cfg)
    if cfg.alt_text_probability > 0 and field != CAPTION:
        digest = hashlib.sha256(f"{cfg.seed}:{sample.key}".encode()).digest()
        if int.from_bytes(digest[:8], "big") / 2**64 < cfg.alt_text_probability:
            field = CAPTION
    return field, sample.text(field)


def load_text_encoder(cfg: TextEncoderConfig, device: str):  # -> (tokenizer, encoder)
    import torch
    from transformers import AutoTokenizer, T5EncoderModel

    folder = storage.local_folder(cfg.model)  # a URI is read from a local copy
    tokenizer = AutoTokenizer.from_pretrained(folder)
    encoder = T5EncoderModel.from_pretrained(folder, dtype=getattr(torch, cfg.dtype)).to(device).eval()
    return tokenizer, encoder


def load_vae(cfg: VaeConfig, device: str):
    import torch
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(storage.local_folder(cfg.model), torch_dtype=getattr(torch, cfg.dtype)).to(device).eval()


def feature_fields(cfg: FeaturesConfig, text_cfg: TextEncoderConfig | None) -> list[str]:
    fields = [META, VAE_FIELD]
    if text_cfg is not None:
        fields += [CAPTION, TEXT_FIELD]
    if cfg.label is not None:
        fields.append(LABEL_FIELD)
    return fields


def feature_plan(name: str, cfg: FeaturesConfig, text_cfg: TextEncoderConfig | None, vae_cfg: VaeConfig,
                 num_shards: int) -> StagePlan:
    """The plan of `features/<name>`; a function of the configs alone, so that a complete
    output can be checked against it without building the stage (its bucket table imports
    diffusers)."""
    return StagePlan(dataset=cfg.dataset, stage=stage_name(name), num_shards=num_shards,
                     input_stage=input_stage(cfg), fields=feature_fields(cfg, text_cfg),
                     config={"features": cfg.model_dump(mode="json"),
                             "text_encoder": text_cfg.model_dump(mode="json") if text_cfg else None,
                             "vae": vae_cfg.model_dump(mode="json"),
                             # a model rebuilt or replaced in the same folder must not mix
                             # its features with the old one's: the plan check catches it
                             "fingerprints": {"text_encoder": fingerprint(text_cfg.model) if text_cfg else None,
                                              "vae": fingerprint(vae_cfg.model)}})


class FeatureStage:
    progress_counters: tuple[str, ...] = ("tokens",)

    def __init__(self, name: str, cfg: FeaturesConfig, text_cfg: TextEncoderConfig | None, vae_cfg: VaeConfig,
                 source: StageOutput, output_uri: str) -> None:
        from training import buckets

        self.name, self.cfg, self.text_cfg, self.vae_cfg = name, cfg, text_cfg, vae_cfg
        self.source, self.output_uri = source, output_uri
        if text_cfg is None:
            self.progress_counters = ()
        self.buckets = (buckets.buckets(cfg.resolution, cfg.buckets.ratios, cfg.buckets.multiple)
                        if cfg.buckets is not None else None)
        self.num_shards = source.read_plan().num_shards
        self.task_cpus = cfg.num_cpus
        self.pool = PoolSpec(actors=cfg.actors, num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus,
                             config_key=f"training.features.{name}")
        self.models = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "models": None}

    def plan(self) -> StagePlan:
        return feature_plan(self.name, self.cfg, self.text_cfg, self.vae_cfg, self.num_shards)

    def fields(self) -> list[str]:
        return feature_fields(self.cfg, self.text_cfg)

    def tasks(self) -> list[ShardTask]:
        return [ShardTask(i) for i in range(self.num_shards)]

    def setup(self) -> None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
        tokenizer, encoder = load_text_encoder(self.text_cfg, device) if self.text_cfg is not None else (None, None)
        self.models = (device, tokenizer, encoder, load_vae(self.vae_cfg, device))
        if self.text_cfg is not None:
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
        out: list[np.ndarray | None] = [None] * len(images)
        by_size: dict[tuple[int, int], list[int]] = {}
        for i, image in enumerate(images):
            by_size.setdefault(image.size, []).append(i)  # a batch through the VAE has one size
        for indices in by_size.values():
            pixels = torch.stack([torch.from_numpy(np.asarray(images[i], dtype=np.float32)).permute(2, 0, 1) for i in indices])
            pixels = (pixels / 127.5 - 1.0).to(device, vae.dtype)
            with torch.inference_mode():
                posterior = vae.encode(pixels).latent_dist
            for i, stored in zip(indices, to_stored(torch.stack([posterior.mean, posterior.std], dim=1), self.cfg.dtype)):
                out[i] = stored
        return out

    def fit(self, image: Image.Image) -> tuple[Image.Image, list[int] | None]:
        """The square crop, or the image fitted to its nearest bucket, and that bucket's size."""
        from training import buckets

        if self.buckets is None:
            return center_crop(image, self.cfg.resolution), None
        bucket = buckets.nearest(self.buckets, image.height, image.width)
        return buckets.fit(image, bucket), [bucket.height, bucket.width]

    def run_shard(self, task: ShardTask, shard_uri: str) -> ShardRecord:
        if self.models is None:
            self.setup()
        return map_shard_in_batches(task.index, self.source.shard_uri(task.index), shard_uri, self.cfg.batch_size,
                                    lambda chunk, _number, failures, counters: self._batch(chunk, failures, counters))

    def _batch(self, chunk: list[Sample], failures: list[Failure], counters: dict[str, int]) -> list[Sample]:
        ready = []
        for sample in chunk:
            meta = sample.meta
            reason = rejection(self.cfg, meta)
            if reason is not None:
                failures.append(Failure(sample.key, "not_selected", reason))
                continue
            label = None
            if self.cfg.label is not None:
                try:
                    label = class_id(self.cfg, meta)
                except LookupError as exc:
                    failures.append(Failure(sample.key, "no_label", str(exc)))
                    continue
            try:
                with Image.open(io.BytesIO(sample.fields[IMAGE])) as image:
                    rgb = image.convert("RGB")
                    picture, bucket = self.fit(rgb)
            except Exception as exc:  # noqa: BLE001 - a bad image is this sample's failure
                failures.append(Failure(sample.key, "decode_error", str(exc)[:300]))
                continue
            field, text = choose_caption(self.cfg, sample)
            ready.append((sample, meta, picture, bucket, original_size(meta, rgb), label, field, text))
        if not ready:
            return []
        latents = self.encode_images([r[2] for r in ready])
        embeddings = self.encode_texts([r[7] for r in ready]) if self.text_cfg is not None else [None] * len(ready)
        out = []
        for (sample, meta, _, bucket, size, label, field, text), latent, embedding in zip(ready, latents, embeddings):
            info = {"name": self.name, "resolution": self.cfg.resolution, "vae": self.vae_cfg.model,
                    "latent_shape": list(latent.shape[1:]), "dtype": self.cfg.dtype, "original_size": list(size)}
            fields = {VAE_FIELD: npy_bytes(latent)}
            if bucket is not None:
                info["bucket"] = bucket
                counters[f"bucket:{bucket[0]}x{bucket[1]}"] = counters.get(f"bucket:{bucket[0]}x{bucket[1]}", 0) + 1
            if embedding is not None:
                counters["tokens"] = counters.get("tokens", 0) + len(embedding)
                counters[f"caption:{field}"] = counters.get(f"caption:{field}", 0) + 1
                info.update(caption_field=field, text_encoder=self.text_cfg.model, tokens=len(embedding))
                fields.update({CAPTION: text.encode("utf-8"), TEXT_FIELD: npy_bytes(embedding)})
            if label is not None:
                info["label"] = {"id": label, "name": self.cfg.label.classes[label]}
                fields[LABEL_FIELD] = str(label).encode()
            meta["features"] = info
            out.append(Sample(sample.key, {META: encode_meta(meta), **fields}))
        return out


def _ensure_tiny_models(config: PipelinesConfig, cfg: FeaturesConfig) -> None:
    from synthetic import scenes
    from training import encoders

    text_cfg = config.training.text_encoders[cfg.text_encoder] if cfg.text_encoder else None
    vae_cfg = config.training.vaes[cfg.vae]
    if text_cfg is not None and text_cfg.tiny is not None:
        # The tokenizer is trained on a fixed corpus (the synthetic grammar), never on this
        # feature set's captions: every feature set sharing the encoder must get the same one.
        encoders.build_text_encoder(text_cfg.model, corpus=scenes.corpus(2000, seed=text_cfg.tiny.seed),
                                    seed=text_cfg.tiny.seed)
    if vae_cfg.tiny is not None:
        encoders.build_vae(vae_cfg.model, seed=vae_cfg.tiny.seed)


def resolved(config: PipelinesConfig, name: str) -> FeaturesConfig:
    """`training.features.<name>` with `label.classes: folders` replaced by the dataset folder's
    sub-folder names, sorted: what the stage, its plan and the trainer use. A folder that
    gains or loses a class changes the plan, so old features are not mixed with new ids."""
    cfg = config.training.features[name]
    if cfg.label is None or cfg.label.classes != "folders":
        return cfg
    path = config.datasets[cfg.dataset].path
    key = f"datasets.{cfg.dataset}.path"
    require_path(key, path, "the image folder", IMAGE_FOLDER_FROM)
    fs, root = storage.filesystem(path)
    classes = sorted(entry["name"].rstrip("/").rsplit("/", 1)[-1] for entry in fs.ls(root, detail=True)
                     if entry["type"] == "directory")
    if not classes:
        raise StageError(f"training.features.{name}.label: classes: folders, but {path} has no sub-folders")
    return cfg.model_copy(update={"label": cfg.label.model_copy(update={"classes": classes})})


def require_encoders(config: PipelinesConfig, cfg: FeaturesConfig) -> None:
    """The feature set's VAE and text encoder can be loaded from here (shardkit.inputs); tiny
    ones are built first."""
    _ensure_tiny_models(config, cfg)
    require_model(f"training.vaes.{cfg.vae}.model", config.training.vaes[cfg.vae].model)
    if cfg.text_encoder is not None:
        require_model(f"training.text_encoders.{cfg.text_encoder}.model", config.training.text_encoders[cfg.text_encoder].model)


def complete_summary(config: PipelinesConfig, name: str) -> dict[str, Any] | None:
    """The summary of `features/<name>` when there is nothing to do: its input and every shard
    complete, its plan the one these configs and model folders give now, its summary written
    to the end. None otherwise, and `extract` takes its usual path (which also reports a
    changed config). Reads plans, records and the models' small files; no Ray, no models."""
    cfg = resolved(config, name)
    source = StageOutput.of(config.storage.root, cfg.dataset, input_stage(cfg))
    output = StageOutput.of(config.storage.root, cfg.dataset, stage_name(name))
    source_plan = source.read_plan()
    if source_plan is None or not source.is_complete() or not output.is_complete():
        return None
    text_cfg = config.training.text_encoders[cfg.text_encoder] if cfg.text_encoder else None
    expected = feature_plan(name, cfg, text_cfg, config.training.vaes[cfg.vae], source_plan.num_shards)
    summary = output.read_summary()
    if output.read_plan() != expected or not summary or "bytes_per_sample" not in summary or summary.get("shards_missing"):
        return None
    return summary


def extract(config: PipelinesConfig, name: str, restart: bool = False) -> dict[str, Any]:
    """Make `features/<name>` of its dataset (captioning, and curating, first if needed)."""
    if name not in config.training.features:
        raise ValueError(f"training.features: no feature set {name!r}; defined: {', '.join(config.training.features) or 'none'}")
    cfg = resolved(config, name)
    done = None if restart else complete_summary(config, name)
    if done is not None:
        log.info("%s/%s: already complete with this config and these models (%d shards, %d samples); skipped",
                 cfg.dataset, stage_name(name), done["shards_complete"], done["samples_out"])
        return done
    require_encoders(config, cfg)  # before captioning and curating, which can take days
    source = pipeline.ensure(config, cfg.dataset, input_stage(cfg))
    output = StageOutput.of(config.storage.root, cfg.dataset, stage_name(name))
    text_cfg = config.training.text_encoders[cfg.text_encoder] if cfg.text_encoder else None
    stage = FeatureStage(name, cfg, text_cfg, config.training.vaes[cfg.vae], source, output.uri)
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
