"""The PixArt-α trainer: one loop for every stage, run by Ray Train's TorchTrainer (DDP).

The driver (`train`) prepares what the workers need: the feature stage (made first if
missing), the run folders, the validation prompts' embeddings. Each worker (`worker_loop`)
trains on its own disjoint shards; rank 0 logs, samples and exports. Stages differ by
config only. With cluster.in_process the same loop runs once in the driver, on its GPU if it
has one, with no Ray at all (one-GPU boxes, debuggers).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import numpy as np
import torch

from shardkit import cluster, pipeline, storage
from shardkit.config import PipelinesConfig, StageConfig
from shardkit.runner import StageError
from shardkit.shards import StageOutput
from training import checkpoint, start
from training.conditioning import CONDITIONINGS
from training.data import FeatureReader, Position
from training.diffusion import Diffusion
from training.models import DIT_NUM_CLASSES
from training.features import NULL_CAPTION, from_stored, load_text_encoder, npy_array, stage_name

log = logging.getLogger(__name__)

PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "V100": 125e12}


class TrainingError(StageError):
    """A stage that cannot train as configured; the command line prints it as one line."""


@dataclass(frozen=True)
class RunLayout:
    """Where a run lives, `root`: a local folder, or a URI on an object store (nodes of a
    cluster share no disk). What cannot be written there directly (appended metrics,
    TensorBoard's event files, sample grids, an export being built) is written in `work`, a
    folder of this process's machine, and synced to `root` (RunSync). For a local root the
    two are the same folder."""
    root: str

    @classmethod
    def of(cls, root: str) -> "RunLayout":
        return cls(os.path.abspath(root) if storage.is_local(root) else root.rstrip("/"))

    @property
    def remote(self) -> bool:
        return not storage.is_local(self.root)

    @property
    def work(self) -> str:
        if not self.remote:
            return self.root
        return os.path.join(tempfile.gettempdir(), "pixart-data-runs", self.root.replace("://", "/"))

    @property
    def checkpoints(self) -> str:
        return storage.join(self.root, "checkpoints")

    @property
    def samples(self) -> str:
        """Local: grids are drawn here, then synced."""
        return os.path.join(self.work, "samples")

    @property
    def export(self) -> str:
        return storage.join(self.root, "pipeline")

    @property
    def exports(self) -> str:
        return storage.join(self.root, "exports")

    def snapshot(self, step: int) -> str:
        return storage.join(self.exports, f"step_{step:06d}")

    @property
    def metrics(self) -> str:
        return storage.join(self.root, "metrics.jsonl")

    @property
    def local_metrics(self) -> str:
        return os.path.join(self.work, "metrics.jsonl")

    @property
    def tensorboard(self) -> str:
        return os.path.join(self.work, "tensorboard")


SYNCED = ("metrics.jsonl", "tensorboard", "samples")


class RunSync:
    """Uploads what rank 0 wrote in `work` (metrics, TensorBoard events, sample grids) to a
    remote root: the files new or changed since the last sync. Called after each published
    checkpoint and at the end, so what a resumed run finds matches its checkpoint."""

    def __init__(self, layout: RunLayout) -> None:
        self.layout = layout
        self.sent: dict[str, tuple[int, int]] = {}

    def __call__(self) -> None:
        if not self.layout.remote:
            return
        changed = set()
        for top in SYNCED:
            path = os.path.join(self.layout.work, top)
            files = [path] if os.path.isfile(path) else [os.path.join(b, n) for b, _, ns in os.walk(path) for n in ns]
            for file in files:
                info = os.stat(file)
                rel = os.path.relpath(file, self.layout.work)
                if self.sent.get(rel) != (info.st_size, info.st_mtime_ns):
                    changed.add(rel)
                    self.sent[rel] = (info.st_size, info.st_mtime_ns)
        if changed:
            storage.put_folder(self.layout.work, self.layout.root, only=changed)


def run_layout(config: PipelinesConfig, stage: str) -> RunLayout:
    return RunLayout.of(storage.join(config.storage.root, "runs", stage))


def publish_export(layout: RunLayout, build: Callable[[str], None], uri: str) -> None:
    """Write a diffusers pipeline to `uri` (a folder of the run): `build(folder)` saves it; on
    an object store it is saved locally, then uploaded with model_index.json last (its
    presence is what says the pipeline is complete)."""
    if not layout.remote:
        build(uri)
        return
    local = os.path.join(layout.work, ".export")
    shutil.rmtree(local, ignore_errors=True)
    build(local)
    storage.remove_tree(uri)
    storage.put_folder(local, uri, last="model_index.json")
    shutil.rmtree(local, ignore_errors=True)


def exported(folder: str) -> bool:
    return storage.exists(storage.join(folder, "model_index.json"))


def _peak_flops(cfg: StageConfig, device: torch.device) -> float | None:
    if cfg.peak_flops:
        return cfg.peak_flops
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return next((v for k, v in PEAK_FLOPS.items() if k in name), None)
    return None


def _flops_per_image(model, ctx: dict[str, Any]) -> float:  # noqa: ANN001
    """Training FLOPs per image: 6 x parameters x image tokens (forward and backward of the
    dense layers; attention's own matmuls are left out, so MFU is slightly understated)."""
    tokens = (ctx["resolution"] // ctx["vae_scale_factor"] // model.config.patch_size) ** 2  # buckets: about as many
    return 6.0 * sum(p.numel() for p in model.parameters()) * tokens


def _digest(model) -> str:  # noqa: ANN001
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


@dataclass(frozen=True)
class Worker:
    """Where a worker runs: its rank among `world`, its device, and how its model is
    wrapped for data parallelism."""
    rank: int
    world: int
    device: torch.device
    prepare: Callable[[torch.nn.Module], torch.nn.Module]


def ray_worker() -> Worker:
    import ray.train
    import ray.train.torch

    context = ray.train.get_context()
    return Worker(context.get_world_rank(), context.get_world_size(), ray.train.torch.get_device(),
                  ray.train.torch.prepare_model)


def this_process_worker() -> Worker:
    """cluster.in_process: the only worker, on this machine's first GPU if it has one."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return Worker(0, 1, device, lambda model: model)


def ray_worker_loop(ctx: dict[str, Any]) -> None:
    """Ray Train's train_loop_per_worker (one argument)."""
    worker_loop(ctx, ray_worker())


def worker_loop(ctx: dict[str, Any], worker: Worker) -> None:
    """Runs on every Ray Train worker, or once in this process (cluster.in_process)."""
    cfg = StageConfig(**ctx["stage"])
    layout = RunLayout.of(ctx["run_root"])
    rank, world, device = worker.rank, worker.world, worker.device
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    os.makedirs(layout.work, exist_ok=True)
    # models named by URI are read from a copy on this worker's machine
    for key in ("init", "vae_dir", "text_encoder_dir"):
        if ctx.get(key):
            ctx[key] = storage.local_folder(ctx[key])
    run_sync = RunSync(layout)

    model, start_note = start.build(ctx)
    # on the device before the optimiser exists: a resumed optimiser's state is cast to its
    # parameters' device when loaded, and must not stay on the CPU beside GPU parameters
    model.to(device)
    if rank == 0:
        storage.atomic_write(storage.join(layout.root, "start.json"), json.dumps(start_note, indent=2))
    conditioning = CONDITIONINGS[cfg.conditioning](ctx, micro_conditions=bool(getattr(model.config, "use_additional_conditions", False)))
    if cfg.grad_checkpointing:
        model.enable_gradient_checkpointing()
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, eps=cfg.adam_eps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(cfg.warmup_steps, 1)))
    step, position = 0, Position()
    torch.manual_seed(cfg.seed * 1000 + rank)  # noise and timesteps differ per rank, models do not
    if rank == 0:
        # a killed driver can leave its workers running for a while: they must finish dying
        # before this run reads (and then writes) the same checkpoints and logs
        ctx["_lock"] = _lock_run(layout)
    _barrier(world)
    found = checkpoint.latest(layout.checkpoints)
    if rank == 0:
        _trim_metrics(layout, found[0] if found else 0)
    if found:
        shared, own, meta = checkpoint.load(found[1], rank)
        model.load_state_dict(shared["model"])
        ema.load_state_dict(shared["ema"])
        optimizer.load_state_dict(shared["optimizer"])
        scheduler.load_state_dict(shared["scheduler"])
        step = meta["step"]
        if own is not None and meta["world"] == world:
            position = Position(**own["position"])
            torch.set_rng_state(own["rng"])
        else:
            log.warning("rank %d: checkpoint made with %d workers, now %d: data order restarts its epoch", rank, meta["world"], world)
        log.info("rank %d: resumed from step %d (%s)", rank, step, found[1])
    ema.to(device)
    ddp_model = worker.prepare(model)
    base_model = ddp_model.module if hasattr(ddp_model, "module") else ddp_model

    features = StageOutput(ctx["features_uri"])
    reader = FeatureReader(features, rank, world, cfg.seed, cfg.shuffle_buffer, position,
                           needs_text=cfg.conditioning == "text", needs_label=cfg.conditioning == "class")
    batches = reader.batches(cfg.batch_size)
    diffusion = Diffusion(learned_sigma=cfg.learned_sigma, snr_gamma=cfg.snr_gamma)
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision)
    scaler = torch.amp.GradScaler(enabled=cfg.precision == "fp16" and device.type == "cuda")
    flops = _flops_per_image(base_model, ctx)
    peak = _peak_flops(cfg, device)
    # logged with each line: a run that moves between machines (it resumes anywhere) keeps
    # each machine's speed apart, and a shipped card can say what trained it
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    writer = None
    if rank == 0:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(layout.tensorboard)
    window_start, window_images, micro_images, skipped_nan = time.perf_counter(), 0, 0, 0

    while step < cfg.steps:
        losses = []
        for micro in range(cfg.grad_accum):
            batch = conditioning.drop(next(batches), cfg.caption_dropout)
            x0 = (batch["mean"] + batch["std"] * torch.randn_like(batch["std"])).to(device) * ctx["scaling_factor"]
            t = diffusion.sample_timesteps(len(x0), device=device)
            noise = torch.randn_like(x0)
            x_t = diffusion.q_sample(x0, t, noise)
            sync = micro == cfg.grad_accum - 1 or not hasattr(ddp_model, "no_sync")
            context = ddp_model.no_sync() if not sync else contextlib.nullcontext()
            with context, torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
                out = conditioning.predict(ddp_model, x_t, t, batch)
                loss, parts = diffusion.loss(out, x0, x_t, t, noise)
            scaler.scale(loss / cfg.grad_accum).backward()
            losses.append(parts)
            micro_images += len(x0)
        if not all(math.isfinite(p["mse"]) for p in losses):
            # a NaN/inf step is skipped and counted, never applied; many in a row stop the run
            optimizer.zero_grad(set_to_none=True)
            skipped_nan, micro_images = skipped_nan + 1, 0
            if skipped_nan > 10:
                raise TrainingError(f"rank {rank}: {skipped_nan} non-finite losses; lower lr or check the features")
            continue
        scaler.unscale_(optimizer)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(ddp_model.parameters(), cfg.grad_clip))
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            # warm-up as diffusers' EMAModel: with a fixed 0.999 the first thousand steps'
            # average is mostly the random start, and early samples and exports look untrained
            decay = min(cfg.ema_decay, (1 + step) / (10 + step))
            for e, p in zip(ema.parameters(), base_model.parameters()):
                e.lerp_(p.detach(), 1.0 - decay)
        step += 1
        window_images += micro_images * world  # a bucket's last batch of an epoch can be short
        micro_images = 0

        if step % cfg.log_every == 0 or step == cfg.steps:
            elapsed = time.perf_counter() - window_start
            rate = window_images / max(elapsed, 1e-9)
            metrics = {"step": step, "loss": float(np.mean([p["mse"] + p.get("vb", 0.0) for p in losses])),
                       "mse": float(np.mean([p["mse"] for p in losses])), "lr": scheduler.get_last_lr()[0],
                       "grad_norm": grad_norm, "images_per_s": round(rate, 2),
                       "tflops_per_s": round(rate * flops / 1e12, 4), "skipped_nan": skipped_nan,
                       "skipped_samples": reader.skipped,
                       "epoch": reader.position.epoch, "device": device_name, "world": world}
            if peak:
                metrics["mfu"] = round(rate * flops / (peak * world), 4)
            if rank == 0:
                _log_metrics(layout, writer, metrics)
            window_start, window_images = time.perf_counter(), 0
        if rank == 0 and (step % cfg.sample_every == 0 or step == cfg.steps):
            conditioning.sample_grids(ema, cfg, os.path.join(layout.samples, f"step_{step:06d}.png"))
            ema.to(device)
        if rank == 0 and cfg.export_every and (step % cfg.export_every == 0 or step == cfg.steps):
            publish_export(layout, lambda folder: conditioning.export(ema, folder), layout.snapshot(step))
            ema.to(device)
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            _save_checkpoint(layout, step, rank, world, base_model, ema, optimizer, scheduler, reader.position, cfg)
            if rank == 0:
                writer.flush()
                run_sync()

    digest = {"rank": rank, "step": step, "parameters_sha256": _digest(base_model), "position": asdict(reader.position)}
    storage.atomic_write(storage.join(layout.root, f"worker{rank}.json"), json.dumps(digest))
    if rank == 0:
        publish_export(layout, lambda folder: conditioning.export(ema, folder), layout.export)
        writer.close()
        run_sync()


