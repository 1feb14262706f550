"""Benchmarks of the shard format itself: our writer and reader against plain tarfile and
webdataset doing the same work."""

from __future__ import annotations

import io
import os
import tarfile

import numpy as np
import webdataset as wds

from shardkit.bench import BenchResult, interleaved
from shardkit.shards import Sample, encode_meta, make_key, read_shard, write_shard

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

    def ours() -> int:
        return write_shard(ours_path, samples)

    def plain() -> int:
        with tarfile.open(plain_path, "w") as tar:
            for sample in samples:
                for name, data in sample.fields.items():
                    info = tarfile.TarInfo(f"{sample.key}.{name}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        return len(samples)

    mine, base = interleaved(ours, plain)
    return BenchResult("shard_write", "samples", mine, base, "plain tarfile loop", 0.9,
                       "disk writes plus the fsync that makes a finished shard durable before its record")


def shard_read(config, workdir: str) -> BenchResult:  # noqa: ANN001
    path = os.path.join(workdir, "shard.tar")
    write_shard(path, _samples())

    def ours() -> int:
        return sum(1 for _ in read_shard(path))

    def webdataset() -> int:
        return sum(1 for _ in wds.WebDataset(path, shardshuffle=False))

    mine, base = interleaved(ours, webdataset)
    return BenchResult("shard_read", "samples", mine, base, "webdataset.WebDataset", 0.9,
                       "tar member parsing in Python (tarfile), one member at a time")


BENCHMARKS = [shard_write, shard_read]
