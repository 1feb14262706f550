"""analysis.alignment: the held-out prompt suite, pass rules, Wilson intervals, chance levels,
and `evaluate` end to end on a tiny exported PixArtAlphaPipeline (real diffusers, 2 steps)."""

from __future__ import annotations

import collections
import json

import pytest

from analysis.alignment import (
    CATEGORIES, SUITE_SIZES, chance_levels, evaluate, main, passes, prompt_suite, sample_case, wilson,
)
from analysis.scene_check import judge, read_image
from synthetic.scenes import corpus, parse_description, render


def test_suite_is_deterministic_and_structured():
    suite = prompt_suite(12, seed=0)
    assert [c.prompt for c in suite] == [c.prompt for c in prompt_suite(12, seed=0)]
    assert [c.prompt for c in suite] != [c.prompt for c in prompt_suite(12, seed=1)]
    assert sample_case("binding", 3).prompt == suite[CATEGORIES.index("binding") * 12 + 3].prompt
    by_category = collections.defaultdict(list)
    for case in suite:
        by_category[case.category].append(case.scene)
        assert (case.scene.width, case.scene.height, case.scene.texture) == (64, 64, "plain")
        assert all(o.size in SUITE_SIZES for o in case.scene.objects)
        parsed = parse_description(case.prompt)  # the prompt states every fact judged
        assert parsed.background == case.scene.background and len(parsed.objects) == len(case.scene.objects)
    assert list(by_category) == list(CATEGORIES) and all(len(v) == 12 for v in by_category.values())
    n = {c: {len(s.objects) for s in scenes} for c, scenes in by_category.items()}
    assert n["background"] == n["colour"] == n["shape"] == {1}
    assert n["binding"] == n["spatial"] == {2} and n["count"] <= {1, 2, 3} and n["complex"] <= {2, 3}
    assert len(n["count"]) > 1
    for s in by_category["binding"]:
        assert s.objects[0].colour != s.objects[1].colour and s.objects[0].kind != s.objects[1].kind
    for s in by_category["spatial"]:
        assert s.objects[0].position != s.objects[1].position
    assert sample_case("count", 0, resolution=128).scene.width == 128


def test_a_perfect_model_passes_every_category():
    for case in prompt_suite(6, seed=5):
        verdicts = judge(case.scene, read_image(render(case.scene)))
        assert passes(case.category, verdicts), (case.prompt, verdicts)


def test_pass_rules():
    v = {"background": True, "count": False, "object0.colour": True, "object0.kind": False,
         "object0.binding": False, "object1.colour": True, "object1.kind": True, "object1.binding": True,
         "spatial": True}
    assert passes("background", v) and passes("colour", v) and passes("spatial", v)
    assert not passes("shape", v) and not passes("binding", v) and not passes("count", v)
    assert not passes("complex", v) and passes("complex", {k: True for k in v})
    assert not passes("spatial", {"background": True})  # no relation stated: nothing to pass


def test_wilson_interval():
    assert wilson(0, 0) == (0.0, 1.0)
    lo, hi = wilson(10, 10)
    assert hi == 1.0 and lo == pytest.approx(10 / (10 + 1.96**2))
    assert wilson(0, 10)[0] == 0.0 and wilson(0, 10)[1] == pytest.approx(1 - lo)
    lo, hi = wilson(50, 100)
    assert lo < 0.5 < hi and hi - 0.5 == pytest.approx(0.5 - lo) and hi - lo == pytest.approx(0.192, abs=0.002)
    assert wilson(500, 1000)[1] - wilson(500, 1000)[0] < hi - lo


def test_chance_levels():
    chance = chance_levels(30, seed=2)
    assert set(chance) == set(CATEGORIES) and all(0.0 <= p <= 1.0 for p in chance.values())
    assert chance["binding"] <= 0.1 and chance["complex"] <= 0.1 and chance["background"] <= 0.3


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> str:
    from training.architectures import build_transformer
    from training.encoders import build_text_encoder, build_vae
    from training.pipelines import export_pipeline

    root = tmp_path_factory.mktemp("alignment")
    text = build_text_encoder(str(root / "t5"), corpus=corpus(60), vocab_size=300)
    vae = build_vae(str(root / "vae"))  # factor 2: 32x32 latents for 64 px
    transformer = build_transformer("PixArt-tiny/2", resolution=64, vae_scale_factor=2, init="default")
    return export_pipeline(str(root / "pipeline"), transformer=transformer, text_encoder_dir=text, vae_dir=vae)


def test_evaluate_end_to_end(pipeline, tmp_path):
    out = tmp_path / "eval"
    # Guidance 1 skips the unconditional half of the batch: half the CPU time of the default.
    scores = evaluate(pipeline, str(out), prompts_per_category=2, seeds=1, steps=2, guidance_scale=1.0,
                      chance_samples=5, device="cpu")
    records = [json.loads(line) for line in (out / "verdicts.jsonl").read_text().splitlines()]
    assert len(records) == 2 * len(CATEGORIES)
    for r in records:
        assert (out / r["image"]).is_file() and r["seed"] == 0
        assert r["reading"]["width"] == 64 and isinstance(r["pass"], bool)
        assert r["prompt"] == sample_case(r["category"], r["index"]).prompt
    assert json.loads((out / "scores.json").read_text()) == scores
    assert scores["settings"]["resolution"] == 64
    for category in CATEGORIES:
        s = scores["categories"][category]
        assert s["n"] == 2 and 0.0 <= s["score"] <= 1.0 and 0.0 <= s["chance"] <= 1.0
        assert s["ci95"][0] <= s["score"] <= s["ci95"][1]
    report = (out / "report.md").read_text()
    assert "| category | score | 95% CI | chance | n |" in report and "| complex |" in report
    assert (out / "contact_sheet.png").is_file()


def test_check_checker_cli(tmp_path):
    path = tmp_path / "checker.json"
    assert main(["check-checker", "--count", "20", "--out", str(path)]) == 0
    conditions = json.loads(path.read_text())["conditions"]
    assert set(conditions) == {"crisp", "jpeg q=90", "blur 1.0 + noise 8"}
    assert conditions["crisp"]["accuracy"]["colour"] == 1.0
