"""The scoring stage on a real local Ray with a tiny CLIP built here and an aesthetic head:
scores for every caption field, the same numbers as the plain embedding functions, failures
recorded, and a feature set that selects by a computed score."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from analysis.clip_models import AestheticHead, build_tiny_clip, image_embeddings, load_clip, text_embeddings
from analysis.scoring import EMBEDDING, score, stage_name
from curation.sample import make_sample
from shardkit.config import ConfigError, load_config, parse_config
from shardkit.shards import ShardRecord, StageOutput, StagePlan, make_key, summarise, write_shard
from shardkit.validate import validate_stage
from tests.imaging import jpeg_bytes

CAPTIONS = ["a red circle", "a blue square on a white background", "", "a green star", "two cats", "a yellow ring"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("scoring-models")
    clip = build_tiny_clip(root / "clip", seed=0)
    model, _ = load_clip(clip)
    torch.manual_seed(0)
    head = AestheticHead(model.config.projection_dim)
    return {"clip": str(clip), "aesthetic": str(head.save(root / "aesthetic.safetensors"))}


def _write(config, dataset: str, stage: str, samples, plan_fields=None) -> None:  # noqa: ANN001
    output = StageOutput.of(config.storage.root, dataset, stage)
    plan = StagePlan(dataset, stage, num_shards=2, **({"fields": plan_fields} if plan_fields else {}))
    output.write_plan(plan)
    for shard in range(2):
        part = [s for s in samples if s.key.startswith(f"{shard:05d}")]
        write_shard(output.shard_uri(shard), part)
        output.write_record(ShardRecord(shard, len(part), len(part), 0.0))
    output.write_summary(summarise(plan, output.records(), 0.0))


def _dataset(write_config, tmp_path, models, **scorer):
    config = load_config(write_config(
        {"hand": {"source": "folder", "path": str(tmp_path)}},
        captioners={"dense": {"model": "unused"}},
        scorers={"s": {"clip": models["clip"], "aesthetic": models["aesthetic"], "input": "captions/dense",
                       "batch_size": 2, **scorer}}))
    shards, captioned = [], []
    for i, text in enumerate(CAPTIONS):
        key = make_key(i % 2, i)
        image = b"\xff\xd8 broken" if i == 4 else jpeg_bytes(i)
        sample = make_sample(key, image, width=16, height=12, original_width=16, original_height=12,
                             source="test", origin=f"mem://{i}", caption=text)
        shards.append(sample)
        dense = dict(sample.fields)
        if i != 3:  # one sample without a dense caption: scored on its alt text only
            dense["dense.txt"] = f"dense {text or 'nothing'}".encode()
        captioned.append(type(sample)(key, dense))
    _write(config, "hand", "shards", shards)
    _write(config, "hand", "captions/dense", captioned)
    return config


def test_every_caption_field_is_scored_as_the_plain_functions_score_it(ray_session, write_config, tmp_path, models):
    config = _dataset(write_config, tmp_path, models, embeddings=True)
    summary = score(config, "hand", "s")
    assert summary["failures_by_reason"] == {"decode_error": 1} and summary["samples_out"] == 5
    output = StageOutput.of(config.storage.root, "hand", stage_name("s"))
    assert validate_stage(output.uri) == []
    samples = list(output.samples())
    model, processor = load_clip(models["clip"])
    head = AestheticHead.from_file(models["aesthetic"])
    from PIL import Image
    import io

    for sample in samples:
        scores = sample.meta["scores"]["s"]
        image = image_embeddings(model, processor, [Image.open(io.BytesIO(sample.fields["jpg"]))])
        assert scores["aesthetic"] == pytest.approx(float(head.score(image)[0]), abs=1e-3)
        stored = np.load(io.BytesIO(sample.fields[EMBEDDING]))
        assert np.allclose(stored, image[0].numpy(), atol=2e-3)
        expected = {}
        for field, label in (("txt", "txt"), ("dense.txt", "dense")):
            if sample.text(field).strip():
                expected[label] = float((image @ text_embeddings(model, processor, [sample.text(field)]).T)[0, 0])
        assert scores["clip_similarity"].keys() == expected.keys()
        for label, value in expected.items():
            assert scores["clip_similarity"][label] == pytest.approx(value, abs=1e-4)
        assert sample.fields["jpg"] and "dense.txt" in sample.fields or sample.text("txt") == "a green star"
    assert summary["aesthetic_mean"] == pytest.approx(np.mean([s.meta["scores"]["s"]["aesthetic"] for s in samples]), abs=1e-3)


def test_a_feature_set_selects_by_a_computed_score(ray_session, write_config, tmp_path, models):
    config = _dataset(write_config, tmp_path, models)
    score(config, "hand", "s")
    values = sorted(s.meta["scores"]["s"]["aesthetic"]
                    for s in StageOutput.of(config.storage.root, "hand", stage_name("s")).samples())
    threshold = values[len(values) // 2]
    from training.features import rejection

    cfg = parse_config({
        "datasets": {"hand": {"source": "folder", "path": str(tmp_path)}}, "captioners": {"dense": {"model": "m"}},
        "scorers": {"s": {"clip": "c", "input": "captions/dense"}},
        "training": {"text_encoders": {"t": {"model": "t"}}, "vaes": {"v": {"model": "v"}},
                     "features": {"f": {"dataset": "hand", "caption": "dense", "scores": "s", "text_encoder": "t",
                                        "vae": "v", "select": [{"field": "scores.s.aesthetic", "min": threshold}]}}},
    }).training.features["f"]
    kept = [s for s in StageOutput.of(config.storage.root, "hand", stage_name("s")).samples() if rejection(cfg, s.meta) is None]
    assert len(kept) == sum(v >= threshold for v in values) > 0


def test_a_scorer_must_read_what_the_feature_set_captions_from():
    raw = {"datasets": {"d": {"source": "folder", "path": "/x"}}, "captioners": {"dense": {"model": "m"}},
           "scorers": {"s": {"clip": "c"}},
           "training": {"text_encoders": {"t": {"model": "t"}}, "vaes": {"v": {"model": "v"}},
                        "features": {"f": {"dataset": "d", "caption": "dense", "scores": "s", "text_encoder": "t", "vae": "v"}}}}
    with pytest.raises(ConfigError, match="scorer s reads shards, but this feature set's captions come from captions/dense"):
        parse_config(raw)
    with pytest.raises(ConfigError, match="no captioner 'other'"):
        parse_config({"scorers": {"s": {"clip": "c", "input": "captions/other"}}})
    with pytest.raises(ConfigError, match="shards"):
        parse_config({"scorers": {"s": {"clip": "c", "input": "features/x"}}})
