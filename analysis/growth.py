"""`python -m analysis.growth`: how time and memory grow with the dataset, for the parts of a
job that see the whole dataset: planning a LAION parquet into shard tasks, dedup (exact, and
exact + near), and merging per-shard noun counts.

Inputs are synthetic and made once per size under `--workdir` (no downloads, no images):
- a LAION-like parquet of N rows (LAION's columns, pyarrow's default row groups of 1Mi rows);
- a complete `fetched` stage of N rows in shards of `--per-shard`: plan, records (10% of rows
  failed, as a record lists them) and per-shard hash indexes exactly as the fetched stage
  writes them (sorted by pixel sha256, row groups of 1024), with 4% exact duplicates, 2% of
  re-encodes (same pHash, other pixels) and 3% near duplicates (1-3 bits of an earlier pHash);
- per-shard noun counts, drawn in the workers from a Zipf vocabulary (`--vocab` nouns,
  exponent 1.07, `--nouns-per-image` a caption on average).

Each (size, step) runs in a fresh child process with its own local Ray (`--cpus` CPUs), the
real code path: `LaionStage.plan()/tasks()` and a worker reading its slice as `collect`
does; `find_drops` and the `DedupStage` the runner would ship; `analysis.job.gather_counts`
(what `count_rows` merges with) over the synthetic counts. Memory is the kernel's high-water
mark (VmHWM) of the driver (this child) and of every Ray worker process, reset when the step
starts (after Ray is up and the workers have imported the step's modules), and sampled every
0.1 s so a worker that exits is still counted. Shared pages (the object store) count in the
RSS of each process that maps them.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import os
import resource
import signal
import subprocess
import sys
import threading
import time
from typing import Any, Callable, Sequence

log = logging.getLogger("growth")

STEPS = ("plan", "exact", "near", "nouns", "records")
DEFAULT_ROWS = "10000,100000,1000000,10000000"
CHUNK = 1 << 20
"""Rows generated at a time, and the parquet's row group (pyarrow's default maximum)."""
ZIPF_EXPONENT = 1.07
FAILED_SHARE = 0.10
EXACT_SHARE, REENCODE_SHARE, NEAR_SHARE = 0.04, 0.02, 0.03


# ---- memory of processes ---------------------------------------------------------------------

def _status_mb(pid: int | str, field: str) -> float:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _reset_peak(pid: int | str) -> None:
    """Linux: writing 5 to clear_refs sets the process's VmHWM back to its current RSS."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _ray_workers() -> dict[int, str]:
    """pid -> title of every Ray worker process under this one (titles start with `ray::`)."""
    import psutil

    out = {}
    for child in psutil.Process().children(recursive=True):
        try:
            cmdline = child.cmdline()
        except psutil.Error:
            continue
        if cmdline and cmdline[0].startswith("ray::"):
            out[child.pid] = cmdline[0]
    return out


class WorkerPeaks:
    """The highest VmHWM of any Ray worker process while the block runs."""

    def __init__(self, interval: float = 0.1) -> None:
        self.interval = interval
        self.peak_mb, self.peak_title, self.idle_mb = 0.0, "", 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="worker-peaks", daemon=True)

    def _scan(self) -> None:
        for pid, title in _ray_workers().items():
            mb = _status_mb(pid, "VmHWM")
            if mb > self.peak_mb:
                self.peak_mb, self.peak_title = mb, title

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._scan()

    def __enter__(self) -> "WorkerPeaks":
        workers = _ray_workers()
        for pid in workers:
            _reset_peak(pid)
        self.idle_mb = max((_status_mb(pid, "VmRSS") for pid in workers), default=0.0)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._scan()


# ---- synthetic inputs ------------------------------------------------------------------------

def _inputs(workdir: str, rows: int) -> str:
    return os.path.join(workdir, f"n{rows}")


