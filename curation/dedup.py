"""The `shards` stage: `fetched` minus duplicates, decided across the whole dataset.

Exact duplicates share the sha256 of their decoded pixels; near duplicates have perceptual
hashes within a Hamming distance. Of each group the sample that comes first (shard order,
then key order) is kept, so the result is the same whatever order shards were fetched in,
and a rerun makes the same decision. Decisions are made from the per-shard hash indexes
(fetched/_index/), never from the images, and the images are copied byte for byte.
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
import shutil
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field

from curation.fetch import index_uri
from shardkit import storage
from shardkit.config import FilterConfig
from shardkit.runner import ShardTask
from shardkit.shards import RECORDS, ShardRecord, StageOutput, StagePlan, read_shard, write_shard

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
    """Keys to drop, with the reason, from (key, pixel_sha256, phash) in keep-priority order:
    the rule in its plainest form, one process holding every hash. `find_drops` decides
    exactly this (tests/test_dedup.py checks it) without any process holding every hash."""
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


# ---- the dataset-wide decision on Ray, bounded per task --------------------------------------
#
# No process holds the whole index. Map tasks read groups of shards' indexes and split them by
# sha256 prefix; each exact reducer sees every copy of the hashes in its range, drops all but
# the earliest, and (for near duplicates) sends each survivor's pHash to band partitions: the
# pHash is cut into blocks, and two hashes within the distance agree on at least `need` of them,
# so every near pair meets in some band bucket (a table: a set of `need` blocks, and their
# value). Band reducers drop repeats of one pHash (all but the earliest are always near
# duplicates: the earliest is kept, or was dropped for a kept hash that is as near to them) and
# list the pairs of distinct pHashes within the distance, each once (in the first table both
# agree on). One resolver task applies the rule to those pairs: in priority order, a hash is
# dropped if an earlier one it is paired with was kept. Every decision is written, by shard
# group, to scratch files under <fetched>/_dedup/; a collector per shard group turns them into
# one file of (shard, key, reason); each shard task reads its own rows. The driver holds a row
# count, and then drop counts, per shard, and the shard groups: nothing that grows with the
# images of a shard.
#
# A sample's priority is an int64: shard << 32 | the rank of its key in its shard, which orders
# samples exactly as (shard, key) does.

SCRATCH = "_dedup"
ROWS_PER_TASK = 1_000_000
"""About how many rows a map task reads and an exact reducer holds: shard groups and partition
counts are sized from it (a band reducer holds about `tables` times as many small rows)."""
MIN_PARTITIONS = 16
MAX_PARTITIONS = 1024
"""Partition counts stay within these: each reducer opens one file per map task, so the
number of reads is maps x partitions."""
COMPARE_PER_ROW = 256
"""How many pair comparisons cost about as much as moving one row through the band shuffle
(used to choose how many blocks a pHash is cut into)."""
_REASONS = (EXACT, NEAR)


def _layout(distance: int, rows: int) -> tuple[list[tuple[int, int]], int]:
    """Blocks of the 64-bit pHash as (shift, width), and how many of them two hashes within
    `distance` must agree on (pigeonhole: at most `distance` blocks hold a differing bit). More
    blocks than distance + 1 make more tables (combinations of `need` blocks) with longer keys,
    hence smaller buckets: chosen by the expected cost at `rows` uniform hashes. Any layout
    finds the same pairs; only the work differs."""
    if distance >= 64:
        return [(0, 0)], 1  # every pair is within the distance: one bucket
    best = None
    for m in range(distance + 1, min(64, max(distance + 1, 16)) + 1):
        need = m - distance
        tables = math.comb(m, need)
        if tables > 64 and best is not None:
            break
        widths = [64 // m + (1 if i < 64 % m else 0) for i in range(m)]
        bits = sum(sorted(widths)[:need])
        cost = tables * (1 + rows / 2.0 ** bits / COMPARE_PER_ROW)
        if best is None or cost < best[0]:
            best = (cost, widths, need)
    _, widths, need = best
    shifts = [sum(widths[:i]) for i in range(len(widths))]
    return list(zip(shifts, widths)), need


def _tables(layout: list[tuple[int, int]], need: int) -> list[tuple[int, ...]]:
    return list(itertools.combinations(range(len(layout)), need))


def _block_mask(layout: list[tuple[int, int]], blocks: tuple[int, ...]) -> int:
    return sum(((1 << width) - 1) << shift for shift, width in (layout[b] for b in blocks))


@functools.lru_cache(maxsize=8)
def _table_of_agreement(layout: tuple[tuple[int, int], ...], need: int):  # noqa: ANN202 - int64 array
    """For each set of agreeing blocks (a bit mask; need >= 2, so at most 16 blocks), the
    index of its first combination of `need` blocks (-1 if it has fewer)."""
    import numpy as np

    m = len(layout)
    index = {c: i for i, c in enumerate(_tables(list(layout), need))}
    lookup = np.full(1 << m, -1, dtype=np.int64)
    for mask in range(1 << m):
        bits = [b for b in range(m) if mask >> b & 1]
        if len(bits) >= need:
            lookup[mask] = index[tuple(bits[:need])]
    return lookup


def _first_table(layout: list[tuple[int, int]], need: int, xor):  # noqa: ANN001, ANN202 - uint64 array -> int64 array
    """For pHash pairs (as their xor), the table each pair is reported in: the first
    combination of `need` blocks they agree on (-1 if they agree on fewer)."""
    import numpy as np

    agree = np.zeros(len(xor), dtype=np.uint64)
    for b, (shift, width) in enumerate(layout):
        same = (xor & np.uint64(((1 << width) - 1) << shift)) == 0
        agree |= same.astype(np.uint64) << np.uint64(b)
    if need == 1:  # the first agreeing block
        lowest = agree & (~agree + np.uint64(1))
        return np.where(agree == 0, -1, np.log2(np.maximum(lowest, 1).astype(np.float64)).astype(np.int64))
    return _table_of_agreement(tuple(layout), need)[agree.astype(np.int64)]


def _prefix_parts(sha, parts: int):  # noqa: ANN001, ANN202 - arrow string array -> int64 array
    """Partition of each hex sha256: its first four hex digits, scaled to `parts` (equal
    strings, whatever they hold, always get equal partitions)."""
    import numpy as np
    import pyarrow as pa

    sha = sha.combine_chunks() if isinstance(sha, pa.ChunkedArray) else sha
    prefix = np.zeros(len(sha), dtype=np.int64)
    if len(sha) == 0 or sha.buffers()[2] is None or sha.buffers()[2].size == 0:
        return prefix
    width = np.int64 if pa.types.is_large_string(sha.type) else np.int32
    offsets = np.frombuffer(sha.buffers()[1], dtype=width)[sha.offset:sha.offset + len(sha) + 1].astype(np.int64)
    data = np.frombuffer(sha.buffers()[2], dtype=np.uint8)
    digit = np.zeros(256, dtype=np.int64)
    for i, c in enumerate(b"0123456789abcdef"):
        digit[c] = i
    for i, c in enumerate(b"ABCDEF"):
        digit[c] = 10 + i
    lengths = offsets[1:] - offsets[:-1]
    for j in range(4):
        there = lengths > j
        prefix = prefix * 16 + np.where(there, digit[data[np.where(there, offsets[:-1] + j, 0)]], 0)
    return prefix * parts >> 16


def _band_parts(table: int, keys, parts: int):  # noqa: ANN001, ANN202
    import numpy as np

    mixed = (keys ^ np.uint64((table * 0x9E3779B97F4A7C15) & (2**64 - 1))) * np.uint64(0xBF58476D1CE4E5B9)
    return ((mixed >> np.uint64(32)) % np.uint64(parts)).astype(np.int64)


def _write_parts(uri: str, columns: dict, parts, count: int) -> None:  # noqa: ANN001
    """An Arrow IPC file whose batch i holds the rows of partition i (empty ones too), so a
    reader of one partition reads the footer and that batch only."""
    import numpy as np
    import pyarrow as pa

    order = np.argsort(parts, kind="stable")
    ends = np.searchsorted(parts[order], np.arange(count), side="right")
    arrays = {}
    for name, values in columns.items():
        if isinstance(values, pa.ChunkedArray):
            values = values.combine_chunks()
        arrays[name] = values.take(pa.array(order)) if isinstance(values, pa.Array) else pa.array(np.asarray(values)[order])
    schema = pa.schema([(name, array.type) for name, array in arrays.items()])
    options = pa.ipc.IpcWriteOptions(compression="zstd")
    with storage.atomic_open(uri) as f, pa.ipc.new_file(f, schema, options=options) as writer:
        start = 0
        for end in ends.tolist():
            writer.write_batch(pa.record_batch([a.slice(start, end - start) for a in arrays.values()], schema=schema))
            start = end


def _read_parts(uris: list[str], part: int):  # noqa: ANN202 - -> pyarrow.Table
    import pyarrow as pa

    batches = []
    for uri in uris:
        fs, path = storage.filesystem(uri)
        with fs.open(path, "rb") as f:
            batches.append(pa.ipc.open_file(f).get_batch(part))
    return pa.Table.from_batches(batches)


def _write_drops(uri: str, prio, reasons, group_starts: list[int]) -> None:  # noqa: ANN001
    """Decisions (priority, reason index) by shard group."""
    import numpy as np

    groups = np.searchsorted(np.asarray(group_starts), (prio >> 32), side="right") - 1
    _write_parts(uri, {"prio": prio, "reason": np.asarray(reasons, dtype=np.int8)}, groups, len(group_starts))


def _map_hashes(shards: list[tuple[int, str]], out: str, parts: int) -> int:
    """Map: these shards' hash indexes, with priorities, split by sha256 prefix."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    tables = []
    for shard, uri in shards:
        fs, path = storage.filesystem(uri)
        table = pq.read_table(path, columns=["key", "pixel_sha256", "phash"], filesystem=fs)
        rank = np.empty(table.num_rows, dtype=np.int64)
        rank[pc.sort_indices(table.column("key")).to_numpy()] = np.arange(table.num_rows)
        tables.append(pa.table({"sha": table.column("pixel_sha256"), "prio": (shard << 32) | rank,
                                "phash": table.column("phash")}))
    table = pa.concat_tables(tables)
    _write_parts(out, {"sha": table.column("sha"), "prio": table.column("prio").to_numpy(),
                       "phash": table.column("phash").to_numpy()}, _prefix_parts(table.column("sha"), parts), parts)
    return table.num_rows