def _barrier(world: int) -> None:
    import torch.distributed as dist

    if world > 1 and dist.is_initialized():
        dist.barrier()


def _lock_run(layout: RunLayout, timeout_s: float = 300.0):  # -> an open file holding the lock
    """Held by rank 0 for the run. It guards this machine's folders against a killed run's
    leftover workers; on an object store nothing locks across machines, and the run relies
    on checkpoints being published whole."""
    import fcntl

    handle = open(os.path.join(layout.work, ".lock"), "w")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return handle
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise TrainingError(f"{layout.root} is in use by another training process") from None
            time.sleep(0.5)


def _log_metrics(layout: RunLayout, writer, metrics: dict[str, Any]) -> None:  # noqa: ANN001
    with open(layout.local_metrics, "a") as f:
        f.write(json.dumps(metrics) + "\n")
    for key, value in metrics.items():
        if key != "step" and isinstance(value, (int, float)):
            writer.add_scalar(f"train/{key}", value, metrics["step"])
    log.info("step %d: loss %.4f, lr %.2e, %.1f images/s%s", metrics["step"], metrics["loss"], metrics["lr"],
             metrics["images_per_s"], f", MFU {metrics['mfu']:.1%}" if "mfu" in metrics else
             f", {metrics['tflops_per_s']:.3f} TFLOP/s")


