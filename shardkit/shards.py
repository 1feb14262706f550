"""The shard format: the contract between stages (docs/shards.md is its prose form).

A stage output is a folder `<storage>/<dataset>/<stage>/` of WebDataset tars with stable
names (00000.tar, ...), one record per finished shard under `_records/`, a `_plan.json`
written before any shard and a `_summary.json` written at the end. Shard i of a stage holds
the samples of shard i of its input that succeeded, same keys, same order. A shard is
complete only when its record exists: the record is written after the tar, atomically.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Mapping

from shardkit import storage, tar

if TYPE_CHECKING:
    from PIL import Image

IMAGE = "jpg"
META = "json"
CAPTION = "txt"
MAX_PIXELS = 64_000_000
"""No stage decodes an image larger than this (8k x 8k): a decompression bomb is a failure."""
BASE_FIELDS = (IMAGE, META, CAPTION)
REQUIRED_META = ("source", "origin", "width", "height", "original_width", "original_height", "sha256")

RECORDS = "_records"
PLAN = "_plan.json"
SUMMARY = "_summary.json"
RUN = "_run"

_KEY = re.compile(r"^[A-Za-z0-9_-]+$")
_FIELD = re.compile(r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")
_SHARD = re.compile(r"^(\d{5,})\.tar$")


class ShardFormatError(ValueError):
    pass


def shard_name(index: int) -> str:
    return f"{index:05d}.tar"


def make_key(shard: int, index: int) -> str:
    """Keys are unique across a dataset and sort in shard order."""
    return f"{shard:05d}{index:05d}"


def _json_bytes(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False, sort_keys=True, separators=(",", ":")).encode("utf-8")


@dataclass
class Sample:
    key: str
    fields: dict[str, bytes]

    def __post_init__(self) -> None:
        if not _KEY.match(self.key):
            raise ShardFormatError(f"key {self.key!r}: only letters, digits, '_' and '-' are allowed")
        for name in self.fields:
            if not _FIELD.match(name):
                raise ShardFormatError(f"{self.key}: bad field name {name!r}")

    @property
    def meta(self) -> dict[str, Any]:
        return json.loads(self.fields[META]) if META in self.fields else {}

    def with_meta(self, meta: dict[str, Any]) -> "Sample":
        return Sample(self.key, {**self.fields, META: _json_bytes(meta)})

    def text(self, field_name: str = CAPTION) -> str:
        return self.fields[field_name].decode("utf-8") if field_name in self.fields else ""


def encode_meta(meta: dict[str, Any]) -> bytes:
    return _json_bytes(meta)


class ShardWriter:
    """Writes one shard tar atomically. Members are `<key>.<field>` with fixed mtime and
    mode, so the same samples always give the same bytes (those tarfile would write: tar.py)."""

    def __init__(self, uri: str):
        self.uri = uri
        self.count = 0
        self._keys: set[str] = set()
        self._offset = 0
        self.close_seconds = 0.0
        """How long close() took: the flush, fsync and rename that make the tar durable under its name."""
        self._context = storage.atomic_open(uri)
        self._file = self._context.__enter__()

    def write(self, sample: Sample) -> None:
        if sample.key in self._keys:
            raise ShardFormatError(f"{self.uri}: duplicate key {sample.key}")
        self._keys.add(sample.key)
        # base fields first, in a fixed order, so readers see the image and metadata first
        order = [f for f in BASE_FIELDS if f in sample.fields] + sorted(
            f for f in sample.fields if f not in BASE_FIELDS
        )
        for name in order:
            data = sample.fields[name]
            header = tar.member_header(f"{sample.key}.{name}", len(data))
            padding = -len(data) % tar.BLOCK
            self._file.write(header)
            self._file.write(data)
            if padding:
                self._file.write(bytes(padding))
            self._offset += len(header) + len(data) + padding
        self.count += 1

    def close(self) -> None:
        started = time.perf_counter()
        self._file.write(tar.end_of_archive(self._offset))
        self._context.__exit__(None, None, None)
        self.close_seconds = time.perf_counter() - started

    def abort(self, exc: BaseException) -> None:
        self._context.__exit__(type(exc), exc, exc.__traceback__)

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:  # noqa: ANN001
        if exc is None:
            self.close()
        else:
            self.abort(exc)


def write_shard(uri: str, samples: Iterable[Sample]) -> int:
    with ShardWriter(uri) as writer:
        for sample in samples:
            writer.write(sample)
    return writer.count


def split_member(uri: str, member: tar.Member) -> tuple[str, str]:
    """(key, field) of a tar member; anything but a plain top-level `key.field` file is refused."""
    name = member.name
    if not member.regular or "/" in name or "\\" in name or name.startswith("."):
        raise ShardFormatError(f"{uri}: refused member {name!r} (not a plain top-level file)")
    key, _, field_name = name.partition(".")
    if not field_name:
        raise ShardFormatError(f"{uri}: member {name!r} has no field suffix")
    return key, field_name


@dataclass
class IndexedSample:
    key: str
    fields: dict[str, bytes]
    """Only the fields that were asked for."""
    offsets: dict[str, tuple[int, int]]
    """Every field of the sample: (data offset, size)."""


def scan_shard(uri: str, wanted: Callable[[str], bool] = lambda _: True) -> Iterator[IndexedSample]:
    """Every sample of a shard in order, read once as a stream, with each member's offsets;
    only the fields `wanted` accepts are read into memory (the rest are skipped: seeked over
    in a local file)."""
    fs, path = storage.filesystem(uri)
    with fs.open(path, "rb") as f:
        current: IndexedSample | None = None
        try:
            for member in tar.members(f, lambda name: wanted(name.partition(".")[2]), seek=storage.is_local(uri)):
                key, field_name = split_member(uri, member)
                if current is None or key != current.key:
                    if current is not None:
                        yield current
                    current = IndexedSample(key, {}, {})
                if field_name in current.offsets:
                    raise ShardFormatError(f"{uri}: {member.name} appears twice")
                current.offsets[field_name] = (member.offset, member.size)
                if member.data is not None:
                    current.fields[field_name] = member.data
        except tar.TarFormatError as exc:
            raise ShardFormatError(f"{uri}: {exc}") from None
        if current is not None:
            yield current


def read_shard(uri: str) -> Iterator[Sample]:
    """Samples of a shard in order, read as a stream. Members that are not plain files or
    whose names could escape a folder are refused: shards may come from elsewhere."""
    for sample in scan_shard(uri):
        yield Sample(sample.key, sample.fields)


# ---- records, plans and summaries ----------------------------------------------------------

@dataclass
class Failure:
    key: str
    reason: str
    detail: str = ""


@dataclass
class ShardRecord:
    shard: int
    samples_in: int
    samples_out: int
    seconds: float
    failures: list[Failure] = field(default_factory=list)
    counters: dict[str, int] = field(default_factory=dict)
    """Stage-specific counts (e.g. `filtered:min_side`, `tokens`) summed in the summary."""

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ShardRecord":
        raw = json.loads(text)
        raw["failures"] = [Failure(**f) for f in raw.get("failures", [])]
        return cls(**raw)


@dataclass
class StagePlan:
    dataset: str
    stage: str
    num_shards: int
    input_stage: str | None = None
    """The stage (relative to the dataset) whose shard i this stage's shard i is made from."""
    fields: list[str] = field(default_factory=lambda: list(BASE_FIELDS))
    """Fields every sample of this stage must have."""
    config: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "StagePlan":
        return cls(**json.loads(text))