def _reduce_exact(maps: list[str], part: int, exact: bool, group_starts: list[int], drops_out: str,
                  near: tuple[list[tuple[int, int]], int, int] | None, bands_out: str | None) -> int:
    """Exact reducer: every copy of the sha256s of one prefix range; all but the earliest of
    each are exact duplicates. With `near` (layout, need, band partitions) the survivors go to
    the band partitions, one row per table."""
    import numpy as np
    import pyarrow.compute as pc

    table = _read_parts(maps, part)
    prio, phash = table.column("prio").to_numpy(), table.column("phash").to_numpy()
    keep = np.ones(len(prio), dtype=bool)
    if exact and len(prio):
        order = pc.sort_indices(table.select(["sha", "prio"]),
                                sort_keys=[("sha", "ascending"), ("prio", "ascending")]).to_numpy()
        sha = table.column("sha").take(order)
        repeat = np.zeros(len(prio), dtype=bool)
        repeat[1:] = pc.equal(sha.slice(1), sha.slice(0, len(prio) - 1)).to_numpy(zero_copy_only=False)
        keep[order[repeat]] = False
    dropped = prio[~keep]
    _write_drops(drops_out, dropped, np.zeros(len(dropped), dtype=np.int8), group_starts)
    if near is not None:
        layout, need, band_parts = near
        prio, phash = prio[keep], phash[keep]
        rows: dict[str, list] = {"table": [], "phash": [], "prio": []}
        parts = []
        for t, blocks in enumerate(_tables(layout, need)):
            keys = phash & np.uint64(_block_mask(layout, blocks))
            rows["table"].append(np.full(len(keys), t, dtype=np.int16))
            rows["phash"].append(phash)
            rows["prio"].append(prio)
            parts.append(_band_parts(t, keys, band_parts))
        _write_parts(bands_out, {k: np.concatenate(v) for k, v in rows.items()}, np.concatenate(parts), band_parts)
    return len(dropped)


