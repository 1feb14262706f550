"""The `captions/<captioner>` stage: every sample of `shards/` gains a dense caption.

Captioner actors each hold one model (GPUs as the captioner's config asks) and caption a
whole shard per call, so the model is loaded once per actor, and a shard is the unit of
resume: an actor killed mid-shard is restarted by Ray and the shard redone; its partial
output never appears (atomic writes)."""

from __future__ import annotations

import io
import logging
from typing import Any

from PIL import Image

from captioning.prompts import user_prompt
from shardkit import pipeline
from shardkit.config import CaptionerConfig, PipelinesConfig
from shardkit.runner import PoolSpec, ShardTask, map_shard_in_batches, run_stage
from shardkit.shards import BASE_FIELDS, IMAGE, Failure, Sample, ShardRecord, StageOutput, StagePlan

log = logging.getLogger(__name__)

INPUT_STAGE = "shards"
MAX_PIXELS = 64_000_000
WORD_BUCKET, TOKEN_BUCKET = 10, 16


def stage_name(captioner: str) -> str:
    return f"captions/{captioner}"


def _decode(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as image:
        if image.width * image.height > MAX_PIXELS:
            raise ValueError(f"{image.width}x{image.height} exceeds the pixel bound")
        return image.convert("RGB")


class CaptionStage:
    progress_counters = ("tokens",)

    def __init__(self, dataset: str, name: str, cfg: CaptionerConfig, source: StageOutput) -> None:
        self.dataset, self.name, self.cfg, self.source = dataset, name, cfg, source
        source_plan = source.read_plan()
        self.num_shards = source_plan.num_shards
        self.task_cpus = cfg.num_cpus
        self.pool = PoolSpec(actors=cfg.actors, num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus)
        self.captioner = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "captioner": None}  # the model never travels; setup() loads it

    def plan(self) -> StagePlan:
        return StagePlan(dataset=self.dataset, stage=stage_name(self.name), num_shards=self.num_shards,
                         input_stage=INPUT_STAGE, fields=[*BASE_FIELDS, f"{self.name}.txt"],
                         config=self.cfg.model_dump(mode="json"))

    def tasks(self) -> list[ShardTask]:
        return [ShardTask(i) for i in range(self.num_shards)]

    def setup(self) -> None:
        from captioning.captioner import Captioner  # torch and transformers load in actors only

        self.captioner = Captioner(self.cfg)

    def run_shard(self, task: ShardTask, shard_uri: str) -> ShardRecord:
        if self.captioner is None:
            self.setup()

        def caption_batch(chunk: list[Sample], number: int, failures: list[Failure], counters: dict[str, int]) -> list[Sample]:
            # seeded from the shard and batch number: the same captions whichever actor runs it
            return self._caption_batch(chunk, self.cfg.generation.seed + task.index * 100_003 + number, failures, counters)

        record = map_shard_in_batches(task.index, self.source.shard_uri(task.index), shard_uri, self.cfg.batch_size,
                                      caption_batch)
        record.counters["generate_ms"] = int(self.captioner.generate_seconds * 1000)
        self.captioner.generate_seconds = 0.0
        return record

    def _caption_batch(self, chunk: list[Sample], seed: int, failures: list[Failure], counters: dict[str, int]) -> list[Sample]:
        ready: list[tuple[Sample, Image.Image, str]] = []
        for sample in chunk:
            if IMAGE not in sample.fields:
                failures.append(Failure(sample.key, "no_image"))
                continue
            try:
                image = _decode(sample.fields[IMAGE])
            except Exception as exc:  # noqa: BLE001 - any decoder error is this sample's failure
                failures.append(Failure(sample.key, "decode_error", str(exc)[:300]))
                continue
            ready.append((sample, image, user_prompt(self.cfg.prompt, sample.text(), self.cfg.max_alt_text_chars)))
        if not ready:
            return []
        try:
            captions = self.captioner.generate(self.captioner.prepare([r[1] for r in ready], [r[2] for r in ready]), seed)
        except Exception:  # noqa: BLE001 - find the sample(s) the processor or model rejects
            if len(ready) == 1:
                failures.append(Failure(ready[0][0].key, "captioner_error", _last_error()))
                return []
            return [s for one in ready for s in self._caption_batch([one[0]], seed, failures, counters)]
        return [self._with_caption(sample, prompt, caption, counters) for (sample, _, prompt), caption in zip(ready, captions)]

    def _with_caption(self, sample: Sample, prompt: str, caption, counters: dict[str, int]) -> Sample:  # noqa: ANN001
        words = len(caption.text.split())
        for name, value in (("captioned", 1), ("tokens", caption.tokens), ("words", words),
                            ("truncated", int(caption.truncated)), ("empty", int(not caption.text)),
                            (f"words_hist:{words // WORD_BUCKET * WORD_BUCKET:04d}", 1),
                            (f"tokens_hist:{caption.tokens // TOKEN_BUCKET * TOKEN_BUCKET:04d}", 1)):
            counters[name] = counters.get(name, 0) + value
        meta = sample.meta
        meta.setdefault("captioners", {})[self.name] = {
            "model": self.cfg.model, "revision": self.captioner.revision, "prompt": prompt,
            "generation": self.cfg.generation.model_dump(), "tokens": caption.tokens, "truncated": caption.truncated,
        }
        return Sample(sample.key, {**sample.with_meta(meta).fields, f"{self.name}.txt": caption.text.encode("utf-8")})


