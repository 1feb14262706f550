"""The `captions/<captioner>` stage: every sample of `shards/` gains a dense caption.

Captioner actors each hold one model (GPUs as the captioner's config asks) and caption a
whole shard per call, so the model is loaded once per actor, and a shard is the unit of
resume: an actor killed mid-shard is restarted by Ray and the shard redone; its partial
output never appears (atomic writes).

Within a shard, a thread reads, decodes and prepares (templates, resizes) the next batches
while the backend generates the current one. Every caption is checked (captioning/quality.py);
flagged ones can get one sampled retry, and their flags are kept in the sample's json."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from captioning import quality
from captioning.backend import CaptionBackend, Generation, Sampling, load_backend, retry_sampling, sampling_of
from captioning.prompts import Prompt, user_prompt
from shardkit import pipeline
from shardkit.config import CaptionerConfig, PipelinesConfig
from shardkit.inputs import require_model
from shardkit.runner import PoolSpec, ShardTask, map_shard_in_batches, run_stage, timed_ms
from shardkit.shards import BASE_FIELDS, IMAGE, Failure, Sample, ShardRecord, StageOutput, StagePlan, decode_image

log = logging.getLogger(__name__)

INPUT_STAGE = "shards"
WORD_BUCKET, TOKEN_BUCKET = 10, 16
RETRY_SEED_OFFSET = 1_000_000_007
RUN_ONLY_KEYS = {"actors", "num_cpus", "num_gpus", "prefetch_batches", "hf", "vllm"}
"""Captioner settings that change how fast captions are made, not which: left out of the
stage plan, so scaling a job out (more actors, another engine setting) resumes it."""


def stage_name(captioner: str) -> str:
    return f"captions/{captioner}"


@dataclass
class _Item:
    sample: Sample
    image: Image.Image
    prompt: Prompt


@dataclass
class _Batch:
    """One batch, decoded and prepared ahead of generation."""
    items: list[_Item] = field(default_factory=list)
    prepared: Any = None
    """The backend's inputs for all items, or None when the batch failed to prepare as a whole
    (then each item is prepared alone)."""


class CaptionStage:
    progress_counters = ("tokens",)

    def __init__(self, dataset: str, name: str, cfg: CaptionerConfig, source: StageOutput) -> None:
        self.dataset, self.name, self.cfg, self.source = dataset, name, cfg, source
        source_plan = source.read_plan()
        self.num_shards = source_plan.num_shards
        self.task_cpus = cfg.num_cpus
        self.pool = PoolSpec(actors=cfg.actors, num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus,
                             config_key=f"captioners.{name}")
        self.backend: CaptionBackend | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "backend": None}  # the model never travels; setup() loads it

    def plan(self) -> StagePlan:
        return StagePlan(dataset=self.dataset, stage=stage_name(self.name), num_shards=self.num_shards,
                         input_stage=INPUT_STAGE, fields=[*BASE_FIELDS, f"{self.name}.txt"],
                         config=self.cfg.model_dump(mode="json", exclude=RUN_ONLY_KEYS))

    def tasks(self) -> list[ShardTask]:
        return [ShardTask(i) for i in range(self.num_shards)]

    def setup(self) -> None:
        self.backend = load_backend(self.cfg)

    def run_shard(self, task: ShardTask, shard_uri: str) -> ShardRecord:
        if self.backend is None:
            self.setup()
        # seeded from the shard and batch number: the same captions whichever actor runs it
        base_seed = self.cfg.generation.seed + task.index * 100_003
        return map_shard_in_batches(
            task.index, self.source.shard_uri(task.index), shard_uri, self.cfg.batch_size,
            process=lambda batch, number, failures, counters: self._caption(batch, base_seed + number, failures, counters),
            prepare=lambda chunk, _number, failures, counters: self._prepare(chunk, failures, counters),
            ahead=self.cfg.prefetch_batches)

    # ---- ahead of generation (the prefetch thread) --------------------------------------

    def _prepare(self, chunk: list[Sample], failures: list[Failure], counters: dict[str, int]) -> _Batch:
        batch = _Batch()
        reserved = self.backend.reserved_strings()
        for sample in chunk:
            if IMAGE not in sample.fields:
                failures.append(Failure(sample.key, "no_image"))
                continue
            try:
                image = decode_image(sample.fields[IMAGE])
            except Exception as exc:  # noqa: BLE001 - any decoder error is this sample's failure
                failures.append(Failure(sample.key, "decode_error", str(exc)[:300]))
                continue
            prompt = user_prompt(self.cfg.prompt, sample.text(), self.cfg.max_alt_text_chars, reserved)
            if prompt.removed:
                _count(counters, "alt_text_sanitized")
            batch.items.append(_Item(sample, image, prompt))
        if batch.items:
            try:
                batch.prepared = self.backend.prepare([i.image for i in batch.items], [i.prompt.text for i in batch.items])
            except Exception:  # noqa: BLE001 - _caption finds the sample(s) the processor rejects
                log.debug("batch failed to prepare; preparing its %d samples one by one", len(batch.items), exc_info=True)
        return batch

    # ---- generation (the stage's own thread) --------------------------------------------

    def _caption(self, batch: _Batch, seed: int, failures: list[Failure], counters: dict[str, int]) -> list[Sample]:
        generations = self._generate(batch.items, batch.prepared, sampling_of(self.cfg), seed, failures, counters)
        kept = [(item, g) for item, g in zip(batch.items, generations) if g is not None]
        flags = [self._flags(item, g) for item, g in kept]
        retried = self._retry([(i, item, g) for i, ((item, g), f) in enumerate(zip(kept, flags))
                               if set(f) & set(self.cfg.quality.retry)], seed, counters)
        out = []
        for i, (item, generation) in enumerate(kept):
            item_flags, retry = flags[i], retried.get(i)
            if retry is not None:
                retry_flags = self._flags(item, retry)
                if quality.better(item_flags, retry_flags, self.cfg.quality.retry):
                    _count(counters, "retry_kept")
                    generation, item_flags = retry, retry_flags
            out.append(self._with_caption(item, generation, item_flags, retry is not None, counters))
        return out

    def _generate(self, items: list[_Item], prepared: Any, sampling: Sampling, seed: int,
                  failures: list[Failure] | None, counters: dict[str, int]) -> list[Generation | None]:
        """Captions of `items`, None where a sample fails. A failing batch is retried sample by
        sample, so one sample the processor or model rejects costs only itself."""
        if not items:
            return []
        try:
            if prepared is None:
                if len(items) > 1:
                    raise ValueError("prepare failed for the batch")
                prepared = self.backend.prepare([items[0].image], [items[0].prompt.text])
            with timed_ms(counters, "generate_ms"):
                return list(self.backend.generate(prepared, sampling, seed))
        except Exception as exc:  # noqa: BLE001 - find the sample(s) at fault
            if len(items) == 1:
                if failures is not None:
                    failures.append(Failure(items[0].sample.key, "captioner_error", f"{type(exc).__name__}: {exc}"[:300]))
                else:
                    log.warning("%s: retry failed: %s", items[0].sample.key, exc)
                return [None]
            return [g for item in items for g in self._generate([item], None, sampling, seed, failures, counters)]

    def _flags(self, item: _Item, generation: Generation) -> list[str]:
        return quality.check(quality.Checked(generation.text, generation.finish_reason, self.cfg.prompt,
                                             item.prompt.alt_text), self.cfg.quality)

    def _retry(self, flagged: list[tuple[int, _Item, Generation]], seed: int, counters: dict[str, int]) -> dict[int, Generation]:
        """One sampled retry of the flagged captions of a batch, together. A retry that fails
        keeps the first caption: the sample is not lost for it."""
        if not flagged:
            return {}
        _count(counters, "retried", len(flagged))
        items = [item for _, item, _ in flagged]
        try:
            prepared = self.backend.prepare([i.image for i in items], [i.prompt.text for i in items])
        except Exception:  # noqa: BLE001 - prepared one by one in _generate
            prepared = None
        again = self._generate(items, prepared, retry_sampling(self.cfg), seed + RETRY_SEED_OFFSET, None, counters)
        return {i: g for (i, _, _), g in zip(flagged, again) if g is not None}

    def _with_caption(self, item: _Item, caption: Generation, flags: list[str], retried: bool,
                      counters: dict[str, int]) -> Sample:
        words = len(caption.text.split())
        truncated = caption.finish_reason == "length"
        for name, value in (("captioned", 1), ("tokens", caption.tokens), ("words", words),
                            ("truncated", int(truncated)), ("empty", int(not caption.text)),
                            ("flagged", int(bool(flags))),
                            (f"words_hist:{words // WORD_BUCKET * WORD_BUCKET:04d}", 1),
                            (f"tokens_hist:{caption.tokens // TOKEN_BUCKET * TOKEN_BUCKET:04d}", 1),
                            *((f"flag:{f}", 1) for f in flags)):
            _count(counters, name, value)
        meta = item.sample.meta
        info = {
            "backend": self.backend.info.backend, "model": self.backend.info.model, "revision": self.backend.info.revision,
            "prompt": item.prompt.text, "generation": self.cfg.generation.model_dump(), "tokens": caption.tokens,
            "finish_reason": caption.finish_reason, "truncated": truncated, "flags": flags,
        }
        if retried:
            info["retried"] = True
        if item.prompt.removed:
            info["alt_text_removed"] = list(item.prompt.removed)
        meta.setdefault("captioners", {})[self.name] = info
        sample = item.sample
        return Sample(sample.key, {**sample.with_meta(meta).fields, f"{self.name}.txt": caption.text.encode("utf-8")})


def _count(counters: dict[str, int], name: str, value: int = 1) -> None:
    counters[name] = counters.get(name, 0) + value


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


def quality_statistics(counters: dict[str, int], checks: list[str]) -> dict[str, Any]:
    """The quality checks' outcome from a summary's summed counters: each flag as kept in the
    output (after retries), captions with any flag, retries made and retries kept."""
    captioned = counters.get("captioned", 0)
    flagged = counters.get("flagged", 0)
    return {
        "flags": {f: counters.get(f"flag:{f}", 0) for f in checks},
        "flagged": flagged,
        "flagged_share": round(flagged / captioned, 4) if captioned else None,
        "retried": counters.get("retried", 0),
        "retry_kept": counters.get("retry_kept", 0),
        "alt_text_sanitized": counters.get("alt_text_sanitized", 0),
    }


def time_breakdown(counters: dict[str, int]) -> dict[str, float]:
    """Seconds summed over shards: read and prepare run in the prefetch thread, beside
    generation; wait is the time generation waited for them (0 when prefetch keeps up); close
    is making each finished tar durable (flush, fsync, rename)."""
    return {name: round(counters.get(f"{name}_ms", 0) / 1000, 2)
            for name in ("read", "prepare", "wait", "generate", "process", "write", "close")}


def caption(config: PipelinesConfig, dataset: str, captioner: str, restart: bool = False) -> dict[str, Any]:
    """Caption every sample of the dataset's shards (curating them first if needed)."""
    cfg = config.captioner(captioner)
    if cfg.tiny is not None:
        from captioning.tiny_models import build_tiny_llava

        build_tiny_llava(cfg.model, kind=cfg.tiny.kind, size=cfg.tiny.size, seed=cfg.tiny.seed)
    # before curating: hours of downloads are no use if the model cannot be loaded
    require_model(f"captioners.{captioner}.model", cfg.model)
    source = pipeline.ensure(config, dataset, INPUT_STAGE)
    stage = CaptionStage(dataset, captioner, cfg, source)
    output = StageOutput.of(config.storage.root, dataset, stage_name(captioner))
    summary = run_stage(stage, output, config.cluster, restart=restart)
    summary["lengths"] = length_statistics(summary["counters"])
    summary["quality"] = quality_statistics(summary["counters"], cfg.quality.checks)
    summary["time_s"] = time_breakdown(summary["counters"])
    output.write_summary(summary)
    lengths, checks = summary["lengths"], summary["quality"]
    log.info("%s/%s: %d captioned, %d failures %s; words mean %s (p95 ≤ %s), tokens mean %s; "
             "flagged %d %s after %d retries (%d kept); %s tokens/s in generate; %.1f s", dataset,
             stage_name(captioner), summary["samples_out"], summary["failures"], summary["failures_by_reason"],
             lengths["mean_words"], lengths["p95_words_at_most"], lengths["mean_tokens"], checks["flagged"],
             {k: v for k, v in checks["flags"].items() if v}, checks["retried"], checks["retry_kept"],
             lengths["tokens_per_generate_second"], summary["wall_seconds"])
    return summary


def make_stage(config: PipelinesConfig, dataset: str, stage: str) -> None:
    """shardkit.pipeline's hook: `captions/<captioner>` made on request of a later stage."""
    caption(config, dataset, stage.split("/", 1)[1])