def _near_pairs(table, key, phash, prio, layout: list[tuple[int, int]], need: int, distance: int):  # noqa: ANN001, ANN202
    """Pairs (earlier, later) of distinct pHashes within `distance` that share a bucket
    (table, key), each reported only in the first table both agree on. Rows are sorted by
    bucket and hold one row per distinct pHash of a bucket. Compares each row with the next
    ones of its bucket, one offset at a time: work in proportion to the pairs compared."""
    import numpy as np

    n = len(key)
    if n < 2:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    new = np.ones(n, dtype=bool)
    new[1:] = (table[1:] != table[:-1]) | (key[1:] != key[:-1])
    starts = np.flatnonzero(new)
    ends = np.repeat(np.append(starts[1:], n), np.diff(np.append(starts, n)))  # end of each row's bucket
    rows = np.arange(n)
    active = rows[ends - rows > 1]
    earlier, later = [], []
    offset = 1
    while len(active):
        other = active + offset
        xor = phash[active] ^ phash[other]
        near = np.bitwise_count(xor) <= distance
        if near.any():
            a, b, x = active[near], other[near], xor[near]
            first = _first_table(layout, need, x) == table[a]
            a, b = a[first], b[first]
            earlier.append(np.minimum(prio[a], prio[b]))
            later.append(np.maximum(prio[a], prio[b]))
        offset += 1
        active = active[ends[active] - active > offset]
    if not earlier:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    return np.concatenate(earlier), np.concatenate(later)


