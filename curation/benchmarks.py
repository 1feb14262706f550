"""Benchmarks of curation: the whole `curate` of a LAION-like and an SA-1B-like sample on
Ray, each against the plain tool doing the same download / decode / resize / write.

Ray is started before timing (its start-up is reported apart), runs alternate ours and the
baseline into fresh output folders, and the best of each is kept. Peak memory is the summed
RSS of every process involved (shardkit.bench.PeakRSS), Ray's daemons and workers included
for ours, since tracemalloc sees neither Ray workers nor img2dataset's processes.
"""

from __future__ import annotations

import contextlib
import glob
import io
import json
import logging
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any, Callable

import psutil
import pyarrow.parquet as pq
from PIL import Image

from curation.curate import curate
from curation.fetch import STAGE as FETCHED, FetchStage
from curation.images import REDUCING_GAP, RESAMPLE, ImagePolicy, phash, pixel_sha256
from curation.sources.sam import _stats as sam_stats
from shardkit import cluster
from shardkit.bench import BenchResult, Measure, PeakRSS
from shardkit.config import PipelinesConfig, parse_config
from shardkit.shards import StageOutput
from synthetic import samples
from synthetic.loopback import LoopbackServer

log = logging.getLogger(__name__)

REPEAT = 2  # runs of each side, alternating; the best is kept
SIZE = 256  # keep_ratio: the smaller side becomes SIZE (never enlarged)
QUALITY = 95
LAION_COUNT = 2000
LAION_PER_SHARD = 250
LAION_THREADS = 16
LAION_TIMEOUT_S = 10
LAION_PROCESSES = os.cpu_count() or 2  # img2dataset processes: this machine's CPUs
SAM_COUNT = 120
# SA-1B's images are ~1500x2250; at that size decoding and resizing dominate, as for users
SAM_SIZES = ((1500, 1000), (1000, 1500), (1200, 900))
SAM_PER_TAR = 30
SEED = 0


# ---- shared helpers ------------------------------------------------------------------------

def _count_jpgs(folder: str) -> int:
    """Images in the tars of a folder, counted from the tars themselves."""
    total = 0
    for path in sorted(glob.glob(os.path.join(folder, "*.tar"))):
        with tarfile.open(path) as tar:
            total += sum(1 for m in tar.getmembers() if m.name.endswith(".jpg"))
    return total


def _ray_workers() -> set[int]:
    """Ray worker processes (not Ray's agents) in this process's tree: an embedded Ray's."""
    found = set()
    for proc in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            title = " ".join(proc.cmdline())
            if title.startswith("ray::") and "Agent" not in title:
                found.add(proc.pid)
    return found


def _alternate(ours: Callable[[int], int], baseline: Callable[[int], int], joined_ray: bool,
               repeat: int = REPEAT) -> tuple[Measure, Measure, dict[str, Any]]:
    """Run the baseline and ours alternately `repeat` times each (the run index is passed so
    that every run writes a fresh folder); the best of each. Also returned: every run's
    seconds, how many Ray worker processes each of ours had to start, and one more run of
    ours straight after the last one, when Ray's workers are still alive ("warm")."""
    runs: dict[str, list[Measure]] = {"ours": [], "baseline": []}
    started = []
    for i in range(repeat):
        for name, fn, ray in (("baseline", baseline, False), ("ours", ours, True)):
            before = _ray_workers()
            with PeakRSS(ray=ray, joined_ray=joined_ray) as memory:
                start = time.perf_counter()
                items = fn(i)
                seconds = time.perf_counter() - start
            if name == "ours":
                started.append(len(_ray_workers() - before))
            runs[name].append(Measure(seconds, items, memory.peak_mb))
            log.info("%s run %d: %d items in %.2f s, peak %.0f MB", name, i, items, seconds, memory.peak_mb)
    start = time.perf_counter()
    ours(repeat)
    warm = round(time.perf_counter() - start, 2)
    best = {k: min(v, key=lambda m: m.seconds) for k, v in runs.items()}
    info = {"run_seconds": {k: [round(m.seconds, 2) for m in v] for k, v in runs.items()},
            "ray_workers_started_per_ours_run": started, "ours_warm_rerun_s": warm,
            "load_average_1min_at_end": round(os.getloadavg()[0], 2)}
    return best["ours"], best["baseline"], info


