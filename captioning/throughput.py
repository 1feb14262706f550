"""`python -m captioning.throughput`: captioning images/s per accelerator, through the whole
stage and against a plain loop, in one run.

Captioning is the bill at scale, so the figure that sizes a job is images/s per GPU for the
real model at the real caption length. Captions are fixed-length here (min_new_tokens =
max_new_tokens, 160 by default: about the paper's captions), so every variant does the same
work whatever the weights say, and random weights at a real checkpoint's shapes
(`--random-size 7b`: LLaVA-1.5-7B) measure the same as the checkpoint would. The images are
synthetic scenes written as a `shards/` stage first; the stage runs in this process (no Ray),
as one actor would on its GPU.

Variants: `loop` is the plain loop a user would write (decode, prepare, generate, one batch
after another); `stage@B` is the captioning stage at batch size B. Each row gives images/s,
tokens/s, the GPU's peak memory and mean utilisation (nvidia-smi, sampled while it ran).
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np
from PIL import Image

from shardkit.cli import run_main, setup_logging
from shardkit.config import PipelinesConfig, parse_config

log = logging.getLogger("captioning.throughput")

DATASET = "throughput"
CAPTIONER = "measured"


@dataclass
class Row:
    variant: str
    backend: str
    batch_size: int
    images: int
    seconds: float
    images_per_s: float
    tokens_per_s: float
    gpu_peak_gb: float | None
    gpu_util_mean: float | None
    torch_peak_gb: float | None
    time_s: dict[str, float] | None = None
    flagged: int | None = None
    steady_images_per_s: float | None = None
    """The stage's shards after its first, by their own times: without the first batch's
    allocator growth and compilation, which a job of hours pays once."""


class GpuMonitor:
    """nvidia-smi sampled every `interval` s while the block runs: the whole GPU's memory in
    use (an engine's preallocated cache included) and its utilisation."""

    def __init__(self, interval: float = 0.5) -> None:
        self.interval = interval
        self.memory_mb: list[float] = []
        self.util: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="gpu-monitor")
        self.available = shutil.which("nvidia-smi") is not None

    def _sample(self) -> None:
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu,memory.used",
                                  "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=5).stdout
            util, memory = out.strip().splitlines()[0].split(",")
            self.util.append(float(util))
            self.memory_mb.append(float(memory))
        except (OSError, ValueError, IndexError, subprocess.SubprocessError):
            pass

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> "GpuMonitor":
        if self.available:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.available:
            self._stop.set()
            self._thread.join()

    @property
    def peak_gb(self) -> float | None:
        return round(max(self.memory_mb) / 1024, 1) if self.memory_mb else None

    @property
    def util_mean(self) -> float | None:
        return round(float(np.mean(self.util)), 1) if self.util else None


def write_images(root: str, count: int, size: int, per_shard: int, seed: int, dataset: str = DATASET) -> None:
    """A complete `shards/` stage of synthetic scenes at size x size (3-6 objects, alt text
    their description), written in this process: no Ray, no HTTP."""
    from curation.sample import make_sample
    from synthetic.scenes import SceneOptions, describe, render, sample_scene
    from shardkit.shards import ShardRecord, StageOutput, StagePlan, make_key, summarise, write_shard

    output = StageOutput.of(root, dataset, "shards")
    if output.is_complete() and sum(r.samples_out for r in output.records().values()) == count:
        return
    rng = np.random.default_rng(seed)
    options = SceneOptions(min_objects=3, max_objects=6, image_sizes=((size, size),))
    shards = [range(i, min(i + per_shard, count)) for i in range(0, count, per_shard)]
    plan = StagePlan(dataset, "shards", num_shards=len(shards))
    output.write_plan(plan)
    for index, numbers in enumerate(shards):
        samples = []
        for n in numbers:
            scene = sample_scene(rng, options)
            buffer = io.BytesIO()
            render(scene).save(buffer, format="JPEG", quality=90)
            samples.append(make_sample(make_key(index, n - numbers.start), buffer.getvalue(), width=size, height=size,
                                       original_width=size, original_height=size, source="synthetic",
                                       origin=f"throughput://{n}", caption=describe(scene)))
        write_shard(output.shard_uri(index), samples)
        output.write_record(ShardRecord(index, len(samples), len(samples), 0.0))
    output.write_summary(summarise(plan, output.records(), 0.0))


