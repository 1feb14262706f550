"""Train the synthetic domain's CLIP: transformers' ``CLIPModel``, from scratch, here.

The scoring stage measures image-text agreement (CLIP score) and feeds an aesthetic head
with CLIP image embeddings. On a cluster that is a hub CLIP (ViT-L/14); the offline demo needs
one that knows the synthetic scenes, so this trains a small one on them and their exact
descriptions (``scenes.describe``), saved as a normal model folder (``CLIPModel`` +
``CLIPProcessor``) that loads exactly as a hub CLIP does (``analysis.clip_models.load_clip``).

Choices, and why:
* Small (``clip_models.ClipSpec``: 64 px, 8 px patches, narrow towers): the 2-vCPU machine
  trains it in about 25 minutes, and flat shapes in 12 colours need no more.
* The symmetric InfoNCE loss of CLIP over the batch, with CLIP's learnt temperature (capped at
  100). Plus, for the image->text half only, hard negative captions (3 per image): the same
  scene with one fact changed (an object's colour, kind or size, the background's colour or
  texture, or two objects' colours swapped), as NegCLIP does (Yuksekgonul et al., ICLR 2023).
  Random in-batch captions almost never differ from the right one by a single object's
  kind, so without them a CLIP learns the background and a bag of words, not which object
  is which. ``--hard-negatives 0`` trains plain CLIP.
* Scenes of 1 to 6 objects: the demo scores both sample-laion (1-3) and sample-sam (3-6).
* Fresh scenes every step (seeded by step; held-out scenes from a disjoint seed stream);
  deterministic given the seed; resumable (``training.checkpoint.ScriptState``).

``python -m analysis.train_clip OUT [--steps N] [--seed S]``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from analysis import clip_models
from synthetic import scenes

log = logging.getLogger(__name__)

HELD_OUT_STREAM = 1_000_003  # held-out scenes: seeds (seed, HELD_OUT_STREAM, i); training uses stream 0
NEGATIVE_STREAM = 17  # the hard negatives' own seed stream, so they never shift the scenes
TRAIN_CHANGES = ("colour", "kind", "size", "background", "texture", "binding")
EVAL_CHANGES = (*TRAIN_CHANGES, "position")  # position is measured, never trained against


@dataclass(frozen=True)
class ClipTrainConfig(clip_models.ClipSpec):
    """The model's shape (ClipSpec's fields) and how it is trained."""

    seed: int = 0
    steps: int = 1000
    batch_size: int = 128
    lr: float = 2e-3
    warmup_steps: int = 50
    weight_decay: float = 0.05
    max_objects: int = 6
    hard_negatives: int = 3  # per image, each a different kind of change; 0: plain CLIP
    eval_scenes: int = 256
    log_every: int = 25
    checkpoint_every: int = 100

    def spec(self) -> clip_models.ClipSpec:
        return clip_models.ClipSpec(**{f.name: getattr(self, f.name) for f in dataclasses.fields(clip_models.ClipSpec)})


# --------------------------------------------------------------------------- data
def draw_scenes(seed: int, stream: int, index: int, count: int, max_objects: int) -> list[scenes.Scene]:
    rng = np.random.default_rng([seed, stream, index])
    options = scenes.SceneOptions(min_objects=1, max_objects=max_objects)
    return [scenes.sample_scene(rng, options) for _ in range(count)]


def changed(scene: scenes.Scene, what: str, rng: np.random.Generator) -> scenes.Scene | None:
    """``scene`` with one fact changed (``what`` in EVAL_CHANGES), or None where that change
    does not apply (binding needs two objects of different colours and kinds). The result is a
    scene the generator could draw (object colours never equal the background), so its
    description is a fluent, wrong caption of the original image."""
    objects = list(scenes.reading_order(scene.objects))
    i = int(rng.integers(len(objects))) if objects else 0
    pick = lambda options: str(rng.choice(sorted(options)))  # noqa: E731
    if what == "background":
        return dataclasses.replace(scene, background=pick(set(scenes.COLOURS) - {o.colour for o in objects} - {scene.background}))
    if what == "texture":
        return dataclasses.replace(scene, texture=pick(set(scenes.TEXTURES) - {scene.texture}))
    if not objects:
        return None
    o = objects[i]
    if what == "colour":
        objects[i] = dataclasses.replace(o, colour=pick(set(scenes.COLOURS) - {o.colour, scene.background}))
    elif what == "kind":
        objects[i] = dataclasses.replace(o, kind=pick(set(scenes.KINDS) - {o.kind}))
    elif what == "size":
        objects[i] = dataclasses.replace(o, size=pick(set(scenes.SIZES) - {o.size}))
    elif what == "position":
        objects[i] = dataclasses.replace(o, position=pick(set(scenes.POSITIONS) - {o.position}))
    elif what == "binding":
        pairs = [(a, b) for a in range(len(objects)) for b in range(a + 1, len(objects))
                 if objects[a].colour != objects[b].colour and objects[a].kind != objects[b].kind]
        if not pairs:
            return None
        a, b = pairs[int(rng.integers(len(pairs)))]
        objects[a], objects[b] = (dataclasses.replace(objects[a], colour=objects[b].colour),
                                  dataclasses.replace(objects[b], colour=objects[a].colour))
    else:
        raise ValueError(f"unknown change {what!r}")
    return dataclasses.replace(scene, objects=tuple(objects))


def hard_negatives(scene: scenes.Scene, rng: np.random.Generator, count: int) -> list[str]:
    """``count`` captions of ``scene``, each with a different kind of fact changed."""
    out = []
    for what in rng.permutation(TRAIN_CHANGES):
        if len(out) == count:
            break
        other = changed(scene, str(what), rng)
        if other is not None:
            out.append(scenes.describe(other))
    return out  # always `count` for count <= 5: only binding can fail to apply


def training_batch(processor, cfg: ClipTrainConfig, step: int) -> dict[str, torch.Tensor]:  # noqa: ANN001
    batch = draw_scenes(cfg.seed, 0, step, cfg.batch_size, cfg.max_objects)
    texts = [scenes.describe(s) for s in batch]
    rng = np.random.default_rng([cfg.seed, NEGATIVE_STREAM, step])
    texts += [text for s in batch for text in hard_negatives(s, rng, cfg.hard_negatives)]
    tokens = processor(text=texts, padding=True, return_tensors="pt")
    pixels = processor(images=[scenes.render(s) for s in batch], return_tensors="pt")["pixel_values"]
    return {"pixel_values": pixels, "input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]}


def contrastive_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:  # noqa: ANN001
    """CLIP's symmetric InfoNCE; texts beyond the images' count are extra negatives for the
    image->text half only (each image's hard negative)."""
    images = clip_models.image_features(model, batch["pixel_values"])
    texts = clip_models.text_features(model, batch)
    n = len(images)
    logits = model.logit_scale.exp().clamp(max=100) * images @ texts.T  # (n, n or 2n)
    target = torch.arange(n)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits[:, :n].T, target)) / 2