def _reduce_bands(bands: list[str], part: int, layout: list[tuple[int, int]], need: int, distance: int,
                  group_starts: list[int], drops_out: str, pairs_out: str) -> int:
    """Band reducer: the rows of some buckets. Repeats of a pHash (after its earliest) are near
    duplicates (reported from table 0, where every hash has a row); the distinct pHashes of each
    bucket are compared pairwise."""
    import numpy as np
    import pyarrow as pa

    data = _read_parts(bands, part)
    table, phash, prio = data.column("table").to_numpy(), data.column("phash").to_numpy(), data.column("prio").to_numpy()
    masks = np.array([_block_mask(layout, blocks) for blocks in _tables(layout, need)], dtype=np.uint64)
    key = phash & masks[table]  # the bucket's key: the pHash's bits in the table's blocks
    order = np.lexsort((prio, phash, key, table))
    table, key, phash, prio = table[order], key[order], phash[order], prio[order]
    first = np.ones(len(prio), dtype=bool)
    first[1:] = (table[1:] != table[:-1]) | (key[1:] != key[:-1]) | (phash[1:] != phash[:-1])
    repeats = prio[~first & (table == 0)]
    _write_drops(drops_out, repeats, np.ones(len(repeats), dtype=np.int8), group_starts)
    earlier, later = _near_pairs(table[first], key[first], phash[first], prio[first], layout, need, distance)
    pairs = pa.table({"earlier": pa.array(earlier, pa.int64()), "later": pa.array(later, pa.int64())})
    with storage.atomic_open(pairs_out) as f, pa.ipc.new_file(f, pairs.schema) as writer:
        writer.write_table(pairs)
    return len(earlier)


def _resolve_pairs(pairs: list[str], group_starts: list[int], drops_out: str) -> int:
    """The rule on the near pairs: in priority order, a hash is dropped if an earlier hash it
    is paired with was kept. Holds every pair (not every hash)."""
    import numpy as np
    import pyarrow as pa

    tables = []
    for uri in pairs:
        fs, path = storage.filesystem(uri)
        with fs.open(path, "rb") as f:
            tables.append(pa.ipc.open_file(f).read_all())
    table = pa.concat_tables(tables)
    earlier, later = table.column("earlier").to_numpy(), table.column("later").to_numpy()
    order = np.lexsort((earlier, later))
    earlier, later = earlier[order], later[order]
    nodes = np.unique(np.concatenate([earlier, later]))
    e, l_ = np.searchsorted(nodes, earlier), np.searchsorted(nodes, later)
    kept = np.ones(len(nodes), dtype=bool)
    bounds = np.flatnonzero(np.diff(l_)) + 1
    for start, end in zip(np.append(0, bounds).tolist(), np.append(bounds, len(l_)).tolist()):
        if end > start and kept[e[start:end]].any():
            kept[l_[start]] = False
    dropped = nodes[~kept]
    _write_drops(drops_out, dropped, np.ones(len(dropped), dtype=np.int8), group_starts)
    return len(dropped)