def _best_run(info: dict[str, Any]) -> int:
    seconds = info["run_seconds"]["ours"]
    return seconds.index(min(seconds))


def _start_ray(config: PipelinesConfig) -> float:
    start = time.perf_counter()
    cluster.connect(config.cluster)
    return round(time.perf_counter() - start, 2)


def _idle_ray_mb(joined_ray: bool) -> float:
    """RSS of Ray's own processes while idle: the fixed part of ours' peak."""
    return round(PeakRSS(joined_ray=joined_ray).sample_mb() - PeakRSS(ray=False).sample_mb(), 1)


def _curation_config(config: PipelinesConfig, root: str, name: str, dataset: dict[str, Any]) -> PipelinesConfig:
    raw = {"cluster": config.cluster.model_dump(mode="json"), "storage": {"root": root},
           "datasets": {name: {"resize": {"mode": "keep_ratio", "size": SIZE, "quality": QUALITY}, **dataset}}}
    return parse_config(raw, "curation/benchmarks.py")


def _stage_times(cfg: PipelinesConfig, name: str) -> dict[str, float]:
    out = {}
    for stage in (FETCHED, "shards"):
        summary = StageOutput.of(cfg.storage.root, name, stage).read_summary() or {}
        out[f"{stage}_wall_s"] = summary.get("wall_seconds", 0.0)
        out[f"{stage}_shard_s"] = summary.get("shard_seconds", 0.0)
        if stage == FETCHED:
            out["reencoded"] = summary.get("counters", {}).get("reencoded", 0)
    return out


@contextlib.contextmanager
def _quiet_img2dataset():
    """img2dataset prints progress from its own processes (to the inherited stdout) and
    tqdm bars to stderr; keep the benchmark's output to its log lines."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 1)
            with contextlib.redirect_stdout(devnull), contextlib.redirect_stderr(devnull):
                yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def _per_image_ms(blobs: list[bytes], fn: Callable[[bytes], Any]) -> float:
    """CPU ms per image of fn in this one thread (rejected images included)."""
    start = time.process_time()
    for blob in blobs:
        with contextlib.suppress(Exception):
            fn(blob)
    return round((time.process_time() - start) / max(1, len(blobs)) * 1e3, 3)


def _policy_cost(blobs: list[bytes], theirs_name: str, theirs: Callable[[bytes], Any]) -> dict[str, float]:
    """Per-image CPU cost of our image policy (decode, RGB, resize, pixel sha256, pHash,
    encode), of its two hashes alone (on the stored pixels), and of what the baseline does."""
    policy = ImagePolicy(mode="keep_ratio", size=SIZE, quality=QUALITY)
    decoded = []
    for blob in blobs:
        with contextlib.suppress(Exception):
            image = Image.open(io.BytesIO(blob)).convert("RGB")
            plan = policy.plan(*image.size)
            # the policy hashes the stored pixels, so its hashes are timed on those
            decoded.append(image.resize(plan.size, Image.LANCZOS, box=plan.box) if plan else image)
    start = time.process_time()
    for image in decoded:
        phash(image)
    phash_ms = (time.process_time() - start) / max(1, len(decoded)) * 1e3
    start = time.process_time()
    for image in decoded:
        pixel_sha256(image)
    sha_ms = (time.process_time() - start) / max(1, len(decoded)) * 1e3
    return {"ours_policy_ms_per_image": _per_image_ms(blobs, policy.process),
            "of_which_phash_ms": round(phash_ms, 3), "of_which_pixel_sha256_ms": round(sha_ms, 3),
            f"{theirs_name}_ms_per_image": _per_image_ms(blobs, theirs)}


# ---- LAION: curate vs img2dataset.download -----------------------------------------------

def _img2dataset_cost(www: str) -> dict[str, float]:
    from img2dataset.resizer import Resizer

    blobs = [Path(f).read_bytes() for f in sorted(glob.glob(os.path.join(www, "images", "*.jpg")))]
    resizer = Resizer(image_size=SIZE, resize_mode="keep_ratio", resize_only_if_bigger=True, encode_quality=QUALITY)
    return _policy_cost(blobs, "img2dataset_resizer", lambda b: resizer(io.BytesIO(b)))


_FETCH_SCRIPT = """
import sys, urllib.request
from concurrent.futures import ThreadPoolExecutor
def get(url):
    try:
        with urllib.request.urlopen(url, timeout={timeout}) as response:
            return len(response.read()) > 0
    except Exception:
        return False