# --------------------------------------------------------------------------- evaluation
def evaluate(model, processor, seed: int = 0, count: int = 256, max_objects: int = 6,  # noqa: ANN001
             stream: int = HELD_OUT_STREAM) -> dict:
    """On ``count`` held-out scenes, through the scoring stage's own functions: retrieval among
    their ``count`` captions (image->text top-1/top-5, text->image top-1), and for each kind
    of change, how often the true caption scores above the changed one (chance 50%) with the
    mean cosine of each."""
    truths = draw_scenes(seed, stream, 0, count, max_objects)
    was_training = model.training
    model.eval()
    images = clip_models.image_embeddings(model, processor, [scenes.render(s) for s in truths])
    captions = clip_models.text_embeddings(model, processor, [scenes.describe(s) for s in truths])
    sims = images @ captions.T
    ranks = (sims > sims.diag()[:, None]).sum(1)  # how many captions beat the right one
    out: dict = {"scenes": count, "i2t_top1": ranks.eq(0).float().mean().item(),
                 "i2t_top5": ranks.lt(5).float().mean().item(),
                 "t2i_top1": (sims.T > sims.diag()[:, None]).sum(1).eq(0).float().mean().item(), "changes": {}}
    rng = np.random.default_rng([seed, stream, 1])
    for what in EVAL_CHANGES:
        pairs = [(i, changed(s, what, rng)) for i, s in enumerate(truths)]
        pairs = [(i, other) for i, other in pairs if other is not None]
        index = torch.tensor([i for i, _ in pairs])
        wrong = (images[index] * clip_models.text_embeddings(
            model, processor, [scenes.describe(o) for _, o in pairs])).sum(-1)
        right = sims.diag()[index]
        out["changes"][what] = {"pairs": len(pairs), "true_above": (right > wrong).float().mean().item(),
                                "cos_true": right.mean().item(), "cos_changed": wrong.mean().item()}
    model.train(was_training)
    return _rounded(out)


def _rounded(x):  # noqa: ANN001, ANN202
    return {k: _rounded(v) for k, v in x.items()} if isinstance(x, dict) else round(x, 4) if isinstance(x, float) else x