@dataclass(frozen=True)
class StageOutput:
    """Where one stage of one dataset lives, and what of it is done."""

    uri: str
    run_id: str = ""
    """Set by the runner for the run that currently owns the output (see write_fence)."""

    @classmethod
    def of(cls, storage_root: str, dataset: str, stage: str) -> "StageOutput":
        return cls(storage.join(storage_root, dataset, stage))

    def shard_uri(self, index: int) -> str:
        return storage.join(self.uri, shard_name(index))

    def record_uri(self, index: int) -> str:
        return storage.join(self.uri, RECORDS, f"{index:05d}.json")

    def shard_indices(self) -> list[int]:
        """Indices of the tars present (complete or not)."""
        return sorted(int(m.group(1)) for m in map(_SHARD.match, storage.list_names(self.uri)) if m)

    def write_fence(self) -> None:
        storage.atomic_write(storage.join(self.uri, RUN), self.run_id)

    def read_fence(self) -> str | None:
        uri = storage.join(self.uri, RUN)
        return storage.read_text(uri) if storage.exists(uri) else None

    def write_plan(self, plan: StagePlan) -> None:
        storage.atomic_write(storage.join(self.uri, PLAN), plan.to_json())

    def read_plan(self) -> StagePlan | None:
        uri = storage.join(self.uri, PLAN)
        return StagePlan.from_json(storage.read_text(uri)) if storage.exists(uri) else None

    def write_record(self, record: ShardRecord) -> None:
        storage.atomic_write(self.record_uri(record.shard), record.to_json())

    def record(self, index: int) -> ShardRecord:
        return ShardRecord.from_json(storage.read_text(self.record_uri(index)))

    def _record_names(self) -> list[str]:
        return [n for n in storage.list_names(storage.join(self.uri, RECORDS))
                if n.endswith(".json") and storage.TEMP_MARKER not in n and n[:-5].isdigit()]

    def iter_records(self) -> Iterator[ShardRecord]:
        """The records one at a time: a stage of millions of shards, each with its failure
        list, is never held whole."""
        for name in self._record_names():
            yield ShardRecord.from_json(storage.read_text(storage.join(self.uri, RECORDS, name)))

    def records(self) -> dict[int, ShardRecord]:
        return {record.shard: record for record in self.iter_records()}

    def complete_shards(self) -> set[int]:
        """From the records' names alone: no record is read."""
        return {int(name[:-5]) for name in self._record_names()}

    def identity(self) -> str:
        """A digest of what a reader of this output sees: the plan, and each complete shard's
        record and tar size and modification time. A shard remade (a new record) or a tar
        replaced after the fact changes it; listing and stat calls only, no tar is read."""
        fs, root = storage.filesystem(self.uri)
        fs.invalidate_cache(root)  # sizes and stamps as they are now, not as this process last listed them
        plan_uri = storage.join(self.uri, PLAN)
        digest = hashlib.sha256(storage.read_bytes(plan_uri) if storage.exists(plan_uri) else b"")
        for record in self.iter_records():  # in shard order (zero-padded names), one at a time
            index = record.shard
            info = fs.info(storage.filesystem(self.shard_uri(index))[1])
            # local files have an mtime; object stores name it otherwise, or give only an etag
            stamp = next((info[k] for k in ("mtime", "LastModified", "updated", "ETag", "etag") if info.get(k)), "")
            digest.update(_json_bytes({"shard": index, "record": dataclasses.asdict(record),
                                       "size": info.get("size"), "stamp": str(stamp)}))
        return digest.hexdigest()

    def is_complete(self) -> bool:
        plan = self.read_plan()
        return plan is not None and self.complete_shards() >= set(range(plan.num_shards))

    def write_summary(self, summary: dict[str, Any]) -> None:
        storage.atomic_write(storage.join(self.uri, SUMMARY), json.dumps(summary, indent=1, sort_keys=True))

    def read_summary(self) -> dict[str, Any] | None:
        uri = storage.join(self.uri, SUMMARY)
        return json.loads(storage.read_text(uri)) if storage.exists(uri) else None

    def samples(self) -> Iterator[Sample]:
        """Every sample of the complete shards, in shard order."""
        for index in sorted(self.complete_shards()):
            yield from read_shard(self.shard_uri(index))


