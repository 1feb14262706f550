"""The `scores/<scorer>` stage: CLIP image-caption similarity and an aesthetic score per sample.

Stage 3 fine-tunes on an aesthetic subset, and only LAION rows arrive with a score; SA-1B and
folders have none. This stage computes them for any dataset: each image's CLIP embedding
(L2-normalised), its cosine similarity to every caption field of the stage it reads (the alt
text `txt`, and the dense captions of a `captions/<captioner>` input), and, with an aesthetic
head, LAION's aesthetic predictor over the same embedding. The scores go into each sample's
json as `scores.<scorer>`, the stage carries every field of its input, and a feature set that
reads it (`scores: <scorer>`) can `select` by them.

Like captioning, it runs on actors that hold the model (GPUs as configured), a shard per
call, with decoding and the processor a few batches ahead of the model in a thread.
"""

from __future__ import annotations

import io
import logging
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from shardkit import pipeline
from shardkit.config import PipelinesConfig, ScorerConfig
from shardkit.inputs import require_model
from shardkit.runner import PoolSpec, ShardTask, map_shard_in_batches, run_stage, timed_ms
from shardkit.shards import CAPTION, IMAGE, Failure, Sample, ShardRecord, StageOutput, StagePlan, decode_image

log = logging.getLogger(__name__)

EMBEDDING = "clip.npy"
SIMILARITY_SUM, SIMILARITY_COUNT = "clip_similarity_sum_micro:", "clip_similarity_n:"
RUN_ONLY_KEYS = {"actors", "num_cpus", "num_gpus", "prefetch_batches", "batch_size"}
"""Settings that change how fast scores are made, not which: left out of the stage plan."""


def stage_name(scorer: str) -> str:
    return f"scores/{scorer}"


def prefetch_batches(cfg: ScorerConfig) -> int:
    """On a CPU actor the prefetch thread competes with the model for the same cores: inline
    preparation measured faster there (0.89x vs 0.85x of the plain loop on 2 vCPUs)."""
    if cfg.prefetch_batches is not None:
        return cfg.prefetch_batches
    return 2 if cfg.num_gpus > 0 else 0


def caption_fields(sample: Sample) -> list[str]:
    """The caption fields of a sample: `txt` and every `<captioner>.txt`."""
    return sorted(name for name in sample.fields if name == CAPTION or name.endswith(f".{CAPTION}"))


def field_label(name: str) -> str:
    """`txt` stays `txt`; `synthetic-captioner.txt` is `synthetic-captioner`."""
    return name if name == CAPTION else name.removesuffix(f".{CAPTION}")


class Scorer:
    """One loaded CLIP (and aesthetic head): `prepare` on the host, `score` on the device."""

    def __init__(self, cfg: ScorerConfig) -> None:
        import torch

        from analysis.clip_models import AestheticHead, load_clip
        from shardkit import storage

        self.torch = torch
        device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = getattr(torch, cfg.dtype)
        if device == "cpu" and dtype == torch.float16:
            dtype = torch.bfloat16  # no fast float16 on CPUs
        self.model, self.processor = load_clip(storage.local_folder(cfg.clip), device, dtype)
        self.head = None
        if cfg.aesthetic is not None:
            self.head = AestheticHead.from_file(storage.local_path(cfg.aesthetic)).to(device)
            if self.head.input_size != self.model.config.projection_dim:
                raise ValueError(f"{cfg.aesthetic}: an aesthetic head over {self.head.input_size}-dim embeddings, "
                                 f"but {cfg.clip} makes {self.model.config.projection_dim}-dim ones")

    def prepare(self, images: list[Image.Image], texts: dict[str, list[str]]) -> dict[str, Any]:
        """Pixel values and each caption field's tokens, on the host."""
        prepared: dict[str, Any] = {"pixels": self.processor(images=images, return_tensors="pt")["pixel_values"]}
        prepared["texts"] = {name: self.processor(text=values, padding=True, truncation=True, return_tensors="pt")
                             for name, values in texts.items()}
        return prepared

    def score(self, prepared: dict[str, Any]) -> tuple[np.ndarray, np.ndarray | None, dict[str, np.ndarray]]:
        """(image embeddings (N, d) normalised, aesthetic scores (N,) or None, cosine similarity
        per caption field (N,))."""
        from analysis.clip_models import image_features, text_features

        with self.torch.inference_mode():
            image = image_features(self.model, prepared["pixels"])
            aesthetic = self.head.score(image).numpy() if self.head is not None else None
            similarity = {name: (image * text_features(self.model, tokens)).sum(-1).cpu().numpy()
                          for name, tokens in prepared["texts"].items()}
        return image.cpu().numpy(), aesthetic, similarity


@dataclass
class _Batch:
    samples: list[Sample] = field(default_factory=list)
    texts: dict[str, list[str]] = field(default_factory=dict)
    """Caption field -> its text per sample ("" where a sample lacks it)."""
    present: dict[str, list[bool]] = field(default_factory=dict)
    prepared: Any = None