def write_laion_parquet(path: str, rows: int, seed: int = 0) -> None:
    """A LAION-like parquet (URL, TEXT and LAION's metadata columns) of `rows` rows, written
    in row groups of CHUNK rows."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    words = pa.array([f"{w}{i}" for i, w in enumerate(["photo", "vintage", "red", "dress", "women", "sale", "house",
                                                        "garden", "dog", "logo", "print", "poster", "canvas"] * 400)])
    tmp = path + ".tmp"
    writer = None
    for start in range(0, rows, CHUNK):
        n = min(CHUNK, rows - start)
        index = pa.array(np.arange(start, start + n))
        host = pc.cast(pa.array(rng.integers(0, 5000, n)), pa.string())
        token = pc.cast(pa.array(rng.integers(10**15, 10**16, n)), pa.string())
        url = pc.binary_join_element_wise("https://cdn", host, ".example.com/images/", token, "/",
                                          pc.cast(index, pa.string()), ".jpg", "")
        lengths = rng.integers(3, 21, n)
        offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
        chosen = words.take(pa.array(rng.integers(0, len(words), lengths.sum())))
        text = pc.binary_join(pa.ListArray.from_arrays(offsets, chosen), " ")
        score = lambda lo, hi: np.where(rng.random(n) < 0.02, np.nan, rng.uniform(lo, hi, n))  # noqa: E731
        table = pa.table({
            "URL": url, "TEXT": text, "WIDTH": rng.integers(64, 4000, n), "HEIGHT": rng.integers(64, 4000, n),
            "similarity": score(0.28, 0.45), "punsafe": score(0, 1), "pwatermark": score(0, 1),
            "AESTHETIC_SCORE": score(3, 8), "hash": rng.integers(-2**62, 2**62, n),
            "LICENSE": pa.array(np.where(rng.random(n) < 0.9, "?", "creative-commons"))})
        if writer is None:
            writer = pq.ParquetWriter(tmp, table.schema)
        writer.write_table(table, row_group_size=CHUNK)
    writer.close()
    os.replace(tmp, path)


def _hashes(rows: int, near_flips: int, seed: int):  # noqa: ANN202 - (sha bytes [rows, 32], phash [rows])
    """Pixel sha256s and pHashes with duplicates of earlier originals: exact copies,
    re-encodes (same pHash, other pixels) and near copies (1..near_flips bits flipped)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    sha = rng.integers(0, 256, (rows, 32), dtype=np.uint8)
    phash = rng.integers(0, 2**64, rows, dtype=np.uint64)
    kind = rng.random(rows)
    exact = kind < EXACT_SHARE
    reencode = (kind >= EXACT_SHARE) & (kind < EXACT_SHARE + REENCODE_SHARE)
    near = (kind >= EXACT_SHARE + REENCODE_SHARE) & (kind < EXACT_SHARE + REENCODE_SHARE + NEAR_SHARE)
    copy = exact | reencode | near
    copy[0] = exact[0] = reencode[0] = near[0] = False
    originals = np.flatnonzero(~copy)
    rows_copied = np.flatnonzero(copy)
    before = np.searchsorted(originals, rows_copied)  # originals earlier than each copy (>= 1: row 0 is one)
    source = originals[(rng.random(len(rows_copied)) * before).astype(np.int64)]
    phash[rows_copied] = phash[source]
    sha[rows_copied[exact[rows_copied]]] = sha[source[exact[rows_copied]]]
    flips = np.zeros(rows, dtype=np.uint64)
    for _ in range(max(1, near_flips)):
        bit = rng.integers(0, 64, rows).astype(np.uint64)
        flips ^= np.where(rng.random(rows) < 0.7, np.uint64(1) << bit, np.uint64(0))
    flips[flips == 0] = np.uint64(1)
    phash[near] ^= flips[near]
    return sha, phash


