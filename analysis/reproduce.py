"""`make reproduce`: the paper's two claims in miniature, measured exactly on the synthetic domain.

Each experiment of `reproduce.experiments` (pipelines.yaml) compares two arms. An arm is one or
more training stages run in order (e.g. stage 1 then stage 2); its last stage exports its EMA
weights every `export_every` steps, and each export is scored by the alignment evaluator on
the same held-out prompts. Curves of pass rate per category against training images (all of
the arm's stages counted, so arms are compared at equal compute) go on one plot per
experiment; the report states, per category, the difference between the arms with a paired
95% interval, whether the checker can be trusted there, and whether the claim held.

    python -m analysis.reproduce [--experiments a,b] [--scale 4] [--out DIR]

Everything resumes: stages train from their last checkpoint or are skipped when done, and a
scored export is not scored again. See docs/reproduce.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from analysis.alignment import CATEGORIES, chance_levels, evaluate, suite_checker_accuracy
from shardkit import storage
from shardkit.config import ConfigError, CurveEvalConfig, PipelinesConfig, StageConfig

log = logging.getLogger(__name__)

TRUSTED_ACCURACY = 0.95
"""A category is judged only where the checker passes at least this share of true renders
(crisp and blurred) of the suite's prompts at the experiment's resolution."""


# --------------------------------------------------------------------------- configuration

def scaled(config: PipelinesConfig, scale: float) -> PipelinesConfig:
    """The config with every experiment stage run `scale` times longer, as new stages named
    `<stage>-x<scale>` (their own run folders: a longer run is another experiment, not a
    continuation whose learning-rate history and curve points differ)."""
    if scale == 1:
        return config
    if scale <= 0:
        raise ConfigError(f"scale must be positive, not {scale}")
    names = {s for e in config.reproduce.experiments.values() for arm in e.arms.values() for s in arm}
    rename = {name: f"{name}-x{scale:g}" for name in names}
    stages = dict(config.training.stages)
    for name in names:
        cfg = stages[name]
        grow = {key: max(1, round(getattr(cfg, key) * scale)) for key in
                ("steps", "checkpoint_every", "sample_every", "export_every") if getattr(cfg, key)}
        stages[rename[name]] = cfg.model_copy(update={**grow, "init_stage": rename.get(cfg.init_stage, cfg.init_stage)})
    experiments = {
        name: e.model_copy(update={"arms": {arm: [rename[s] for s in stages_] for arm, stages_ in e.arms.items()}})
        for name, e in config.reproduce.experiments.items()}
    return config.model_copy(update={
        "training": config.training.model_copy(update={"stages": stages}),
        "reproduce": config.reproduce.model_copy(update={"experiments": experiments})})


def images_per_step(cfg: StageConfig) -> int:
    return cfg.batch_size * cfg.grad_accum * cfg.workers


def earlier_images(config: PipelinesConfig, stages: Sequence[str]) -> int:
    """Training images of an arm's stages before its scored (last) one."""
    return sum(config.training.stages[s].steps * images_per_step(config.training.stages[s]) for s in stages[:-1])


def stage_seconds(metrics_path: Path, cfg: StageConfig) -> float | None:
    """Training wall time from the logged rates (resumed runs included, pauses excluded)."""
    if not metrics_path.exists():
        return None
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    seconds, previous = 0.0, 0
    for row in rows:
        if row.get("images_per_s"):
            seconds += (row["step"] - previous) * images_per_step(cfg) / row["images_per_s"]
        previous = row["step"]
    return seconds


# --------------------------------------------------------------------------- curves

@dataclass
class Point:
    stage: str
    step: int
    images: int
    """Training images of the whole arm up to this export (earlier stages included)."""
    scores: dict[str, dict[str, Any]]
    records: list[dict[str, Any]] = field(repr=False, default_factory=list)


