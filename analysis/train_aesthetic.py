"""Train LAION's aesthetic-predictor head on the synthetic CLIP, against a synthetic rule.

The scoring stage scores images with improved-aesthetic-predictor's MLP over CLIP ViT-L/14
embeddings (LAION's weights) on a cluster. The offline demo has no ViT-L/14, so it needs the
same head over its own CLIP (``analysis/train_clip.py``); and there are no human ratings of
synthetic scenes, so the target is a rule the synthetic domain defines exactly from the
scene. What the head learns is that rule, not beauty: the card says so.

The rule (``aesthetic_score``), 1 to 10, a caricature of "a bold subject": the shapes fill
the frame and stand out from the background, both visible in the image:

    1 + 4.5 * min(coverage / 0.4, 1)   coverage: the share of the frame the shapes cover
      + 4.5 * min(contrast / 0.5, 1)   contrast: mean |luminance(shape) - luminance(background)|, 0-1

Why this rule: a first one scored plain backgrounds, one large subject and no clutter; the
head learnt it only to Spearman 0.51, because the synthetic CLIP holds texture almost not at
all linearly (a ridge fit over its embeddings reads "plain background" at r 0.57) while it
holds coverage (0.92), background luminance (0.96) and contrast (0.80) well. LAION's head has
no activations, so a target must be linear in the embedding to be learnable at all.

How, and why:
* Embeddings of a fixed set of scenes (``--scenes``, 1 to 6 objects, the CLIP's training
  distribution) computed once through ``clip_models.image_embeddings``, the scoring stage's
  path; the head is trained on them as LAION's was (MSE, Adam, L2-normalised inputs). Fresh
  scenes every step would cost a CLIP forward each and teach a linear head nothing more.
* Held-out scenes come from a disjoint seed stream; reported: Spearman and Pearson
  correlation and MAE against the rule, and the MAE of always answering the mean.
* Deterministic given the seed (scenes, initialisation, shuffling and dropout are seeded).

``python -m analysis.train_aesthetic OUT --clip FOLDER [--scenes N] [--epochs E] [--seed S]``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from analysis import clip_models
from synthetic import scenes

log = logging.getLogger(__name__)

HELD_OUT_STREAM = 1_000_007  # training scenes: (seed, 0, chunk); held-out: (seed, HELD_OUT_STREAM, chunk)
WEIGHTS = "model.safetensors"
FULL_COVERAGE = 0.4  # a frame 40% covered by shapes counts as filled (95th percentile: 0.37)
FULL_CONTRAST = 0.5  # luminance difference counted as standing out fully (95th percentile: 0.59)


def luminance(colour: str) -> float:
    r, g, b = scenes.COLOURS[colour]
    return (0.299 * r + 0.587 * g + 0.114 * b) / 255


def aesthetic_parts(scene: scenes.Scene) -> dict[str, float]:
    """The rule's two parts (0 to 4.5 each), for a viewer or a card to show beside the score."""
    covered = sum(int(mask.sum()) for mask in scenes.render_masks(scene)) / (scene.width * scene.height)
    contrast = float(np.mean([abs(luminance(o.colour) - luminance(scene.background)) for o in scene.objects])) \
        if scene.objects else 0.0
    return {"coverage": 4.5 * min(covered / FULL_COVERAGE, 1.0), "contrast": 4.5 * min(contrast / FULL_CONTRAST, 1.0)}


def aesthetic_score(scene: scenes.Scene) -> float:
    """The synthetic aesthetic target, 1 (small shapes that blend in) to 10 (bold shapes filling the frame)."""
    return 1.0 + sum(aesthetic_parts(scene).values())


@dataclass
class AestheticTrainConfig:
    seed: int = 0
    scenes: int = 16384
    eval_scenes: int = 2048
    max_objects: int = 6
    epochs: int = 40
    batch_size: int = 256
    lr: float = 1e-3


