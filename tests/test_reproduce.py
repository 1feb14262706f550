"""make reproduce: experiments of two arms trained by the real trainer (Ray Train), each export
scored by the real evaluator, curves compared at equal compute, report written; and the
comparison's arithmetic on hand-made points."""

from __future__ import annotations

import json

import pytest

from analysis.reproduce import Point, learned, overall, paired_difference, reproduce, scaled, verdict
from shardkit.config import load_config

KINDS = ["circle", "square", "triangle", "star", "ring"]
TRAIN = {"batch_size": 8, "lr": 1e-3, "warmup_steps": 2, "grad_clip": 1.0, "ema_decay": 0.9, "checkpoint_every": 2,
         "log_every": 2, "sample_every": 4, "sample_steps": 2, "validation_prompts": ["A red circle."]}


def _config(write_config, **experiments_override):
    scenes = {"source": "synthetic", "count": 32, "seed": 5, "max_objects": 2, "image_sizes": [[32, 32]],
              "textured_fraction": 0.0, "samples_per_shard": 16}
    text = {"text_encoder": "t5", "vae": "vae", "resolution": 32, "batch_size": 16}
    experiments = {
        "dense-vs-alt": {"claim": "Dense captions teach alignment faster.",
                         "arms": {"dense": ["dense"], "alt": ["alt"]}},
        "stage1-vs-scratch": {"claim": "Stage 1 first is faster at equal compute.",
                              "arms": {"from stage 1": ["s1", "s1-dense"], "from scratch": ["dense"]}},
        **experiments_override,
    }
    return write_config(
        {"scenes-dense": {**scenes, "caption": "description"},  # same seed: the same images
         "scenes-alt": {**scenes, "caption": "alt_text"},
         "classes": {**scenes, "seed": 6, "max_objects": 1, "caption": "none"}},
        training={
            "text_encoders": {"t5": {"model": "${storage}/models/t5", "tiny": {"seed": 0}, "dtype": "float32"}},
            "vaes": {"vae": {"model": "${storage}/models/vae", "tiny": {"seed": 0}}},
            "features": {
                "f-dense": {"dataset": "scenes-dense", "caption": "txt", **text},
                "f-alt": {"dataset": "scenes-alt", "caption": "txt", **text},
                "f-cls": {"dataset": "classes", "vae": "vae", "resolution": 32, "batch_size": 16,
                          "label": {"field": "scene.objects.0.kind", "classes": KINDS}},
            },
            "stages": {
                "dense": {"features": "f-dense", "steps": 4, "export_every": 2, **TRAIN},
                "alt": {"features": "f-alt", "steps": 4, "export_every": 2, **TRAIN},
                "s1": {"features": "f-cls", "conditioning": "class", "model": "DiT-tiny/2", "steps": 2,
                       **{**TRAIN, "validation_prompts": ["circle"]}},
                "s1-dense": {"features": "f-dense", "init_stage": "s1", "steps": 2, "export_every": 2, **TRAIN},
            },
        },
        reproduce={"eval": {"prompts": 2, "seeds": 1, "steps": 2}, "experiments": experiments})


def test_reproduce_trains_scores_every_export_and_reports_both_experiments(ray_session, write_config, tmp_path):
    config = load_config(_config(write_config))
    report = reproduce(config)
    assert report == tmp_path / "data" / "reports" / "reproduce" / "README.md"
    text = report.read_text()
    assert "## dense-vs-alt" in text and "## stage1-vs-scratch" in text
    assert (report.parent / "dense-vs-alt.png").stat().st_size > 10_000
    results = json.loads((report.parent / "results.json").read_text())
    first, second = results["experiments"]
    # every export is a point; x counts the whole arm's images (stage 1's 2 x 8 come first)
    assert [p["images"] for p in first["arms"]["dense"]["points"]] == [16, 32]
    assert [p["images"] for p in second["arms"]["from stage 1"]["points"]] == [32]
    assert second["arms"]["from stage 1"]["images"] == second["arms"]["from scratch"]["images"] == 32
    assert second["last_images"] == 32
    for category, c in first["categories"].items():
        assert c["verdict"] in {"holds", "reversed", "no clear difference", "not learned by either arm",
                                "checker not trusted here"}
        assert 0 <= c["last"]["dense"]["score"] <= 1 and c["difference"]["curve"]["units"] == 2
    # each point's images and verdicts are kept beside its run
    verdicts = tmp_path / "data" / "runs" / "dense" / "curve" / "step_000002" / "verdicts.jsonl"
    assert len(verdicts.read_text().splitlines()) == 7 * 2

    # a rerun trains nothing and scores nothing again
    scores = verdicts.parent / "scores.json"
    before = scores.stat().st_mtime_ns
    reproduce(config, experiments=["dense-vs-alt"])
    assert scores.stat().st_mtime_ns == before