# --------------------------------------------------------------------------- training
def train(out: str, cfg: ClipTrainConfig) -> dict:
    """Train (resuming from ``out``'s interrupted state), evaluate, save model + processor + card."""
    from training.script_training import ScriptRun

    run = ScriptRun(out, cfg.seed, log)
    processor = clip_models.build_processor(cfg.spec())
    model = clip_models.build_model(cfg.spec(), processor.tokenizer, cfg.seed)
    # no weight decay on norms, biases, embeddings' scale: CLIP's recipe
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": rest, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)
    run.resume(model, optimizer)
    parameters = sum(p.numel() for p in model.parameters())
    log.info("CLIP: %.2fM parameters, vocab %d; %d steps of %d", parameters / 1e6, len(processor.tokenizer),
             cfg.steps, cfg.batch_size)

    def report(loss: torch.Tensor) -> tuple[dict, str]:
        return ({"loss": round(loss.item(), 4), "logit_scale": round(model.logit_scale.exp().item(), 2)},
                f"loss {loss.item():.4f}")

    seconds = run.train(lambda step: contrastive_loss(model, training_batch(processor, cfg, step)), steps=cfg.steps,
                        batch_size=cfg.batch_size, lr=cfg.lr, warmup_steps=cfg.warmup_steps, floor=0.05,
                        log_every=cfg.log_every, checkpoint_every=cfg.checkpoint_every, report=report)
    metrics = evaluate(model, processor, cfg.seed, cfg.eval_scenes, cfg.max_objects)
    log.info("held-out: %s", json.dumps(metrics))
    summary = {"parameters": parameters, "vocab_size": len(processor.tokenizer), "steps": cfg.steps,
               "batch_size": cfg.batch_size, "train_seconds_this_run": round(seconds, 1), "held_out": metrics,
               "median_images_per_s": run.median_rate(), "config": asdict(cfg), "torch": torch.__version__}

    def save(tmp: Path) -> None:
        model.to(torch.float16).save_pretrained(tmp, safe_serialization=True)  # half the bytes; loads as float32
        processor.save_pretrained(tmp)

    run.finish(save, summary, model_card(summary))
    return summary


def model_card(summary: dict) -> str:
    cfg, held = summary["config"], summary["held_out"]
    rows = "\n".join(f"| {k} | {v['pairs']} | {v['true_above']:.1%} | {v['cos_true']:.3f} | {v['cos_changed']:.3f} |"
                     for k, v in held["changes"].items())
    negatives = (f"plus {cfg['hard_negatives']} hard negative captions per image (each with one fact changed) in"
                 " the image->text half" if cfg["hard_negatives"] else "no hard negatives")
    return f"""# synthetic-clip

A transformers `CLIPModel` ({summary['parameters'] / 1e6:.2f}M parameters: ViT {cfg['vision_layers']} layers x {cfg['vision_width']} on
{cfg['image_size']} px images in {cfg['patch_size']} px patches; text transformer {cfg['text_layers']} layers x {cfg['text_width']}; joint
space {cfg['projection_dim']}) and its `CLIPProcessor`, trained from scratch by `python -m analysis.train_clip`
(analysis/train_clip.py, seed {cfg['seed']}) on this project's synthetic scenes and their exact
descriptions. It measures how well a caption in the synthetic grammar states a synthetic
scene: backgrounds, objects' colours, kinds and sizes. It knows no other words (they become
`<unk>`) and no other images: for the offline demo only, in place of a hub CLIP.

Load: `analysis.clip_models.load_clip(folder)`, or `CLIPModel.from_pretrained(folder)` and
`AutoProcessor.from_pretrained(folder)`. Images are squashed to {cfg['image_size']}x{cfg['image_size']} (no crop);
the tokenizer is word level over the grammar (`PreTrainedTokenizerFast`, saved as
`TokenizersBackend`). Weights stored in float16.

- Training: {summary['steps']} steps of {summary['batch_size']} fresh scenes (1-{cfg['max_objects']} objects), CLIP's symmetric
  InfoNCE with a learnt temperature, {negatives}; AdamW lr {cfg['lr']} (warm-up, cosine to 5%),
  float32 on CPU, about {summary['median_images_per_s'] or float('nan'):.0f} images/s,
  {summary['train_seconds_this_run'] / 60:.0f} minutes on the 2-vCPU development machine.

## Held-out scenes ({held['scenes']}, never drawn in training)

Retrieval among their {held['scenes']} captions: image->text top-1 {held['i2t_top1']:.1%}, top-5 {held['i2t_top5']:.1%};
text->image top-1 {held['t2i_top1']:.1%} (chance {1 / held['scenes']:.1%} and {5 / held['scenes']:.1%}).

The true caption against the same caption with one fact changed (chance 50%): `binding`
swaps two objects' colours; `position` was never trained against.

| change | pairs | true caption scores higher | mean cos, true | mean cos, changed |
|---|---|---|---|---|
{rows}
"""


def main(argv: Sequence[str] | None = None) -> int:
    from training.script_training import script_main, script_parser

    parser = script_parser("python -m analysis.train_clip", __doc__, "output folder (a CLIPModel + CLIPProcessor + card)",
                           ClipTrainConfig)
    parser.add_argument("--batch-size", type=int, default=ClipTrainConfig.batch_size)
    parser.add_argument("--lr", type=float, default=ClipTrainConfig.lr)
    parser.add_argument("--max-objects", type=int, default=ClipTrainConfig.max_objects)
    parser.add_argument("--hard-negatives", type=int, default=ClipTrainConfig.hard_negatives,
                        help="changed captions per image in the image->text half (0: plain CLIP)")
    parser.add_argument("--eval-scenes", type=int, default=ClipTrainConfig.eval_scenes)
    return script_main(parser, argv, lambda args: train(args.out, ClipTrainConfig(
        steps=args.steps, batch_size=args.batch_size, seed=args.seed, lr=args.lr, max_objects=args.max_objects,
        hard_negatives=args.hard_negatives, eval_scenes=args.eval_scenes)))


if __name__ == "__main__":
    sys.exit(main())
