"""The noun-counting job: one Ray task per (dataset, caption field, shard), merged exactly."""

from __future__ import annotations

import importlib.metadata
import logging
import time
from dataclasses import dataclass
from typing import Any

from analysis.nouns import NounCounts, count_texts, decode_caption, load_nlp
from shardkit import cluster, storage
from shardkit.config import NounsConfig, PipelinesConfig
from shardkit.shards import CAPTION, Sample, StageOutput, read_shard

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Row:
    """One row of the report: a caption field of a dataset, read from one stage."""

    dataset: str
    field: str
    stage_uri: str
    source: str

    @property
    def label(self) -> str:
        return f"{self.dataset} / {self.field}"


def find_rows(config: PipelinesConfig, datasets: list[str] | None = None, fields: list[str] | None = None) -> list[Row]:
    """Every caption field of every dataset that has one: the source's own `txt` from
    `shards/`, and each complete `captions/<captioner>/` stage's `<captioner>.txt`."""
    rows = []
    for name in datasets or list(config.datasets):
        source = config.dataset(name).source
        shards = StageOutput.of(config.storage.root, name, "shards")
        candidates = [(CAPTION, shards)] if shards.is_complete() else []
        for captioner in storage.list_names(storage.join(config.storage.root, name, "captions")):
            output = StageOutput.of(config.storage.root, name, f"captions/{captioner}")
            if output.is_complete():
                candidates.append((f"{captioner}.txt", output))
        for field_name, output in candidates:
            if fields and field_name not in fields and field_name.removesuffix(".txt") not in fields:
                continue
            rows.append(Row(name, field_name, output.uri, source))
    return rows


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def inputs_identity(config: PipelinesConfig, rows: list[Row]) -> dict[str, Any]:
    """What the counts depend on: the rows, each stage output as it is now (its complete shards),
    the noun settings and the installed spaCy and models. Read from package metadata, not by
    loading spaCy: this decides whether counting (Ray, spaCy) is needed at all."""
    cfg = config.analysis.nouns
    return {
        "rows": [{"dataset": r.dataset, "field": r.field, "source": r.source, "stage": r.stage_uri,
                  "output": StageOutput(r.stage_uri).identity()} for r in rows],
        "config": cfg.model_dump(mode="json"),
        "spacy": {name: _version(name) for name in ["spacy", *cfg.spacy_models]},
    }


def quality_flags(sample: Sample, field_name: str) -> list[str]:
    """The captioning stage's quality flags on this sample's caption field (none for alt text)."""
    if field_name == CAPTION:
        return []
    captioner = field_name.removesuffix(".txt")
    return sample.meta.get("captioners", {}).get(captioner, {}).get("flags", [])


def count_shard(shard_uri: str, field_name: str, cfg: NounsConfig) -> NounCounts:
    nlp = load_nlp(tuple(cfg.spacy_models))
    seen = NounCounts()
    texts = []
    for sample in read_shard(shard_uri):
        flags = quality_flags(sample, field_name)
        if flags:
            seen.flagged += 1
            seen.flags.update(flags)
            if cfg.exclude_flagged:
                seen.excluded += 1
                continue
        texts.append(decode_caption(sample.fields.get(field_name), seen))
    counts = count_texts(texts, nlp, cfg.include_propn, cfg.batch_size, cfg.max_caption_chars)
    return counts.merge(seen)


def count_rows(config: PipelinesConfig, rows: list[Row]) -> tuple[dict[Row, NounCounts], dict]:
    """Counts per row, and timings (Ray start-up apart from counting)."""
    import ray

    started = time.monotonic()
    cluster.connect(config.cluster)
    ray_start = time.monotonic() - started
    cfg = config.analysis.nouns
    remote = ray.remote(count_shard).options(num_cpus=cfg.task_cpus, max_retries=2)
    pending = {}
    for row in rows:
        output = StageOutput(row.stage_uri)
        for index in sorted(output.complete_shards()):
            pending[remote.remote(output.shard_uri(index), row.field, cfg)] = row
    counts = {row: NounCounts() for row in rows}
    total = len(pending)
    last_log = time.monotonic()
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        row = pending.pop(ready[0])
        counts[row].merge(ray.get(ready[0]))
        if time.monotonic() - last_log > 5 or not pending:
            last_log = time.monotonic()
            log.info("nouns: %d/%d shards counted", total - len(pending), total)
    return counts, {"ray_start_s": round(ray_start, 2), "count_s": round(time.monotonic() - started - ray_start, 2)}