with ThreadPoolExecutor({threads}) as pool:
    sys.stdout.write(str(sum(pool.map(get, sys.stdin.read().split()))))
"""


def _listen_overflows() -> int:
    """The kernel's count of connections dropped because a listen backlog was full (all of
    this machine's sockets; Linux only, else 0). The loopback server's backlog is
    socketserver's default of 5."""
    with contextlib.suppress(OSError):
        with open("/proc/net/netstat") as f:
            header, values = [line.split() for line in f if line.startswith("TcpExt:")][:2]
        return int(dict(zip(header, values)).get("ListenOverflows", 0))
    return 0


def _http_rate(urls: list[str], processes: int, repeat: int = 2) -> float:
    """Best rate (successful GETs/s) of `processes` plain-urllib processes of LAION_THREADS
    threads each against the loopback server: the HTTP ceiling at that concurrency."""
    script = _FETCH_SCRIPT.format(timeout=LAION_TIMEOUT_S, threads=LAION_THREADS)
    best = 0.0
    for _ in range(repeat):
        start = time.perf_counter()
        procs = [subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  text=True) for _ in range(processes)]
        for i, proc in enumerate(procs):
            proc.stdin.write("\n".join(urls[i::processes]))
            proc.stdin.close()
        ok = sum(int(proc.stdout.read() or 0) for proc in procs)
        for proc in procs:
            proc.wait()
        best = max(best, ok / (time.perf_counter() - start))
    return round(best, 1)


def _curate_and_count(cfg, name: str, found: dict[str, list[int]], stage_times: list[dict[str, float]]) -> int:  # noqa: ANN001
    """Our side of a run: curate from scratch, record stage times and counts, return the
    images fetched (the baseline writes everything it fetched, so that is the comparable count)."""
    summary = curate(cfg, name, restart=True)
    stage_times.append(_stage_times(cfg, name) | {"total_s": summary["seconds"]})
    fetched = _count_jpgs(StageOutput.of(cfg.storage.root, name, FETCHED).uri)
    found["ours"].append(fetched)
    found["ours_after_dedup"].append(_count_jpgs(StageOutput.of(cfg.storage.root, name, "shards").uri))
    return fetched


