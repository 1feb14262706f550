"""Text-image alignment of an exported PixArt pipeline on the synthetic domain, scored exactly.

A prompt suite is drawn from scenes.py's grammar on a seed stream of its own; the pipeline
draws each prompt, analysis/scene_check.py reads the image back and judges it against the
scene the prompt described. Categories are scored apart (as T2I-CompBench does for
attribute binding, counting and spatial relations), each with a Wilson 95% interval and the
score a prompt-blind model would get (chance). See docs/evaluation.md.

    python -m analysis.alignment eval PIPELINE_FOLDER --out DIR [--prompts N] [--seeds K] [--steps S]
    python -m analysis.alignment check-checker [--count N]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from analysis.scene_check import Reading, judge, read_image, validate
from synthetic.scenes import Scene, SceneOptions, describe, render, sample_scene

log = logging.getLogger(__name__)

# Objects per prompt for each category.
CATEGORY_OBJECTS: dict[str, tuple[int, int]] = {
    "background": (1, 1), "colour": (1, 1), "shape": (1, 1), "binding": (2, 2),
    "count": (1, 3), "spatial": (2, 2), "complex": (2, 3),
}
CATEGORIES: tuple[str, ...] = tuple(CATEGORY_OBJECTS)
# Small objects (13 px at 64 px) are left out: a small star is a 2-px-pointed blob that the
# checker tells from a circle only 90% of the time after JPEG and under mild blur, and a
# model drawing at that scale can't show points either (see `check-checker`).
SUITE_SIZES: tuple[str, ...] = ("medium", "large")
# Last entropy word of every suite generator: training's scene streams are [seed, i] and
# (seed, i, k), so no suite scene shares a generator with a training scene. Prompts can still
# coincide with training captions (the grammar is small); it is the draws that are held out.
SUITE_STREAM = 0xA11E
CHANCE_METHOD = ("checker on crisp renders of scenes drawn independently of the prompt, from "
                 "the same category's distribution (a model that draws well but ignores the text)")


@dataclass(frozen=True)
class PromptCase:
    category: str
    index: int
    scene: Scene

    @property
    def prompt(self) -> str:
        return describe(self.scene)


def _acceptable(category: str, scene: Scene, sizes: Sequence[str]) -> bool:
    objects = scene.objects
    if any(o.size not in sizes for o in objects):
        return False
    if category == "binding":  # swapping attributes must be visible: colours and kinds differ
        return len({o.colour for o in objects}) == 2 and len({o.kind for o in objects}) == 2
    if category == "spatial":  # two objects in one cell state no relation
        return objects[0].position != objects[1].position
    return True


def sample_case(category: str, index: int, seed: int = 0, resolution: int = 64,
                sizes: Sequence[str] = SUITE_SIZES) -> PromptCase:
    """The suite's `index`-th scene of `category`: a pure function of the arguments."""
    lo, hi = CATEGORY_OBJECTS[category]
    rng = np.random.default_rng([seed, CATEGORIES.index(category), index, SUITE_STREAM])
    # Plain backgrounds: the checker reads the background's colour, not its texture, so a
    # texture word in the prompt would be a fact no category scores.
    n = int(rng.integers(lo, hi + 1))  # drawn once, so that rejection keeps counts uniform
    options = SceneOptions(min_objects=n, max_objects=n, image_sizes=((resolution, resolution),),
                           textured_fraction=0.0)
    for _ in range(1000):
        try:
            scene = sample_scene(rng, options)
        except RuntimeError:  # n objects did not fit this time
            continue
        if _acceptable(category, scene, sizes):
            return PromptCase(category, index, scene)
    raise RuntimeError(f"no {category} scene with sizes {sizes} fits {resolution}x{resolution}")


def prompt_suite(per_category: int, seed: int = 0, resolution: int = 64,
                 sizes: Sequence[str] = SUITE_SIZES) -> list[PromptCase]:
    return [sample_case(c, i, seed, resolution, sizes) for c in CATEGORIES for i in range(per_category)]


def passes(category: str, verdicts: dict[str, bool]) -> bool:
    """Whether one image passes its category, from scene_check.judge's verdicts."""
    if category in ("background", "count", "spatial"):
        return bool(verdicts.get(category, False))
    if category == "complex":
        return all(verdicts.values())
    fact = {"colour": "colour", "shape": "kind", "binding": "binding"}[category]
    return all(ok for key, ok in verdicts.items() if key.endswith("." + fact))