def write_fetched_stage(uri: str, rows: int, per_shard: int, seed: int = 0) -> int:
    """A complete `fetched` stage of `rows` rows (plan, records, hash indexes; no tars)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from curation.fetch import INDEX_SCHEMA, index_uri
    from shardkit import storage
    from shardkit.shards import Failure, ShardRecord, StageOutput, StagePlan, make_key

    output = StageOutput(uri)
    shards = math.ceil(rows / per_shard)
    sha, phash = _hashes(rows, 3, seed)
    failed = int(per_shard * FAILED_SHARE)
    storage.makedirs(storage.join(uri, "_index"))
    for shard in range(shards):
        lo, hi = shard * per_shard, min(rows, (shard + 1) * per_shard)
        text = sha[lo:hi].tobytes().hex()
        entries = sorted((text[i * 64:(i + 1) * 64], make_key(shard, i), int(phash[lo + i])) for i in range(hi - lo))
        table = pa.table({"key": [e[1] for e in entries], "pixel_sha256": [e[0] for e in entries],
                          "phash": pa.array([e[2] for e in entries], pa.uint64())}, schema=INDEX_SCHEMA)
        pq.write_table(table, storage.filesystem(index_uri(uri, shard))[1], row_group_size=1024)
        failures = [Failure(make_key(shard, hi - lo + i), "http_404", "HTTP Error 404: Not Found") for i in range(failed)]
        output.write_record(ShardRecord(shard, samples_in=hi - lo + failed, samples_out=hi - lo, seconds=1.0,
                                        failures=failures))
    output.write_plan(StagePlan("growth", "fetched", num_shards=shards,
                                config={"source": "laion", "samples_per_shard": per_shard}))
    return shards


def generate(workdir: str, rows: int, per_shard: int) -> None:
    folder = _inputs(workdir, rows)
    done = os.path.join(folder, "_complete.json")
    settings = {"rows": rows, "per_shard": per_shard}
    if os.path.exists(done) and json.load(open(done)) == settings:
        return
    os.makedirs(os.path.join(folder, "laion"), exist_ok=True)
    started = time.perf_counter()
    write_laion_parquet(os.path.join(folder, "laion", "part-00000.parquet"), rows)
    import shutil

    shutil.rmtree(os.path.join(folder, "fetched"), ignore_errors=True)
    write_fetched_stage(os.path.join(folder, "fetched"), rows, per_shard)
    json.dump(settings, open(done, "w"))
    log.info("inputs of %d rows in %s (%.0f s)", rows, folder, time.perf_counter() - started)


@functools.lru_cache(maxsize=4)
def _zipf(vocab: int) -> tuple[Any, list[str]]:
    import numpy as np

    weights = 1.0 / np.arange(1, vocab + 1) ** ZIPF_EXPONENT
    return np.cumsum(weights / weights.sum()), [f"noun{rank}" for rank in range(vocab)]


def synthetic_counts(shard: int, images: int, vocab: int, per_image: float, seed: int = 0):  # -> NounCounts
    """What `count_shard` returns for a shard of `images` captions whose nouns follow Zipf's
    law over `vocab` nouns: the same fields, drawn instead of tagged."""
    from collections import Counter

    import numpy as np

    from analysis.nouns import NounCounts

    cdf, names = _zipf(vocab)
    rng = np.random.default_rng([seed, shard])
    per_caption = rng.poisson(per_image, images)
    tokens = np.minimum(np.searchsorted(cdf, rng.random(int(per_caption.sum()))), vocab - 1)
    ranks, occurrences = np.unique(tokens, return_counts=True)
    counts = NounCounts(images=images, captions=int((per_caption > 0).sum()), words=int(per_caption.sum() * 3))
    counts.nouns = Counter(dict(zip((names[r] for r in ranks.tolist()), occurrences.tolist())))
    counts.per_caption = Counter(dict(zip(*np.unique(per_caption, return_counts=True))))
    counts.per_caption = Counter({int(k): int(v) for k, v in counts.per_caption.items()})
    return counts


# ---- the steps (run in a child, Ray up) ------------------------------------------------------

def _read_slice(stage, task) -> tuple[int, float]:  # noqa: ANN001 - a LaionStage and its ShardTask
    """A worker's part of planning: its slice of the parquet, read as `collect` reads it."""
    started = time.perf_counter()
    rows = stage._rows(*task.payload).to_pylist()
    return len(rows), time.perf_counter() - started


