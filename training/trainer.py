"""The PixArt-α trainer: one loop for every stage, run by Ray Train's TorchTrainer (DDP).

The driver (`train`) prepares what the workers need, a `TrainContext`: the feature stage
(made first if missing), the run folders (training/layout.py), the validation prompts'
embeddings. Each worker (`worker_loop`) trains on its own disjoint shards; rank 0 logs,
samples and exports. Stages differ by config only. With cluster.in_process the same loop
runs once in the driver, on its GPU if it has one, with no Ray at all (one-GPU boxes,
debuggers).
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
import time
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable, Iterator

import numpy as np
import torch

from shardkit import cluster, pipeline, storage
from shardkit.config import PipelinesConfig, StageConfig
from shardkit.inputs import MissingInput
from shardkit.runner import StageError
from shardkit.shards import StageOutput
from training import checkpoint, start
from training.conditioning import CONDITIONINGS, Conditioning
from training.data import FeatureReader, Position
from training.diffusion import Diffusion
from training.architectures import DIT_NUM_CLASSES
from training.features import NULL_CAPTION, from_stored, load_text_encoder, npy_array, require_encoders, stage_name
from training.features import resolved as resolved_features  # `classes: folders` made concrete
from training.layout import SYNCED, RunLayout, run_layout

log = logging.getLogger(__name__)

PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "V100": 125e12}


class TrainingError(StageError):
    """A stage that cannot train as configured; the command line prints it as one line."""


@dataclass(frozen=True)
class TrainContext:
    """What the driver hands every worker (pickled, in Ray Train's train_loop_config): the
    stage, where its run and features live, the models it starts from and reads, and what
    the workers need to know of them without loading them. A text stage has the text fields,
    a class stage `classes`."""
    stage: StageConfig
    run_root: str
    features_uri: str
    init: str | None
    """The model it starts from (stage.init, or init_stage's export); None: a new one."""
    vae_dir: str
    resolution: int
    latent_channels: int
    vae_scale_factor: int
    scaling_factor: float
    sample_sizes: tuple[tuple[int, int], ...]
    """(height, width) of the validation grids."""
    text_encoder_dir: str | None = None
    caption_channels: int | None = None
    prompt_embeds: np.ndarray | None = None
    """The validation prompts' T5 embeddings and masks: no text encoder stays loaded to sample."""
    prompt_masks: np.ndarray | None = None
    null_embed: np.ndarray | None = None
    """The empty caption's embedding: the dropped caption, and sampling's unconditional input."""
    classes: list[str] | None = None

    def with_local_models(self) -> "TrainContext":
        """The models named by URI, read from a copy on this worker's machine."""
        named = ("init", "vae_dir", "text_encoder_dir")
        return replace(self, **{key: storage.local_folder(getattr(self, key)) for key in named if getattr(self, key)})


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


def publish_export(layout: RunLayout, build: Callable[[str], None], uri: str) -> None:
    """Write a diffusers pipeline to `uri` (a folder of the run): `build(folder)` saves it; on
    an object store it is saved locally, then uploaded with model_index.json last (its
    presence is what says the pipeline is complete)."""
    if not layout.remote:
        build(uri)
        return
    local = layout.export_staging
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


def _flops_per_image(model, ctx: TrainContext) -> float:  # noqa: ANN001
    """Training FLOPs per image: 6 x parameters x image tokens (forward and backward of the
    dense layers; attention's own matmuls are left out, so MFU is slightly understated)."""
    tokens = (ctx.resolution // ctx.vae_scale_factor // model.config.patch_size) ** 2  # buckets: about as many
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


def ray_worker_loop(config: dict[str, Any]) -> None:
    """Ray Train's train_loop_per_worker: its one argument is train_loop_config, {"ctx": TrainContext}."""
    worker_loop(config["ctx"], ray_worker())


def worker_loop(ctx: TrainContext, worker: Worker) -> None:
    """Runs on every Ray Train worker, or once in this process (cluster.in_process): build the
    model, resume from the run's last checkpoint, step to `steps` with the periodic hooks
    after each step (log, sample, export, checkpoint), then export the run's pipeline."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    layout = RunLayout.of(ctx.run_root)
    os.makedirs(layout.work, exist_ok=True)
    ctx = ctx.with_local_models()
    state, conditioning = setup(ctx, layout, worker)
    with run_lock(layout, worker):
        position = resume(state, layout, worker)
        stepper = Stepper(ctx, state, conditioning, worker, position)
        hooks = Hooks(ctx, layout, worker, stepper)
        while state.step < ctx.stage.steps:
            done = stepper.step()
            if done is not None:  # None: a non-finite loss, the step was skipped
                hooks.after_step(done)
        hooks.finish()


@dataclass
class TrainState:
    """What a checkpoint saves and a resumed run restores, beside each worker's data position."""
    model: torch.nn.Module
    ema: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    step: int = 0


def setup(ctx: TrainContext, layout: RunLayout, worker: Worker) -> tuple[TrainState, Conditioning]:
    """The stage's model (training/start.py), its EMA and optimiser, and its conditioning."""
    cfg = ctx.stage
    model, start_note = start.build(ctx)
    # on the device before the optimiser exists: a resumed optimiser's state is cast to its
    # parameters' device when loaded, and must not stay on the CPU beside GPU parameters
    model.to(worker.device)
    if worker.rank == 0:
        storage.atomic_write(layout.start, json.dumps(start_note, indent=2))
    micro_conditions = bool(getattr(model.config, "use_additional_conditions", False))
    conditioning = CONDITIONINGS[cfg.conditioning](ctx, micro_conditions=micro_conditions)
    if cfg.grad_checkpointing:
        model.enable_gradient_checkpointing()
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, eps=cfg.adam_eps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(cfg.warmup_steps, 1)))
    torch.manual_seed(cfg.seed * 1000 + worker.rank)  # noise and timesteps differ per rank, models do not
    return TrainState(model, ema, optimizer, scheduler), conditioning


@contextlib.contextmanager
def run_lock(layout: RunLayout, worker: Worker, timeout_s: float = 300.0) -> Iterator[None]:
    """Held by rank 0 while the run trains; no rank reads the run before rank 0 holds it. A
    killed driver can leave its workers running for a while: they must finish dying before
    this run reads (and then writes) the same checkpoints and logs. It guards this machine's
    folders only: on an object store nothing locks across machines, and the run relies on
    checkpoints being published whole."""
    import fcntl

    handle = None
    if worker.rank == 0:
        handle = open(layout.lock, "w")
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    handle.close()
                    raise TrainingError(f"{layout.root} is in use by another training process") from None
                time.sleep(0.5)
    try:
        _barrier(worker.world)
        yield
    finally:
        if handle is not None:
            handle.close()


def resume(state: TrainState, layout: RunLayout, worker: Worker) -> Position:
    """Restore the run's last complete checkpoint, if any, and return where this worker's data
    continues. Metrics logged after that checkpoint will be logged again: they are dropped."""
    found = checkpoint.latest(layout.checkpoints)
    if worker.rank == 0:
        _trim_metrics(layout, found[0] if found else 0)
    position = Position()
    if not found:
        return position
    shared, own, meta = checkpoint.load(found[1], worker.rank)
    state.model.load_state_dict(shared["model"])
    state.ema.load_state_dict(shared["ema"])
    state.optimizer.load_state_dict(shared["optimizer"])
    state.scheduler.load_state_dict(shared["scheduler"])
    state.step = meta["step"]
    if own is not None and meta["world"] == worker.world:
        position = Position(**own["position"])
        torch.set_rng_state(own["rng"])
    else:
        log.warning("rank %d: checkpoint made with %d workers, now %d: data order restarts its epoch",
                    worker.rank, meta["world"], worker.world)
    log.info("rank %d: resumed from step %d (%s)", worker.rank, state.step, found[1])
    return position


@dataclass(frozen=True)
class StepResult:
    losses: list[dict[str, float]]
    """Each micro-batch's loss terms."""
    grad_norm: float
    images: int
    """Trained on in this step by all workers (a bucket's last batch of an epoch can be short)."""


class Stepper:
    """Optimiser steps, each over `grad_accum` micro-batches of this worker's shards, then the
    EMA update. Made after resume: the data continues from the checkpoint's position, and the
    model is wrapped for data parallelism with its restored weights."""

    def __init__(self, ctx: TrainContext, state: TrainState, conditioning: Conditioning, worker: Worker,
                 position: Position) -> None:
        cfg = self.cfg = ctx.stage
        self.ctx, self.state, self.conditioning, self.worker = ctx, state, conditioning, worker
        state.ema.to(worker.device)
        self.ddp = worker.prepare(state.model)
        self.model = self.ddp.module if hasattr(self.ddp, "module") else self.ddp
        """The bare model: what the EMA follows and a checkpoint saves."""
        self.reader = FeatureReader(StageOutput(ctx.features_uri), worker.rank, worker.world, cfg.seed, cfg.shuffle_buffer,
                                    position, needs_text=cfg.conditioning == "text", needs_label=cfg.conditioning == "class")
        self.batches = self.reader.batches(cfg.batch_size)
        self.diffusion = Diffusion(learned_sigma=cfg.learned_sigma, snr_gamma=cfg.snr_gamma)
        self.autocast = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision)
        self.scaler = torch.amp.GradScaler(enabled=cfg.precision == "fp16" and worker.device.type == "cuda")
        self.skipped_nan = 0

    def step(self) -> StepResult | None:
        """None: a loss was not finite. Such a step is skipped and counted, never applied;
        many in a row stop the run."""
        losses, images = self._accumulate()
        if not all(math.isfinite(p["mse"]) for p in losses):
            self.state.optimizer.zero_grad(set_to_none=True)
            self.skipped_nan += 1
            if self.skipped_nan > 10:
                raise TrainingError(f"rank {self.worker.rank}: {self.skipped_nan} non-finite losses; lower lr or check "
                                    f"the features")
            return None
        grad_norm = self._apply()
        self.state.step += 1
        return StepResult(losses, grad_norm, images * self.worker.world)

    def _accumulate(self) -> tuple[list[dict[str, float]], int]:
        """Forward and backward of each micro-batch; DDP all-reduces the gradients on the last."""
        cfg, device, ddp = self.cfg, self.worker.device, self.ddp
        losses, images = [], 0
        for micro in range(cfg.grad_accum):
            batch = self.conditioning.drop(next(self.batches), cfg.caption_dropout)
            x0 = (batch["mean"] + batch["std"] * torch.randn_like(batch["std"])).to(device) * self.ctx.scaling_factor
            t = self.diffusion.sample_timesteps(len(x0), device=device)
            noise = torch.randn_like(x0)
            x_t = self.diffusion.q_sample(x0, t, noise)
            sync = micro == cfg.grad_accum - 1 or not hasattr(ddp, "no_sync")
            context = ddp.no_sync() if not sync else contextlib.nullcontext()
            with context, torch.autocast(device.type, dtype=self.autocast or torch.float32, enabled=self.autocast is not None):
                out = self.conditioning.predict(ddp, x_t, t, batch)
                loss, parts = self.diffusion.loss(out, x0, x_t, t, noise)
            self.scaler.scale(loss / cfg.grad_accum).backward()
            losses.append(parts)
            images += len(x0)
        return losses, images

    def _apply(self) -> float:
        """Clip, step the optimiser and its schedule, update the EMA; returns the gradient norm."""
        state, cfg = self.state, self.cfg
        self.scaler.unscale_(state.optimizer)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.ddp.parameters(), cfg.grad_clip))
        self.scaler.step(state.optimizer)
        self.scaler.update()
        state.scheduler.step()
        state.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            # warm-up as diffusers' EMAModel: with a fixed 0.999 the first thousand steps'
            # average is mostly the random start, and early samples and exports look untrained
            decay = min(cfg.ema_decay, (1 + state.step) / (10 + state.step))
            for e, p in zip(state.ema.parameters(), self.model.parameters()):
                e.lerp_(p.detach(), 1.0 - decay)
        return grad_norm


