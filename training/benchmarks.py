"""Trainer throughput against a minimal hand-written loop, and what precomputed features save."""

from __future__ import annotations

import io
import json
import os
import time

import numpy as np
import torch
from PIL import Image

from shardkit import cluster, pipeline
from shardkit.bench import BenchResult, Measure, PeakRSS
from shardkit.config import parse_config
from training.data import FeatureReader
from training.diffusion import Diffusion
from training.features import center_crop, extract, load_text_encoder, load_vae
from training.layout import run_layout
from training.architectures import build_transformer
from training.trainer import train

IMAGES = 256
STEPS = 40
BATCH = 16
RESOLUTION = 32


def _config(workdir: str, steps: int):  # noqa: ANN202
    cpus = float(os.cpu_count() or 1)
    return parse_config({
        "storage": {"root": os.path.join(workdir, "data")},
        "datasets": {"bench": {"source": "synthetic", "count": IMAGES, "samples_per_shard": 64, "caption": "description"}},
        "training": {
            "text_encoders": {"t5": {"model": "${storage}/models/t5", "tiny": {"seed": 0}, "dtype": "float32"}},
            "vaes": {"vae": {"model": "${storage}/models/vae", "tiny": {"seed": 0}}},
            "features": {"f": {"dataset": "bench", "caption": "txt", "text_encoder": "t5", "vae": "vae",
                               "resolution": RESOLUTION, "batch_size": 32}},
            # the worker gets every CPU, so torch uses as many threads as the in-process loop
            "stages": {"s": {"features": "f", "model": "PixArt-tiny/2", "steps": steps, "batch_size": BATCH,
                             "lr": 1e-4, "warmup_steps": 1, "log_every": 5, "checkpoint_every": steps,
                             "sample_every": steps, "sample_steps": 2, "cpus_per_worker": cpus,
                             "validation_prompts": ["A red circle."]}},
        }})


def _hand_loop(config, steps: int, encode_inside: bool) -> float:  # noqa: ANN001
    """The smallest honest loop: same model, batch, precision and objective; batches read by
    the same reader (or, with encode_inside, images and captions encoded every step)."""
    features_cfg = config.training.features["f"]
    output = pipeline.ensure(config, "bench", "features/f")
    stage = config.training.stages["s"]
    model = build_transformer("PixArt-tiny/2", resolution=RESOLUTION, caption_channels=64, vae_scale_factor=2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.03, eps=1e-10)
    diffusion = Diffusion()
    batches = FeatureReader(output, 0, 1, 0, stage.shuffle_buffer).batches(BATCH)
    if encode_inside:
        tokenizer, encoder = load_text_encoder(config.training.text_encoders["t5"], "cpu")
        vae = load_vae(config.training.vaes["vae"], "cpu")
        source = pipeline.ensure(config, "bench", "shards")
        raw = [(s.fields["jpg"], s.text()) for s in source.samples()]
    started = None
    for step in range(steps + 2):
        if step == 2:  # the first steps warm up allocators and kernels, in both loops
            started = time.perf_counter()
        if encode_inside:
            chunk = raw[(step * BATCH) % len(raw):][:BATCH]
            pixels = torch.stack([torch.from_numpy(np.asarray(center_crop(Image.open(io.BytesIO(b)).convert("RGB"),
                                  features_cfg.resolution), dtype=np.float32)).permute(2, 0, 1) for b, _ in chunk]) / 127.5 - 1
            tokens = tokenizer([t for _, t in chunk], max_length=120, truncation=True, padding="longest", return_tensors="pt")
            with torch.no_grad():
                x0 = vae.encode(pixels).latent_dist.sample() * 0.18215
                text = encoder(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).last_hidden_state
            mask = tokens.attention_mask
        else:
            batch = next(batches)
            x0 = (batch["mean"] + batch["std"] * torch.randn_like(batch["std"])) * 0.18215
            text, mask = batch["text"], batch["mask"]
        t = diffusion.sample_timesteps(len(x0))
        noise = torch.randn_like(x0)
        x_t = diffusion.q_sample(x0, t, noise)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x_t, encoder_hidden_states=text, encoder_attention_mask=mask, timestep=t,
                        added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)[0]
            loss, _ = diffusion.loss(out, x0, x_t, t, noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), stage.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - started


def trainer_throughput(config, workdir: str) -> BenchResult:  # noqa: ANN001
    bench_config = _config(workdir, STEPS)
    cluster.connect(bench_config.cluster)
    extract(bench_config, "f")
    runs = []
    for attempt in range(2):  # alternate; keep the best of each
        with PeakRSS() as memory:
            train(bench_config, "s", restart=True)
        metrics = [json.loads(line) for line in open(run_layout(bench_config, "s").metrics)]
        steady = [m["images_per_s"] for m in metrics[1:]]  # the first window holds start-up
        ours = Measure(seconds=STEPS * BATCH / float(np.median(steady)), items=STEPS * BATCH, peak_mb=memory.peak_mb)
        with PeakRSS(ray=False) as memory:
            seconds = _hand_loop(bench_config, STEPS, encode_inside=False)
        runs.append((ours, Measure(seconds, STEPS * BATCH, memory.peak_mb)))
    mine = min((r[0] for r in runs), key=lambda m: m.seconds)
    base = min((r[1] for r in runs), key=lambda m: m.seconds)
    return BenchResult("trainer_throughput", "images", mine, base, "hand-written loop, same model/batch/bf16", 0.95,
                       "the transformer's forward and backward (PixArt-tiny/2, 32x32 px = 16x16 latents); ours adds "
                       "the EMA update, caption dropout and npy decoding per sample",
                       extra={"steps": STEPS, "batch": BATCH, "ours_is": "median steady-state images/s from metrics.jsonl"})


def precomputed_features_speedup(config, workdir: str) -> BenchResult:  # noqa: ANN001
    bench_config = _config(workdir, STEPS)
    cluster.connect(bench_config.cluster)
    extract(bench_config, "f")
    with PeakRSS(ray=False) as memory:
        precomputed = Measure(_hand_loop(bench_config, STEPS, encode_inside=False), STEPS * BATCH, memory.peak_mb)
    with PeakRSS(ray=False) as memory:
        inline = Measure(_hand_loop(bench_config, STEPS, encode_inside=True), STEPS * BATCH, memory.peak_mb)
    return BenchResult("precomputed_features", "images", precomputed, inline, "encoding images and captions in the loop",
                       1.0, "with tiny encoders the saving is small; with T5-XXL (4.7B) and the SD VAE encoding costs "
                       "more than the PixArt-XL step itself, which is why PixArt extracts features offline",
                       extra={"steps": STEPS, "batch": BATCH})


BENCHMARKS = [trainer_throughput, precomputed_features_speedup]