def summarise(plan: StagePlan, records: Mapping[int, ShardRecord] | Iterable[ShardRecord],
              wall_seconds: float) -> dict[str, Any]:
    """The stage summary, over every record (this run's and earlier runs'), so a resumed
    stage reports the whole output, not just the last part. One pass, counts only: records
    may be a stream (StageOutput.iter_records)."""
    failures: Counter[str] = Counter()
    counters: Counter[str] = Counter()
    complete: set[int] = set()
    samples_in = samples_out = 0
    seconds = 0.0
    for record in records.values() if isinstance(records, Mapping) else records:
        complete.add(record.shard)
        failures.update(f.reason for f in record.failures)
        counters.update(record.counters)
        samples_in += record.samples_in
        samples_out += record.samples_out
        seconds += record.seconds
    missing = sorted(set(range(plan.num_shards)) - complete)
    return {
        "dataset": plan.dataset,
        "stage": plan.stage,
        "shards_total": plan.num_shards,
        "shards_complete": len(complete),
        "shards_missing": missing,
        "samples_in": samples_in,
        "samples_out": samples_out,
        "failures": sum(failures.values()),
        "failures_by_reason": dict(sorted(failures.items())),
        "counters": dict(sorted(counters.items())),
        "shard_seconds": round(seconds, 3),
        "wall_seconds": round(wall_seconds, 3),
    }


def decode_image(data: bytes) -> Image.Image:
    """A shard's image as RGB, its size checked from the header before any pixel is decoded."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        if image.width * image.height > MAX_PIXELS:
            raise ValueError(f"{image.width}x{image.height} exceeds the pixel bound")
        return image.convert("RGB")
