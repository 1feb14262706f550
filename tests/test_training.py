"""Feature extraction and the trainer, end to end on tiny models, on a real local Ray."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from shardkit import pipeline
from shardkit.config import ConfigError, load_config, parse_config
from shardkit.runner import StageError
from shardkit.shards import Sample, StageOutput
from shardkit.validate import validate_stage
from tests.conftest import REPO
from training.diffusion import Diffusion
from training.features import NULL_CAPTION, choose_caption, extract, from_stored, npy_array
from training.pipelines import generate
from training.trainer import TrainingError, train


def _config(write_config, **stage):
    return write_config(
        {"syn": {"source": "synthetic", "count": 48, "seed": 2, "samples_per_shard": 12, "caption": "description"}},
        training={
            "text_encoders": {"t5": {"model": "${storage}/models/t5", "tiny": {"seed": 0}, "dtype": "float32"}},
            "vaes": {"vae": {"model": "${storage}/models/vae", "tiny": {"seed": 0}}},
            "features": {"f": {"dataset": "syn", "caption": "txt", "text_encoder": "t5", "vae": "vae",
                               "resolution": 32, "batch_size": 8}},
            "stages": {"s": {"features": "f", "model": "PixArt-tiny/2", "steps": 30, "batch_size": 8, "lr": 1e-3,
                             "warmup_steps": 5, "grad_clip": 1.0, "ema_decay": 0.9, "checkpoint_every": 10,
                             "sample_every": 30, "log_every": 5, "validation_prompts": ["A large red circle in the center."],
                             "sample_steps": 4, **stage}},
        })


def test_objective_matches_ddpm_and_is_zero_for_a_perfect_model():
    from diffusers import DDPMScheduler

    diffusion = Diffusion(learned_sigma=True)
    x0, noise = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8)
    t = torch.tensor([1, 10, 500, 999])
    reference = DDPMScheduler(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear")
    assert torch.allclose(diffusion.q_sample(x0, t, noise), reference.add_noise(x0, noise, t), atol=1e-5)
    x_t = diffusion.q_sample(x0, t, noise)
    perfect = torch.cat([noise, -torch.ones_like(noise)], dim=1)  # v = -1: the true posterior variance
    loss, parts = diffusion.loss(perfect, x0, x_t, t, noise)
    assert parts["mse"] == 0 and abs(parts["vb"]) < 1e-4
    wrong_variance = torch.cat([noise, torch.ones_like(noise)], dim=1)
    assert diffusion.loss(wrong_variance, x0, x_t, t, noise)[1]["vb"] > 1e-3
    plain = Diffusion(learned_sigma=False)
    assert set(plain.loss(noise + 1, x0, x_t, t, noise)[1]) == {"mse"}
    # Min-SNR-5: a unit error weighs 5/SNR where SNR > 5 (t = 1, 10) and fully where SNR < 5 (t = 500, 999)
    weighted = Diffusion(learned_sigma=False, snr_gamma=5.0)
    snr = weighted.snr[t].float()
    assert float(snr[1]) > 5 > float(snr[2])
    expected = torch.clamp(snr, max=5.0) / snr
    assert weighted.loss(noise + 1, x0, x_t, t, noise)[0] == pytest.approx(float(expected.mean()), rel=1e-5)


def test_caption_choice_mixes_alt_text_with_the_configured_probability():
    config = parse_config({"datasets": {"d": {"source": "folder", "path": "/x"}},
                           "captioners": {"c": {"model": "m"}},
                           "training": {"text_encoders": {"t": {"model": "t"}}, "vaes": {"v": {"model": "v"}},
                                        "features": {"f": {"dataset": "d", "caption": "c", "text_encoder": "t",
                                                           "vae": "v", "alt_text_probability": 0.3}}}})
    cfg = config.training.features["f"]
    samples = [Sample(f"k{i}", {"txt": b"alt", "c.txt": b"dense"}) for i in range(2000)]
    chosen = [choose_caption(cfg, s) for s in samples]
    share = sum(field == "txt" for field, _ in chosen) / len(chosen)
    assert 0.27 < share < 0.33
    assert chosen == [choose_caption(cfg, s) for s in samples]  # decided by key: reruns agree
    assert {text for field, text in chosen if field == "c.txt"} == {"dense"}


def test_features_hold_posteriors_and_valid_token_embeddings(ray_session, write_config):
    path = _config(write_config)
    config = load_config(path)
    summary = extract(config, "f")
    output = StageOutput.of(config.storage.root, "syn", "features/f")
    assert validate_stage(output.uri) == []
    assert summary["samples_out"] == 48 and summary["bytes_per_sample"] > 0
    for sample in output.samples():
        meta = sample.meta
        posterior = npy_array(sample.fields["vae.npy"])
        text = npy_array(sample.fields["t5.npy"])
        assert posterior.shape == (2, 4, 16, 16) and posterior.dtype == np.float16  # tiny VAE: factor 2
        assert text.shape == (meta["features"]["tokens"], 64) and text.dtype == np.float16
        assert sample.text() == meta["description"] and "jpg" not in sample.fields
        assert (from_stored(posterior)[1] > 0).all()  # a std, not a log-variance
    null = npy_array((open(os.path.join(output.uri, NULL_CAPTION), "rb").read()))
    assert null.shape[0] >= 1 and null.shape[1] == 64

    # a rerun finds the set complete before the stage runner: no new run fence, no new summary
    written = {name: (open(os.path.join(output.uri, name)).read(), os.stat(os.path.join(output.uri, name)).st_mtime_ns)
               for name in ("_run", "_summary.json", "_plan.json")}
    assert extract(config, "f") == summary
    assert {name: (open(os.path.join(output.uri, name)).read(), os.stat(os.path.join(output.uri, name)).st_mtime_ns)
            for name in written} == written
    # a changed config is still refused as before, never taken as complete
    with pytest.raises(StageError, match="another config"):
        extract(load_config(path, ["training.features.f.resolution=64"]), "f")


def _metrics(root: str) -> list[dict]:
    return [json.loads(line) for line in open(os.path.join(root, "metrics.jsonl"))]


def test_training_resumes_after_a_kill_and_exports_a_working_pipeline(ray_session, write_config):
    path = _config(write_config, steps=40, export_every=20)
    config = load_config(path)
    extract(config, "f")  # made first so the killed run spends its time training
    run = os.path.join(config.storage.root, "runs", "s")
    driver = subprocess.Popen([sys.executable, "-m", "training", "train", "s", "--config", str(path)], cwd=REPO,
                              start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not os.path.isdir(os.path.join(run, "checkpoints", "step_000020")) and time.monotonic() < deadline:
            assert driver.poll() is None, "the training run ended before it could be killed"
            time.sleep(0.1)
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    summary = train(config, "s")
    assert summary["resumed_from"] >= 20
    # trained and exported: the next run says so before importing Ray Train, diffusers or transformers
    probe = ("import sys; from training.__main__ import main; assert main(['train', 's', '--config', sys.argv[1]]) == 0; "
             "print(sorted(m for m in ('ray.train', 'diffusers', 'transformers') if m in sys.modules))")
    rerun = subprocess.run([sys.executable, "-c", probe, str(path)], cwd=REPO, capture_output=True, text=True, check=True)
    assert rerun.stdout.splitlines()[-1] == "[]" and "already trained to step 40" in rerun.stderr
    steps = [m["step"] for m in _metrics(run)]
    assert steps == list(range(5, 41, 5))  # continued: no step logged twice, none missing
    losses = [m["loss"] for m in _metrics(run)]
    assert losses[-1] < losses[0]
    assert os.path.exists(os.path.join(run, "samples", "step_000040.png"))  # the final grid
    worker = json.load(open(os.path.join(run, "worker0.json")))
    assert worker["step"] == 40 and worker["position"]["batches"] + worker["position"]["epoch"] > 0
    images = generate(summary["pipeline"], ["A large red circle in the center."], height=32, width=32, steps=3)
    assert images[0].size == (32, 32)
    _check_shipping(config, os.path.join(config.storage.root, "shipped"))


def _check_shipping(config, out: str) -> None:
    """The trained run as a shipped folder (float16 transformer, card with the eval's rates),
    and its samples, drawn once and then found up to date."""
    from safetensors import safe_open

    from training.shipped import samples, ship

    scores = {"categories": {"colour": {"score": 0.5, "ci95": [0.3, 0.7], "chance": 0.086, "n": 20}},
              "settings": {"prompts_per_category": 10, "seeds": [0, 1], "steps": 4, "guidance_scale": 4.5, "resolution": 32}}
    scores_path = os.path.join(config.storage.root, "scores.json")
    with open(scores_path, "w") as f:
        json.dump(scores, f)
    ship(config, "s", out, scores=scores_path)
    with safe_open(os.path.join(out, "transformer", "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    card = open(os.path.join(out, "README.md")).read()
    assert "40 steps of 8 (320 images seen)" in card and "| colour | 50.0% | 30.0%-70.0% | 8.6% | 20 |" in card
    assert "- Trained on: cpu (" in card and ", 40 steps at a median " in card  # the device of every logged line
    assert json.load(open(os.path.join(out, "training.json")))["dataset"]["count"] == 48
    # a run that spans sessions ships its export at a step, and its card says how far it had got
    interim = ship(config, "s", out + "-interim", step=20)
    card = open(os.path.join(interim, "README.md")).read()
    assert "20 steps of 8 (160 images seen), an interim export of a run planned for 40 steps" in card
    assert json.load(open(os.path.join(interim, "training.json")))["steps"] == 20
    with pytest.raises(FileNotFoundError, match="step_000030"):
        ship(config, "s", out + "-none", step=30)
    grid = samples(out, ["A large red circle in the center.", "A small blue star."], os.path.join(out, "..", "samples"), steps=2)
    from PIL import Image

    assert Image.open(grid).size == (64, 32)
    before = os.path.getmtime(grid)
    assert samples(out, ["A large red circle in the center.", "A small blue star."], os.path.join(out, "..", "samples"),
                   steps=2) == grid and os.path.getmtime(grid) == before  # up to date: not drawn again


def test_in_process_extracts_and_trains_without_ray_and_resumes(ray_session, write_config):
    """cluster.in_process (a one-GPU box without Ray): features and training run in the driver
    with no Ray imported, and a longer rerun resumes from the last checkpoint."""
    path = _config(write_config, steps=12, checkpoint_every=6, sample_every=12, export_every=12, log_every=3)
    config = load_config(path)
    pipeline.ensure(config, "syn", "shards")  # curation's dedup uses Ray; nothing after it may
    probe = ("import sys\n"
             "from shardkit.config import load_config\n"
             "from training.features import extract\n"
             "from training.trainer import train\n"
             "config = load_config(sys.argv[1], ['cluster.in_process=true'])\n"
             "features = extract(config, 'f')\n"
             "first = train(config, 's')\n"
             "longer = train(load_config(sys.argv[1], ['cluster.in_process=true', 'training.stages.s.steps=18']), 's')\n"
             "print(features['samples_out'], first['resumed_from'], longer['resumed_from'], 'ray' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", probe, str(path)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split()[-4:] == ["48", "0", "12", "False"]
    run = os.path.join(config.storage.root, "runs", "s")
    assert [m["step"] for m in _metrics(run)] == list(range(3, 19, 3))  # continued, nothing logged twice
    assert json.load(open(os.path.join(run, "worker0.json")))["step"] == 18
    assert os.path.exists(os.path.join(run, "exports", "step_000012", "model_index.json"))
    images = generate(os.path.join(run, "pipeline"), ["A large red circle in the center."], height=32, width=32, steps=3)
    assert images[0].size == (32, 32)


def test_two_workers_keep_identical_parameters(ray_session, write_config):
    config = load_config(_config(write_config, steps=6, workers=2, cpus_per_worker=1.0, checkpoint_every=6,
                                 sample_every=100, log_every=3, grad_accum=2, grad_checkpointing=True))
    train(config, "s")
    run = os.path.join(config.storage.root, "runs", "s")
    ranks = [json.load(open(os.path.join(run, f"worker{r}.json"))) for r in (0, 1)]
    assert ranks[0]["parameters_sha256"] == ranks[1]["parameters_sha256"]
    assert ranks[0]["step"] == ranks[1]["step"] == 6
    assert ranks[0]["position"] != ranks[1]["position"] or ranks[0]["position"]["batches"] > 0
    # a later stage can start from this run's checkpoint (its EMA weights)
    follow = load_config(_config(write_config, steps=2, init=os.path.join(run, "checkpoints", "step_000006"),
                                 sample_every=100, log_every=1), ["storage.root=" + config.storage.root + "-next"])
    assert train(follow, "s")["last_loss"] is not None


def test_bad_training_input_is_a_clear_error(ray_session, write_config, tmp_path):
    with pytest.raises(ConfigError, match="training.stages.s.features: no feature set 'nope'"):
        load_config(_config(write_config, features="nope"))
    config = load_config(_config(write_config))
    with pytest.raises(TrainingError, match="no stage 'x'"):
        train(config, "x")
    # a model made for another text encoder's width
    from training.architectures import build_transformer

    other = build_transformer("PixArt-tiny/2", resolution=32, caption_channels=32, vae_scale_factor=2)
    other.save_pretrained(tmp_path / "other")
    bad = load_config(_config(write_config, init=str(tmp_path / "other"), steps=2))
    with pytest.raises(TrainingError, match="takes 32-dim captions, the features hold 64-dim"):
        train(bad, "s")


def test_a_stage_that_cannot_start_says_why_in_one_line(write_config):
    path = _config(write_config)
    raw = __import__("yaml").safe_load(path.read_text())
    raw["training"]["stages"]["next"] = {**raw["training"]["stages"]["s"], "init_stage": "s"}
    path.write_text(__import__("yaml").safe_dump(raw, sort_keys=False))
    done = subprocess.run([sys.executable, "-m", "training", "train", "next", "--config", str(path)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: next starts from s, which has not been trained") and "make train-s" in last


def test_training_output_stays_readable_beside_another_ray(ray_session, write_config):
    """The command line starts its own Ray beside this session's: Ray Train's placement-group
    cleaner, which finds its cluster by looking at the machine, died there with a 30-line
    traceback (or warned once a second without a dashboard) until workers were told their
    own cluster's address."""
    path = _config(write_config, steps=12, checkpoint_every=6, sample_every=12, log_every=6)
    done = subprocess.run([sys.executable, "-m", "training", "train", "s", "--config", str(path)], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    for noise in ("PlacementGroupCleaner", "Failed to query", "multiple active Ray instances", "Traceback"):
        assert noise not in done.stderr