def _config(args: argparse.Namespace, model: str, backend: str, batch_size: int) -> PipelinesConfig:
    captioner: dict[str, Any] = {
        "model": model, "backend": backend, "dtype": args.dtype, "batch_size": batch_size,
        "generation": {"max_new_tokens": args.new_tokens, "min_new_tokens": args.new_tokens},
        # every caption runs to the limit by design: `length` says nothing here, and a retry
        # would be extra work the loop does not do
        "quality": {"checks": ["empty", "repetition", "echo"], "retry": []},
    }
    if backend == "hf" and (args.hf_static or args.hf_compile):
        captioner["hf"] = {"cache_implementation": "static", "compile": args.hf_compile}
    if backend == "vllm":
        captioner["vllm"] = {"max_num_seqs": args.vllm_max_num_seqs, "gpu_memory_utilization": 0.9,
                             **({"kv_cache_gb": args.vllm_kv_cache_gb} if args.vllm_kv_cache_gb else {})}
    return parse_config({"cluster": {"in_process": True}, "storage": {"root": os.path.join(args.workdir, "data")},
                         "datasets": {DATASET: {"source": "folder", "path": args.workdir}},
                         "captioners": {CAPTIONER: captioner}})


def _torch_peak_reset() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def _torch_peak_gb() -> float | None:
    import torch

    return round(torch.cuda.max_memory_allocated() / 2**30, 1) if torch.cuda.is_available() else None


def run_loop(args: argparse.Namespace, model: str, backend: str, batch_size: int, count: int) -> Row:
    from captioning.backend import load_backend, sampling_of
    from captioning.prompts import PAPER_PROMPT
    from shardkit.shards import StageOutput

    config = _config(args, model, backend, batch_size)
    captioner = load_backend(config.captioner(CAPTIONER))
    sampling = sampling_of(config.captioner(CAPTIONER))
    jpegs = [s.fields["jpg"] for s in StageOutput.of(config.storage.root, DATASET, "shards").samples()][:count]
    # one untimed batch first: the first batch of a size grows the allocator's pools and picks
    # kernels (seconds on a GPU), which the stage pays in its first shard and a steady loop never
    warm = [Image.open(io.BytesIO(b)).convert("RGB") for b in jpegs[:batch_size]]
    captioner.generate(captioner.prepare(warm, [PAPER_PROMPT] * len(warm)), sampling, seed=0)
    _torch_peak_reset()
    tokens = 0
    with GpuMonitor() as gpu:
        started = time.perf_counter()
        for first in range(0, len(jpegs), batch_size):
            images = [Image.open(io.BytesIO(b)).convert("RGB") for b in jpegs[first:first + batch_size]]
            prepared = captioner.prepare(images, [PAPER_PROMPT] * len(images))
            tokens += sum(g.tokens for g in captioner.generate(prepared, sampling, seed=first))
        seconds = time.perf_counter() - started
    return Row("loop", backend, batch_size, len(jpegs), round(seconds, 2), round(len(jpegs) / seconds, 2),
               round(tokens / seconds, 1), gpu.peak_gb, gpu.util_mean, _torch_peak_gb())


def run_stage(args: argparse.Namespace, model: str, backend: str, batch_size: int) -> Row:
    from captioning.backend import load_backend
    from captioning.stage import caption, stage_name
    from shardkit.shards import StageOutput

    config = _config(args, model, backend, batch_size)
    load_backend(config.captioner(CAPTIONER))  # loaded (or reused) before the clock starts
    _torch_peak_reset()
    with GpuMonitor() as gpu:
        started = time.perf_counter()
        summary = caption(config, DATASET, CAPTIONER, restart=True)
        seconds = time.perf_counter() - started
    images = summary["samples_out"]
    records = sorted(StageOutput.of(config.storage.root, DATASET, stage_name(CAPTIONER)).records().items())[1:]
    steady_seconds = sum(r.seconds for _, r in records)
    steady = round(sum(r.samples_out for _, r in records) / steady_seconds, 2) if steady_seconds else None
    return Row(f"stage@{batch_size}", backend, batch_size, images, round(seconds, 2), round(images / seconds, 2),
               round(summary["counters"].get("tokens", 0) / seconds, 1), gpu.peak_gb, gpu.util_mean, _torch_peak_gb(),
               time_s=summary["time_s"], flagged=summary["quality"]["flagged"], steady_images_per_s=steady)


