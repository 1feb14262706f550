"""Dataset-wide dedup decisions from the hash indexes: the bounded Ray job decides exactly as
the one-process rule (kept below as it was, gathering every hash in the driver)."""

import hashlib
import pickle
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curation import dedup
from curation.dedup import EXACT, NEAR, DedupStage, _layout, _tables, find_drops, find_duplicates
from curation.fetch import INDEX_SCHEMA, index_uri
from shardkit.config import FilterConfig
from shardkit.shards import ShardRecord, StageOutput, StagePlan


# ---- the rule as it was decided before (commit 76deb04): every hash in the driver ------------

def _old_find_drops(fetched, filters):
    plan = fetched.read_plan()
    uris = [index_uri(fetched.uri, shard) for shard in range(plan.num_shards)]
    drops = {}
    if filters.dedup_exact:  # what the 16 prefix partitions found together: the earliest of each sha kept
        rows = []
        for shard, uri in enumerate(uris):
            table = pq.read_table(uri, columns=["key", "pixel_sha256"])
            rows += [(sha, shard, key) for key, sha in
                     zip(table.column("key").to_pylist(), table.column("pixel_sha256").to_pylist())]
        rows.sort()
        for (sha, shard, key), previous in zip(rows[1:], rows):
            if sha == previous[0]:
                drops.setdefault(shard, {})[key] = EXACT
    if filters.near_duplicate_distance is not None:
        entries = []
        for shard, uri in enumerate(uris):
            table = pq.read_table(uri, columns=["key", "phash"])
            entries += [(shard, key, phash) for key, phash in
                        zip(table.column("key").to_pylist(), table.column("phash").to_pylist())
                        if key not in drops.get(shard, {})]
        entries.sort()
        shard_of = {key: shard for shard, key, _ in entries}
        found = find_duplicates([(key, "", phash) for _, key, phash in entries], False, filters.near_duplicate_distance)
        for key, reason in found.items():
            drops.setdefault(shard_of[key], {})[key] = reason
    return drops


# ---- inputs ----------------------------------------------------------------------------------

def _fetched(tmp_path, seed=0, shards=7):
    """A complete fetched stage (plan, records, indexes) whose hashes are dense with
    duplicates: exact copies, re-encodes (same pHash) and chains of near pHashes in clusters,
    keys written out of order within shards, and an empty shard."""
    rng = random.Random(seed)
    uri = str(tmp_path / f"fetched-{seed}")
    output = StageOutput(uri)
    (tmp_path / f"fetched-{seed}" / "_index").mkdir(parents=True)
    images = [(hashlib.sha256(f"{seed}-{i}".encode()).hexdigest(), None) for i in range(50)]
    bases = [rng.getrandbits(64) for _ in range(4)]
    used = []
    for shard in range(shards):
        count = 0 if shard == 3 else rng.randint(20, 60)
        rows = []
        for i in range(count):
            kind = rng.random()
            if kind < 0.3:  # an exact copy (same pixels: same pHash)
                sha, _ = rng.choice(images)
                phash = int(sha[:16], 16)
            elif kind < 0.4 and used:  # a re-encode: other pixels, an earlier pHash
                sha = hashlib.sha256(f"{seed}-{shard}-{i}".encode()).hexdigest()
                phash = rng.choice(used)
            else:  # a cluster member: 0-12 of its 16 low bits flipped, some high bits now and then
                sha = hashlib.sha256(f"{seed}-{shard}-{i}".encode()).hexdigest()
                phash = rng.choice(bases) ^ rng.getrandbits(16) & rng.getrandbits(16)
                if rng.random() < 0.2:
                    phash ^= 1 << rng.randrange(16, 64)
            used.append(phash)
            rows.append((f"{shard:05d}{rng.randrange(10**5):05d}-{i}", sha, phash))
        rows.sort(key=lambda r: r[1])
        pq.write_table(pa.table({"key": [r[0] for r in rows], "pixel_sha256": [r[1] for r in rows],
                                 "phash": pa.array([r[2] for r in rows], pa.uint64())}, schema=INDEX_SCHEMA),
                       index_uri(uri, shard), row_group_size=8)
        output.write_record(ShardRecord(shard, samples_in=count, samples_out=count, seconds=0.0))
    output.write_plan(StagePlan("d", "fetched", num_shards=shards))
    return output