def _save_checkpoint(layout: RunLayout, step: int, rank: int, world: int, model, ema, optimizer, scheduler,
                     position: Position, cfg: StageConfig) -> None:  # noqa: ANN001
    staging = checkpoint.staging_dir(layout.checkpoints, step)
    checkpoint.save_rank_state(staging, rank, {"position": asdict(position), "rng": torch.get_rng_state()})
    if rank == 0:
        checkpoint.save_shared_state(
            staging, {"model": model.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
                      "scheduler": scheduler.state_dict()})
    _barrier(world)  # every rank's position is stored before the checkpoint is published
    if rank == 0:
        checkpoint.publish(layout.checkpoints, step, {"step": step, "world": world, "stage": cfg.model_dump(mode="json")})
        log.info("checkpoint at step %d", step)


def _prompt_embeddings(text_cfg, prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:  # noqa: ANN001
    tokenizer, encoder = load_text_encoder(text_cfg, "cpu")
    tokens = tokenizer(prompts, max_length=text_cfg.max_length, truncation=True, padding="max_length", return_tensors="pt")
    with torch.inference_mode():
        hidden = encoder(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).last_hidden_state
    return hidden.float().numpy(), tokens.attention_mask.numpy()


def train(config: PipelinesConfig, stage: str, restart: bool = False) -> dict[str, Any]:
    """Train `training.stages.<stage>`, resuming from its last checkpoint; returns a summary."""
    if stage not in config.training.stages:
        raise TrainingError(f"training.stages: no stage {stage!r}; defined: {', '.join(config.training.stages) or 'none'}")
    cfg = config.training.stages[stage]
    features_cfg = config.training.features[cfg.features]
    init = _resolve_init(config, stage)
    features = pipeline.ensure(config, features_cfg.dataset, stage_name(cfg.features))
    vae_cfg = config.training.vaes[features_cfg.vae]
    text_cfg = config.training.text_encoders[features_cfg.text_encoder] if cfg.conditioning == "text" else None
    layout = run_layout(config, stage)
    if restart:
        storage.remove_tree(layout.root)
        shutil.rmtree(layout.work, ignore_errors=True)
    storage.makedirs(layout.root)
    found = checkpoint.latest(layout.checkpoints)
    if found:
        _check_resumable(stage, cfg, found[1])
    if found and found[0] >= cfg.steps and exported(layout.export):
        log.info("%s: already trained to step %d and exported to %s", stage, found[0], layout.export)
        return _summary(stage, cfg, layout, found, seconds=0.0)
    # imported only now: seconds of start-up that a stage found trained and exported skips
    from diffusers import AutoencoderKL
    from transformers import T5Config

    vae_config = AutoencoderKL.load_config(storage.local_folder(vae_cfg.model))
    ctx = {
        "stage": cfg.model_dump(mode="json"), "run_root": layout.root, "features_uri": features.uri, "init": init,
        "resolution": features_cfg.resolution, "latent_channels": vae_config["latent_channels"],
        "vae_scale_factor": 2 ** (len(vae_config["block_out_channels"]) - 1),
        "scaling_factor": vae_config.get("scaling_factor", 0.18215),
        "vae_dir": vae_cfg.model,
        "sample_sizes": [tuple(size) for size in cfg.sample_sizes] or [(features_cfg.resolution, features_cfg.resolution)],
    }
    if text_cfg is not None:
        embeds, masks = _prompt_embeddings(text_cfg, cfg.validation_prompts)
        ctx.update({
            "caption_channels": T5Config.from_pretrained(storage.local_folder(text_cfg.model)).d_model,
            "text_encoder_dir": text_cfg.model,
            "prompt_embeds": embeds, "prompt_masks": masks,
            "null_embed": from_stored(npy_array(storage.read_bytes(storage.join(features.uri, NULL_CAPTION)))).numpy(),
        })
    else:
        classes = features_cfg.label.classes
        if len(classes) > DIT_NUM_CLASSES:
            raise TrainingError(f"{stage}: {len(classes)} classes; a DiT here has {DIT_NUM_CLASSES} class rows")
        unknown = [name for name in cfg.validation_prompts if name not in classes]
        if unknown:
            raise TrainingError(f"training.stages.{stage}.validation_prompts: {unknown} are not classes of "
                                f"{cfg.features} ({', '.join(classes)})")
        ctx["classes"] = classes
    try:
        start.check(cfg, storage.local_folder(init) if init else None, ctx)
    except start.StartError as exc:
        raise TrainingError(str(exc)) from None
    started = time.monotonic()
    if config.cluster.in_process:
        if cfg.workers != 1:
            raise TrainingError(f"training.stages.{stage}.workers is {cfg.workers}: cluster.in_process trains one worker")
        try:
            worker_loop(ctx, this_process_worker())
        finally:
            lock = ctx.pop("_lock", None)  # a Ray worker's lock ends with its process; this process lives on
            if lock is not None:
                lock.close()
        summary = _summary(stage, cfg, layout, found, seconds=time.monotonic() - started)
        log.info("%s: %d steps in this process, %.0f s; pipeline %s", stage, cfg.steps, summary["seconds"], layout.export)
        return summary
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer, TorchConfig

    cluster.connect(config.cluster)
    trainer = TorchTrainer(
        ray_worker_loop, train_loop_config=ctx,
        torch_config=TorchConfig(backend="nccl" if cfg.gpus_per_worker > 0 else "gloo"),
        scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=cfg.gpus_per_worker > 0,
                                     resources_per_worker={"CPU": cfg.cpus_per_worker, "GPU": cfg.gpus_per_worker}),
        # Ray Train's own storage holds no checkpoints of ours: a folder of the driver's machine
        run_config=RunConfig(name="ray", storage_path=os.path.join(layout.work, "ray"),
                             failure_config=FailureConfig(max_failures=0)),
    )
    try:
        trainer.fit()
    except Exception as exc:  # noqa: BLE001 - Ray wraps the worker's error; surface its message
        lines = [line for line in str(exc).splitlines() if line.strip()]
        raise TrainingError(f"{stage}: training failed: {lines[-1] if lines else exc}; rerun to resume "
                            f"from the last checkpoint") from exc
    summary = _summary(stage, cfg, layout, found, seconds=time.monotonic() - started)
    log.info("%s: %d steps, loss %s -> %s, %.0f s; pipeline %s", stage, cfg.steps, summary["first_loss"],
             summary["last_loss"], summary["seconds"], layout.export)
    return summary