def table(rows: list[Row], baseline: Row | None) -> str:
    lines = ["| variant | backend | batch | images | s | images/s | steady images/s | × loop (steady) | tokens/s | "
             "GPU peak GB | GPU util % |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        steady = r.steady_images_per_s or r.images_per_s
        ratio = f"{steady / baseline.images_per_s:.2f}" if baseline else "—"
        lines.append(f"| {r.variant} | {r.backend} | {r.batch_size} | {r.images} | {r.seconds} | {r.images_per_s} | "
                     f"{r.steady_images_per_s or '—'} | {ratio} | {r.tokens_per_s} | "
                     f"{r.gpu_peak_gb if r.gpu_peak_gb is not None else '—'} | "
                     f"{r.gpu_util_mean if r.gpu_util_mean is not None else '—'} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m captioning.throughput", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument("--model", help="a LLaVA-family folder or hub id (real weights)")
    model.add_argument("--random-size", choices=["tiny", "7b"], help="build a random LLaVA-1.5 of this size")
    parser.add_argument("--workdir", required=True, help="images, the random model and the stage outputs go here")
    parser.add_argument("--backends", default="hf", help="comma-separated: hf, vllm")
    parser.add_argument("--images", type=int, default=256, help="images per stage run")
    parser.add_argument("--loop-images", type=int, default=64, help="images for the plain loop (0: no loop)")
    parser.add_argument("--loop-batch", type=int, default=16, help="the plain loop's batch size")
    parser.add_argument("--batch-sizes", default="16,128", help="the stage's batch sizes, comma-separated")
    parser.add_argument("--new-tokens", type=int, default=160, help="every caption's length in tokens")
    parser.add_argument("--image-size", type=int, default=384)
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--hf-static", action="store_true", help="hf: a static KV cache")
    parser.add_argument("--hf-compile", action="store_true", help="hf: static cache and a compiled decoding step")
    parser.add_argument("--vllm-max-num-seqs", type=int, default=256)
    parser.add_argument("--vllm-kv-cache-gb", type=float, default=None, help="vLLM's CPU build: KV cache size")
    parser.add_argument("--out", default=None, help="write the rows as JSON here (default: <workdir>/throughput.json)")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    os.makedirs(args.workdir, exist_ok=True)

    started = time.perf_counter()
    if args.random_size:
        from captioning.tiny_models import build_tiny_llava

        model_path = build_tiny_llava(os.path.join(args.workdir, f"random-llava-{args.random_size}"),
                                      size=args.random_size, seed=0)
    else:
        model_path = args.model
    build_s = time.perf_counter() - started
    batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b]
    # a shard is never split across batches: shards at least as large as the largest batch
    write_images(os.path.join(args.workdir, "data"), max(args.images, args.loop_images), args.image_size,
                 per_shard=max([args.images // 4, args.loop_batch, *batch_sizes]), seed=0)
    out = args.out or os.path.join(args.workdir, "throughput.json")
    report: dict[str, Any] = {
        "model": model_path, "random_size": args.random_size, "new_tokens": args.new_tokens,
        "image_size": args.image_size, "dtype": args.dtype, "build_s": round(build_s, 1), "device": _device_name(),
        "argv": list(argv if argv is not None else sys.argv[1:]), "load_s": {}, "rows": []}
    rows: list[Row] = []

    def record(row: Row) -> None:
        """Each row is saved as soon as it is measured: a run cut short keeps what it had."""
        rows.append(row)
        report["rows"].append(asdict(row))
        with open(out, "w") as f:
            json.dump(report, f, indent=1)
        log.info("%s", row)

    from captioning.backend import load_backend

    for backend in [b for b in args.backends.split(",") if b]:
        load_started = time.perf_counter()
        load_backend(_config(args, model_path, backend, args.loop_batch).captioner(CAPTIONER))
        report["load_s"][backend] = round(time.perf_counter() - load_started, 1)
        log.info("%s: model loaded in %.1f s", backend, report["load_s"][backend])
        if args.loop_images:
            record(run_loop(args, model_path, backend, args.loop_batch, args.loop_images))
        for batch in batch_sizes:
            record(run_stage(args, model_path, backend, batch))
    print(table(rows, next((r for r in rows if r.variant == "loop"), None)))
    return 0


def _device_name() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({os.cpu_count()} threads)"


if __name__ == "__main__":
    sys.exit(run_main(main))