def _collect(group: int, shards: list[tuple[int, str]], drops: list[str], out: str) -> dict[int, dict[str, int]]:
    """One shard group's decisions as (shard, key, reason), one row group per shard;
    returns the counts per shard and reason."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    table = _read_parts(drops, group)
    if table.num_rows == 0:
        return {}
    prio, reason = table.column("prio").to_numpy(), table.column("reason").to_numpy()
    order = np.argsort(prio, kind="stable")
    prio, reason = prio[order], reason[order]
    uris = dict(shards)
    counts: dict[int, dict[str, int]] = {}
    schema = pa.schema([("shard", pa.int32()), ("key", pa.string()), ("reason", pa.string())])
    with storage.atomic_open(out) as f, pq.ParquetWriter(f, schema) as writer:
        for shard in np.unique(prio >> 32).tolist():
            lo, hi = np.searchsorted(prio >> 32, [shard, shard + 1])
            keys = storage.read_parquet(uris[shard], columns=["key"]).column("key")
            keys = keys.take(pc.sort_indices(keys))
            names = [_REASONS[r] for r in reason[lo:hi].tolist()]
            writer.write_table(pa.table({"shard": pa.array(np.full(hi - lo, shard, dtype=np.int32)),
                                         "key": keys.take(pa.array(prio[lo:hi] & 0xFFFFFFFF)), "reason": names},
                                        schema=schema))
            counts[shard] = dict(Counter(names))
    return counts


def read_shard_drops(uri: str, shard: int) -> dict[str, str]:
    """key -> reason of one shard's dropped samples, from its group's file."""
    import pyarrow.parquet as pq

    fs, path = storage.filesystem(uri)
    table = pq.read_table(path, columns=["key", "reason"], filters=[("shard", "=", shard)], filesystem=fs)
    return dict(zip(table.column("key").to_pylist(), table.column("reason").to_pylist()))


@dataclass
class Drops:
    """find_drops' decisions: for each shard that loses samples, the file listing them."""

    files: dict[int, str] = field(default_factory=dict)
    """shard -> the file of its group's (shard, key, reason) rows."""
    per_shard: dict[int, dict[str, int]] = field(default_factory=dict)
    """shard -> reason -> samples dropped."""
    scratch: str | None = None
    """The folder of these files, to remove once the `shards` stage is made."""

    @property
    def counts(self) -> dict[str, int]:
        total: Counter = Counter()
        for reasons in self.per_shard.values():
            total.update(reasons)
        return dict(total)

    def of(self, shard: int) -> dict[str, str]:
        return read_shard_drops(self.files[shard], shard) if shard in self.files else {}

    def to_dict(self) -> dict[int, dict[str, str]]:
        """Every decision in memory (small datasets, tests)."""
        return {shard: self.of(shard) for shard in sorted(self.files)}

    def remove_scratch(self) -> None:
        if self.scratch:
            storage.remove_tree(self.scratch)


def _shard_groups(rows: list[int]) -> list[int]:
    """First shard of each group of consecutive shards of about ROWS_PER_TASK rows."""
    starts, total = [0], 0
    for shard, n in enumerate(rows):
        if total and total + n > ROWS_PER_TASK:
            starts.append(shard)
            total = 0
        total += n
    return starts


def _partitions(rows: float) -> int:
    return max(MIN_PARTITIONS, min(MAX_PARTITIONS, math.ceil(rows / ROWS_PER_TASK)))


def _rows_per_shard(fetched: StageOutput, plan: StagePlan) -> list[int] | None:
    """Samples in each shard of a complete stage (None if a record is missing), one record
    in memory at a time: records list their failures, which grow with the dataset."""
    names = set(storage.list_names(storage.join(fetched.uri, RECORDS)))
    if any(fetched.record_uri(i).rsplit("/", 1)[-1] not in names for i in range(plan.num_shards)):
        return None
    return [fetched.record(i).samples_out for i in range(plan.num_shards)]


