"""The PixArt-α trainer: one loop for every stage, run by Ray Train's TorchTrainer (DDP).

The driver (`train`) prepares what the workers need: the feature stage (made first if
missing), the run folders, the validation prompts' embeddings. Each worker (`worker_loop`)
trains on its own disjoint shards; rank 0 logs, samples and exports. Stages differ by
config only.
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
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from shardkit import cluster, pipeline, storage
from shardkit.config import PipelinesConfig, StageConfig
from shardkit.shards import StageOutput
from training import checkpoint
from training.data import FeatureReader, Position, collate
from training.diffusion import Diffusion
from training.features import NULL_CAPTION, from_stored, load_text_encoder, npy_array, stage_name

log = logging.getLogger(__name__)

PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "V100": 125e12}


class TrainingError(RuntimeError):
    pass


@dataclass
class RunLayout:
    root: str

    @property
    def checkpoints(self) -> str:
        return os.path.join(self.root, "checkpoints")

    @property
    def samples(self) -> str:
        return os.path.join(self.root, "samples")

    @property
    def export(self) -> str:
        return os.path.join(self.root, "pipeline")

    @property
    def metrics(self) -> str:
        return os.path.join(self.root, "metrics.jsonl")

    @property
    def tensorboard(self) -> str:
        return os.path.join(self.root, "tensorboard")


def run_layout(config: PipelinesConfig, stage: str) -> RunLayout:
    root = storage.join(config.storage.root, "runs", stage)
    if not storage.is_local(root):
        raise TrainingError(f"runs/{stage}: training writes checkpoints to a local or mounted folder, not {root}")
    return RunLayout(os.path.abspath(root))


def _peak_flops(cfg: StageConfig, device: torch.device) -> float | None:
    if cfg.peak_flops:
        return cfg.peak_flops
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return next((v for k, v in PEAK_FLOPS.items() if k in name), None)
    return None


def _init_folder(init: str) -> str:
    """A diffusers pipeline folder's transformer, or a transformer folder itself."""
    return os.path.join(init, "transformer") if os.path.isdir(os.path.join(init, "transformer")) else init


def _check_init(cfg: StageConfig, ctx: dict[str, Any]) -> None:
    """Refuse, before any worker starts, a starting model that cannot read these features."""
    from diffusers import PixArtTransformer2DModel

    if not cfg.init or os.path.exists(os.path.join(cfg.init, "state.pt")):
        return  # a checkpoint of ours: built from the registry with these features' sizes
    model_cfg = PixArtTransformer2DModel.load_config(_init_folder(cfg.init))
    if model_cfg["caption_channels"] != ctx["caption_channels"]:
        raise TrainingError(f"{cfg.init}: the model takes {model_cfg['caption_channels']}-dim captions, the features "
                            f"hold {ctx['caption_channels']}-dim T5 embeddings: use the text encoder it was trained with")
    if model_cfg["in_channels"] != ctx["latent_channels"]:
        raise TrainingError(f"{cfg.init}: the model takes {model_cfg['in_channels']} latent channels, "
                            f"the VAE makes {ctx['latent_channels']}")


def _build_model(ctx: dict[str, Any]):  # -> PixArtTransformer2DModel
    """From `init` (one of our checkpoints, a diffusers pipeline or transformer folder) or new."""
    from diffusers import PixArtTransformer2DModel

    cfg = StageConfig(**ctx["stage"])
    if cfg.init and os.path.exists(os.path.join(cfg.init, "state.pt")):
        # one of our checkpoints: the registry model with the checkpoint's EMA weights
        model = _build_registry_model(cfg, ctx)
        model.load_state_dict(checkpoint.load(cfg.init, rank=-1)[0]["ema"])
        return model
    if cfg.init:
        return PixArtTransformer2DModel.from_pretrained(_init_folder(cfg.init))
    return _build_registry_model(cfg, ctx)


def _build_registry_model(cfg: StageConfig, ctx: dict[str, Any]):  # -> PixArtTransformer2DModel
    from training.models import build_transformer

    return build_transformer(cfg.model, resolution=ctx["resolution"], latent_channels=ctx["latent_channels"],
                             caption_channels=ctx["caption_channels"], learned_sigma=cfg.learned_sigma,
                             vae_scale_factor=ctx["vae_scale_factor"], seed=cfg.seed)