class Hooks:
    """What happens every so many steps, and at the last one: a metrics line (every rank
    measures, rank 0 writes), sample grids and snapshot exports (rank 0, from the EMA
    weights), a checkpoint (every rank stores its own data position). `finish` ends the run."""

    def __init__(self, ctx: TrainContext, layout: RunLayout, worker: Worker, stepper: Stepper) -> None:
        self.cfg, self.layout, self.worker, self.stepper = ctx.stage, layout, worker, stepper
        self.flops = _flops_per_image(stepper.model, ctx)
        self.peak = _peak_flops(self.cfg, worker.device)
        # logged with each line: a run that moves between machines (it resumes anywhere) keeps
        # each machine's speed apart, and a shipped card can say what trained it
        self.device_name = torch.cuda.get_device_name(worker.device) if worker.device.type == "cuda" else \
            f"cpu ({torch.get_num_threads()} threads)"
        self.writer = None
        if worker.rank == 0:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(layout.tensorboard)
        self.run_sync = RunSync(layout)
        self.window_start, self.window_images = time.perf_counter(), 0

    def _due(self, every: int | None) -> bool:
        step = self.stepper.state.step
        return bool(every) and (step % every == 0 or step == self.cfg.steps)

    def after_step(self, done: StepResult) -> None:
        cfg, rank, state, device = self.cfg, self.worker.rank, self.stepper.state, self.worker.device
        self.window_images += done.images
        if self._due(cfg.log_every):
            self.log(done)
        if rank == 0 and self._due(cfg.sample_every):
            self.stepper.conditioning.sample_grids(state.ema, cfg, os.path.join(self.layout.local_samples,
                                                                                f"step_{state.step:06d}.png"))
            state.ema.to(device)  # sampling moved it to the CPU
        if rank == 0 and self._due(cfg.export_every):
            self.export(self.layout.snapshot(state.step))
            state.ema.to(device)
        if self._due(cfg.checkpoint_every):
            self.checkpoint()

    def log(self, done: StepResult) -> None:
        rate = self.window_images / max(time.perf_counter() - self.window_start, 1e-9)
        losses, state, reader, world = done.losses, self.stepper.state, self.stepper.reader, self.worker.world
        metrics = {"step": state.step, "loss": float(np.mean([p["mse"] + p.get("vb", 0.0) for p in losses])),
                   "mse": float(np.mean([p["mse"] for p in losses])), "lr": state.scheduler.get_last_lr()[0],
                   "grad_norm": done.grad_norm, "images_per_s": round(rate, 2),
                   "tflops_per_s": round(rate * self.flops / 1e12, 4), "skipped_nan": self.stepper.skipped_nan,
                   "skipped_samples": reader.skipped,
                   "epoch": reader.position.epoch, "device": self.device_name, "world": world}
        if self.peak:
            metrics["mfu"] = round(rate * self.flops / (self.peak * world), 4)
        if self.worker.rank == 0:
            _log_metrics(self.layout, self.writer, metrics)
        self.window_start, self.window_images = time.perf_counter(), 0

    def export(self, uri: str) -> None:
        ema = self.stepper.state.ema
        publish_export(self.layout, lambda folder: self.stepper.conditioning.export(ema, folder), uri)

    def checkpoint(self) -> None:
        """Each rank stores its data position and RNG, rank 0 the shared state; rank 0 then
        publishes the checkpoint and syncs the run's files, so a resumed run finds them matching."""
        layout, rank, world, state = self.layout, self.worker.rank, self.worker.world, self.stepper.state
        staging = checkpoint.staging_dir(layout.checkpoints, state.step)
        checkpoint.save_rank_state(staging, rank, {"position": asdict(self.stepper.reader.position),
                                                   "rng": torch.get_rng_state()})
        if rank == 0:
            checkpoint.save_shared_state(
                staging, {"model": self.stepper.model.state_dict(), "ema": state.ema.state_dict(),
                          "optimizer": state.optimizer.state_dict(), "scheduler": state.scheduler.state_dict()})
        _barrier(world)  # every rank's position is stored before the checkpoint is published
        if rank == 0:
            checkpoint.publish(layout.checkpoints, state.step,
                               {"step": state.step, "world": world, "stage": self.cfg.model_dump(mode="json")})
            log.info("checkpoint at step %d", state.step)
            self.writer.flush()
            self.run_sync()

    def finish(self) -> None:
        """Every worker notes what it ended with (its parameters' digest: ranks must agree);
        rank 0 exports the run's pipeline and syncs the last of its files."""
        rank, stepper = self.worker.rank, self.stepper
        digest = {"rank": rank, "step": stepper.state.step, "parameters_sha256": _digest(stepper.model),
                  "position": asdict(stepper.reader.position)}
        storage.atomic_write(self.layout.worker_note(rank), json.dumps(digest))
        if rank == 0:
            self.export(self.layout.export)
            self.writer.close()
            self.run_sync()


