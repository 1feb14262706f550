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


PARTITIONS = 16
"""Exact dedup runs as this many Ray tasks, each holding the hashes of one range of sha256
prefixes: memory per worker is 1/PARTITIONS of the dataset's hash index."""


def _prefix_range(part: int, parts: int) -> tuple[str, str | None]:
    lo, hi = part * 256 // parts, (part + 1) * 256 // parts
    return f"{lo:02x}", (f"{hi:02x}" if hi < 256 else None)


def exact_duplicates_in_partition(index_uris: list[str], part: int, parts: int) -> list[tuple[int, str]]:
    """(shard, key) of every sample whose pixel hash, in this partition's prefix range, was
    seen at an earlier (shard, key). Index files are sorted by hash, so the range filter skips
    most of each file by its row-group statistics."""
    import pyarrow.parquet as pq

    lo, hi = _prefix_range(part, parts)
    filters = [("pixel_sha256", ">=", lo)] + ([("pixel_sha256", "<", hi)] if hi else [])
    rows = []
    for shard, uri in enumerate(index_uris):
        fs, path = storage.filesystem(uri)
        table = pq.read_table(path, columns=["key", "pixel_sha256"], filters=filters, filesystem=fs)
        rows += [(sha, shard, key) for key, sha in zip(table.column("key").to_pylist(), table.column("pixel_sha256").to_pylist())]
    rows.sort()
    return [(shard, key) for (sha, shard, key), previous in zip(rows[1:], rows) if sha == previous[0]]


def find_drops(fetched: StageOutput, filters: FilterConfig) -> dict[int, dict[str, str]]:
    """shard -> {key: reason} for the whole dataset (Ray must be connected)."""
    import ray

    plan = fetched.read_plan()
    if plan is None or not fetched.is_complete():
        raise ValueError(f"{fetched.uri} is not complete: fetch before dedup")
    started = time.monotonic()
    uris = [index_uri(fetched.uri, shard) for shard in range(plan.num_shards)]
    drops: dict[int, dict[str, str]] = {}
    if filters.dedup_exact:
        remote = ray.remote(exact_duplicates_in_partition).options(num_cpus=1)
        for found in ray.get([remote.remote(uris, part, PARTITIONS) for part in range(PARTITIONS)]):
            for shard, key in found:
                drops.setdefault(shard, {})[key] = EXACT
    near = 0
    if filters.near_duplicate_distance is not None:
        # near duplicates need every remaining pHash in one place: 8 bytes of hash plus the key
        # per image on one worker (the driver), the one part of curation that grows with the dataset
        entries = []
        for shard, uri in enumerate(uris):
            table = storage.read_parquet(uri, columns=["key", "phash"])
            entries += [(shard, key, phash) for key, phash in zip(table.column("key").to_pylist(), table.column("phash").to_pylist())
                        if key not in drops.get(shard, {})]
        entries.sort()
        shard_of = {key: shard for shard, key, _ in entries}
        found = find_duplicates([(key, "", phash) for _, key, phash in entries], False, filters.near_duplicate_distance)
        for key, reason in found.items():
            drops.setdefault(shard_of[key], {})[key] = reason
        near = len(found)
    exact = sum(r == EXACT for d in drops.values() for r in d.values())
    log.info("%s: dedup found %d exact and %d near duplicates in %.2f s", plan.dataset, exact, near,
             time.monotonic() - started)
    return drops


@dataclass
class DedupStage:
    dataset: str
    fetched: StageOutput
    filters: FilterConfig
    drops: dict[int, dict[str, str]] = field(default_factory=dict)
    """From find_drops: computed once in the driver, each shard's part sent with its task."""
    task_cpus: float = 1.0

    def __post_init__(self) -> None:
        self.fetched_plan = self.fetched.read_plan()

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
