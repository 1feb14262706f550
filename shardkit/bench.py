"""`make bench`: every package's benchmarks, each against a baseline measured in the same run.

The machine is shared and noisy, so no benchmark reports an absolute speed alone: it reports
the ratio of ours to a baseline doing the same work in the same process, peak memory beside
speed, and what bounds it. Packages register benchmarks in `<package>/benchmarks.py` as a
`BENCHMARKS` list of callables taking (config, workdir) and returning a BenchResult.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import json
import logging
import os
import sys
import tempfile
import threading
import time
import tracemalloc
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import psutil

from shardkit import storage
from shardkit.cli import add_config_arguments, config_from_args, run_main, setup_logging
from shardkit.cluster import PROJECT_PACKAGES

log = logging.getLogger("bench")


class BenchSkipped(Exception):
    """A benchmark that cannot run on this machine (an optional dependency is missing); its
    reason is logged and recorded instead of a figure."""


@dataclass
class Measure:
    seconds: float
    items: int
    peak_mb: float

    @property
    def rate(self) -> float:
        return self.items / max(self.seconds, 1e-9)


@dataclass
class BenchResult:
    name: str
    unit: str
    ours: Measure
    baseline: Measure
    baseline_name: str
    target: float
    bottleneck: str
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        return self.ours.rate / max(self.baseline.rate, 1e-9)

    def line(self) -> str:
        verdict = "meets" if self.ratio >= self.target else "MISSES"
        return (f"{self.name}: {self.ours.rate:,.1f} {self.unit}/s vs {self.baseline_name} "
                f"{self.baseline.rate:,.1f} {self.unit}/s = {self.ratio:.2f}x ({verdict} target {self.target}); "
                f"peak {self.ours.peak_mb:.1f} MB vs {self.baseline.peak_mb:.1f} MB; bottleneck: {self.bottleneck}")


class PeakRSS:
    """Peak summed RSS, in MB, of this process, all its descendants (multiprocessing children,
    and an embedded Ray's daemons and workers) and any `ray::` worker of a cluster this
    process joined, sampled every `interval` s in a background thread while the block runs.
    tracemalloc sees none of those. RSS counts shared pages in every process that maps them,
    so this is an upper bound.

    `ray=False` leaves out Ray's own processes (daemons, agents, workers: cmdline with `ray::`
    or under `site-packages/ray/`) and whatever they started, for baselines that run beside
    an idle Ray. `ray::` processes outside our tree belong to another Ray on this machine
    unless we joined one, so they are counted only when `joined_ray` is set.
    """

    def __init__(self, interval: float = 0.1, ray: bool = True, joined_ray: bool = False) -> None:
        self.interval, self.ray, self.joined_ray = interval, ray, joined_ray
        self.peak_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="peak-rss", daemon=True)

    def sample_mb(self) -> float:
        """One scan of the process table: the summed RSS now."""
        procs = {p.pid: p for p in psutil.process_iter(["ppid"])}
        children: dict[int, list[int]] = {}
        for pid, proc in procs.items():
            children.setdefault(proc.info["ppid"], []).append(pid)

        def cmdline(pid: int) -> str:
            try:
                return " ".join(procs[pid].cmdline())
            except psutil.Error:
                return ""

        def skipped(pid: int) -> bool:
            return not self.ray and ("ray::" in cmdline(pid) or "/site-packages/ray/" in cmdline(pid))

        me, counted, stack = os.getpid(), set(), [os.getpid()]
        while stack:
            pid = stack.pop()
            if pid in counted or (pid != me and skipped(pid)):
                continue
            counted.add(pid)
            stack.extend(children.get(pid, ()))
        if self.ray and self.joined_ray:
            counted.update(pid for pid in procs if "ray::" in cmdline(pid))
        total = 0
        for pid in counted:
            try:
                total += procs[pid].memory_info().rss
            except psutil.Error:  # exited meanwhile
                pass
        return total / 2**20

    def _run(self) -> None:
        while True:
            self.peak_mb = max(self.peak_mb, self.sample_mb())
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> "PeakRSS":
        self.peak_mb = self.sample_mb()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self.peak_mb, self.sample_mb())


def measure(fn: Callable[[], int], repeat: int = 3) -> Measure:
    """Best of `repeat` runs (the least disturbed by other load); fn returns items done."""
    best = None
    for _ in range(repeat):
        tracemalloc.start()
        start = time.perf_counter()
        items = fn()
        seconds = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
        if best is None or seconds < best.seconds:
            best = Measure(seconds, items, peak)
    return best


def interleaved(ours: Callable[[], int], baseline: Callable[[], int], repeat: int = 3) -> tuple[Measure, Measure]:
    """Alternate ours and the baseline so that a burst of load hits both alike."""
    results: dict[str, list[Measure]] = {"ours": [], "baseline": []}
    for _ in range(repeat):
        results["ours"].append(measure(ours, 1))
        results["baseline"].append(measure(baseline, 1))
    pick = lambda runs: min(runs, key=lambda m: m.seconds)  # noqa: E731
    return pick(results["ours"]), pick(results["baseline"])


def _benchmarks(only: list[str]) -> list[Callable]:
    found = []
    for package in PROJECT_PACKAGES:
        if importlib.util.find_spec(package) is None or importlib.util.find_spec(f"{package}.benchmarks") is None:
            continue
        for bench in importlib.import_module(f"{package}.benchmarks").BENCHMARKS:
            if not only or any(o in bench.__name__ for o in only):
                found.append(bench)
    return found


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shardkit.bench", description=__doc__)
    parser.add_argument("only", nargs="*", help="run only benchmarks whose name contains one of these")
    add_config_arguments(parser)
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    config = config_from_args(args)
    report_dir = storage.join(config.storage.root, "reports", "bench")
    results = []
    for bench in _benchmarks(args.only):
        log.info("running %s", bench.__name__)
        with tempfile.TemporaryDirectory(prefix="bench-") as workdir:
            try:
                result = bench(config, workdir)
            except BenchSkipped as skipped:
                log.warning("%s: skipped: %s", bench.__name__, skipped)
                storage.atomic_write(storage.join(report_dir, f"{bench.__name__}.json"),
                                     json.dumps({"name": bench.__name__, "skipped": str(skipped),
                                                 "when": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=1))
                continue
        results.append(result)
        log.info("%s", result.line())
        record = dataclasses.asdict(result) | {"ratio": result.ratio, "when": time.strftime("%Y-%m-%dT%H:%M:%S")}
        storage.atomic_write(storage.join(report_dir, f"{result.name}.json"), json.dumps(record, indent=1))
    log.info("%d benchmarks; records in %s", len(results), report_dir)
    return 0


if __name__ == "__main__":
    # run the imported module's main, not this __main__ copy's: benchmarks raise the imported
    # module's BenchSkipped, which a `__main__.BenchSkipped` handler would not catch
    from shardkit import bench as imported

    sys.exit(run_main(imported.main))