def laion_curation(config: PipelinesConfig, workdir: str) -> BenchResult:
    source = os.path.join(workdir, "source")
    samples.write_sample_laion(source, count=LAION_COUNT, seed=SEED)
    parquet = os.path.join(source, "sample-laion.parquet")
    joined = config.cluster.resolved_address() is not None
    ray_start_s = _start_ray(config)
    idle_ray_mb = _idle_ray_mb(joined)
    fetch_tasks = int(cluster.total_cpus() / FetchStage.task_cpus)  # shard tasks Ray runs at once
    name = "bench-laion"
    found: dict[str, Any] = {"ours": [], "ours_after_dedup": [], "baseline": [], "baseline_stats_successes": []}
    overflows: dict[str, list[int]] = {"ours": [], "baseline": []}
    stage_times: list[dict[str, float]] = []

    with LoopbackServer(os.path.join(source, "www")) as server:
        samples.rewrite_base_url(source, server.base_url)

        def ours(i: int) -> int:
            cfg = _curation_config(config, os.path.join(workdir, f"ours-{i}"), name, {
                "source": "laion", "parquet": parquet, "allow_private_urls": True,
                "samples_per_shard": LAION_PER_SHARD, "threads": LAION_THREADS, "timeout_s": LAION_TIMEOUT_S})
            before = _listen_overflows()
            fetched = _curate_and_count(cfg, name, found, stage_times)
            overflows["ours"].append(_listen_overflows() - before)
            return fetched

        def baseline(i: int) -> int:
            import img2dataset

            out = os.path.join(workdir, f"img2dataset-{i}")
            before = _listen_overflows()
            with _quiet_img2dataset():
                img2dataset.download(
                    url_list=parquet, output_folder=out, input_format="parquet", url_col="URL", caption_col="TEXT",
                    output_format="webdataset", image_size=SIZE, resize_mode="keep_ratio", resize_only_if_bigger=True,
                    encode_quality=QUALITY, thread_count=LAION_THREADS, number_sample_per_shard=LAION_PER_SHARD,
                    processes_count=LAION_PROCESSES, distributor="multiprocessing", enable_wandb=False,
                    timeout=LAION_TIMEOUT_S,
                )
            overflows["baseline"].append(_listen_overflows() - before)
            written = _count_jpgs(out)
            found["baseline"].append(written)
            found["baseline_stats_successes"].append(sum(
                json.loads(Path(p).read_text())["successes"] for p in glob.glob(os.path.join(out, "*_stats.json"))))
            return written

        mine, base, info = _alternate(ours, baseline, joined)
        urls = pq.read_table(parquet, columns=["URL"]).column("URL").to_pylist()
        # the HTTP ceiling at img2dataset's and at our number of connections
        http = {p: _http_rate(urls, p) for p in sorted({LAION_PROCESSES, fetch_tasks})}
    if len(set(found["ours"] + found["baseline"])) != 1:
        log.warning("laion_curation: ours and img2dataset wrote different numbers of images: %s", found)

    best = stage_times[_best_run(info)]
    cost = _img2dataset_cost(os.path.join(source, "www"))
    fetch_wall, fetch_task_s = best[f"{FETCHED}_wall_s"], best[f"{FETCHED}_shard_s"]
    overhead = mine.seconds - fetch_wall - best["shards_wall_s"]
    bottleneck = (
        f"fetch stage {fetch_wall:.1f} s of {mine.seconds:.1f} s: its shard tasks' own time sums to "
        f"{fetch_task_s:.1f} s ({fetch_tasks} at once: ~{fetch_task_s / fetch_tasks:.1f} s), the rest is "
        f"starting Ray workers ({info['ray_workers_started_per_ours_run']} per run) that import img2dataset "
        f"(a rerun with them still alive took {info['ours_warm_rerun_s']:.1f} s); "
        f"the loopback server answers {http[fetch_tasks]:.0f} GETs/s to our {fetch_tasks}x{LAION_THREADS} "
        f"connections vs {http[LAION_PROCESSES]:.0f}/s to img2dataset's {LAION_PROCESSES}x{LAION_THREADS} "
        f"(listen-backlog drops during ours {overflows['ours']}, img2dataset {overflows['baseline']}); "
        f"our policy {cost['ours_policy_ms_per_image']:.2f} ms/image vs img2dataset's resizer "
        f"{cost['img2dataset_resizer_ms_per_image']:.2f}; dedup stage {best['shards_wall_s']:.1f} s; "
        f"driver {overhead:.1f} s")
    extra = {
        "ray_start_s": ray_start_s, "idle_ray_rss_mb_in_ours_peak": idle_ray_mb, "rows": LAION_COUNT,
        "images_written": found, **info, "stage_seconds_best_ours": best, **cost,
        "loopback_http_gets_per_s_by_connections": {f"{p}x{LAION_THREADS}": r for p, r in http.items()},
        "listen_backlog_overflows_per_run": overflows,
        "ours_concurrency": f"fetch tasks take {FetchStage.task_cpus} CPU: {fetch_tasks} shard tasks x "
                            f"{LAION_THREADS} threads at once",
        "baseline_concurrency": f"{LAION_PROCESSES} processes x {LAION_THREADS} threads",
        "ours_extra_work": "pixel sha256 + pHash per image, hash index, dataset-wide dedup stage (rewrites every tar)",
    }
    return BenchResult("laion_curation", "images", mine, base, "img2dataset.download (multiprocessing)", 0.9,
                       bottleneck, extra)


# ---- SA-1B: curate vs a plain tarfile + PIL loop -------------------------------------------

def _plain_image(data: bytes) -> bytes:
    """The plain loop's image step: decode, RGB, smaller side to SIZE if bigger (the filter
    and reducing gap of our policy), JPEG at our quality."""
    img = Image.open(io.BytesIO(data)).convert("RGB")
    short = min(img.size)
    if short > SIZE:
        scale = SIZE / short
        img = img.resize((round(img.width * scale), round(img.height * scale)), RESAMPLE, reducing_gap=REDUCING_GAP)
    buffer = io.BytesIO()
    img.save(buffer, format="JPEG", quality=QUALITY)
    return buffer.getvalue()