class ScoreStage:
    progress_counters = ()

    def __init__(self, dataset: str, name: str, cfg: ScorerConfig, source: StageOutput) -> None:
        self.dataset, self.name, self.cfg, self.source = dataset, name, cfg, source
        self.num_shards = source.read_plan().num_shards
        self.task_cpus = cfg.num_cpus
        self.pool = PoolSpec(actors=cfg.actors, num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus,
                             config_key=f"scorers.{name}")
        self.scorer: Scorer | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "scorer": None}  # the model never travels; setup() loads it

    def plan(self) -> StagePlan:
        fields = list(self.source.read_plan().fields) + ([EMBEDDING] if self.cfg.embeddings else [])
        return StagePlan(dataset=self.dataset, stage=stage_name(self.name), num_shards=self.num_shards,
                         input_stage=self.cfg.input, fields=fields,
                         config=self.cfg.model_dump(mode="json", exclude=RUN_ONLY_KEYS))

    def tasks(self) -> list[ShardTask]:
        return [ShardTask(i) for i in range(self.num_shards)]

    def setup(self) -> None:
        self.scorer = Scorer(self.cfg)

    def run_shard(self, task: ShardTask, shard_uri: str) -> ShardRecord:
        if self.scorer is None:
            self.setup()
        return map_shard_in_batches(task.index, self.source.shard_uri(task.index), shard_uri, self.cfg.batch_size,
                                    process=lambda batch, _n, failures, counters: self._score(batch, failures, counters),
                                    prepare=lambda chunk, _n, failures, counters: self._prepare(chunk, failures),
                                    ahead=prefetch_batches(self.cfg))

    def _prepare(self, chunk: list[Sample], failures: list[Failure]) -> _Batch:
        batch, images = _Batch(), []
        for sample in chunk:
            try:
                images.append(decode_image(sample.fields[IMAGE]))
            except Exception as exc:  # noqa: BLE001 - any decoder error is this sample's failure
                failures.append(Failure(sample.key, "decode_error", str(exc)[:300]))
                continue
            batch.samples.append(sample)
        names = sorted({name for sample in batch.samples for name in caption_fields(sample)})
        for name in names:
            batch.present[name] = [name in s.fields and bool(s.text(name).strip()) for s in batch.samples]
            batch.texts[name] = [s.text(name) if ok else "" for s, ok in zip(batch.samples, batch.present[name])]
        if batch.samples:
            batch.prepared = self.scorer.prepare(images, batch.texts)
        return batch

    def _score(self, batch: _Batch, failures: list[Failure], counters: dict[str, int]) -> list[Sample]:
        if not batch.samples:
            return []
        try:
            with timed_ms(counters, "model_ms"):
                embeddings, aesthetic, similarity = self.scorer.score(batch.prepared)
        except Exception as exc:  # noqa: BLE001 - recorded per sample; the other batches go on
            for sample in batch.samples:
                failures.append(Failure(sample.key, "scorer_error", f"{type(exc).__name__}: {exc}"[:300]))
            return []
        out = []
        for i, sample in enumerate(batch.samples):
            scores: dict[str, Any] = {"clip_similarity": {
                field_label(name): round(float(similarity[name][i]), 5)
                for name in similarity if batch.present[name][i]}}
            if aesthetic is not None:
                scores["aesthetic"] = round(float(aesthetic[i]), 4)
            meta = sample.meta
            meta.setdefault("scores", {})[self.name] = scores
            fields = dict(sample.with_meta(meta).fields)
            if self.cfg.embeddings:
                buffer = io.BytesIO()
                np.save(buffer, embeddings[i].astype(np.float16))
                fields[EMBEDDING] = buffer.getvalue()
            out.append(Sample(sample.key, fields))
            counters["scored"] = counters.get("scored", 0) + 1
            for label, value in scores["clip_similarity"].items():  # in millionths: records hold integers
                counters[f"{SIMILARITY_SUM}{label}"] = counters.get(f"{SIMILARITY_SUM}{label}", 0) + int(round(value * 1e6))
                counters[f"{SIMILARITY_COUNT}{label}"] = counters.get(f"{SIMILARITY_COUNT}{label}", 0) + 1
            if aesthetic is not None:  # summed in thousandths: records hold integers
                counters["aesthetic_sum_milli"] = counters.get("aesthetic_sum_milli", 0) + int(round(aesthetic[i] * 1000))
        return out


def score(config: PipelinesConfig, dataset: str, scorer: str, restart: bool = False) -> dict[str, Any]:
    """Score every sample of the scorer's input stage of `dataset` (made first if needed)."""
    cfg = config.scorer(scorer)
    if cfg.tiny is not None and not os.path.isfile(os.path.join(cfg.clip, "config.json")):
        from analysis.clip_models import build_tiny_clip

        build_tiny_clip(cfg.clip, seed=cfg.tiny.seed)
    # before the stages it reads are made: their hours are no use without these
    require_model(f"scorers.{scorer}.clip", cfg.clip)
    if cfg.aesthetic is not None:
        require_model(f"scorers.{scorer}.aesthetic", cfg.aesthetic, marker=None)
    source = pipeline.ensure(config, dataset, cfg.input)
    stage = ScoreStage(dataset, scorer, cfg, source)
    output = StageOutput.of(config.storage.root, dataset, stage_name(scorer))
    summary = run_stage(stage, output, config.cluster, restart=restart)
    scored = summary["counters"].get("scored", 0)
    if cfg.aesthetic is not None and scored:
        summary["aesthetic_mean"] = round(summary["counters"]["aesthetic_sum_milli"] / 1000 / scored, 4)
    counters = summary["counters"]
    summary["clip_similarity_mean"] = {
        key.removeprefix(SIMILARITY_SUM): round(value / 1e6 / counters[SIMILARITY_COUNT + key.removeprefix(SIMILARITY_SUM)], 4)
        for key, value in sorted(counters.items()) if key.startswith(SIMILARITY_SUM)}
    output.write_summary(summary)
    log.info("%s/%s: %d scored, %d failures %s; aesthetic mean %s; CLIP similarity mean %s; %.1f s", dataset,
             stage_name(scorer), scored, summary["failures"], summary["failures_by_reason"], summary.get("aesthetic_mean"),
             summary["clip_similarity_mean"], summary["wall_seconds"])
    return summary


def make_stage(config: PipelinesConfig, dataset: str, stage: str) -> None:
    """shardkit.pipeline's hook: `scores/<scorer>` made on request of a later stage."""
    score(config, dataset, stage.split("/", 1)[1])