# What may change between a run and its resumption: how long, how it is watched and where it
# runs. Anything else (model, data, objective, optimiser) would silently mix two experiments.
RESUMABLE_CHANGES = {"steps", "checkpoint_every", "sample_every", "export_every", "log_every", "validation_prompts", "sample_steps",
                     "guidance_scale", "sample_sizes", "workers", "gpus_per_worker", "cpus_per_worker", "peak_flops"}


def _check_resumable(stage: str, cfg: StageConfig, found: str) -> None:
    before = json.loads(storage.read_text(storage.join(found, checkpoint.META))).get("stage", {})
    now = cfg.model_dump(mode="json")
    changed = sorted(k for k in now.keys() - RESUMABLE_CHANGES if k in before and before[k] != now[k])
    if changed:
        details = ", ".join(f"{k}: {before[k]!r} -> {now[k]!r}" for k in changed[:4])
        raise TrainingError(f"runs/{stage} was trained with another config ({details}): rerun with --restart "
                            f"(make ... SET= / python -m training train {stage} --restart) or name a new stage")


def _resolve_init(config: PipelinesConfig, stage: str) -> str | None:
    """`init`, or the exported pipeline of `init_stage`, which must have been trained."""
    cfg = config.training.stages[stage]
    if cfg.init_stage is None:
        if cfg.init and not storage.exists(cfg.init):
            raise TrainingError(f"training.stages.{stage}.init: {cfg.init} does not exist")
        return cfg.init
    export = run_layout(config, cfg.init_stage).export
    if not exported(export):
        raise TrainingError(f"{stage} starts from {cfg.init_stage}, which has not been trained and exported yet "
                            f"({export}): run `make train-{cfg.init_stage}` first")
    return export