def test_scale_makes_longer_runs_of_their_own(write_config):
    config = scaled(load_config(_config(write_config)), 3)
    stages = config.training.stages
    assert stages["dense-x3"].steps == 12 and stages["dense-x3"].export_every == 6
    assert stages["s1-dense-x3"].init_stage == "s1-x3"
    assert config.reproduce.experiments["stage1-vs-scratch"].arms["from stage 1"] == ["s1-x3", "s1-dense-x3"]
    assert stages["dense"].steps == 4  # the unscaled stages are untouched


def test_arms_must_chain_and_end_in_a_scored_stage(write_config):
    with pytest.raises(ValueError, match="must start from"):
        load_config(_config(write_config, bad={"claim": "x", "arms": {"a": ["s1", "alt"], "b": ["dense"]}}))
    with pytest.raises(ValueError, match="export_every"):
        load_config(_config(write_config, bad={"claim": "x", "arms": {"a": ["s1"], "b": ["dense"]}}))
    with pytest.raises(ValueError, match="exactly two arms"):
        load_config(_config(write_config, bad={"claim": "x", "arms": {"a": ["dense"]}}))


def _point(images: int, passes: list[bool], category: str = "colour") -> Point:
    records = [{"category": category, "index": i, "seed": 0, "pass": ok} for i, ok in enumerate(passes)]
    score = sum(passes) / len(passes)
    return Point("s", images, images, {category: {"score": score, "ci95": [score, score], "chance": 0.1}}, records)


def test_paired_difference_is_averaged_along_the_shared_points():
    a = [_point(10, [True, True, False, False]), _point(20, [True, True, True, True])]
    b = [_point(5, [False] * 4), _point(10, [True, False, False, False]), _point(20, [True, True, False, False])]
    d = paired_difference(a, b, "colour")
    assert d["curve"]["images"] == [10, 20]  # b's point at 5 has no partner
    assert d["curve"]["difference"] == pytest.approx((0.25 + 0.5) / 2)
    assert d["last"]["difference"] == pytest.approx(0.5)
    lo, hi = d["curve"]["ci95"]
    assert lo < d["curve"]["difference"] < hi
    assert paired_difference(a, [_point(7, [True] * 4)], "colour") is None


def test_learned_means_ending_the_budget_above_chance_not_a_blip_on_the_way():
    def at(lo: float) -> Point:
        return Point("s", 0, 0, {"colour": {"score": lo + 0.05, "ci95": [lo, lo + 0.1], "chance": 0.1}})

    assert learned([at(0.0), at(0.2)], "colour")
    assert not learned([at(0.2), at(0.05)], "colour")  # above chance once, back at it by the end
    assert not learned([], "colour")


def test_verdicts_say_plainly_when_a_claim_is_not_measured():
    up = {"curve": {"ci95": [0.05, 0.2]}}
    across = {"curve": {"ci95": [-0.1, 0.2]}}
    down = {"curve": {"ci95": [-0.3, -0.1]}}
    assert verdict(up, trusted=True, learned=True) == "holds"
    assert verdict(down, trusted=True, learned=True) == "reversed"
    assert verdict(across, trusted=True, learned=True) == "no clear difference"
    assert verdict(up, trusted=False, learned=True) == "checker not trusted here"
    assert verdict(up, trusted=True, learned=False) == "not learned by either arm"
    assert overall({"background": "holds", "colour": "no clear difference"}).startswith("held here")
    assert overall({"background": "reversed"}).startswith("did not hold")
    assert overall({"background": "not learned by either arm"}).startswith("not measurable")