# ---- the tests -------------------------------------------------------------------------------

@pytest.mark.parametrize("exact,near", [(True, None), (False, 0), (True, 0), (True, 2), (False, 3), (True, 4),
                                        (True, 8), (True, 12), (True, 64)])
def test_the_ray_job_drops_what_the_one_process_rule_drops(ray_session, tmp_path, monkeypatch, exact, near):
    monkeypatch.setattr(dedup, "ROWS_PER_TASK", 70)  # several map tasks and shard groups
    fetched = _fetched(tmp_path, seed=near or 0)
    filters = FilterConfig(dedup_exact=exact, near_duplicate_distance=near)
    expected = _old_find_drops(fetched, filters)
    assert sum(r == NEAR for d in expected.values() for r in d.values()) or near is None  # the case is exercised
    drops = find_drops(fetched, filters)
    assert drops.to_dict() == expected
    assert drops.counts == {reason: sum(r == reason for d in expected.values() for r in d.values())
                            for reason in (EXACT, NEAR) if any(r == reason for d in expected.values() for r in d.values())}


def test_more_blocks_than_distance_plus_one_find_the_same_pairs(ray_session, tmp_path, monkeypatch):
    """Tables of several blocks (chosen for large datasets) decide as one block a table does."""
    monkeypatch.setattr(dedup, "ROWS_PER_TASK", 70)
    monkeypatch.setattr(dedup, "COMPARE_PER_ROW", 1e-9)  # longest keys: tables of several blocks
    layout, need = _layout(3, 1000)
    assert need >= 2 and len(_tables(layout, need)) > len(layout)
    for seed in (1, 2):
        fetched = _fetched(tmp_path, seed=seed)
        filters = FilterConfig(dedup_exact=True, near_duplicate_distance=3)
        assert find_drops(fetched, filters).to_dict() == _old_find_drops(fetched, filters)


def test_layouts_keep_the_pigeonhole_and_grow_keys_with_the_dataset():
    for distance in (0, 1, 4, 8, 11, 20, 63):
        for rows in (10**3, 10**7, 10**10):
            layout, need = _layout(distance, rows)
            assert sum(width for _, width in layout) == 64 and len(layout) - need == distance
    assert _layout(64, 10) == ([(0, 0)], 1)
    assert _layout(4, 10**4)[1] == 1 and _layout(4, 10**9)[1] >= 2  # big datasets: longer keys, smaller buckets


def test_the_stage_sent_to_tasks_leaves_the_drops_behind(ray_session, tmp_path):
    fetched = _fetched(tmp_path)
    filters = FilterConfig(near_duplicate_distance=2)
    drops = find_drops(fetched, filters)
    stage = DedupStage("d", fetched, filters, drops=drops)
    assert pickle.loads(pickle.dumps(stage)).drops is None
    tasks = stage.tasks()
    assert {t.index for t in tasks if t.payload} == set(drops.files)
    assert all(dedup.read_shard_drops(t.payload, t.index) == drops.of(t.index) for t in tasks if t.payload)
    drops.remove_scratch()
    assert not (tmp_path / "fetched-0" / "_dedup").exists()


def test_near_duplicates_within_distance_of_an_earlier_kept_hash():
    base = 0x0F0F_F0F0_1234_5678
    entries = [("a", "", base), ("b", "", base ^ 0b111), ("c", "", base ^ (0xFF << 40)), ("d", "", base ^ 0b1)]
    assert find_duplicates(entries, exact=False, near_distance=3) == {"b": "duplicate:near", "d": "duplicate:near"}
    assert find_duplicates(entries, exact=False, near_distance=0) == {}
