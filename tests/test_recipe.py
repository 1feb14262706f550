"""The paper's recipe at full size, as pipelines.yaml declares it under the names the README
uses (`sam`, `laion`, `llava-1.5-7b`, `paper-stage1` ... `paper-stage3-1024`): its settings are
the paper's (checked against the paper's Table 4, written out here independently), and on a
machine without its inputs every README command ends in one line that names the config key,
what is missing and where to get it."""

from __future__ import annotations

import os
import subprocess

import huggingface_hub.constants
import pytest

from shardkit import cluster
from shardkit.config import PAPER_PROMPT, ClusterConfig, load_config
from shardkit.inputs import MissingInput, require_model
from shardkit.runner import StageError
from tests.conftest import REPO

# paper Table 4: (stage, resolution, steps, batch per GPU, GPUs); arXiv 2310.00426
TABLE_4 = [
    ("paper-stage1", 256, 300_000, 128, 8),
    ("paper-stage2", 256, 150_000, 178, 64),
    ("paper-stage3", 256, 90_000, 178, 64),
    ("paper-stage3-512", 512, 100_000, 40, 64),
    ("paper-stage3-1024", 1024, 16_000, 12, 32),
]


@pytest.fixture(scope="module")
def config():
    return load_config(REPO / "pipelines.yaml")


def test_the_recipe_has_the_papers_settings(config):
    t = config.training
    assert config.datasets["sam"].source == "sam" and config.datasets["sam"].links.endswith("sa1b_links.txt")
    assert config.datasets["laion"].source == "laion" and config.datasets["imagenet"].source == "folder"
    llava = config.captioner("llava-1.5-7b")
    assert llava.model == "llava-hf/llava-1.5-7b-hf" and llava.prompt == PAPER_PROMPT == (
        "Describe this image and its style in a very detailed manner")
    assert t.text_encoders["t5-xxl"].max_length == 120
    assert t.vaes["sd-vae-ft-ema"].model == "stabilityai/sd-vae-ft-ema"
    for name, resolution, steps, batch, gpus in TABLE_4:
        stage = t.stages[name]
        features = t.features[stage.features]
        assert (features.resolution, stage.steps, stage.batch_size, stage.workers, stage.gpus_per_worker) == (
            resolution, steps, batch, gpus, 1), name
        # the repository's optimiser and schedule, the same for every row
        assert (stage.lr, stage.weight_decay, stage.adam_eps, stage.warmup_steps, stage.grad_clip, stage.ema_decay) == (
            2e-5, 0.03, 1e-10, 1000, 0.01, 0.9999), name
        if resolution > 256:  # multi-scale stages: the paper's 40 aspect-ratio buckets
            assert features.buckets is not None and features.buckets.ratios == "paper"
    assert t.stages["paper-stage1"].conditioning == "class" and t.stages["paper-stage1"].model == "DiT-XL/2"
    assert t.features["imagenet-256"].label.classes == "folders"
    # stage 2 from DiT-XL/2's weights, as the paper; stage 3's rows chained
    assert t.stages["paper-stage2"].init.endswith("DiT-XL-2-256") and t.stages["paper-stage2"].model == "PixArt-XL/2"
    assert [t.stages[n].init_stage for n in ("paper-stage3", "paper-stage3-512", "paper-stage3-1024")] == [
        "paper-stage2", "paper-stage3", "paper-stage3-512"]
    assert t.features["sam-256"].dataset == "sam" and t.features["sam-256"].caption == "llava-1.5-7b"
    assert t.stages["paper-stage3-1024"].use_additional_conditions is True


@pytest.fixture
def bare_machine(tmp_path):
    """What a fresh clone on a machine without the recipe's inputs sees: no SA-1B, LAION or
    ImageNet under storage, no weights, and no hub (offline, an empty hub cache)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    env.pop("RAY_ADDRESS", None)
    return env, f"SET=storage.root={tmp_path / 'data'}"


@pytest.mark.parametrize("command, key", [
    (["caption", "DATASET=sam"], "datasets.sam.links"),  # the default captioner is here; SA-1B is not
    (["caption", "DATASET=sam", "CAPTIONER=llava-1.5-7b"], "captioners.llava-1.5-7b.model"),
    (["curate", "DATASET=laion"], "datasets.laion.parquet"),
    (["score", "DATASET=sam", "SCORER=clip-vit-l14"], "scorers.clip-vit-l14.clip"),
    (["features", "FEATURES=sam-256"], "training.vaes.sd-vae-ft-ema.model"),
    (["train-paper-stage1"], "datasets.imagenet.path"),
    (["train-paper-stage2"], "training.stages.paper-stage2.init"),
])
def test_a_missing_input_is_one_line_naming_its_key(bare_machine, command, key):
    env, storage = bare_machine
    run = subprocess.run(["make", "-s", "-C", str(REPO), *command, storage], env=env, capture_output=True, text=True,
                         timeout=300)
    output = run.stdout + run.stderr
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert run.returncode != 0 and "Traceback" not in output, output[-3000:]
    assert len(errors) == 1 and errors[0].startswith(f"error: {key}: "), output[-3000:]
    if "model" in key or "clip" in key:
        assert "HF_HUB_OFFLINE is set" in errors[0] and "huggingface-cli download" in errors[0]


def test_a_hub_model_in_the_local_cache_is_found_offline(tmp_path, monkeypatch):
    """The hub's own cache layout (huggingface_hub's try_to_load_from_cache reads it)."""
    repo = tmp_path / "hub" / "models--org--model"
    snapshot = repo / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads HF_HUB_CACHE when first imported; this process imported it long ago
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    require_model("captioners.x.model", "org/model")
    with pytest.raises(MissingInput, match="captioners.x.model: the hub model org/other cannot be loaded here"):
        require_model("captioners.x.model", "org/other")
    folder = tmp_path / "org" / "model-folder"
    folder.mkdir(parents=True)
    with pytest.raises(MissingInput, match="it has no config.json"):
        require_model("training.vaes.v.model", str(folder))


def test_gpus_an_embedded_ray_does_not_have_are_an_error(ray_session):
    cluster.require_gpus(ClusterConfig(), "captioners.x", 0, "num_gpus")  # nothing asked, nothing to check
    with pytest.raises(StageError, match=r"captioners.x.num_gpus: 2 worker\(s\) asking for 1 GPU\(s\) each"):
        cluster.require_gpus(ClusterConfig(), "captioners.x", 1, "num_gpus", count=2)
