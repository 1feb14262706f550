"""The scoring models (analysis/clip_models.py): the CLIP loading path, the shipped synthetic CLIP
and aesthetic head measured on scenes they never saw, and LAION's head format."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from analysis import clip_models
from analysis.clip_models import AestheticHead
from analysis.train_aesthetic import aesthetic_parts, aesthetic_score, clip_fingerprint, embedded_scenes, measure
from analysis.train_clip import EVAL_CHANGES, changed, draw_scenes, evaluate
from synthetic import scenes

MODELS = Path(__file__).resolve().parents[1] / "analysis" / "models"
SHIPPED_CLIP, SHIPPED_HEAD = MODELS / "synthetic-clip", MODELS / "synthetic-aesthetic"
TEST_STREAM = 2_000_003  # neither the trainers' training (0) nor their held-out streams


def test_tiny_clip_round_trips_through_from_pretrained(tmp_path):
    from transformers import CLIPModel, CLIPProcessor, PreTrainedTokenizerFast

    folder = clip_models.build_tiny_clip(tmp_path / "tiny", seed=3)
    model, processor = clip_models.load_clip(folder)
    assert isinstance(model, CLIPModel) and isinstance(processor, CLIPProcessor)
    assert isinstance(processor.tokenizer, PreTrainedTokenizerFast)  # TokenizersBackend in transformers 5
    built = clip_models.build_model(clip_models.TINY_SPEC, processor.tokenizer, seed=3).eval()
    batch = draw_scenes(0, TEST_STREAM, 0, 4, 3)
    images, texts = [scenes.render(s) for s in batch], [scenes.describe(s) for s in batch]
    for m in (model, built):
        assert clip_models.image_embeddings(m, processor, images).shape == (4, 16)
    assert torch.allclose(clip_models.image_embeddings(model, processor, images),
                          clip_models.image_embeddings(built, processor, images), atol=1e-5)
    text = clip_models.text_embeddings(model, processor, texts)
    assert torch.allclose(text, clip_models.text_embeddings(built, processor, texts), atol=1e-5)
    assert torch.allclose(text.norm(dim=-1), torch.ones(4))
    ids = processor.tokenizer(texts[0])["input_ids"]
    assert processor.tokenizer.unk_token_id not in ids and ids[-1] == model.config.text_config.eos_token_id
    assert processor.tokenizer.decode(ids, skip_special_tokens=True) == texts[0].lower()
    assert processor.tokenizer("IMG_0042.JPG")["input_ids"].count(processor.tokenizer.unk_token_id) >= 1


def test_changed_captions_state_exactly_one_other_fact():
    for scene in draw_scenes(0, TEST_STREAM, 1, 40, 6):
        for what in EVAL_CHANGES:
            other = changed(scene, what, np.random.default_rng(0))
            if other is None:
                assert what == "binding"
                continue
            assert scenes.describe(other) != scenes.describe(scene)
            assert all(o.colour != other.background for o in other.objects)  # a scene the generator could draw
            parsed = scenes.parse_description(scenes.describe(other))
            assert len(parsed.objects) == len(scene.objects) and parsed.background == other.background


def test_shipped_clip_prefers_the_true_caption_on_unseen_scenes():
    """Measured when shipped, on these 128 scenes: see docs/scoring.md. Chance: 50% for each
    change, 1/128 for retrieval."""
    model, processor = clip_models.load_clip(SHIPPED_CLIP)
    result = evaluate(model, processor, seed=0, count=128, max_objects=6, stream=TEST_STREAM)
    rates = {k: v["true_above"] for k, v in result["changes"].items()}
    assert result["i2t_top1"] >= 0.6, result
    assert rates["background"] >= 0.95 and rates["colour"] >= 0.85, rates
    assert rates["kind"] >= 0.7 and rates["texture"] >= 0.7, rates
    assert result["changes"]["colour"]["cos_true"] > result["changes"]["colour"]["cos_changed"] + 0.05


def test_shipped_aesthetic_head_follows_its_rule_on_unseen_scenes():
    config = json.loads((SHIPPED_HEAD / "config.json").read_text())
    assert config["clip_fingerprint"] == clip_fingerprint(SHIPPED_CLIP)  # shipped as a pair
    model, processor = clip_models.load_clip(SHIPPED_CLIP)
    head = AestheticHead.from_file(SHIPPED_HEAD)
    x, y = embedded_scenes(model, processor, seed=0, stream=TEST_STREAM, count=256, max_objects=6)
    result = measure(head.score(x), y)
    assert result["spearman"] >= 0.8 and result["mae"] < 0.6 * result["mae_of_mean"], result


def test_aesthetic_rule_rewards_shapes_that_fill_the_frame_and_stand_out():
    """1 + 4.5 * min(coverage / 0.4, 1) + 4.5 * min(contrast / 0.5, 1), from the rendered scene."""
    base = draw_scenes(0, TEST_STREAM, 2, 1, 1)[0]
    box = replace(base.objects[0], kind="square", centre=(32, 32), extent=64, bbox=(0, 0, 64, 64))
    full = replace(base, width=64, height=64, background="black", texture="plain", objects=(replace(box, colour="white"),))
    assert aesthetic_parts(full) == {"coverage": 4.5, "contrast": 4.5} and aesthetic_score(full) == 10.0
    assert aesthetic_score(replace(full, objects=())) == 1.0
    faint = replace(full, objects=(replace(box, colour="brown"),))  # luminance 0.313 on black (0.059): contrast 0.254
    assert aesthetic_parts(faint)["coverage"] == 4.5
    assert aesthetic_parts(faint)["contrast"] == pytest.approx(4.5 * 0.254 / 0.5, abs=0.01)
    for scene in draw_scenes(0, TEST_STREAM, 3, 50, 6):
        assert 1.0 <= aesthetic_score(scene) <= 10.0
    quarter = replace(box, colour="white", extent=32, bbox=(0, 0, 32, 32))
    one, two = (replace(full, objects=objects) for objects in ((quarter,), (quarter, replace(quarter, bbox=(32, 32, 32, 32)))))
    assert aesthetic_parts(one)["coverage"] == pytest.approx(4.5 * 0.25 / 0.4) and aesthetic_parts(two)["coverage"] == 4.5


def _laion_state(d: int, seed: int = 0) -> tuple[dict[str, torch.Tensor], torch.nn.Module]:
    """A state dict as improved-aesthetic-predictor writes it (torch.save(model.state_dict()))."""
    torch.manual_seed(seed)
    mlp = torch.nn.Sequential(torch.nn.Linear(d, 1024), torch.nn.Dropout(0.2), torch.nn.Linear(1024, 128),
                              torch.nn.Dropout(0.2), torch.nn.Linear(128, 64), torch.nn.Dropout(0.1),
                              torch.nn.Linear(64, 16), torch.nn.Linear(16, 1))
    return {f"layers.{k}": v for k, v in mlp.state_dict().items()}, mlp.eval()


def test_aesthetic_head_loads_laion_key_names(tmp_path):
    state, reference = _laion_state(768)
    assert sorted(state) == sorted(f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias"))
    torch.save(state, tmp_path / "sac+logos+ava1-l14-linearMSE.pth")
    head = AestheticHead.from_file(tmp_path / "sac+logos+ava1-l14-linearMSE.pth")
    assert head.input_size == 768 and not head.training
    x = torch.nn.functional.normalize(torch.randn(5, 768), dim=-1)
    with torch.inference_mode():
        assert torch.allclose(head(x), reference(x)[:, 0], atol=1e-6)
    assert torch.allclose(head.score(x * 3), reference(x)[:, 0], atol=1e-5)  # score() normalises, as LAION's code
    again = AestheticHead.from_file(head.save(tmp_path / "head.safetensors"))
    assert torch.equal(again.score(x), head.score(x))
    assert AestheticHead.from_file(head.save(tmp_path / "head.pth")).state_dict().keys() == state.keys()


def test_aesthetic_head_refuses_malformed_files(tmp_path):
    state, _ = _laion_state(64)
    cases = {
        "renamed.pth": ({k.replace("layers.", "mlp."): v for k, v in state.items()}, "no 2-D 'layers.0.weight'"),
        "missing.pth": ({k: v for k, v in state.items() if not k.startswith("layers.7")}, "missing .'layers.7.bias'"),
        "extra.pth": ({**state, "layers.8.weight": torch.zeros(1)}, "unexpected .'layers.8.weight'"),
        "shape.pth": ({**state, "layers.2.weight": torch.zeros(128, 512)}, "wrong shapes"),
        "not_tensors.pth": ({"layers.0.weight": 1}, "state dict of tensors"),
    }
    for name, (content, message) in cases.items():
        torch.save(content, tmp_path / name)
        with pytest.raises(ValueError, match=message):
            AestheticHead.from_file(tmp_path / name)
    (tmp_path / "junk.safetensors").write_bytes(b"not a weights file")
    (tmp_path / "junk.pth").write_bytes(b"not a weights file")
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pth")  # a pickled module: code, refused by weights_only
    for name in ("junk.safetensors", "junk.pth", "module.pth"):
        with pytest.raises(ValueError, match="not a readable weights file"):
            AestheticHead.from_file(tmp_path / name)
    with pytest.raises(FileNotFoundError):
        AestheticHead.from_file(tmp_path / "absent.pth")


def test_trainers_are_deterministic_on_a_tiny_budget(tmp_path):
    from analysis import train_aesthetic, train_clip

    tiny = dict(steps=2, batch_size=6, eval_scenes=12, log_every=1, vision_width=32, vision_layers=1, text_width=32,
                text_layers=1, heads=2, projection_dim=16)
    for name in "ab":
        summary = train_clip.train(str(tmp_path / name), train_clip.ClipTrainConfig(**tiny))
    digests = [hashlib.sha256((tmp_path / n / "model.safetensors").read_bytes()).hexdigest() for n in "ab"]
    assert digests[0] == digests[1] and summary["steps"] == 2
    assert not (tmp_path / ".a.training" / "state.pt").exists()
    assert (tmp_path / "a" / "README.md").read_text().startswith("# synthetic-clip")
    head = train_aesthetic.train(str(tmp_path / "head"), str(tmp_path / "a"),
                                 train_aesthetic.AestheticTrainConfig(scenes=64, eval_scenes=32, epochs=2))
    assert head["input_size"] == 16 and set(head["held_out"]) == {"spearman", "pearson", "mae", "mae_of_mean"}
    assert AestheticHead.from_file(tmp_path / "head").input_size == 16
    assert "not beauty" in (tmp_path / "head" / "README.md").read_text()
