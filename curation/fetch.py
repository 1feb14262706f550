"""The `fetched` stage every source shares: image policy, filters and hashes, per shard.

A source only says what its shards are and yields candidates (or failures) for one shard;
this module turns them into samples the same way for every source. Duplicates are removed
afterwards, across the whole dataset, by the `shards` stage (dedup.py): a shard task can
only see its own shard, and a dataset-wide decision made while shards race would depend on
which shard finished first.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from curation.filters import caption_rejection, image_rejection, metadata_rejection
from curation.images import ImagePolicy, ImageRejected, ProcessedImage
from curation.sample import make_sample
from shardkit import storage
from shardkit.runner import ShardTask
from shardkit.shards import Failure, ShardRecord, StagePlan, write_shard

log = logging.getLogger(__name__)

STAGE = "fetched"
INDEX = "_index"
INDEX_SCHEMA = pa.schema([("key", pa.string()), ("pixel_sha256", pa.string()), ("phash", pa.uint64())])


def index_uri(stage_uri: str, shard: int) -> str:
    """The per-shard sidecar of image hashes that dedup reads instead of the images."""
    return storage.join(stage_uri, INDEX, f"{shard:05d}.parquet")


@dataclass
class Candidate:
    key: str
    origin: str
    caption: str = ""
    meta: dict[str, Any] = field(default_factory=dict)
    """What the source knows about the sample (LAION's columns, SA-1B's mask statistics)."""
    data: bytes | None = None
    """Undecoded image bytes; None when `processed` is already set (img2dataset did it)."""
    processed: ProcessedImage | None = None


class ShardBuilder:
    """Collects one shard's samples, failures and filter counts, then writes it."""

    def __init__(self, shard: int, source: str, policy: ImagePolicy, filters) -> None:  # noqa: ANN001
        self.shard, self.source, self.policy, self.filters = shard, source, policy, filters
        self.samples: dict[str, Any] = {}
        self.hashes: list[tuple[str, str, int]] = []
        self.failures: list[Failure] = []
        self.counters: dict[str, int] = {}
        self.seen = 0
        self.started = time.monotonic()

    def count(self, name: str, n: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + n

    def fail(self, key: str, reason: str, detail: str = "") -> None:
        self.seen += 1
        self.failures.append(Failure(key, reason, detail[:500]))

    def filtered(self, key: str, name: str) -> None:
        self.seen += 1
        self.count(f"filtered:{name}")

    def prefilter(self, candidate: Candidate) -> bool:
        """Filters that need no image: True if the candidate is still wanted. Sources that
        download call this first, so filtered rows cost no bandwidth."""
        name = metadata_rejection(candidate.meta, self.filters) or caption_rejection(candidate.caption, self.filters)
        if name:
            self.filtered(candidate.key, name)
            return False
        return True

    def add(self, candidate: Candidate, prefiltered: bool = False) -> None:
        if not prefiltered and not self.prefilter(candidate):
            return
        processed = candidate.processed
        if processed is None:
            try:
                processed = self.policy.process(candidate.data or b"")
            except ImageRejected as exc:
                self.fail(candidate.key, exc.reason, exc.detail)
                return
        name = image_rejection(processed.original_width, processed.original_height, self.filters)
        if name:
            self.filtered(candidate.key, name)
            return
        self.seen += 1
        if processed.reencoded:
            self.count("reencoded")
        self.samples[candidate.key] = make_sample(
            candidate.key, processed.data, width=processed.width, height=processed.height,
            original_width=processed.original_width, original_height=processed.original_height,
            source=self.source, origin=candidate.origin, caption=candidate.caption,
            extra={**candidate.meta, "pixel_sha256": processed.pixel_sha256, "phash": f"{processed.phash:016x}"},
        )
        self.hashes.append((candidate.key, processed.pixel_sha256, processed.phash))

    def finish(self, shard_uri: str, stage_uri: str) -> ShardRecord:
        """Write the shard (in key order, whatever order downloads finished in) and its hash
        index; the runner writes the record after this returns."""
        written = write_shard(shard_uri, (self.samples[k] for k in sorted(self.samples)))
        # sorted by hash: dedup reads hash ranges, and row-group statistics let it skip the rest
        self.hashes.sort(key=lambda h: h[1])
        table = pa.table(
            {"key": [h[0] for h in self.hashes], "pixel_sha256": [h[1] for h in self.hashes],
             "phash": pa.array([h[2] for h in self.hashes], pa.uint64())},
            schema=INDEX_SCHEMA,
        )
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, row_group_size=1024)
        storage.atomic_write(index_uri(stage_uri, self.shard), sink.getvalue().to_pybytes())
        return ShardRecord(self.shard, samples_in=self.seen, samples_out=written,
                           seconds=time.monotonic() - self.started, failures=self.failures,
                           counters=dict(sorted(self.counters.items())))


class FetchStage:
    """Base of every source's stage. Subclasses define `slices()` (one payload per shard,
    computed once in the driver) and `collect(task, builder)`."""

    stage = STAGE
    task_cpus = 1.0
    """Whole CPUs: Ray keeps about one idle worker per CPU, so fractional tasks make it start
    (and import img2dataset in) fresh workers every run; downloads get their concurrency from
    threads inside the task instead (measured: 1.85x faster on 2 vCPUs)."""

    def __init__(self, dataset: str, cfg: Any) -> None:
        self.dataset, self.cfg = dataset, cfg

    def slices(self) -> list[Any]:
        raise NotImplementedError

    def collect(self, task: ShardTask, builder: ShardBuilder) -> None:
        raise NotImplementedError

    @cached_property
    def _slices(self) -> list[Any]:
        return self.slices()

    @cached_property
    def policy(self) -> ImagePolicy:
        r = self.cfg.resize
        return ImagePolicy(mode=r.mode, size=r.size, upscale=r.upscale, quality=r.quality, max_pixels=r.max_pixels)

    def plan(self) -> StagePlan:
        return StagePlan(dataset=self.dataset, stage=STAGE, num_shards=len(self._slices),
                         config=self.cfg.model_dump(mode="json"))

    def tasks(self) -> list[ShardTask]:
        return [ShardTask(i, payload) for i, payload in enumerate(self._slices)]

    def run_shard(self, task: ShardTask, shard_uri: str) -> ShardRecord:
        builder = ShardBuilder(task.index, self.cfg.source, self.policy, self.cfg.filters)
        self.collect(task, builder)
        stage_uri = shard_uri.rsplit("/", 1)[0]
        return builder.finish(shard_uri, stage_uri)