def wilson(passed: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a pass rate (95% for z=1.96); (0, 1) when n is 0."""
    if n == 0:
        return 0.0, 1.0
    p = passed / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


@lru_cache(maxsize=8)
def chance_levels(samples: int = 500, seed: int = 1, resolution: int = 64,
                  sizes: tuple[str, ...] = SUITE_SIZES) -> dict[str, float]:
    """Monte Carlo pass rate per category of images that ignore their prompt (CHANCE_METHOD)."""
    chance = {}
    for category in CATEGORIES:
        hits = 0
        for i in range(samples):
            prompt = sample_case(category, i, seed, resolution, sizes).scene
            drawn = sample_case(category, i, seed + 1, resolution, sizes).scene
            hits += passes(category, judge(prompt, read_image(render(drawn))))
        chance[category] = hits / samples if samples else float("nan")
    return chance


CHECKER_CONDITIONS: dict[str, dict[str, float]] = {"crisp": {}, "blur 1.0 + noise 8": {"blur": 1.0, "noise": 8.0}}


def suite_checker_accuracy(prompts_per_category: int, suite_seed: int = 0, resolution: int = 64,
                           sizes: Sequence[str] = SUITE_SIZES) -> dict[str, dict[str, float]]:
    """Per condition and category, the share of the suite's own prompts whose true render
    (crisp, or blurred and noised like a small model's output) passes: how often a model
    that drew the prompt right would be scored right, at this resolution."""
    from analysis.scene_check import degrade

    suite = prompt_suite(prompts_per_category, suite_seed, resolution, sizes)
    accuracy = {}
    for name, kwargs in CHECKER_CONDITIONS.items():
        hits: dict[str, list[bool]] = {c: [] for c in CATEGORIES}
        for i, case in enumerate(suite):
            image = degrade(render(case.scene), kwargs.get("blur", 0.0), kwargs.get("noise", 0.0), seed=i)
            hits[case.category].append(passes(case.category, judge(case.scene, read_image(image))))
        accuracy[name] = {c: float(np.mean(v)) for c, v in hits.items()}
    return accuracy


# --------------------------------------------------------------------------- evaluation

def _record(case: PromptCase, seed: int, generator_seed: int, path: Path, out_dir: Path,
            reading: Reading) -> dict[str, Any]:
    verdicts = judge(case.scene, reading)
    return {"category": case.category, "index": case.index, "prompt": case.prompt, "seed": seed,
            "generator_seed": generator_seed, "image": str(path.relative_to(out_dir)),
            "expected": case.scene.to_dict(), "reading": reading.to_dict(), "verdicts": verdicts,
            "pass": passes(case.category, verdicts)}


def evaluate(pipeline_folder: str, out_dir: str, prompts_per_category: int = 50,
             seeds: int | Sequence[int] = 2, steps: int = 20, guidance_scale: float = 4.5,
             suite_seed: int = 0, chance_samples: int = 500, batch_size: int = 16,
             sizes: Sequence[str] = SUITE_SIZES, device: str | None = None) -> dict[str, Any]:
    """Draw the suite with the pipeline in `pipeline_folder` at its own resolution, judge every
    image, and write images/, verdicts.jsonl, scores.json, report.md and contact_sheet.png
    under `out_dir`. Returns scores.json's content. `seeds` is a count or a list of seeds."""
    from training.encoders import vae_scale_factor
    from training.pipelines import generate, load_pipeline

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    seeds = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
    pipe = load_pipeline(pipeline_folder, device)
    resolution = int(pipe.transformer.config.sample_size * vae_scale_factor(pipe.vae))
    suite = prompt_suite(prompts_per_category, suite_seed, resolution, sizes)
    log.info("%d prompts x %d seeds at %d px, %d steps, guidance %g", len(suite), len(seeds), resolution,
             steps, guidance_scale)
    records = []
    with open(out / "verdicts.jsonl", "w") as verdicts_file:
        for seed in seeds:
            for b in range(0, len(suite), batch_size):
                batch = suite[b: b + batch_size]
                # diffusers draws a batch's noise from one generator: vary it per batch so
                # that the same position in every batch does not start from the same noise.
                generator_seed = seed * 100_003 + b // batch_size
                images = generate(pipe, [c.prompt for c in batch], height=resolution, width=resolution,
                                  steps=steps, guidance_scale=guidance_scale, seed=generator_seed)
                for case, image in zip(batch, images):
                    path = out / "images" / case.category / f"{case.index:03d}_seed{seed}.png"
                    path.parent.mkdir(parents=True, exist_ok=True)
                    image.save(path)
                    record = _record(case, seed, generator_seed, path, out, read_image(image))
                    records.append(record)
                    verdicts_file.write(json.dumps(record) + "\n")
            log.info("seed %d: %d images judged", seed, len(records))
    chance = chance_levels(chance_samples, 1, resolution, tuple(sizes)) if chance_samples else {}
    scores = {"categories": _scores(records, chance), "settings": {
        "pipeline": str(pipeline_folder), "resolution": resolution, "steps": steps,
        "guidance_scale": guidance_scale, "seeds": seeds, "prompts_per_category": prompts_per_category,
        "suite_seed": suite_seed, "sizes": list(sizes), "interval": "Wilson 95% over prompts x seeds",
        "chance": {"method": CHANCE_METHOD, "samples": chance_samples}}}
    (out / "scores.json").write_text(json.dumps(scores, indent=2) + "\n")
    sheet = _contact_sheet(records, out)
    (out / "report.md").write_text(_report(scores, sheet))
    for category, s in scores["categories"].items():
        log.info("%-10s %.3f [%.3f, %.3f]  chance %s  n=%d", category, s["score"], *s["ci95"],
                 f"{s['chance']:.3f}" if s["chance"] is not None else "-", s["n"])
    return scores


def _scores(records: list[dict], chance: dict[str, float]) -> dict[str, dict[str, Any]]:
    scores = {}
    for category in CATEGORIES:
        results = [r["pass"] for r in records if r["category"] == category]
        passed, n = sum(results), len(results)
        scores[category] = {"score": passed / n if n else float("nan"), "ci95": list(wilson(passed, n)),
                            "chance": chance.get(category), "passed": passed, "n": n}
    return scores


def _contact_sheet(records: list[dict], out: Path, columns: int = 6) -> str | None:
    """First images of each category, captioned ✓ / ✗ (pass / fail)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    from PIL import Image

    rows = [[r for r in records if r["category"] == c][:columns] for c in CATEGORIES]
    rows = [row for row in rows if row]
    if not rows:
        return None
    figure, axes = plt.subplots(len(rows), columns, figsize=(1.6 * columns, 1.8 * len(rows)), squeeze=False)
    for row, ax_row in zip(rows, axes):
        for ax in ax_row:
            ax.axis("off")
        for r, ax in zip(row, ax_row):
            ax.imshow(np.asarray(Image.open(out / r["image"]).convert("RGB")), interpolation="nearest")
            ax.set_title(f"{'✓' if r['pass'] else '✗'} {r['category']} {r['index']}", fontsize=7,
                         color="green" if r["pass"] else "red")
    figure.tight_layout()
    figure.savefig(out / "contact_sheet.png", dpi=100)
    plt.close(figure)
    return "contact_sheet.png"


def _report(scores: dict[str, Any], sheet: str | None) -> str:
    s = scores["settings"]
    lines = [
        "# Text-image alignment on the synthetic domain", "",
        f"Pipeline `{s['pipeline']}` at {s['resolution']} px, {s['steps']} steps, guidance "
        f"{s['guidance_scale']}; {s['prompts_per_category']} prompts per category (suite seed "
        f"{s['suite_seed']}, sizes {', '.join(s['sizes'])}) x seeds {s['seeds']}.", "",
        "| category | score | 95% CI | chance | n |", "|---|---|---|---|---|",
    ]
    for category, c in scores["categories"].items():
        chance = f"{c['chance']:.3f}" if c["chance"] is not None else "-"
        lines.append(f"| {category} | {c['score']:.3f} | {c['ci95'][0]:.3f}–{c['ci95'][1]:.3f} | {chance} | {c['n']} |")
    lines += ["", f"Intervals: {s['interval']} (seeds of one prompt are not independent, so they "
              "are somewhat narrow when seeds > 1).",
              f"Chance: {s['chance']['method']}; {s['chance']['samples']} samples per category.",
              "Every image, its reading and its verdicts are in `verdicts.jsonl`."]
    if sheet:
        lines += ["", f"![first images per category, ✓ pass / ✗ fail]({sheet})"]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- CLI

def _eval(args: argparse.Namespace) -> int:
    from shardkit import storage
    from shardkit.cli import config_from_args

    pipeline, out = args.pipeline, args.out
    if args.stage or not out:
        config = config_from_args(args)
        if args.stage:
            from training.layout import run_layout

            pipeline = run_layout(config, args.stage).export
        name = args.stage or Path(pipeline).name
        out = out or storage.join(config.storage.root, "eval", name)
    if not pipeline:
        log.error("give a pipeline folder or --stage")
        return 2
    evaluate(pipeline, out, prompts_per_category=args.prompts, seeds=args.seeds, steps=args.steps,
             guidance_scale=args.guidance, suite_seed=args.suite_seed, chance_samples=args.chance_samples,
             batch_size=args.batch_size, device=args.device)
    print(Path(out) / "scores.json")  # for scripts: make train-stage2-long ships it in the card
    log.info("report: %s", Path(out) / "report.md")
    return 0


def _check_checker(args: argparse.Namespace) -> int:
    conditions = {"crisp": {}, f"jpeg q={args.jpeg_quality}": {"jpeg_quality": args.jpeg_quality},
                  "blur 1.0 + noise 8": {"blur": 1.0, "noise": 8.0}}
    results = {}
    for name, kwargs in conditions.items():
        v = validate(args.count, seed=args.seed, resolution=args.resolution, **kwargs)
        results[name] = {"accuracy": v.accuracy, "n": v.n, "images": v.images, "kind_by_shape": v.kind_by_shape}
        log.info("%-18s %s", name, "  ".join(f"{c} {a:.3f}" for c, a in v.accuracy.items()))
        weak = {k: round(a, 3) for k, a in v.kind_by_shape.items() if a < 0.95}
        if weak:
            log.info("%-18s kind accuracy below 0.95: %s", "", weak)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"resolution": args.resolution, "seed": args.seed,
                                              "conditions": results}, indent=2) + "\n")
        log.info("wrote %s", args.out)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    from shardkit.cli import dispatch

    parser = argparse.ArgumentParser(prog="python -m analysis.alignment", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    common = argparse.ArgumentParser(add_help=False)
    commands = parser.add_subparsers(dest="command", required=True)
    ev = commands.add_parser("eval", parents=[common], help="score an exported PixArtAlphaPipeline folder")
    ev.add_argument("pipeline", nargs="?", help="exported pipeline folder (e.g. training/models/synthetic-pixart)")
    ev.add_argument("--stage", help="instead: a training stage's export (runs/<stage>/pipeline)")
    ev.add_argument("--out", help="output folder (default: <storage>/eval/<stage or folder name>)")
    ev.add_argument("--prompts", type=int, default=50, help="prompts per category (default 50)")
    ev.add_argument("--seeds", type=int, default=2, help="seeds per prompt (default 2)")
    ev.add_argument("--steps", type=int, default=20, help="sampling steps (default 20)")
    ev.add_argument("--guidance", type=float, default=4.5, help="guidance scale (default 4.5)")
    ev.add_argument("--suite-seed", type=int, default=0, help="which prompt suite (default 0)")
    ev.add_argument("--chance-samples", type=int, default=500, help="Monte Carlo samples per category for chance")
    ev.add_argument("--batch-size", type=int, default=16)
    ev.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ev.set_defaults(handler=_eval)
    check = commands.add_parser("check-checker", parents=[common],
                                help="the checker's accuracy on renders of known scenes")
    check.add_argument("--count", type=int, default=500, help="scenes per condition (default 500)")
    check.add_argument("--seed", type=int, default=0)
    check.add_argument("--resolution", type=int, default=64)
    check.add_argument("--jpeg-quality", type=int, default=90)
    check.add_argument("--out", default=None, help="also write the numbers to this JSON file")
    check.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    check.set_defaults(handler=_check_checker)
    return dispatch(parser, [ev], argv)  # check-checker reads no config


if __name__ == "__main__":
    sys.exit(main())