def _flops_per_image(model, ctx: dict[str, Any]) -> float:  # noqa: ANN001
    """Training FLOPs per image: 6 x parameters x image tokens (forward and backward of the
    dense layers; attention's own matmuls are left out, so MFU is slightly understated)."""
    tokens = (ctx["resolution"] // ctx["vae_scale_factor"] // model.config.patch_size) ** 2
    return 6.0 * sum(p.numel() for p in model.parameters()) * tokens


def _digest(model) -> str:  # noqa: ANN001
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


def worker_loop(ctx: dict[str, Any]) -> None:
    """Runs on every Ray Train worker."""
    import ray.train
    import ray.train.torch

    cfg = StageConfig(**ctx["stage"])
    layout = RunLayout(ctx["run_root"])
    rank, world = ray.train.get_context().get_world_rank(), ray.train.get_context().get_world_size()
    device = ray.train.torch.get_device()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")

    model = _build_model(ctx)
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
    ddp_model = ray.train.torch.prepare_model(model)
    base_model = ddp_model.module if hasattr(ddp_model, "module") else ddp_model

    features = StageOutput(ctx["features_uri"])
    reader = FeatureReader(features, rank, world, cfg.seed, cfg.shuffle_buffer, position)
    batches = reader.batches(cfg.batch_size)
    diffusion = Diffusion(learned_sigma=cfg.learned_sigma)
    null_text = from_stored(npy_array(storage.read_bytes(storage.join(ctx["features_uri"], NULL_CAPTION))))
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision)
    scaler = torch.amp.GradScaler(enabled=cfg.precision == "fp16" and device.type == "cuda")
    flops = _flops_per_image(base_model, ctx)
    peak = _peak_flops(cfg, device)
    writer = None
    if rank == 0:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(layout.tensorboard)
    window_start, window_images, skipped_nan = time.perf_counter(), 0, 0

    while step < cfg.steps:
        losses = []
        for micro in range(cfg.grad_accum):
            batch = next(batches)
            batch = _drop_captions(batch, null_text, cfg.caption_dropout)
            x0 = (batch["mean"] + batch["std"] * torch.randn_like(batch["std"])).to(device) * ctx["scaling_factor"]
            t = diffusion.sample_timesteps(len(x0), device=device)
            noise = torch.randn_like(x0)
            x_t = diffusion.q_sample(x0, t, noise)
            sync = micro == cfg.grad_accum - 1 or not hasattr(ddp_model, "no_sync")
            context = ddp_model.no_sync() if not sync else contextlib.nullcontext()
            with context, torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
                out = ddp_model(x_t, encoder_hidden_states=batch["text"].to(device),
                                encoder_attention_mask=batch["mask"].to(device), timestep=t,
                                added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)[0]
                loss, parts = diffusion.loss(out, x0, x_t, t, noise)
            scaler.scale(loss / cfg.grad_accum).backward()
            losses.append(parts)
        if not all(math.isfinite(p["mse"]) for p in losses):
            # a NaN/inf step is skipped and counted, never applied; many in a row stop the run
            optimizer.zero_grad(set_to_none=True)
            skipped_nan += 1
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
            for e, p in zip(ema.parameters(), base_model.parameters()):
                e.lerp_(p.detach(), 1.0 - cfg.ema_decay)
        step += 1
        window_images += cfg.batch_size * cfg.grad_accum * world

        if step % cfg.log_every == 0 or step == cfg.steps:
            elapsed = time.perf_counter() - window_start
            rate = window_images / max(elapsed, 1e-9)
            metrics = {"step": step, "loss": float(np.mean([p["mse"] + p.get("vb", 0.0) for p in losses])),
                       "mse": float(np.mean([p["mse"] for p in losses])), "lr": scheduler.get_last_lr()[0],
                       "grad_norm": grad_norm, "images_per_s": round(rate, 2),
                       "tflops_per_s": round(rate * flops / 1e12, 4), "skipped_nan": skipped_nan,
                       "skipped_samples": reader.skipped,
                       "epoch": reader.position.epoch}
            if peak:
                metrics["mfu"] = round(rate * flops / (peak * world), 4)
            if rank == 0:
                _log_metrics(layout, writer, metrics)
            window_start, window_images = time.perf_counter(), 0
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            _save_checkpoint(layout, step, rank, world, base_model, ema, optimizer, scheduler, reader.position, cfg)
        if rank == 0 and (step % cfg.sample_every == 0 or step == cfg.steps):
            _sample_grid(ema, ctx, os.path.join(layout.samples, f"step_{step:06d}.png"), cfg)
            ema.to(device)

    digest = {"rank": rank, "step": step, "parameters_sha256": _digest(base_model), "position": asdict(reader.position)}
    with open(os.path.join(layout.root, f"worker{rank}.json"), "w") as f:
        json.dump(digest, f)
    if rank == 0:
        from training.models import export_pipeline

        export_pipeline(layout.export, transformer=ema.to("cpu").float(), text_encoder_dir=ctx["text_encoder_dir"],
                        vae_dir=ctx["vae_dir"])
        writer.close()