def _settings_match(scores_path: Path, ev: CurveEvalConfig) -> bool:
    if not scores_path.exists():
        return False
    s = json.loads(scores_path.read_text())["settings"]
    return (s["prompts_per_category"], s["seeds"], s["steps"], s["guidance_scale"], s["suite_seed"]) == (
        ev.prompts, list(range(ev.seeds)), ev.steps, ev.guidance_scale, ev.suite_seed)


def score_export(export: Path, out: Path, ev: CurveEvalConfig) -> tuple[dict[str, Any], list[dict]]:
    """Scores of one export, evaluated once: kept in `out` while the settings are the same."""
    if not _settings_match(out / "scores.json", ev):
        started = time.monotonic()
        evaluate(str(export), str(out), prompts_per_category=ev.prompts, seeds=ev.seeds, steps=ev.steps,
                 guidance_scale=ev.guidance_scale, suite_seed=ev.suite_seed)
        (out / "timing.json").write_text(json.dumps({"seconds": round(time.monotonic() - started, 1)}) + "\n")
    scores = json.loads((out / "scores.json").read_text())
    records = [json.loads(line) for line in (out / "verdicts.jsonl").read_text().splitlines() if line.strip()]
    return scores, records


def arm_curve(config: PipelinesConfig, stages: Sequence[str], ev: CurveEvalConfig) -> list[Point]:
    """Score every export of the arm's last stage; x is the arm's training images so far."""
    from training.layout import run_layout

    offset = earlier_images(config, stages)
    last = stages[-1]
    layout = run_layout(config, last)
    per_step = images_per_step(config.training.stages[last])
    points = []
    for export in sorted(Path(layout.exports).glob("step_*")):
        if not (export / "model_index.json").is_file():
            continue
        step = int(export.name.split("_")[1])
        scores, records = score_export(export, Path(layout.curve) / export.name, ev)
        points.append(Point(last, step, offset + step * per_step, scores["categories"], records))
        log.info("%s step %d: %s", last, step, "  ".join(
            f"{c} {v['score']:.2f}" for c, v in scores["categories"].items()))
    return points


# --------------------------------------------------------------------------- comparison

def _passes_by_unit(records: list[dict], category: str) -> dict[tuple[int, int], bool]:
    return {(r["index"], r["seed"]): bool(r["pass"]) for r in records if r["category"] == category}


def paired_difference(a: Sequence[Point], b: Sequence[Point], category: str) -> dict[str, Any] | None:
    """Mean difference in pass rate (a - b) over the points where both arms were scored at the
    same training images, with a 95% interval over the suite's prompts x seeds: each unit's
    difference averaged along the curve, then a normal interval of the mean across units.
    Averaging along the curve measures "learns faster" (the area between the curves); the
    last shared point alone is reported beside it."""
    at_b = {p.images: p for p in b}
    shared = [(p, at_b[p.images]) for p in a if p.images in at_b]
    if not shared:
        return None

    def summary(pairs: list[tuple[Point, Point]]) -> dict[str, Any]:
        rows = []
        for pa, pb in pairs:  # each point's verdicts indexed once, not once per unit
            passed_a, passed_b = _passes_by_unit(pa.records, category), _passes_by_unit(pb.records, category)
            rows.append([float(passed_a[u]) - float(passed_b.get(u, False)) for u in sorted(passed_a)])
        diffs = np.array(rows).mean(axis=0)
        n = len(diffs)
        mean = float(diffs.mean()) if n else float("nan")
        half = 1.96 * float(diffs.std(ddof=1)) / math.sqrt(n) if n > 1 else float("inf")
        return {"difference": mean, "ci95": [mean - half, mean + half], "units": n,
                "images": [pa.images for pa, _ in pairs]}

    return {"curve": summary(shared), "last": summary(shared[-1:])}


def learned(points: Sequence[Point], category: str) -> bool:
    """Whether the arm ends its budget above chance: its last point's Wilson interval lies
    wholly above it. Any point would do too easily: seven categories times several points
    give a blip somewhere (an untrained model's mottled colours match a prompt's now and then)."""
    if not points:
        return False
    last = points[-1].scores[category]
    return last["ci95"][0] > (last["chance"] or 0.0)