def _last_error() -> str:
    import sys

    exc = sys.exc_info()[1]
    return f"{type(exc).__name__}: {exc}"[:300]


def length_statistics(counters: dict[str, int]) -> dict[str, Any]:
    """Caption length statistics from a summary's summed counters."""
    captioned = counters.get("captioned", 0)

    def percentile(prefix: str, bucket: int, q: float) -> int | None:
        hist = sorted((int(k.split(":")[1]), v) for k, v in counters.items() if k.startswith(prefix))
        target, seen = q * captioned, 0
        for start, count in hist:
            seen += count
            if seen >= target:
                return start + bucket - 1
        return None

    return {
        "captioned": captioned,
        "mean_words": round(counters.get("words", 0) / captioned, 2) if captioned else None,
        "mean_tokens": round(counters.get("tokens", 0) / captioned, 2) if captioned else None,
        "p50_words_at_most": percentile("words_hist:", WORD_BUCKET, 0.5),
        "p95_words_at_most": percentile("words_hist:", WORD_BUCKET, 0.95),
        "truncated": counters.get("truncated", 0),
        "empty": counters.get("empty", 0),
        "tokens_per_generate_second": round(counters.get("tokens", 0) / (counters["generate_ms"] / 1000), 1)
        if counters.get("generate_ms") else None,
    }


def caption(config: PipelinesConfig, dataset: str, captioner: str, restart: bool = False) -> dict[str, Any]:
    """Caption every sample of the dataset's shards (curating them first if needed)."""
    cfg = config.captioner(captioner)
    source = pipeline.ensure(config, dataset, INPUT_STAGE)
    if cfg.tiny is not None:
        from captioning.tiny_models import build_tiny_llava

        build_tiny_llava(cfg.model, kind=cfg.tiny.kind, seed=cfg.tiny.seed)
    stage = CaptionStage(dataset, captioner, cfg, source)
    output = StageOutput.of(config.storage.root, dataset, stage_name(captioner))
    summary = run_stage(stage, output, config.cluster, restart=restart)
    summary["lengths"] = length_statistics(summary["counters"])
    output.write_summary(summary)
    log.info("%s/%s: %d captioned, %d failures %s; words mean %s (p95 ≤ %s), tokens mean %s, %d truncated; "
             "%s tokens/s in generate; %.1f s", dataset, stage_name(captioner), summary["samples_out"],
             summary["failures"], summary["failures_by_reason"], summary["lengths"]["mean_words"],
             summary["lengths"]["p95_words_at_most"], summary["lengths"]["mean_tokens"],
             summary["lengths"]["truncated"], summary["lengths"]["tokens_per_generate_second"], summary["wall_seconds"])
    return summary


def make_stage(config: PipelinesConfig, dataset: str, stage: str) -> None:
    """shardkit.pipeline's hook: `captions/<captioner>` made on request of a later stage."""
    caption(config, dataset, stage.split("/", 1)[1])
