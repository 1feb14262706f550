"""The paper's three stages on the one trainer: class-conditional DiT (stage 1), text stage
from it by DiT import (stage 2), selected, bucketed, higher-resolution fine-tuning with
PixArt's positional interpolation and micro-conditions (stage 3). Tiny models, real Ray."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from PIL import Image

from shardkit.config import ConfigError, load_config, parse_config
from shardkit.runner import StageError
from shardkit.shards import StageOutput
from training import buckets
from training.architectures import build_transformer
from training.data import FeatureReader, latent_size
from training.features import LABEL_FIELD, TEXT_FIELD, VAE_FIELD, extract, npy_array
from training.pipelines import generate
from training.start import StartError, fit
from training.trainer import TrainingError, train

KINDS = ["circle", "square", "triangle", "star", "ring"]
TRAIN = {"batch_size": 8, "lr": 1e-3, "warmup_steps": 2, "grad_clip": 1.0, "ema_decay": 0.9, "checkpoint_every": 10,
         "log_every": 2, "sample_steps": 3}


def _config(write_config, extra_stages: dict | None = None):
    return write_config(
        {"classes": {"source": "synthetic", "count": 48, "seed": 3, "min_objects": 1, "max_objects": 1,
                     "samples_per_shard": 12, "caption": "description"},
         "scenes": {"source": "synthetic", "count": 48, "seed": 2, "samples_per_shard": 12, "caption": "description"}},
        training={
            "text_encoders": {"t5": {"model": "${storage}/models/t5", "tiny": {"seed": 0}, "dtype": "float32"}},
            "vaes": {"vae": {"model": "${storage}/models/vae", "tiny": {"seed": 0}}},
            "features": {
                "cls": {"dataset": "classes", "vae": "vae", "resolution": 32, "batch_size": 16,
                        "label": {"field": "scene.objects.0.kind", "classes": KINDS}},
                "dense": {"dataset": "scenes", "caption": "txt", "text_encoder": "t5", "vae": "vae", "resolution": 32},
                "hq": {"dataset": "scenes", "caption": "txt", "text_encoder": "t5", "vae": "vae", "resolution": 64,
                       "select": [{"field": "width", "min": 96}], "buckets": {"ratios": "pipeline", "multiple": 8}},
                "hq256": {"dataset": "scenes", "caption": "txt", "text_encoder": "t5", "vae": "vae", "resolution": 256,
                          "buckets": {"ratios": "pipeline", "multiple": 16}, "batch_size": 8},
            },
            "stages": {
                "s1": {"features": "cls", "conditioning": "class", "model": "DiT-tiny/2", "steps": 6, "sample_every": 6,
                       "validation_prompts": ["circle", "star"], **TRAIN},
                "s2": {"features": "dense", "init_stage": "s1", "steps": 4, "sample_every": 4,
                       "validation_prompts": ["A red circle."], **TRAIN},
                "s3": {"features": "hq", "init_stage": "s2", "steps": 4, "sample_every": 4,
                       "sample_sizes": [[64, 64], [48, 80]], "validation_prompts": ["A red circle."], **TRAIN},
                **(extra_stages or {}),
            },
        })


def _run(root: str, stage: str) -> str:
    return os.path.join(root, "runs", stage)


def test_stage1_to_stage3_in_sequence_each_exporting_a_pipeline_that_generates(ray_session, write_config):
    from diffusers import DiTPipeline

    path = _config(write_config)
    config = load_config(path)
    root = config.storage.root
    with pytest.raises(TrainingError, match="make train-s1"):
        train(config, "s2")  # starts from stage 1, which does not exist yet

    # stage 1: a class-conditional DiT, exported as a DiTPipeline that knows its class names
    s1 = train(config, "s1")
    assert s1["last_loss"] < s1["first_loss"]
    pipe = DiTPipeline.from_pretrained(s1["pipeline"])
    assert pipe.get_label_ids(["star"]) == [KINDS.index("star")]
    images = pipe(class_labels=pipe.get_label_ids(["circle", "ring"]), num_inference_steps=3,
                  generator=torch.Generator().manual_seed(0)).images
    assert [im.size for im in images] == [(32, 32)] * 2
    assert os.path.exists(os.path.join(_run(root, "s1"), "samples", "step_000006.png"))
    with pytest.raises(TrainingError, match="--restart"):
        train(load_config(path, ["training.stages.s1.lr=0.01"]), "s1")  # a changed run is not resumed
    assert train(load_config(path, ["training.stages.s1.log_every=3"]), "s1")["seconds"] == 0  # done: reused

    # stage 2 starts from stage 1's DiT, imported by reparameterisation
    train(config, "s2")
    start = json.load(open(os.path.join(_run(root, "s2"), "start.json")))
    assert start["from"] == "dit_import" and start["init"] == s1["pipeline"]
    assert start["import_report"]["max_abs_diff"] < 1e-4
    assert generate(os.path.join(_run(root, "s2"), "pipeline"), ["A red circle."], height=32, width=32, steps=3)[0].size == (32, 32)

    # stage 3: twice the resolution (positions interpolated), aspect-ratio buckets, a selection
    s3 = train(config, "s3")
    start = json.load(open(os.path.join(_run(root, "s3"), "start.json")))
    assert start["from"] == "pixart" and any("interpolation scale 1 -> 2" in c for c in start["fitted"])
    transformer = json.load(open(os.path.join(s3["pipeline"], "transformer", "config.json")))
    assert transformer["sample_size"] == 32 and transformer["interpolation_scale"] == 2
    square, wide = (generate(s3["pipeline"], ["A red circle."], height=h, width=w, steps=3)[0] for h, w in ((64, 64), (48, 80)))
    assert square.size == (64, 64) and wide.size == (80, 48)
    samples = os.path.join(_run(root, "s3"), "samples")
    assert sorted(os.listdir(samples)) == ["step_000004.png", "step_000004_48x80.png"]
    assert Image.open(os.path.join(samples, "step_000004_48x80.png")).size == (80, 48)


def test_micro_conditions_train_and_reach_the_pipeline(ray_session, write_config):
    """PixArt-α 1024's size and aspect-ratio conditions, at the one sample size (128) where
    PixArtAlphaPipeline feeds them: here 256 px through the tiny VAE (factor 2), 8x8 patches."""
    from diffusers import PixArtAlphaPipeline

    stage = {"features": "hq256", "model": "PixArt-tiny/8", "use_additional_conditions": True, "steps": 3,
             "sample_every": 3, "sample_sizes": [[192, 336]], "validation_prompts": ["A red circle."], **TRAIN}
    config = load_config(_config(write_config, {"micro": stage, "bad": {**stage, "features": "hq"}}))
    with pytest.raises(TrainingError, match="sample size 128"):
        train(config, "bad")  # 64 px: the pipeline would never pass the conditions
    summary = train(config, "micro")
    pipe = PixArtAlphaPipeline.from_pretrained(summary["pipeline"])
    assert pipe.transformer.config.use_additional_conditions and pipe.transformer.config.sample_size == 128
    emb = pipe.transformer.adaln_single.emb
    assert emb.resolution_embedder.linear_2.weight.abs().sum() > 0  # trained
    image = generate(pipe, ["A red circle."], height=192, width=336, steps=2)[0]
    assert image.size == (336, 192)


def test_fit_interpolates_positions_and_adds_conditions_without_changing_the_model():
    small = build_transformer("PixArt-tiny/2", resolution=32, caption_channels=64, vae_scale_factor=2)
    large, changes = fit(small, resolution=64, vae_scale_factor=2, use_additional_conditions=None)
    assert large.config.sample_size == 32 and large.config.interpolation_scale == 2 and changes
    # the larger grid spans the smaller one: every other position is an old position
    old = small.pos_embed.pos_embed.view(8, 8, -1)  # 32 px, VAE factor 2, patch 2
    new = large.pos_embed.pos_embed.view(16, 16, -1)
    assert torch.allclose(new[::2, ::2], old, atol=1e-6)
    for a, b in zip(small.state_dict().values(), large.state_dict().values()):
        assert torch.equal(a, b)
    assert fit(large, resolution=64, vae_scale_factor=2, use_additional_conditions=None)[0] is large  # nothing to do
    pixart_table = fit(small, resolution=64, vae_scale_factor=2, use_additional_conditions=None, interpolation_scale=1)[0]
    assert pixart_table.config.interpolation_scale == 1  # PixArt's 256 -> 512 choice, when asked for

    base = build_transformer("PixArt-tiny/8", resolution=256, caption_channels=64, vae_scale_factor=2, seed=1)
    torch.nn.init.normal_(base.proj_out.weight)  # a model that outputs something
    conditioned, changes = fit(copy.deepcopy(base), resolution=256, vae_scale_factor=2, use_additional_conditions=True)
    assert conditioned.config.use_additional_conditions and "micro-conditions added" in changes[0]
    x, text = torch.randn(2, 4, 128, 96), torch.randn(2, 5, 64)
    t = torch.tensor([10, 700])
    added = {"resolution": torch.tensor([[480.0, 640.0], [1024.0, 256.0]]), "aspect_ratio": torch.tensor([[0.75], [4.0]])}
    with torch.no_grad():
        before = base(x, encoder_hidden_states=text, timestep=t, added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
        after = conditioned(x, encoder_hidden_states=text, timestep=t, added_cond_kwargs=added).sample
    assert torch.allclose(before, after, atol=1e-5)  # zero output layers: the same model until trained
    with pytest.raises(StartError, match="sample size 128"):
        fit(small, resolution=32, vae_scale_factor=2, use_additional_conditions=True)


def _class_folder(root, sizes: dict[str, list[tuple[int, int]]]) -> None:
    colours = {"cat": "orange", "dog": "brown", "bird": "blue"}
    for name, shapes in sizes.items():
        (root / name).mkdir(parents=True)
        for i, (w, h) in enumerate(shapes):
            Image.new("RGB", (w, h), colours[name]).save(root / name / f"{i}.png")


def test_classes_from_the_folders_are_their_sorted_names(ray_session, write_config, tmp_path):
    """`classes: folders` (ImageNet's layout, DiT-XL/2's ids): the sorted sub-folder names, read
    when the features are made and kept in their plan, so a folder that gains a class makes the
    old features stale instead of mixing two numberings."""
    root = tmp_path / "imagenet"
    _class_folder(root, {"dog": [(32, 32)], "cat": [(32, 32), (40, 32)], "bird": [(32, 32)]})  # unlike: not dedup'd
    features = {"f": {"dataset": "folders", "vae": "vae", "resolution": 16, "batch_size": 4,
                      "label": {"field": "folder", "classes": "folders"}}}
    config = load_config(write_config(
        {"folders": {"source": "folder", "path": str(root)}},
        training={"vaes": {"vae": {"model": "${storage}/models/vae", "tiny": {"seed": 0}}}, "features": features}))
    assert extract(config, "f")["samples_out"] == 4
    output = StageOutput.of(config.storage.root, "folders", "features/f")
    for sample in output.samples():
        meta = sample.meta
        assert int(sample.fields[LABEL_FIELD]) == ["bird", "cat", "dog"].index(meta["folder"])
        assert meta["features"]["label"]["name"] == meta["folder"]
    assert output.read_plan().config["features"]["label"]["classes"] == ["bird", "cat", "dog"]
    (root / "eel").mkdir()
    Image.new("RGB", (32, 32), "grey").save(root / "eel" / "0.png")
    with pytest.raises(StageError, match="another config"):  # ids shifted: not mixed with the old ones
        extract(config, "f")
    with pytest.raises(ConfigError, match="classes: folders needs field: folder and a folder dataset"):
        parse_config({"datasets": {"s": {"source": "synthetic"}},
                      "training": {"vaes": {"vae": {"model": "m"}},
                                   "features": {"f": {**features["f"], "dataset": "s"}}}})


def test_class_folders_selection_and_buckets_become_features_a_reader_batches_by_bucket(ray_session, write_config, tmp_path):
    root = tmp_path / "imagenet"
    _class_folder(root, {"cat": [(64, 64), (96, 48), (48, 96), (64, 80), (30, 64)],
                         "dog": [(64, 48), (64, 64), (48, 64), (96, 64)], "bird": [(64, 64)]})
    config = load_config(write_config(
        {"folders": {"source": "folder", "path": str(root), "samples_per_shard": 4, "filters": {"min_side": 16}}},
        training={"vaes": {"vae": {"model": "${storage}/models/vae", "tiny": {"seed": 0}}},
                  "features": {"f": {"dataset": "folders", "vae": "vae", "resolution": 32, "batch_size": 3,
                                     "label": {"field": "folder", "classes": ["cat", "dog"]},
                                     "select": [{"field": "width", "min": 40}],
                                     "buckets": {"ratios": "pipeline", "multiple": 8}}}}))
    summary = extract(config, "f")
    assert summary["failures_by_reason"] == {"no_label": 1, "not_selected": 1}  # the bird, the 30 px cat
    assert summary["samples_out"] == 8
    options = buckets.buckets(32, "pipeline", 8)
    output = StageOutput.of(config.storage.root, "folders", "features/f")
    keys = set()
    for sample in output.samples():
        meta = sample.meta
        assert TEXT_FIELD not in sample.fields and "txt" not in sample.fields  # class features: no text
        assert int(sample.fields[LABEL_FIELD]) == ["cat", "dog"].index(meta["folder"])
        expected = buckets.nearest(options, meta["height"], meta["width"])
        assert meta["features"]["bucket"] == [expected.height, expected.width]
        assert npy_array(sample.fields[VAE_FIELD]).shape == (2, 4, expected.height // 2, expected.width // 2)
        assert latent_size(sample.fields[VAE_FIELD]) == (expected.height // 2, expected.width // 2)
        keys.add(sample.key)

    # one epoch: every sample exactly once, every batch a single bucket
    reader = FeatureReader(output, 0, 1, seed=0, shuffle_buffer=4, needs_text=False, needs_label=True)
    epoch = list(reader._epoch_batches(0, 2))
    assert sorted(s.key for batch in epoch for s in batch) == sorted(keys)
    assert all(len({latent_size(s.fields[VAE_FIELD]) for s in batch}) == 1 for batch in epoch)
    # resume: a reader from a saved position yields exactly what the first would have next
    first = reader.batches(2)
    for _ in range(len(epoch) + 2):  # into the second epoch
        next(first)
    resumed = FeatureReader(output, 0, 1, seed=0, shuffle_buffer=4, position=copy.copy(reader.position),
                            needs_text=False, needs_label=True).batches(2)
    for _ in range(3):
        a, b = next(first), next(resumed)
        assert torch.equal(a["mean"], b["mean"]) and torch.equal(a["label"], b["label"])
        assert a["aspect_ratio"].shape == (len(a["mean"]), 1) and a["resolution"].shape == (len(a["mean"]), 2)


def test_stage_configs_are_checked(write_config):
    with pytest.raises(ConfigError, match="class conditioning needs a feature set with `label`"):
        load_config(_config(write_config, {"x": {"features": "dense", "conditioning": "class"}}))
    with pytest.raises(ConfigError, match="text conditioning needs a feature set with `caption`"):
        load_config(_config(write_config, {"x": {"features": "cls"}}))
    with pytest.raises(ConfigError, match="not both"):
        load_config(_config(write_config, {"x": {"features": "dense", "init": "/a", "init_stage": "s1"}}))
    with pytest.raises(ConfigError, match="no stage 'nope'"):
        load_config(_config(write_config, {"x": {"features": "dense", "init_stage": "nope"}}))
    with pytest.raises(ConfigError, match="unique"):
        load_config(_config(write_config), ["training.features.cls.label.classes=[a, a]"])
    with pytest.raises(ConfigError, match="give min, max or both"):
        load_config(_config(write_config), ["training.features.hq.select=[{field: width}]"])


def test_bucket_sets():
    assert [b.size for b in buckets.buckets(1024) if b.ratio == 1.0] == [(1024, 1024)]
    pipeline_1024 = buckets.buckets(1024, "pipeline", 32)
    assert len(pipeline_1024) == 33 and pipeline_1024[0].size == (512, 2048) and pipeline_1024[-1].size == (2048, 512)
    paper = buckets.ratios("paper")
    assert len(paper) == 40 and paper[0] == 0.25 and paper[-1] == 4.0
    for bucket in buckets.buckets(512, "paper", 16):
        assert bucket.height % 16 == 0 and bucket.width % 16 == 0
        assert abs(bucket.height * bucket.width / 512**2 - 1) < 0.12  # about the same pixel count
    assert buckets.nearest(buckets.buckets(128, [0.5, 1.0, 2.0], 8), 100, 190).ratio == 0.5
    image = Image.new("RGB", (300, 100))
    assert buckets.fit(image, buckets.Bucket(0.5, 64, 128)).size == (128, 64)
