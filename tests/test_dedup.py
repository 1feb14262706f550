"""Dataset-wide dedup decisions from the hash indexes, partitioned by hash prefix."""

import hashlib
import random

import pyarrow as pa
import pyarrow.parquet as pq

from curation.dedup import exact_duplicates_in_partition, find_duplicates
from curation.fetch import INDEX_SCHEMA


def _indexes(tmp_path, shards):
    uris = []
    for shard, rows in enumerate(shards):
        rows = sorted(rows, key=lambda r: r[1])
        path = tmp_path / f"{shard:05d}.parquet"
        pq.write_table(pa.table({"key": [r[0] for r in rows], "pixel_sha256": [r[1] for r in rows],
                                 "phash": pa.array([0] * len(rows), pa.uint64())}, schema=INDEX_SCHEMA),
                       path, row_group_size=4)
        uris.append(str(path))
    return uris


def test_partitioned_exact_dedup_keeps_the_earliest_and_matches_one_pass(tmp_path):
    rng = random.Random(0)
    images = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(60)]
    shards = [[(f"{s:05d}{i:05d}", rng.choice(images)) for i in range(25)] for s in range(4)]
    uris = _indexes(tmp_path, shards)
    expected, seen = set(), set()
    for shard, rows in enumerate(shards):  # the rule: shard order, then key order
        for key, sha in sorted(rows):
            if sha in seen:
                expected.add((shard, key))
            seen.add(sha)
    for parts in (1, 3, 16):
        found = [d for part in range(parts) for d in exact_duplicates_in_partition(uris, part, parts)]
        assert sorted(found) == sorted(expected) and len(found) == len(set(found))


def test_near_duplicates_within_distance_of_an_earlier_kept_hash():
    base = 0x0F0F_F0F0_1234_5678
    entries = [("a", "", base), ("b", "", base ^ 0b111), ("c", "", base ^ (0xFF << 40)), ("d", "", base ^ 0b1)]
    assert find_duplicates(entries, exact=False, near_distance=3) == {"b": "duplicate:near", "d": "duplicate:near"}
    assert find_duplicates(entries, exact=False, near_distance=0) == {}
