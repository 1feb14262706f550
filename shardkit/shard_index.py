"""Byte offsets of every member of a shard tar, so one sample's field is read without the tar.

A tar member's data sits at a fixed offset in the file, and the shard reader tells it
(`IndexedSample.offsets`) while it reads the headers. An index lists, for each key of a shard in
tar order, each field's `[offset, size]`; with it a reader fetches one image with one ranged
read (`read_member`), locally or from an object store (fsspec opens ranges lazily).

Indices live beside the records: `<stage>/_offsets/00000.json`, one per shard, written
atomically by whoever first needs them (the viewer writes them while it reads each tar once
anyway). Each records the tar's size and modification stamp when it was made; an index whose
tar changed since (a remade shard) is stale and read as absent. The folder is not part of
the shard format: it can be deleted at any time and is made again.

```json
{"version": 1, "shard": 3, "tar": "00003.tar", "size": 1234567, "stamp": "1733327012.5",
 "samples": {"0000300000": {"jpg": [1536, 20480], "json": [23040, 311], "txt": [24064, 42]}, ...}}
```
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from shardkit import storage
from shardkit.shards import IndexedSample, scan_shard, shard_name

OFFSETS = "_offsets"
VERSION = 1


def index_uri(stage_uri: str, shard: int) -> str:
    return storage.join(stage_uri, OFFSETS, f"{shard:05d}.json")


def tar_stamp(shard_uri: str) -> tuple[int, str]:
    """The tar's size and a stamp that changes when it is replaced (mtime, or the object's
    etag/last-modified): what an index is checked against."""
    fs, path = storage.filesystem(shard_uri)
    fs.invalidate_cache(path)
    info = fs.info(path)
    stamp = next((info[k] for k in ("mtime", "LastModified", "updated", "ETag", "etag") if info.get(k)), "")
    return int(info.get("size") or 0), str(stamp)


@dataclass
class ShardIndex:
    shard: int
    size: int
    stamp: str
    samples: dict[str, dict[str, tuple[int, int]]] = field(default_factory=dict)
    """key -> field -> (offset of the member's data in the tar, its size), in tar order."""

    def locate(self, key: str, field_name: str) -> tuple[int, int]:
        try:
            return self.samples[key][field_name]
        except KeyError:
            raise KeyError(f"shard {self.shard}: no member {key}.{field_name}") from None

    def to_json(self) -> str:
        return json.dumps({"version": VERSION, "shard": self.shard, "tar": shard_name(self.shard), "size": self.size,
                           "stamp": self.stamp, "samples": {k: {f: list(v) for f, v in fields.items()}
                                                            for k, fields in self.samples.items()}},
                          separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> "ShardIndex":
        raw = json.loads(text)
        if raw.get("version") != VERSION:
            raise ValueError(f"shard index version {raw.get('version')!r}, expected {VERSION}")
        return cls(raw["shard"], raw["size"], raw["stamp"],
                   {k: {f: (int(v[0]), int(v[1])) for f, v in fields.items()} for k, fields in raw["samples"].items()})


class IndexBuilder:
    """Collects the offsets of a shard being scanned; `index()` once the scan is done."""

    def __init__(self, shard_uri: str, shard: int):
        self.shard_uri, self.shard = shard_uri, shard
        self.size, self.stamp = tar_stamp(shard_uri)
        self.samples: dict[str, dict[str, tuple[int, int]]] = {}

    def add(self, sample: IndexedSample) -> IndexedSample:
        self.samples[sample.key] = dict(sample.offsets)
        return sample

    def index(self) -> ShardIndex:
        return ShardIndex(self.shard, self.size, self.stamp, self.samples)


def build_index(stage_uri: str, shard: int) -> ShardIndex:
    """Read the tar's headers once: local tars with seeks over the data, remote ones as one
    stream (a seek there is a request of its own)."""
    shard_uri = storage.join(stage_uri, shard_name(shard))
    builder = IndexBuilder(shard_uri, shard)
    for sample in scan_shard(shard_uri, wanted=lambda _: False):
        builder.add(sample)
    return builder.index()


def write_index(stage_uri: str, index: ShardIndex) -> str:
    uri = index_uri(stage_uri, index.shard)
    storage.atomic_write(uri, index.to_json())
    return uri


def read_index(stage_uri: str, shard: int, check: bool = True) -> ShardIndex | None:
    """The shard's index if there is one and (with `check`) its tar is still the one it was
    made from; None otherwise."""
    uri = index_uri(stage_uri, shard)
    if not storage.exists(uri):
        return None
    try:
        index = ShardIndex.from_json(storage.read_text(uri))
    except (ValueError, KeyError, TypeError):
        return None  # an older version or a damaged file: made again
    if check and (index.size, index.stamp) != tar_stamp(storage.join(stage_uri, shard_name(shard))):
        return None
    return index


def ensure_index(stage_uri: str, shard: int) -> ShardIndex:
    """The shard's current index, built and written if it is absent or stale."""
    index = read_index(stage_uri, shard)
    if index is None:
        index = build_index(stage_uri, shard)
        write_index(stage_uri, index)
    return index


def read_member(shard_uri: str, offset: int, size: int) -> bytes:
    """`size` bytes at `offset` of a tar: one ranged read."""
    fs, path = storage.filesystem(shard_uri)
    if storage.is_local(shard_uri):
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read(size)
    return fs.cat_file(path, start=offset, end=offset + size)


def read_field(stage_uri: str, shard: int, key: str, field_name: str, index: ShardIndex | None = None) -> bytes:
    """One field of one sample, through the shard's index (made first if needed)."""
    index = index or ensure_index(stage_uri, shard)
    offset, size = index.locate(key, field_name)
    return read_member(storage.join(stage_uri, shard_name(shard)), offset, size)