def _read_metrics(uri: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in storage.read_text(uri).splitlines() if line.strip()] if storage.exists(uri) else []


def _summary(stage: str, cfg: StageConfig, layout: RunLayout, resumed: tuple[int, str] | None, seconds: float) -> dict[str, Any]:
    metrics = _read_metrics(layout.metrics)
    return {"stage": stage, "steps": cfg.steps, "first_loss": metrics[0]["loss"] if metrics else None,
            "last_loss": metrics[-1]["loss"] if metrics else None, "seconds": round(seconds, 1),
            "pipeline": layout.export, "samples": layout.samples, "resumed_from": resumed[0] if resumed else 0}


def _trim_metrics(layout: RunLayout, step: int) -> None:
    """Metrics logged after the checkpoint we resume from will be logged again: drop them. The
    run's own file is the truth (this machine's work copy may be another run's, or none)."""
    kept = [m for m in _read_metrics(layout.metrics) if m["step"] <= step]
    with open(layout.local_metrics + ".tmp", "w") as f:
        f.writelines(json.dumps(m) + "\n" for m in kept)
    os.replace(layout.local_metrics + ".tmp", layout.local_metrics)
    if layout.remote:
        storage.atomic_write(layout.metrics, "".join(json.dumps(m) + "\n" for m in kept))