def embedded_scenes(model, processor, seed: int, stream: int, count: int, max_objects: int,  # noqa: ANN001
                    chunk: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """(L2-normalised image embeddings, rule scores) of ``count`` scenes, drawn in chunks."""
    from analysis.train_clip import draw_scenes

    embeddings, targets = [], []
    for index, start in enumerate(range(0, count, chunk)):
        batch = draw_scenes(seed, stream, index, min(chunk, count - start), max_objects)
        embeddings.append(clip_models.image_embeddings(model, processor, [scenes.render(s) for s in batch]))
        targets.append(torch.tensor([aesthetic_score(s) for s in batch]))
    return torch.cat(embeddings), torch.cat(targets)


def measure(predicted: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    from scipy.stats import pearsonr, spearmanr

    p, t = predicted.double().numpy(), target.double().numpy()
    return {"spearman": round(float(spearmanr(p, t).statistic), 4), "pearson": round(float(pearsonr(p, t).statistic), 4),
            "mae": round(float(np.abs(p - t).mean()), 4), "mae_of_mean": round(float(np.abs(t - t.mean()).mean()), 4)}


def clip_fingerprint(folder: str | Path) -> str:
    """Which CLIP a head belongs to: the head is meaningless over any other embeddings."""
    return hashlib.sha256((Path(folder) / "model.safetensors").read_bytes()).hexdigest()[:16]


def train(out: str, clip: str, cfg: AestheticTrainConfig) -> dict:
    from training.script_training import write_model

    started = time.monotonic()
    model, processor = clip_models.load_clip(clip)
    x, y = embedded_scenes(model, processor, cfg.seed, 0, cfg.scenes, cfg.max_objects)
    x_test, y_test = embedded_scenes(model, processor, cfg.seed, HELD_OUT_STREAM, cfg.eval_scenes, cfg.max_objects)
    embed_seconds = time.monotonic() - started
    log.info("embedded %d + %d scenes in %.0f s", len(x), len(x_test), embed_seconds)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        head = clip_models.AestheticHead(x.shape[1])
        optimizer = torch.optim.Adam(head.parameters(), lr=cfg.lr)
        for epoch in range(cfg.epochs):
            head.train()
            for index in torch.randperm(len(x)).split(cfg.batch_size):
                loss = torch.nn.functional.mse_loss(head(x[index]), y[index])
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            if (epoch + 1) % 10 == 0 or epoch + 1 == cfg.epochs:
                log.info("epoch %d/%d: held-out %s", epoch + 1, cfg.epochs, measure(head.eval().score(x_test), y_test))
    head.eval()
    summary = {"input_size": head.input_size, "clip": Path(clip).name, "clip_fingerprint": clip_fingerprint(clip),
               "held_out": measure(head.score(x_test), y_test), "train": measure(head.score(x), y),
               "seconds": round(time.monotonic() - started, 1), "embed_seconds": round(embed_seconds, 1),
               "config": asdict(cfg), "torch": torch.__version__}
    log.info("held-out: %s", summary["held_out"])
    config = {"architecture": "improved-aesthetic-predictor MLP", "input_size": head.input_size,
              "input": "L2-normalised CLIP image embeddings", "clip": summary["clip"],
              "clip_fingerprint": summary["clip_fingerprint"], "target": "synthetic rule (analysis/train_aesthetic.py)",
              "range": [1, 10]}

    def save(tmp: Path) -> None:
        head.save(tmp / WEIGHTS, dtype=torch.float16)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")

    write_model(out, save, summary, model_card(summary))
    return summary


def model_card(summary: dict) -> str:
    cfg, held = summary["config"], summary["held_out"]
    return f"""# synthetic-aesthetic

**What it measures: a synthetic rule, not beauty.** This is LAION's aesthetic-predictor head
(improved-aesthetic-predictor's MLP, same layers and key names) trained by
`python -m analysis.train_aesthetic` (analysis/train_aesthetic.py, seed {cfg['seed']}) over the
{summary['input_size']}-d image embeddings of `{summary['clip']}` (fingerprint `{summary['clip_fingerprint']}`;
over any other CLIP its scores mean nothing) to predict this rule of the synthetic scenes,
1 to 10:

    1 + 4.5 * min(coverage / 0.4, 1)   coverage: the share of the frame the shapes cover
      + 4.5 * min(contrast / 0.5, 1)   contrast: mean |luminance(shape) - luminance(background)|

A score of 10 means shapes covering 40% of the frame or more, far from the background in
brightness; 1 means a few small shapes close to the background's brightness. It is a
caricature of "a bold subject", chosen because both parts can be seen in the image
(`aesthetic_parts(scene)` gives them) and the CLIP's embedding holds both linearly. No
person rated anything; the score says nothing about how good an image looks.

Load: `AestheticHead.from_file(folder)` (`analysis/clip_models.py`); score
`head.score(image_embeddings(clip, processor, images))`. Weights in float16 safetensors.

- Training: {cfg['scenes']} scenes (1-{cfg['max_objects']} objects, 30% textured backgrounds as the generator
  draws them), embedded once; MSE, Adam lr {cfg['lr']}, batch {cfg['batch_size']}, {cfg['epochs']} epochs, dropout as
  LAION's; {summary['seconds']:.0f} s on the 2-vCPU development machine ({summary['embed_seconds']:.0f} s of it embedding).
- Note: the MLP has no activations (LAION's neither), so in use it is one affine map of the
  normalised embedding: what it can learn is what the CLIP embedding holds linearly.

## Against the rule, on {cfg['eval_scenes']} held-out scenes

| measure | value |
|---|---|
| Spearman correlation | {held['spearman']:.3f} |
| Pearson correlation | {held['pearson']:.3f} |
| mean absolute error (score points) | {held['mae']:.2f} |
| mean absolute error of always answering the mean | {held['mae_of_mean']:.2f} |
"""


def main(argv: Sequence[str] | None = None) -> int:
    from training.script_training import script_main, script_parser

    parser = script_parser("python -m analysis.train_aesthetic", __doc__,
                           "output folder (model.safetensors + config.json + card)", AestheticTrainConfig)
    parser.add_argument("--clip", required=True, help="the CLIP folder whose image embeddings the head reads")
    parser.add_argument("--scenes", type=int, default=AestheticTrainConfig.scenes)
    parser.add_argument("--epochs", type=int, default=AestheticTrainConfig.epochs)
    return script_main(parser, argv, lambda args: train(
        args.out, args.clip, AestheticTrainConfig(scenes=args.scenes, epochs=args.epochs, seed=args.seed)))


if __name__ == "__main__":
    sys.exit(main())