def _shard_task_overhead(stage, task) -> float:  # noqa: ANN001
    """What every shard task of a stage pays before its work: the stage object it is sent."""
    return 0.0


def _stage_bytes(stage: Any) -> int:
    import ray.cloudpickle

    return len(ray.cloudpickle.dumps(stage))


def _task_overhead_s(stage: Any, tasks: list) -> float:
    """Seconds per task, from submission to return, of tasks that only receive the stage
    (as the runner sends it: one object reference, deserialised in every task)."""
    import ray

    ref = ray.put(stage)
    remote = ray.remote(_shard_task_overhead).options(num_cpus=1)
    picked = [tasks[i] for i in sorted({0, len(tasks) // 2, len(tasks) - 1})]
    started = time.perf_counter()
    ray.get([remote.remote(ref, t) for t in picked for _ in range(2)])
    return (time.perf_counter() - started) / (2 * len(picked))


def step_plan(args: argparse.Namespace, rows: int) -> dict[str, Any]:
    import ray

    from curation.sources.laion import LaionStage
    from shardkit.config import LaionSource

    cfg = LaionSource(source="laion", parquet=[os.path.join(_inputs(args.workdir, rows), "laion", "part-00000.parquet")],
                      samples_per_shard=args.per_shard)
    started = time.perf_counter()
    stage = LaionStage("growth", cfg)
    plan = stage.plan()
    tasks = stage.tasks()
    stage_ref = ray.put(stage)  # what the runner does before submitting the tasks
    driver_s = time.perf_counter() - started
    remote = ray.remote(_read_slice).options(num_cpus=1)
    picked = [tasks[i] for i in sorted({0, len(tasks) // 2, len(tasks) - 1})]
    results = ray.get([remote.remote(stage_ref, t) for t in picked])
    return {"driver_s": round(driver_s, 3), "shards": plan.num_shards, "stage_bytes": _stage_bytes(stage),
            "worker_task_s": round(max(s for _, s in results), 3), "rows_read": [n for n, _ in results]}


def _dedup(args: argparse.Namespace, rows: int, near: int | None) -> dict[str, Any]:
    from curation.dedup import DedupStage, find_drops
    from shardkit.config import FilterConfig
    from shardkit.shards import StageOutput

    fetched = StageOutput(os.path.join(_inputs(args.workdir, rows), "fetched"))
    filters = FilterConfig(dedup_exact=True, near_duplicate_distance=near)
    started = time.perf_counter()
    drops = find_drops(fetched, filters)
    found_s = time.perf_counter() - started
    stage = DedupStage("growth", fetched, filters, drops=drops)
    tasks = stage.tasks()
    driver_s = time.perf_counter() - started
    counted = count_drops(drops)
    overhead = _task_overhead_s(stage, tasks)
    if hasattr(drops, "remove_scratch"):
        drops.remove_scratch()
    return {"find_drops_s": round(found_s, 3), "driver_s": round(driver_s, 3), "drops": counted,
            "stage_bytes": _stage_bytes(stage), "shard_task_overhead_s": round(overhead, 4)}


def count_drops(drops: Any) -> dict[str, int]:
    """Drops by reason, from find_drops' result."""
    if hasattr(drops, "counts"):
        return dict(drops.counts)
    out: dict[str, int] = {}
    for per_shard in drops.values():
        for reason in per_shard.values():
            out[reason] = out.get(reason, 0) + 1
    return out


def step_exact(args: argparse.Namespace, rows: int) -> dict[str, Any]:
    return _dedup(args, rows, None)


def step_near(args: argparse.Namespace, rows: int) -> dict[str, Any]:
    return _dedup(args, rows, args.near_distance)


def step_records(args: argparse.Namespace, rows: int) -> dict[str, Any]:
    """What the runner does with a stage's records in the driver (the done shards before a
    run, the summary after it): every record read, with its list of failures."""
    from shardkit.shards import StageOutput, summarise

    fetched = StageOutput(os.path.join(_inputs(args.workdir, rows), "fetched"))
    started = time.perf_counter()
    done = fetched.complete_shards()
    summary = summarise(fetched.read_plan(), fetched.iter_records(), 0.0)
    return {"driver_s": round(time.perf_counter() - started, 3), "shards": len(done), "failures": summary["failures"]}


def step_nouns(args: argparse.Namespace, rows: int) -> dict[str, Any]:
    from analysis.job import gather_counts

    shards = math.ceil(rows / args.per_shard)
    jobs = [("growth", (shard, min(args.per_shard, rows - shard * args.per_shard), args.vocab, args.nouns_per_image))
            for shard in range(shards)]
    started = time.perf_counter()
    counts = gather_counts(synthetic_counts, jobs, ["growth"], 1.0)["growth"]
    return {"driver_s": round(time.perf_counter() - started, 3), "shards": shards, "images": counts.images,
            "distinct_nouns": len(counts.nouns), "total_nouns": counts.total_nouns}


STEP_FUNCTIONS: dict[str, Callable[[argparse.Namespace, int], dict[str, Any]]] = {
    "plan": step_plan, "exact": step_exact, "near": step_near, "nouns": step_nouns, "records": step_records}
STEP_MODULES = {"plan": ["curation.sources.laion"], "exact": ["curation.dedup"], "near": ["curation.dedup"],
                "nouns": ["analysis.job", "analysis.growth"], "records": ["shardkit.shards"]}


def _warm(modules: list[str]) -> int:
    import importlib

    for name in modules:
        importlib.import_module(name)
    return os.getpid()


def run_child(args: argparse.Namespace) -> dict[str, Any]:
    """One step at one size, in this (fresh) process: Ray up, workers warm, then measured."""
    import ray

    from shardkit.cluster import WORKER_ENV

    for name in STEP_MODULES[args.step]:
        __import__(name)
    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, logging_level=logging.WARNING,
             runtime_env={"env_vars": dict(WORKER_ENV)})
    warm = ray.remote(_warm).options(num_cpus=1)
    ray.get([warm.remote(STEP_MODULES[args.step]) for _ in range(args.cpus * 2)])
    driver_start_mb = _status_mb("self", "VmRSS")
    _reset_peak("self")
    cpu = resource.getrusage(resource.RUSAGE_SELF)
    with WorkerPeaks() as workers:
        started = time.perf_counter()
        extra = STEP_FUNCTIONS[args.step](args, args.rows)
        seconds = time.perf_counter() - started
    driver_peak_mb = _status_mb("self", "VmHWM")
    after = resource.getrusage(resource.RUSAGE_SELF)
    driver_cpu_s = after.ru_utime + after.ru_stime - cpu.ru_utime - cpu.ru_stime
    ray.shutdown()
    return {"rows": args.rows, "step": args.step, "seconds": round(seconds, 2), "driver_cpu_s": round(driver_cpu_s, 2),
            "driver_start_mb": round(driver_start_mb), "driver_peak_mb": round(driver_peak_mb),
            "worker_idle_mb": round(workers.idle_mb), "worker_peak_mb": round(workers.peak_mb),
            "worker_peak_in": workers.peak_title, **extra}


# ---- the parent: inputs, one child per (size, step), the table -------------------------------

def _child_argv(args: argparse.Namespace, *extra: str) -> list[str]:
    return [sys.executable, "-m", "analysis.growth", "--workdir", args.workdir, "--per-shard", str(args.per_shard),
            "--near-distance", str(args.near_distance), "--vocab", str(args.vocab),
            "--nouns-per-image", str(args.nouns_per_image), "--cpus", str(args.cpus), *extra]


def _run(argv: list[str], timeout: float) -> tuple[int, str]:
    """Run a child in its own process group; on timeout end that group (only it)."""
    child = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, _ = child.communicate(timeout=timeout)
        return child.returncode, out
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        child.communicate()
        return -1, ""


def table(results: list[dict[str, Any]]) -> str:
    lines = ["| rows | step | seconds | driver CPU s | driver peak MB (start) | worker peak MB (idle) | notes |",
             "|---:|---|---:|---:|---:|---:|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['rows']:,} | {r['step']} | {r['error']} | | | | |")
            continue
        notes = []
        if "shards" in r:
            notes.append(f"{r['shards']:,} shards")
        if "drops" in r:
            notes.append("drops " + ", ".join(f"{k.split(':')[1]} {v:,}" for k, v in sorted(r["drops"].items())))
        if "stage_bytes" in r:
            size = r["stage_bytes"]
            notes.append(f"stage sent to each task {size / 2**20:.1f} MB" if size >= 2**20 else
                         f"stage sent to each task {size / 1024:.0f} KB")
        if "shard_task_overhead_s" in r:
            notes.append(f"{r['shard_task_overhead_s'] * 1000:.0f} ms/task to receive it")
        if "worker_task_s" in r:
            notes.append(f"slice read {r['worker_task_s']:.2f} s")
        if "failures" in r:
            notes.append(f"{r['failures']:,} failures in the records")
        if "distinct_nouns" in r:
            notes.append(f"{r['distinct_nouns']:,} distinct nouns")
        lines.append(f"| {r['rows']:,} | {r['step']} | {r['seconds']:,.1f} | {r.get('driver_cpu_s', 0):,.1f} "
                     f"| {r['driver_peak_mb']:,} ({r['driver_start_mb']:,}) "
                     f"| {r['worker_peak_mb']:,} ({r['worker_idle_mb']:,}) | {'; '.join(notes)} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analysis.growth", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default=DEFAULT_ROWS, help=f"comma-separated sizes (default {DEFAULT_ROWS})")
    parser.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated, of {', '.join(STEPS)}")
    parser.add_argument("--workdir", default="/tmp/pixart-growth", help="inputs are made here once per size")
    parser.add_argument("--per-shard", type=int, default=1000, help="rows a shard (samples_per_shard's default)")
    parser.add_argument("--near-distance", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=500_000, help="nouns in the Zipf vocabulary")
    parser.add_argument("--nouns-per-image", type=float, default=8.0)
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of each step's local Ray")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds a step may take before it is given up")
    parser.add_argument("--out", help="write the results as JSON here too")
    parser.add_argument("--step", choices=STEPS, help=argparse.SUPPRESS)  # a child: one step at --rows
    parser.add_argument("--generate", action="store_true", help=argparse.SUPPRESS)  # a child: make --rows' inputs
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if args.generate:
        generate(args.workdir, int(args.rows), args.per_shard)
        return 0
    if args.step:
        args.rows = int(args.rows)
        print(json.dumps(run_child(args)), flush=True)
        return 0
    results = []
    for rows in [int(float(r)) for r in args.rows.split(",")]:
        code, _ = _run(_child_argv(args, "--rows", str(rows), "--generate"), args.timeout)
        if code != 0:
            raise SystemExit(f"making the inputs of {rows} rows failed ({code})")
        for step in args.steps.split(","):
            code, out = _run(_child_argv(args, "--rows", str(rows), "--step", step), args.timeout)
            lines = [line for line in out.splitlines() if line.startswith("{")]
            error = f"timed out after {args.timeout:.0f} s" if code == -1 else f"failed ({code})"
            result = json.loads(lines[-1]) if code == 0 and lines else {"rows": rows, "step": step, "error": error}
            results.append(result)
            log.info("%s", json.dumps(result))
            if args.out:
                with open(args.out, "w") as f:
                    json.dump(results, f, indent=1)
    print(table(results))
    return 0


if __name__ == "__main__":
    # the imported module's main, not this __main__ copy's: functions sent to Ray workers must
    # be importable there by name (analysis.growth.synthetic_counts, not __main__'s)
    from analysis import growth

    sys.exit(growth.main())
