"""The noun-counting job: one Ray task per (dataset, caption field, shard), merged exactly."""

from __future__ import annotations

import importlib.metadata
import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Callable

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
    started = time.monotonic()
    cluster.connect(config.cluster)
    ray_start = time.monotonic() - started
    cfg = config.analysis.nouns
    jobs = []
    for row in rows:
        output = StageOutput(row.stage_uri)
        jobs += [(row, (output.shard_uri(index), row.field, cfg)) for index in sorted(output.complete_shards())]
    counts = gather_counts(count_shard, jobs, rows, cfg.task_cpus)
    return counts, {"ray_start_s": round(ray_start, 2), "count_s": round(time.monotonic() - started - ray_start, 2)}


SHARDS_PER_TASK_MAX = 64
"""A counting task counts up to this many shards of one row in order and returns their sum:
with many shards, fewer and larger partial counts reach the merge."""
TASKS_PER_SLOT = 4
"""Shards are grouped so that there are about this many counting tasks per task slot."""
MERGE_FAN_IN = 16
"""A merge task sums this many partial counts."""


def _count_many(count: Callable[..., NounCounts], jobs: list[tuple]) -> NounCounts:
    total = NounCounts()
    for args in jobs:
        total.merge(count(*args))
    return total


def _merge(parts: list) -> NounCounts:
    """The sum of the counts behind these object references, fetched one at a time (passed in
    a list, Ray does not fetch them before the task starts): a merge holds its running sum and
    one part, never all of its parts at once."""
    import ray

    total = NounCounts()
    for ref in parts:
        total.merge(ray.get(ref))
    return total


class _Partial:
    """A partial count in a row's stack: its object reference once its task is started; a
    merge waits (as `parts`) until the partials it sums are finished."""

    __slots__ = ("level", "ref", "parts")

    def __init__(self, level: int, ref: Any = None, parts: list["_Partial"] | None = None) -> None:
        self.level, self.ref, self.parts = level, ref, parts


def gather_counts(count: Callable[..., NounCounts], jobs: list[tuple[Any, tuple]], rows: list[Any],
                  task_cpus: float) -> dict[Any, NounCounts]:
    """Runs `count(*args)` for every (row, args) job on Ray and sums the results per row.

    Beyond the list of jobs, nothing in the driver grows with the shards: tasks count runs of
    consecutive shards, at most two per task slot are in flight, and partial counts are summed
    on the workers, MERGE_FAN_IN consecutive ones at a time (a stack of fewer than MERGE_FAN_IN
    per level per row), each merge started once its parts are finished; the driver receives
    one finished count per row. Sums are exact and made in job order whatever order tasks
    finish in, so the result (down to the order of the nouns, which breaks ties among the most
    common) is the same on every run."""
    import ray

    slots = max(1, int(cluster.total_cpus() / max(task_cpus, 0.01)))
    by_row: dict[Any, list[tuple]] = {row: [] for row in rows}
    for row, args in jobs:
        by_row[row].append(args)
    counter = ray.remote(_count_many).options(num_cpus=task_cpus, max_retries=2)
    merger = ray.remote(_merge).options(num_cpus=min(task_cpus, 1.0), max_retries=2)
    stacks: dict[Any, list[_Partial]] = {row: [] for row in rows}
    in_flight: dict[Any, int] = {}
    """reference -> shards its task counts (0 for a merge)"""
    finished: set = set()
    waiting: list[_Partial] = []
    limit = 2 * slots
    total, done, last_log = len(jobs), 0, time.monotonic()

    def launch() -> None:
        still = []
        for merge in waiting:
            if all(part.ref is not None and part.ref in finished for part in merge.parts):
                refs = [part.ref for part in merge.parts]
                finished.difference_update(refs)
                merge.ref, merge.parts = merger.remote(refs), None
                in_flight[merge.ref] = 0
            else:
                still.append(merge)
        waiting[:] = still

    def settle(wait_for: int) -> None:
        nonlocal done, last_log
        while len(in_flight) > wait_for:
            ready, _ = ray.wait(list(in_flight), num_returns=1, fetch_local=False)
            done += in_flight.pop(ready[0])
            finished.add(ready[0])
            launch()
            if time.monotonic() - last_log > 5:
                last_log = time.monotonic()
                log.info("nouns: %d/%d shards counted", done, total)

    for row, row_jobs in by_row.items():
        per_task = min(SHARDS_PER_TASK_MAX, max(1, math.ceil(len(row_jobs) / (TASKS_PER_SLOT * slots))))
        stack = stacks[row]
        for start in range(0, len(row_jobs), per_task):
            settle(limit - 1)
            chunk = row_jobs[start:start + per_task]
            ref = counter.remote(count, chunk)
            in_flight[ref] = len(chunk)
            stack.append(_Partial(0, ref))
            while len(stack) >= MERGE_FAN_IN and len({p.level for p in stack[-MERGE_FAN_IN:]}) == 1:
                merge = _Partial(stack[-1].level + 1, parts=stack[-MERGE_FAN_IN:])
                del stack[-MERGE_FAN_IN:]
                stack.append(merge)
                waiting.append(merge)
    while waiting or in_flight:
        launch()
        if in_flight:
            settle(len(in_flight) - 1)
    log.info("nouns: %d/%d shards counted", done, total)
    finals = {row: merger.remote([p.ref for p in stack]) for row, stack in stacks.items()}
    return {row: ray.get(ref) for row, ref in finals.items()}