def _barrier(world: int) -> None:
    import torch.distributed as dist

    if world > 1 and dist.is_initialized():
        dist.barrier()


def _lock_run(layout: RunLayout, timeout_s: float = 300.0):  # -> an open file holding the lock
    import fcntl

    handle = open(os.path.join(layout.root, ".lock"), "w")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return handle
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise TrainingError(f"{layout.root} is in use by another training process") from None
            time.sleep(0.5)


def _drop_captions(batch: dict[str, torch.Tensor], null_text: torch.Tensor, probability: float) -> dict[str, torch.Tensor]:
    """Classifier-free guidance training: some captions become the empty caption's embedding,
    exactly what the pipeline feeds as the unconditional input at sampling time."""
    if probability <= 0:
        return batch
    drop = torch.rand(len(batch["text"])) < probability
    if not drop.any():
        return batch
    items = [{"mean": batch["mean"][i], "std": batch["std"][i],
              "text": null_text if drop[i] else batch["text"][i][: int(batch["mask"][i].sum())]} for i in range(len(drop))]
    return collate(items)


def _log_metrics(layout: RunLayout, writer, metrics: dict[str, Any]) -> None:  # noqa: ANN001
    with open(layout.metrics, "a") as f:
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
                      "scheduler": scheduler.state_dict()},
            {"step": step, "world": world, "stage": cfg.model_dump(mode="json")})
    _barrier(world)  # every rank's position is on disk before the checkpoint is published
    if rank == 0:
        checkpoint.publish(layout.checkpoints, step)
        log.info("checkpoint at step %d", step)


def _sample_grid(ema, ctx: dict[str, Any], path: str, cfg: StageConfig) -> None:  # noqa: ANN001
    """Validation prompts through PixArtAlphaPipeline with the EMA weights and precomputed
    prompt embeddings, so no text encoder has to stay loaded on the trainer."""
    from diffusers import AutoencoderKL, PixArtAlphaPipeline
    from PIL import Image

    from training.models import default_scheduler

    if "_vae" not in ctx:
        ctx["_vae"] = AutoencoderKL.from_pretrained(ctx["vae_dir"])
    pipe = PixArtAlphaPipeline(tokenizer=None, text_encoder=None, vae=ctx["_vae"], transformer=ema.float().to("cpu"),
                               scheduler=default_scheduler())
    pipe.set_progress_bar_config(disable=True)
    prompts = torch.from_numpy(ctx["prompt_embeds"]).float()
    masks = torch.from_numpy(ctx["prompt_masks"]).long()
    null = torch.zeros_like(prompts)
    null_mask = torch.zeros_like(masks)
    null_text = torch.from_numpy(ctx["null_embed"]).float()
    null[:, : len(null_text)], null_mask[:, : len(null_text)] = null_text, 1
    size = ctx["resolution"]
    with torch.inference_mode():
        images = pipe(prompt=None, negative_prompt=None, prompt_embeds=prompts, prompt_attention_mask=masks,
                      negative_prompt_embeds=null,
                      negative_prompt_attention_mask=null_mask, height=size, width=size,
                      num_inference_steps=cfg.sample_steps, guidance_scale=cfg.guidance_scale,
                      generator=torch.Generator("cpu").manual_seed(0), use_resolution_binning=False,
                      output_type="pil").images
    grid = Image.new("RGB", (size * len(images), size))
    for i, image in enumerate(images):
        grid.paste(image, (i * size, 0))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    grid.save(path + ".tmp.png")
    os.replace(path + ".tmp.png", path)


