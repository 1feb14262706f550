"""The `shards` stage: `fetched` minus duplicates, decided across the whole dataset.

Exact duplicates share the sha256 of their decoded pixels; near duplicates have perceptual
hashes within a Hamming distance. Of each group the sample that comes first (shard order,
then key order) is kept, so the result is the same whatever order shards were fetched in,
and a rerun makes the same decision. Decisions are made from the per-shard hash indexes
(fetched/_index/), never from the images, and the images are copied byte for byte.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections import defaultdict
from dataclasses import dataclass, field

from curation.fetch import index_uri
from shardkit import storage
from shardkit.config import FilterConfig
from shardkit.runner import ShardTask
from shardkit.shards import ShardRecord, StageOutput, StagePlan, read_shard, write_shard

log = logging.getLogger(__name__)

STAGE = "shards"
EXACT = "duplicate:exact"
NEAR = "duplicate:near"


def _blocks(value: int, count: int) -> list[tuple[int, int]]:
    """Split 64 bits into `count` blocks: two hashes within distance count-1 agree exactly on
    at least one block (pigeonhole), so only hashes sharing a block need comparing."""
    width = -(-64 // count)
    return [(i, (value >> (i * width)) & ((1 << width) - 1)) for i in range(count)]


def find_duplicates(entries: list[tuple[str, str, int]], exact: bool, near_distance: int | None) -> dict[str, str]:
    """Keys to drop, with the reason, from (key, pixel_sha256, phash) in keep-priority order."""
    drops: dict[str, str] = {}
    seen_sha: set[str] = set()
    buckets: dict[tuple[int, int], list[int]] = defaultdict(list)
    for key, sha, phash in entries:
        if exact and sha in seen_sha:
            drops[key] = EXACT
            continue
        seen_sha.add(sha)
        if near_distance is None:
            continue
        blocks = _blocks(phash, near_distance + 1)
        candidates = {c for b in blocks for c in buckets.get(b, ())}
        if any(bin(phash ^ c).count("1") <= near_distance for c in candidates):
            drops[key] = NEAR
            continue
        for b in blocks:
            buckets[b].append(phash)
    return drops


@dataclass
class DedupStage:
    dataset: str
    fetched: StageOutput
    filters: FilterConfig
    task_cpus: float = 1.0
    drops: dict[int, dict[str, str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.fetched_plan = self.fetched.read_plan()
        if self.fetched_plan is None or not self.fetched.is_complete():
            raise ValueError(f"{self.fetched.uri} is not complete: fetch before dedup")
        started = time.monotonic()
        entries, shard_of = [], {}
        for shard in range(self.fetched_plan.num_shards):
            table = storage.read_parquet(index_uri(self.fetched.uri, shard))
            for key, sha, phash in zip(*(table.column(c).to_pylist() for c in ("key", "pixel_sha256", "phash"))):
                entries.append((key, sha, phash))
                shard_of[key] = shard
        found = find_duplicates(entries, self.filters.dedup_exact, self.filters.near_duplicate_distance)
        for key, reason in found.items():
            self.drops.setdefault(shard_of[key], {})[key] = reason
        log.info("%s: dedup over %d samples found %d exact and %d near duplicates in %.2f s", self.dataset,
                 len(entries), sum(r == EXACT for r in found.values()), sum(r == NEAR for r in found.values()),
                 time.monotonic() - started)

    def plan(self) -> StagePlan:
        return StagePlan(
            dataset=self.dataset, stage=STAGE, num_shards=self.fetched_plan.num_shards, input_stage="fetched",
            config={"dedup_exact": self.filters.dedup_exact,
                    "near_duplicate_distance": self.filters.near_duplicate_distance,
                    "fetched": self.fetched_plan.config},
        )

    def tasks(self) -> list[ShardTask]:
        return [ShardTask(i, self.drops.get(i, {})) for i in range(self.fetched_plan.num_shards)]

    def run_shard(self, task: ShardTask, shard_uri: str) -> ShardRecord:
        started = time.monotonic()
        drops: dict[str, str] = task.payload
        source = self.fetched.shard_uri(task.index)
        if not drops:
            # nothing to remove: the fetched tar is already this shard, byte for byte
            fs, path = storage.filesystem(source)
            with fs.open(path, "rb") as src, storage.atomic_open(shard_uri) as out:
                shutil.copyfileobj(src, out, 1 << 20)
            count = self.fetched.record(task.index).samples_out
            return ShardRecord(task.index, samples_in=count, samples_out=count, seconds=time.monotonic() - started)
        samples = list(read_shard(source))
        kept = write_shard(shard_uri, (s for s in samples if s.key not in drops))
        counters: dict[str, int] = {}
        for reason in drops.values():
            counters[reason] = counters.get(reason, 0) + 1
        return ShardRecord(task.index, samples_in=len(samples), samples_out=kept,
                           seconds=time.monotonic() - started, counters=counters)
