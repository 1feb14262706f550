"""Benchmarks of the shard format itself: our writer and reader against plain tarfile and
webdataset doing the same work."""

from __future__ import annotations

import io
import os
import tarfile

import numpy as np
import webdataset as wds

from shardkit.bench import BenchResult, interleaved
from shardkit.shards import Sample, ShardWriter, encode_meta, make_key, read_shard, write_shard

SAMPLES = 2000
IMAGE_BYTES = 20_000  # about a 256 px JPEG


def _samples() -> list[Sample]:
    rng = np.random.default_rng(0)
    return [
        Sample(make_key(0, i), {"jpg": rng.bytes(IMAGE_BYTES), "json": encode_meta({"i": i}), "txt": b"a caption"})
        for i in range(SAMPLES)
    ]


def shard_write(config, workdir: str) -> BenchResult:  # noqa: ANN001 - bench signature
    samples = _samples()
    ours_path, plain_path = os.path.join(workdir, "ours.tar"), os.path.join(workdir, "plain.tar")

    closing: list[float] = []

    def ours() -> int:
        with ShardWriter(ours_path) as writer:
            for sample in samples:
                writer.write(sample)
        closing.append(writer.close_seconds)
        return writer.count

    def plain() -> int:
        with tarfile.open(plain_path, "w") as tar:
            for sample in samples:
                for name, data in sample.fields.items():
                    info = tarfile.TarInfo(f"{sample.key}.{name}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        return len(samples)

    mine, base = interleaved(ours, plain)
    durable = min(closing)
    return BenchResult("shard_write", "samples", mine, base, "plain tarfile loop (no fsync)", 0.9,
                       f"disk writes; the fsync and rename that make a finished shard durable before its record is "
                       f"written (a crash must not leave a record over a tar the disk never got) take {durable * 1000:.0f} ms "
                       f"of {mine.seconds * 1000:.0f}; headers are formatted in Python (shardkit/tar.py)",
                       extra={"close_fsync_rename_s": round(durable, 4), "samples": SAMPLES, "image_bytes": IMAGE_BYTES})


def shard_read(config, workdir: str) -> BenchResult:  # noqa: ANN001
    path = os.path.join(workdir, "shard.tar")
    write_shard(path, _samples())

    def ours() -> int:
        return sum(1 for _ in read_shard(path))

    def webdataset() -> int:
        return sum(1 for _ in wds.WebDataset(path, shardshuffle=False))

    mine, base = interleaved(ours, webdataset)
    return BenchResult("shard_read", "samples", mine, base, "webdataset.WebDataset", 0.9,
                       "tar headers parsed and checksummed in Python (shardkit/tar.py), one read per member")


BENCHMARKS = [shard_write, shard_read]