def _plain_sam(tars: list[str], out_path: str) -> int:
    """What ingesting SA-1B takes at the least: stream each tar, parse each annotation json
    (the same statistics ours keeps), process each image, write one plain tar."""
    written = 0
    with tarfile.open(out_path, "w") as out:
        def add(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            out.addfile(info, io.BytesIO(data))

        for path in tars:
            with open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
                for member in tar:
                    stem, _, ext = member.name.rpartition(".")
                    data = tar.extractfile(member).read()
                    if ext == "json":
                        add(f"{stem}.json", json.dumps(sam_stats(data)).encode())
                    elif ext == "jpg":
                        add(f"{stem}.jpg", _plain_image(data))
                        written += 1
    return written


def sam_ingestion(config: PipelinesConfig, workdir: str) -> BenchResult:
    source = os.path.join(workdir, "source")
    samples.write_sample_sam(source, count=SAM_COUNT, seed=SEED, images_per_tar=SAM_PER_TAR, image_sizes=SAM_SIZES)
    www = os.path.join(source, "www")
    tars = sorted(glob.glob(os.path.join(www, "*.tar")))
    joined = config.cluster.resolved_address() is not None
    ray_start_s = _start_ray(config)
    idle_ray_mb = _idle_ray_mb(joined)
    fetch_tasks = min(len(tars), int(cluster.total_cpus() / FetchStage.task_cpus))
    name = "bench-sam"
    found: dict[str, list[int]] = {"ours": [], "ours_after_dedup": [], "baseline": []}
    stage_times: list[dict[str, float]] = []

    def ours(i: int) -> int:
        cfg = _curation_config(config, os.path.join(workdir, f"ours-{i}"), name, {"source": "sam", "tars": www})
        return _curate_and_count(cfg, name, found, stage_times)

    def baseline(i: int) -> int:
        written = _plain_sam(tars, os.path.join(workdir, f"plain-{i}.tar"))
        found["baseline"].append(written)
        return written

    mine, base, info = _alternate(ours, baseline, joined)
    if len(set(found["ours"] + found["baseline"])) != 1:
        log.warning("sam_ingestion: ours and the plain loop wrote different numbers of images: %s", found)
    blobs = []
    for path in tars:
        with tarfile.open(path) as tar:
            blobs += [tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".jpg")]
    cost = _policy_cost(blobs, "plain_loop_image_step", _plain_image)
    best = stage_times[_best_run(info)]
    fetch_wall, fetch_tasks_s = best[f"{FETCHED}_wall_s"], best[f"{FETCHED}_shard_s"]
    overhead = mine.seconds - fetch_wall - best["shards_wall_s"]
    bottleneck = (
        f"per-image CPU: our policy {cost['ours_policy_ms_per_image']:.2f} ms (pHash "
        f"{cost['of_which_phash_ms']:.2f}, pixel sha256 {cost['of_which_pixel_sha256_ms']:.2f}) vs the plain "
        f"loop's {cost['plain_loop_image_step_ms_per_image']:.2f} ms; fetch stage {fetch_wall:.2f} s of "
        f"{mine.seconds:.2f} s (shard tasks' own time {fetch_tasks_s:.2f} s, {fetch_tasks} at once), dedup stage "
        f"{best['shards_wall_s']:.2f} s, driver {overhead:.2f} s")
    extra = {
        "ray_start_s": ray_start_s, "idle_ray_rss_mb_in_ours_peak": idle_ray_mb, "images": SAM_COUNT,
        "tars": len(tars), "images_written": found, **info, "stage_seconds_best_ours": best, **cost,
        "ours_extra_work": "pixel sha256 + pHash per image, hash index, dataset-wide dedup pass (rewrites every "
                           "tar); the plain loop does none of these",
        "sample_images": f"SA-1B-sized scenes {SAM_SIZES}, resized to a 256 px smaller side by both",
        "concurrency": f"plain loop: one process; ours: {fetch_tasks} shard tasks at once on "
                       f"{cluster.total_cpus():g} CPUs",
    }
    return BenchResult("sam_ingestion", "images", mine, base, "plain tarfile + PIL loop", 0.9, bottleneck, extra)


BENCHMARKS = [laion_curation, sam_ingestion]