def _barrier(world: int) -> None:
    import torch.distributed as dist

    if world > 1 and dist.is_initialized():
        dist.barrier()


def _log_metrics(layout: RunLayout, writer, metrics: dict[str, Any]) -> None:  # noqa: ANN001
    with open(layout.local_metrics, "a") as f:
        f.write(json.dumps(metrics) + "\n")
    for key, value in metrics.items():
        if key != "step" and isinstance(value, (int, float)):
            writer.add_scalar(f"train/{key}", value, metrics["step"])
    log.info("step %d: loss %.4f, lr %.2e, %.1f images/s%s", metrics["step"], metrics["loss"], metrics["lr"],
             metrics["images_per_s"], f", MFU {metrics['mfu']:.1%}" if "mfu" in metrics else
             f", {metrics['tflops_per_s']:.3f} TFLOP/s")


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
    features_cfg = resolved_features(config, cfg.features)
    init = _resolve_init(config, stage)
    # (missing features check the encoders themselves before their own inputs are made)
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
    require_encoders(config, features_cfg)  # the trainer reads both (the VAE's config, T5's)
    # imported only now: seconds of start-up that a stage found trained and exported skips
    from diffusers import AutoencoderKL
    from transformers import T5Config

    vae_config = AutoencoderKL.load_config(storage.local_folder(vae_cfg.model))
    ctx = TrainContext(
        stage=cfg, run_root=layout.root, features_uri=features.uri, init=init, vae_dir=vae_cfg.model,
        resolution=features_cfg.resolution, latent_channels=vae_config["latent_channels"],
        vae_scale_factor=2 ** (len(vae_config["block_out_channels"]) - 1),
        scaling_factor=vae_config.get("scaling_factor", 0.18215),
        sample_sizes=tuple(tuple(size) for size in cfg.sample_sizes) or ((features_cfg.resolution, features_cfg.resolution),),
    )
    if text_cfg is not None:
        embeds, masks = _prompt_embeddings(text_cfg, cfg.validation_prompts)
        ctx = replace(
            ctx, caption_channels=T5Config.from_pretrained(storage.local_folder(text_cfg.model)).d_model,
            text_encoder_dir=text_cfg.model, prompt_embeds=embeds, prompt_masks=masks,
            null_embed=from_stored(npy_array(storage.read_bytes(storage.join(features.uri, NULL_CAPTION)))).numpy())
    else:
        classes = features_cfg.label.classes
        if len(classes) > DIT_NUM_CLASSES:
            raise TrainingError(f"{stage}: {len(classes)} classes; a DiT here has {DIT_NUM_CLASSES} class rows")
        unknown = [name for name in cfg.validation_prompts if name not in classes]
        if unknown:
            raise TrainingError(f"training.stages.{stage}.validation_prompts: {unknown} are not classes of "
                                f"{cfg.features} ({', '.join(classes)})")
        ctx = replace(ctx, classes=classes)
    try:
        start.check(cfg, storage.local_folder(init) if init else None, ctx)
    except start.StartError as exc:
        raise TrainingError(str(exc)) from None
    started = time.monotonic()
    if config.cluster.in_process:
        if cfg.workers != 1:
            raise TrainingError(f"training.stages.{stage}.workers is {cfg.workers}: cluster.in_process trains one worker")
        worker_loop(ctx, this_process_worker())
        summary = _summary(stage, cfg, layout, found, seconds=time.monotonic() - started)
        log.info("%s: %d steps in this process, %.0f s; pipeline %s", stage, cfg.steps, summary["seconds"], layout.export)
        return summary
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer, TorchConfig

    cluster.connect(config.cluster)
    cluster.require_gpus(config.cluster, f"training.stages.{stage}", cfg.gpus_per_worker, "gpus_per_worker", cfg.workers)
    trainer = TorchTrainer(
        ray_worker_loop, train_loop_config={"ctx": ctx},
        torch_config=TorchConfig(backend="nccl" if cfg.gpus_per_worker > 0 else "gloo"),
        scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=cfg.gpus_per_worker > 0,
                                     resources_per_worker={"CPU": cfg.cpus_per_worker, "GPU": cfg.gpus_per_worker}),
        # Ray Train's own storage holds no checkpoints of ours: a folder of the driver's machine
        run_config=RunConfig(name="ray", storage_path=layout.ray_storage,
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
            raise MissingInput(f"training.stages.{stage}.init", f"the starting model {cfg.init} does not exist",
                               "put a diffusers PixArt or DiT folder there (DiT-XL/2's ImageNet weights: "
                               f"`huggingface-cli download facebook/DiT-XL-2-256 --local-dir {cfg.init}` where the hub "
                               f"is reachable), or one of our checkpoints, or set training.stages.{stage}.init")
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
            "pipeline": layout.export, "samples": layout.local_samples, "resumed_from": resumed[0] if resumed else 0}


def _trim_metrics(layout: RunLayout, step: int) -> None:
    """Metrics logged after the checkpoint we resume from will be logged again: drop them. The
    run's own file is the truth (this machine's work copy may be another run's, or none)."""
    kept = [m for m in _read_metrics(layout.metrics) if m["step"] <= step]
    with open(layout.local_metrics + ".tmp", "w") as f:
        f.writelines(json.dumps(m) + "\n" for m in kept)
    os.replace(layout.local_metrics + ".tmp", layout.local_metrics)
    if layout.remote:
        storage.atomic_write(layout.metrics, "".join(json.dumps(m) + "\n" for m in kept))