def _prompt_embeddings(text_cfg, prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:  # noqa: ANN001
    tokenizer, encoder = load_text_encoder(text_cfg, "cpu")
    tokens = tokenizer(prompts, max_length=text_cfg.max_length, truncation=True, padding="max_length", return_tensors="pt")
    with torch.inference_mode():
        hidden = encoder(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).last_hidden_state
    return hidden.float().numpy(), tokens.attention_mask.numpy()


def train(config: PipelinesConfig, stage: str, restart: bool = False) -> dict[str, Any]:
    """Train `training.stages.<stage>`, resuming from its last checkpoint; returns a summary."""
    from diffusers import AutoencoderKL
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer, TorchConfig
    from transformers import T5Config

    if stage not in config.training.stages:
        raise TrainingError(f"training.stages: no stage {stage!r}; defined: {', '.join(config.training.stages) or 'none'}")
    cfg = config.training.stages[stage]
    features_cfg = config.training.features[cfg.features]
    features = pipeline.ensure(config, features_cfg.dataset, stage_name(cfg.features))
    text_cfg, vae_cfg = config.training.text_encoders[features_cfg.text_encoder], config.training.vaes[features_cfg.vae]
    layout = run_layout(config, stage)
    if restart and os.path.exists(layout.root):
        shutil.rmtree(layout.root)
    os.makedirs(layout.root, exist_ok=True)
    found = checkpoint.latest(layout.checkpoints)
    if found and found[0] >= cfg.steps and os.path.exists(os.path.join(layout.export, "model_index.json")):
        log.info("%s: already trained to step %d and exported to %s", stage, found[0], layout.export)
        return _summary(stage, cfg, layout, found, seconds=0.0)
    vae_config = AutoencoderKL.load_config(vae_cfg.model)
    embeds, masks = _prompt_embeddings(text_cfg, cfg.validation_prompts)
    ctx = {
        "stage": cfg.model_dump(mode="json"), "run_root": layout.root, "features_uri": features.uri,
        "resolution": features_cfg.resolution, "latent_channels": vae_config["latent_channels"],
        "vae_scale_factor": 2 ** (len(vae_config["block_out_channels"]) - 1),
        "scaling_factor": vae_config.get("scaling_factor", 0.18215),
        "caption_channels": T5Config.from_pretrained(text_cfg.model).d_model,
        "text_encoder_dir": text_cfg.model, "vae_dir": vae_cfg.model,
        "prompt_embeds": embeds, "prompt_masks": masks,
        "null_embed": from_stored(npy_array(storage.read_bytes(storage.join(features.uri, NULL_CAPTION)))).numpy(),
    }
    _check_init(cfg, ctx)
    cluster.connect(config.cluster)
    started = time.monotonic()
    trainer = TorchTrainer(
        worker_loop, train_loop_config=ctx,
        torch_config=TorchConfig(backend="nccl" if cfg.gpus_per_worker > 0 else "gloo"),
        scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=cfg.gpus_per_worker > 0,
                                     resources_per_worker={"CPU": cfg.cpus_per_worker, "GPU": cfg.gpus_per_worker}),
        run_config=RunConfig(name="ray", storage_path=os.path.join(layout.root, "ray"),
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


def _summary(stage: str, cfg: StageConfig, layout: RunLayout, resumed: tuple[int, str] | None, seconds: float) -> dict[str, Any]:
    metrics = [json.loads(line) for line in open(layout.metrics)] if os.path.exists(layout.metrics) else []
    return {"stage": stage, "steps": cfg.steps, "first_loss": metrics[0]["loss"] if metrics else None,
            "last_loss": metrics[-1]["loss"] if metrics else None, "seconds": round(seconds, 1),
            "pipeline": layout.export, "samples": layout.samples, "resumed_from": resumed[0] if resumed else 0}


def _trim_metrics(layout: RunLayout, step: int) -> None:
    """Metrics logged after the checkpoint we resume from will be logged again: drop them."""
    if not os.path.exists(layout.metrics):
        return
    kept = [line for line in open(layout.metrics) if line.strip() and json.loads(line)["step"] <= step]
    with open(layout.metrics + ".tmp", "w") as f:
        f.writelines(kept)
    os.replace(layout.metrics + ".tmp", layout.metrics)