def verdict(difference: dict[str, Any] | None, trusted: bool, learned: bool) -> str:
    if difference is None:
        return "no shared points"
    if not trusted:
        return "checker not trusted here"
    if not learned:
        return "not learned by either arm"
    lo, hi = difference["curve"]["ci95"]
    return "holds" if lo > 0 else "reversed" if hi < 0 else "no clear difference"


def overall(verdicts: dict[str, str]) -> str:
    held = [c for c, v in verdicts.items() if v == "holds"]
    reversed_ = [c for c, v in verdicts.items() if v == "reversed"]
    if held and not reversed_:
        return f"held here (in {', '.join(held)}; no category against it)"
    if reversed_ and not held:
        return f"did not hold here: the other arm was better in {', '.join(reversed_)}"
    if held and reversed_:
        return f"mixed: held in {', '.join(held)}, reversed in {', '.join(reversed_)}"
    if any(v == "no clear difference" for v in verdicts.values()):
        return "not shown here: where the arms learned, their difference was within the uncertainty"
    return "not measurable at this budget: neither arm learned a category the checker can be trusted on"


# --------------------------------------------------------------------------- report

def plot(name: str, claim: str, curves: dict[str, list[Point]], trusted: dict[str, bool], path: Path,
         earlier: dict[str, int] | None = None) -> None:
    """`earlier`: per arm, the images of its stages before the scored one (shaded: no points)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, 4, figsize=(15, 7), sharex=True)
    for ax, category in zip(axes.flat, CATEGORIES):
        for (arm, points), colour in zip(curves.items(), ("tab:blue", "tab:orange")):
            if not points:
                continue
            x = [p.images / 1000 for p in points]
            y = [p.scores[category]["score"] for p in points]
            lo = [p.scores[category]["ci95"][0] for p in points]
            hi = [p.scores[category]["ci95"][1] for p in points]
            ax.plot(x, y, "o-", color=colour, label=arm, markersize=3)
            ax.fill_between(x, lo, hi, color=colour, alpha=0.15)
            if (earlier or {}).get(arm):
                ax.axvspan(0, earlier[arm] / 1000, color=colour, alpha=0.07, label=f"{arm}: earlier stages")
        chance = next((p.scores[category]["chance"] for ps in curves.values() for p in ps), None)
        if chance is not None:
            ax.axhline(chance, color="gray", linestyle="--", linewidth=1, label="chance")
        ax.set_title(category + ("" if trusted[category] else " (checker < 95%)"),
                     color="black" if trusted[category] else "gray")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes.flat[-1].axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    axes.flat[-1].legend(handles, labels, loc="center")
    for ax in axes[-1]:
        ax.set_xlabel("training images (thousands, all stages)")
    for ax in axes[:, 0]:
        ax.set_ylabel("pass rate (Wilson 95%)")
    figure.suptitle(f"{name}: {claim}", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def _experiment_markdown(result: dict[str, Any]) -> list[str]:
    arms = list(result["arms"])
    a, b = arms
    lines = [f"## {result['name']}", "", f"**Claim:** {result['claim']}", "",
             f"**Here:** the claim {result['overall']}.", "", f"![{result['name']}]({result['plot']})", ""]
    for arm, info in result["arms"].items():
        lines.append(f"- **{arm}**: stages {' → '.join(info['stages'])}; {info['images']:,} training images; "
                     f"{info['train_seconds'] / 60:.1f} min of training" if info["train_seconds"] is not None else
                     f"- **{arm}**: stages {' → '.join(info['stages'])}; {info['images']:,} training images")
    lines += ["", f"Last point (both arms at {result['last_images']:,} images) and the mean difference along "
              f"the shared points ({a} − {b}, paired over the same prompts; 95% interval):", "",
              f"| category | {a} | {b} | chance | difference, last | difference, curve | checker | verdict |",
              "|---|---|---|---|---|---|---|---|"]
    for category in CATEGORIES:
        c = result["categories"][category]
        cells = []
        for arm in arms:
            s = c["last"].get(arm)
            cells.append(f"{_pct(s['score'])} ({_pct(s['ci95'][0])}–{_pct(s['ci95'][1])})" if s else "—")
        d = c["difference"]
        diff = (lambda x: f"{100 * x['difference']:+.0f} pts ({100 * x['ci95'][0]:+.0f} to {100 * x['ci95'][1]:+.0f})")
        lines.append(f"| {category} | {cells[0]} | {cells[1]} | {_pct(c['chance'])} | "
                     f"{diff(d['last']) if d else '—'} | {diff(d['curve']) if d else '—'} | "
                     f"{_pct(c['checker'])} | {c['verdict']} |")
    return lines + [""]


def write_report(results: list[dict[str, Any]], meta: dict[str, Any], out: Path) -> Path:
    ev = meta["eval"]
    lines = ["# PixArt-α's claims in miniature", "",
             f"Written by `{meta['command']}` on {meta['written']}. Every arm is scored by the "
             f"alignment evaluator (`analysis/alignment.py`): {ev['prompts']} held-out prompts per category × "
             f"{ev['seeds']} seed(s), {ev['steps']} sampling steps, guidance {ev['guidance_scale']}, at "
             f"{meta['resolution']} px; the same prompts at every point and in every arm. Chance is the score of a "
             "model that draws the domain well but ignores the prompt.", "",
             "A category is judged only where the checker passes at least "
             f"{_pct(TRUSTED_ACCURACY)} of true renders of the suite's prompts at this resolution, crisp and "
             "blurred (σ 1 px, noise 8), as a small model draws them:", "",
             "| category | " + " | ".join(meta["checker"]) + " |", "|---|" + "---|" * len(meta["checker"])]
    for category in CATEGORIES:
        lines.append(f"| {category} | " + " | ".join(_pct(acc[category]) for acc in meta["checker"].values()) + " |")
    lines += ["", "A verdict of *holds* means the favoured arm's mean pass rate along the shared points is higher "
              "with the 95% interval of the difference above zero; *reversed* the opposite; *not learned* that "
              "neither arm ended its budget with its interval above chance, so the budget was too small to tell.", ""]
    for result in results:
        lines += _experiment_markdown(result)
    lines += ["Numbers: `results.json`; every image and verdict: each run's `curve/step_N/` folder "
              "(`runs/<stage>/curve/`).", ""]
    path = out / "README.md"
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines))
    tmp.replace(path)
    return path


# --------------------------------------------------------------------------- driver

def run_experiment(config: PipelinesConfig, name: str, out: Path, checker: dict[str, float]) -> dict[str, Any]:
    from training.layout import run_layout
    from training.trainer import train

    experiment = config.reproduce.experiments[name]
    ev = config.reproduce.eval
    curves, arms = {}, {}
    for arm, stages in experiment.arms.items():
        for stage in stages:
            log.info("%s / %s: training %s", name, arm, stage)
            train(config, stage)
        curves[arm] = arm_curve(config, stages, ev)
        cfgs = [config.training.stages[s] for s in stages]
        seconds = [stage_seconds(Path(run_layout(config, s).metrics), c) for s, c in zip(stages, cfgs)]
        arms[arm] = {"stages": list(stages), "images": sum(c.steps * images_per_step(c) for c in cfgs),
                     "train_seconds": sum(seconds) if all(s is not None for s in seconds) else None,
                     "points": [{"stage": p.stage, "step": p.step, "images": p.images, "scores": p.scores}
                                for p in curves[arm]]}
    a, b = curves.values()
    shared = sorted({p.images for p in a} & {p.images for p in b})
    categories = {}
    for category in CATEGORIES:
        difference = paired_difference(a, b, category)
        learned_by_end = learned(a, category) or learned(b, category)
        trusted = checker[category] >= TRUSTED_ACCURACY
        last = {arm: next((p.scores[category] for p in points if p.images == shared[-1]), None) if shared else None
                for arm, points in curves.items()}
        chance = next((p.scores[category]["chance"] for ps in curves.values() for p in ps), float("nan"))
        categories[category] = {"last": last, "difference": difference, "learned": learned_by_end, "chance": chance,
                                "checker": checker[category], "trusted": trusted,
                                "verdict": verdict(difference, trusted, learned_by_end)}
    plot_name = f"{name}.png"
    earlier = {arm: earlier_images(config, stages) for arm, stages in experiment.arms.items()}
    plot(name, experiment.claim, curves, {c: v["trusted"] for c, v in categories.items()}, out / plot_name, earlier)
    return {"name": name, "claim": experiment.claim, "arms": arms, "categories": categories,
            "last_images": shared[-1] if shared else None, "plot": plot_name,
            "overall": overall({c: v["verdict"] for c, v in categories.items()})}


def reproduce(config: PipelinesConfig, experiments: Sequence[str] | None = None, scale: float = 1.0,
              out: str | None = None, command: str = "make reproduce") -> Path:
    """Train, score and report the experiments; returns the report's path."""
    config = scaled(config, scale)
    names = list(experiments or config.reproduce.experiments)
    unknown = [n for n in names if n not in config.reproduce.experiments]
    if unknown:
        raise ConfigError(f"reproduce.experiments: no experiment {unknown[0]!r}; defined: "
                         f"{', '.join(config.reproduce.experiments) or 'none'}")
    resolutions = {config.training.features[config.training.stages[arm[-1]].features].resolution
                   for n in names for arm in config.reproduce.experiments[n].arms.values()}
    if len(resolutions) != 1:
        raise ConfigError(f"the experiments' scored stages train at several resolutions {sorted(resolutions)}: "
                         "one report judges one resolution")
    resolution = resolutions.pop()
    ev = config.reproduce.eval
    accuracy = suite_checker_accuracy(ev.prompts, ev.suite_seed, resolution)
    checker = {c: min(acc[c] for acc in accuracy.values()) for c in CATEGORIES}
    chance_levels(500, 1, resolution)  # cached for every evaluation in this process
    folder = Path(out or storage.join(config.storage.root, "reports", "reproduce" + (f"-x{scale:g}" if scale != 1 else "")))
    folder.mkdir(parents=True, exist_ok=True)
    results = [run_experiment(config, name, folder, checker) for name in names]
    meta = {"command": command, "written": time.strftime("%Y-%m-%d %H:%M"), "scale": scale,
            "resolution": resolution, "eval": ev.model_dump(), "checker": accuracy,
            "trusted_accuracy": TRUSTED_ACCURACY}
    tmp = folder / "results.json.tmp"
    tmp.write_text(json.dumps({"meta": meta, "experiments": results}, indent=2) + "\n")
    tmp.replace(folder / "results.json")
    return write_report(results, meta, folder)


def main(argv: Sequence[str] | None = None) -> int:
    from shardkit.cli import add_config_arguments, config_from_args, run_main, setup_logging

    parser = argparse.ArgumentParser(prog="python -m analysis.reproduce", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiments", default=None, help="comma-separated names (default: all of the config's)")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="run every experiment stage this many times longer, as new stages <name>-x<scale>")
    parser.add_argument("--out", default=None, help="report folder (default: <storage>/reports/reproduce[-x<scale>])")
    add_config_arguments(parser)
    args = parser.parse_args(argv)
    setup_logging(args.verbose)

    def go(_: Sequence[str] | None) -> int:
        report = reproduce(config_from_args(args), args.experiments.split(",") if args.experiments else None,
                           args.scale, args.out, command=" ".join(["python -m analysis.reproduce", *(argv or sys.argv[1:])]))
        log.info("report: %s", report)
        print(report)
        return 0

    return run_main(go, argv)


if __name__ == "__main__":
    sys.exit(main())
