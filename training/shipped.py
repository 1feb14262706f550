"""A trained stage as a shipped model, and sample grids from any exported pipeline.

`ship` turns a stage's export (runs/<stage>/pipeline) into a folder to commit beside the code:
the same PixArtAlphaPipeline with the transformer in float16 (half the bytes; the demo casts it
back to float32 to sample on CPU), a `training.json` of what the run did and a card. When an
alignment evaluation of the export is given (`make eval`'s scores.json), its rates go into the
card, so the card states what the checkpoint's samples follow and how often.

`samples` draws one grid of prompts from a pipeline folder into a folder of its own, keyed by
what made it, so that a second `make demo` finds it and returns at once.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from shardkit import storage
from shardkit.config import PipelinesConfig

log = logging.getLogger(__name__)

CARD = "README.md"
SAMPLE_SEED = 0


def run_summary(config: PipelinesConfig, stage: str, step: int | None = None) -> dict[str, Any]:
    """What runs/<stage> did (up to `step`, if given): steps, images seen, loss first/last,
    images/s and hours."""
    from training.layout import run_layout

    layout = run_layout(config, stage)
    lines = storage.read_text(layout.metrics).splitlines() if storage.exists(layout.metrics) else []
    metrics = [m for m in (json.loads(line) for line in lines if line.strip()) if step is None or m["step"] <= step]
    if not metrics:
        raise FileNotFoundError(f"{layout.metrics}: no metrics; train the stage first (make train-{stage})")
    cfg = config.training.stages[stage]
    devices = hardware(metrics, cfg.batch_size * cfg.grad_accum, cfg.workers)
    return {"stage": stage, "steps": metrics[-1]["step"], "images_seen": sum(d["images"] for d in devices),
            "batch_size": cfg.batch_size, "first_loss": round(metrics[0]["loss"], 4),
            "last_loss": round(metrics[-1]["loss"], 4), "hardware": devices, "config": cfg.model_dump(mode="json")}


def hardware(metrics: list[dict[str, Any]], images_per_worker_step: int, workers: int) -> list[dict[str, Any]]:
    """Steps, images, median images/s and hours per device the run trained on (a logged line covers
    the steps since the one before it). Lines from before devices were logged count as
    `unrecorded`, with the configured number of workers."""
    by_device: dict[str, dict[str, Any]] = {}
    previous = 0
    for m in metrics:
        entry = by_device.setdefault(m.get("device", "unrecorded"), {"steps": 0, "images": 0, "rates": []})
        entry["steps"] += m["step"] - previous
        entry["images"] += (m["step"] - previous) * images_per_worker_step * m.get("world", workers)
        previous = m["step"]
        if m.get("images_per_s"):
            entry["rates"].append(m["images_per_s"])
    out = []
    for device, entry in by_device.items():
        rates = sorted(entry["rates"])
        median = rates[len(rates) // 2] if rates else None
        out.append({"device": device, "steps": entry["steps"], "images": entry["images"], "median_images_per_s": median,
                    "hours": round(entry["images"] / median / 3600, 2) if median else None})
    return out


def ship(config: PipelinesConfig, stage: str, out: str, scores: str | None = None, step: int | None = None) -> str:
    """Copy runs/<stage>/pipeline into `out` (transformer in float16) with training.json, the
    evaluation's scores (if given) and a card; replaces `out` atomically.

    `step` ships the run's export at that step (runs/<stage>/exports/step_N, written every
    `export_every` steps) instead: an interim checkpoint of a run that takes several sessions,
    whose card says how far the run had got."""
    import torch
    from diffusers import PixArtAlphaPipeline

    from shardkit.folders import write_folder
    from training.layout import run_layout

    layout = run_layout(config, stage)
    export = layout.export if step is None else layout.snapshot(step)
    if not storage.exists(storage.join(export, "model_index.json")):
        raise FileNotFoundError(f"{export}: no exported pipeline; run `make train-{stage}` first")
    summary = run_summary(config, stage, step)
    features = config.training.features[config.training.stages[stage].features]
    summary["features"] = features.model_dump(mode="json")
    summary["dataset"] = config.datasets[features.dataset].model_dump(mode="json")
    evaluation = json.loads(Path(scores).read_text()) if scores else None
    pipe = PixArtAlphaPipeline.from_pretrained(storage.local_folder(export))
    pipe.transformer.to(torch.float16)

    def write(tmp: Path) -> None:
        pipe.save_pretrained(tmp, safe_serialization=True)
        (tmp / "training.json").write_text(json.dumps(summary, indent=2) + "\n")
        if evaluation is not None:
            (tmp / "alignment.json").write_text(json.dumps(evaluation, indent=2) + "\n")
        (tmp / CARD).write_text(model_card(Path(out).name, summary, evaluation))

    write_folder(Path(out), write)
    log.info("shipped %s as %s", stage, out)
    return out


def model_card(name: str, summary: dict, evaluation: dict | None) -> str:
    cfg, data = summary["config"], summary["dataset"]
    lines = [
        f"# {name}",
        "",
        f"A diffusers `PixArtAlphaPipeline` trained by `make train-{summary['stage']}` (training stage "
        f"`{summary['stage']}` of pipelines.yaml) on this project's synthetic scenes, for the embedded demo and "
        "`make eval`. Its text encoder (`synthetic-t5`) and VAE (`synthetic-vae`) were trained here too; "
        "their cards are in training/models/. The transformer is stored in float16.",
        "",
        "## Training",
        f"- Model: {cfg['model']} (PixArtTransformer2DModel), from scratch, {cfg['features']} features at "
        f"{summary['features']['resolution']} px.",
        f"- Data: {data['count']} scenes of {data['min_objects']}-{data['max_objects']} objects "
        f"(dataset seed {data['seed']}), captioned by their exact descriptions.",
        f"- {summary['steps']} steps of {summary['batch_size']} ({summary['images_seen']:,} images seen)"
        + (f", an interim export of a run planned for {cfg['steps']} steps" if cfg["steps"] > summary["steps"] else "")
        + "; "
        f"AdamW lr {cfg['lr']}, EMA {cfg['ema_decay']}, caption dropout {cfg['caption_dropout']}; loss "
        f"{summary['first_loss']} -> {summary['last_loss']}.",
        "- Trained on: " + "; ".join(
            f"{h['device']}, {h['steps']} steps at a median {h['median_images_per_s']} images/s "
            f"(about {h['hours']} hours)" for h in summary["hardware"]) + ".",
    ]
    if evaluation is not None:
        lines += ["", "## What its samples follow (make eval)", "", evaluation_table(evaluation), "",
                  "A rate inside its chance level's reach means the samples do not follow that part of the prompt."]
    return "\n".join(lines) + "\n"


def evaluation_table(evaluation: dict) -> str:
    """The alignment scores as a Markdown table: category, rate, 95% interval, chance, n."""
    rows = ["| category | pass rate | 95% interval | chance | judged |", "|---|---|---|---|---|"]
    for category, score in evaluation["categories"].items():
        low, high = score["ci95"]
        chance = "-" if score.get("chance") is None else f"{score['chance']:.1%}"
        rows.append(f"| {category} | {score['score']:.1%} | {low:.1%}-{high:.1%} | {chance} | {score['n']} |")
    s = evaluation.get("settings", {})
    note = (f"{s.get('prompts_per_category')} held-out prompts per category x seeds {s.get('seeds')}, "
            f"{s.get('steps')} sampling steps, guidance {s.get('guidance_scale')}, {s.get('resolution')} px; "
            "judged by analysis/scene_check.py (its own accuracy: docs/evaluation.md). Chance: a model that "
            "draws the domain well but ignores the prompt.")
    return "\n".join(rows) + f"\n\n{note}"


def samples(folder: str, prompts: list[str], out: str, *, steps: int = 20, guidance_scale: float = 4.5,
            size: int | None = None) -> str:
    """A grid (one column per prompt) from the pipeline in `folder` into `out`/grid.png with
    prompts.json beside it; kept when the same pipeline weights, prompts and settings made it."""
    settings = {"prompts": prompts, "steps": steps, "guidance_scale": guidance_scale, "seed": SAMPLE_SEED,
                "size": size, "weights": _weights_digest(folder)}
    record, grid = Path(out) / "prompts.json", Path(out) / "grid.png"
    if record.is_file() and grid.is_file() and json.loads(record.read_text()) == settings:
        log.info("samples of %s are up to date in %s", folder, out)
        return str(grid)
    # torch and diffusers only now: a grid found up to date needs neither
    from training.conditioning import _save_grid
    from training.encoders import vae_scale_factor
    from training.pipelines import generate, load_pipeline

    pipe = load_pipeline(folder, device="cpu")
    pipe.transformer.float()
    side = size or pipe.transformer.config.sample_size * vae_scale_factor(pipe.vae)
    images = generate(pipe, prompts, height=side, width=side, steps=steps, guidance_scale=guidance_scale,
                      seed=SAMPLE_SEED)
    _save_grid(images, str(grid))
    record.write_text(json.dumps(settings, indent=2) + "\n")
    log.info("wrote %d samples of %s to %s", len(images), folder, grid)
    return str(grid)


def _weights_digest(folder: str) -> str:
    digest = hashlib.sha256()
    for path in sorted(Path(folder).glob("*/*.safetensors")):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]
