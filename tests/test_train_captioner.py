"""The synthetic captioner's trainer (captioning/train_captioner.py) on a tiny budget, and the
shipped, trained captioner through the real captioning stage."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from captioning.train_captioner import CaptionerTrainConfig, build_tokenizer, score, train
from synthetic import scenes

TINY = dict(steps=3, batch_size=4, eval_scenes=4, vision_width=32, vision_layers=1, text_width=32, text_layers=1,
            log_every=1, checkpoint_every=2)


def test_word_tokenizer_round_trips_the_grammar():
    tokenizer = build_tokenizer()
    rng = __import__("numpy").random.default_rng(0)
    for _ in range(50):
        text = scenes.describe(scenes.sample_scene(rng))
        ids = tokenizer(text).input_ids
        assert tokenizer.unk_token_id not in ids
        assert tokenizer.decode(ids, skip_special_tokens=True) == text
        assert len(ids) == len(scenes.tokenize(text)) + 1  # one token per word or mark, plus <s>


def test_trainer_is_deterministic_and_saves_a_loadable_llava(tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    first = train(str(tmp_path / "a"), CaptionerTrainConfig(**TINY))
    train(str(tmp_path / "b"), CaptionerTrainConfig(**TINY))
    digest = [hashlib.sha256((tmp_path / n / "model.safetensors").read_bytes()).hexdigest() for n in "ab"]
    assert digest[0] == digest[1]  # same seed, same weights
    assert set(first["held_out"]) >= {"exact", "background", "colour", "kind", "position"}
    folder = tmp_path / "a"
    assert (folder / "README.md").read_text().startswith("# synthetic-captioner")
    assert json.loads((folder / "training.json").read_text())["steps"] == 3
    processor = AutoProcessor.from_pretrained(folder)
    model = AutoModelForImageTextToText.from_pretrained(folder)
    assert type(model).__name__ == "LlavaForConditionalGeneration" and type(processor).__name__ == "LlavaProcessor"
    assert not list(Path(tmp_path).glob(".a.training/state.pt"))  # the resume state is gone once saved


def test_score_counts_exact_and_attribute_matches():
    rng = __import__("numpy").random.default_rng(1)
    truths = [scenes.sample_scene(rng, scenes.SceneOptions(min_objects=1, max_objects=1)) for _ in range(2)]
    right = scenes.describe(truths[0])
    obj = truths[1].objects[0]
    other = next(c for c in scenes.COLOURS if c != obj.colour)
    wrong = scenes.describe(truths[1]).replace(f"{obj.size} {obj.colour} {obj.kind}", f"{obj.size} {other} {obj.kind}")
    result = score(truths, [right, wrong])
    assert result["exact"] == 0.5 and result["colour"] == 0.5 and result["kind"] == 1.0 and result["count"] == 1.0


SHIPPED = Path(__file__).resolve().parents[1] / "captioning" / "models" / "synthetic-captioner"


def test_shipped_captioner_describes_scenes_through_the_captioning_stage(ray_session, write_config):
    """The committed weights, loaded like any llava-hf checkpoint by the captioning stage, on
    JPEG scenes it never saw (another seed): its captions name the right things."""
    from captioning.stage import caption, stage_name
    from shardkit.config import load_config
    from shardkit.shards import StageOutput

    assert (SHIPPED / "model.safetensors").is_file(), f"{SHIPPED} is missing: run `make train-captioner`"
    config = load_config(write_config(
        {"syn": {"source": "synthetic", "count": 12, "seed": 11, "samples_per_shard": 6}},
        captioners={"trained": {"model": str(SHIPPED), "dtype": "float32", "batch_size": 6,
                                "generation": {"max_new_tokens": 80}}}))
    summary = caption(config, "syn", "trained")
    assert summary["samples_out"] == 12 and summary["failures"] == 0
    right = 0
    for sample in StageOutput.of(config.storage.root, "syn", stage_name("trained")).samples():
        scene = scenes.Scene.from_dict(sample.meta["scene"])
        text = sample.text("trained.txt")
        parsed = scenes.parse_description(text)
        assert parsed.background is not None, text  # a caption in the grammar's form
        truth = sorted((o.colour, o.kind) for o in scene.objects)
        right += parsed.background == scene.background and sorted((c, k) for _, c, k, _ in parsed.objects) == truth
    assert right >= 10, f"{right}/12 captions name the background and every object's colour and kind"