def find_drops(fetched: StageOutput, filters: FilterConfig) -> Drops:
    """Every duplicate of the dataset, decided on Ray workers (Ray must be connected)."""
    import ray

    plan = fetched.read_plan()
    rows = _rows_per_shard(fetched, plan) if plan is not None else None
    if rows is None:
        raise ValueError(f"{fetched.uri} is not complete: fetch before dedup")
    started = time.monotonic()
    near = filters.near_duplicate_distance
    if (not filters.dedup_exact and near is None) or not rows:
        return Drops()
    scratch_root = storage.join(fetched.uri, SCRATCH)
    storage.remove_tree(scratch_root)  # an earlier run's, killed before it cleaned up
    scratch = storage.join(scratch_root, uuid.uuid4().hex[:12])
    uris = [(shard, index_uri(fetched.uri, shard)) for shard in range(plan.num_shards)]
    starts = _shard_groups(rows)
    groups = [uris[a:b] for a, b in zip(starts, starts[1:] + [len(uris)])]
    band_setup, bands = None, []
    parts = _partitions(sum(rows))
    if near is not None:
        # each survivor goes to one bucket per table: as many partitions (exact and band) as
        # keep a reducer's share of those rows at about ROWS_PER_TASK
        layout, need = _layout(near, sum(rows))
        parts = _partitions(sum(rows) * len(_tables(layout, need)))
        band_setup = (layout, need, parts)
        bands = [storage.join(scratch, "bands", f"{p:05d}.arrow") for p in range(parts)]
    task = lambda fn: ray.remote(fn).options(num_cpus=1, max_retries=2)  # noqa: E731
    maps = [storage.join(scratch, "map", f"{m:05d}.arrow") for m in range(len(groups))]
    map_hashes = task(_map_hashes)
    ray.get([map_hashes.remote(group, out, parts) for group, out in zip(groups, maps)])
    drop_files = [storage.join(scratch, "drops", f"exact-{p:05d}.arrow") for p in range(parts)]
    reduce_exact = task(_reduce_exact)
    ray.get([reduce_exact.remote(maps, p, filters.dedup_exact, starts, drop_files[p], band_setup,
                                 bands[p] if bands else None) for p in range(parts)])
    if band_setup is not None:
        layout, need, band_parts = band_setup
        pairs = [storage.join(scratch, "pairs", f"{q:05d}.arrow") for q in range(band_parts)]
        repeats = [storage.join(scratch, "drops", f"repeat-{q:05d}.arrow") for q in range(band_parts)]
        reduce_bands = task(_reduce_bands)
        ray.get([reduce_bands.remote(bands, q, layout, need, near, starts, repeats[q], pairs[q])
                 for q in range(band_parts)])
        drop_files += repeats + [storage.join(scratch, "drops", "near.arrow")]
        ray.get(task(_resolve_pairs).remote(pairs, starts, drop_files[-1]))
    outs = [storage.join(scratch, "groups", f"{g:05d}.parquet") for g in range(len(groups))]
    drops = Drops(scratch=scratch_root)
    collect = task(_collect)
    for g, found in enumerate(ray.get([collect.remote(g, group, drop_files, out)
                                       for g, (group, out) in enumerate(zip(groups, outs))])):
        for shard, reasons in found.items():
            drops.files[shard], drops.per_shard[shard] = outs[g], reasons
    counts = drops.counts
    log.info("%s: dedup found %d exact and %d near duplicates in %.2f s (%d map tasks, %d partitions)", plan.dataset,
             counts.get(EXACT, 0), counts.get(NEAR, 0), time.monotonic() - started, len(groups), parts)
    return drops


@dataclass
class DedupStage:
    dataset: str
    fetched: StageOutput
    filters: FilterConfig
    drops: Drops | None = None
    """From find_drops (None: nothing to drop, or every shard is already made). Each shard's
    task gets the file of its drops, never the whole set."""
    task_cpus: float = 1.0

    def __post_init__(self) -> None:
        self.fetched_plan = self.fetched.read_plan()

    def __getstate__(self) -> dict:
        # the runner sends the stage to every task: it goes without the per-shard file map,
        # which grows with the shards (each task carries its own file)
        return {**self.__dict__, "drops": None}

    def plan(self) -> StagePlan:
        return StagePlan(
            dataset=self.dataset, stage=STAGE, num_shards=self.fetched_plan.num_shards, input_stage="fetched",
            config={"dedup_exact": self.filters.dedup_exact,
                    "near_duplicate_distance": self.filters.near_duplicate_distance,
                    "fetched": self.fetched_plan.config},
        )

    def tasks(self) -> list[ShardTask]:
        files = self.drops.files if self.drops is not None else {}
        return [ShardTask(i, files.get(i)) for i in range(self.fetched_plan.num_shards)]

    def run_shard(self, task: ShardTask, shard_uri: str) -> ShardRecord:
        started = time.monotonic()
        drops = read_shard_drops(task.payload, task.index) if task.payload else {}
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
