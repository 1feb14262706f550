"""Object storage, against a real S3 API server on loopback (moto's): the storage helpers,
and features and training with `storage.root: s3://...` in this process (checkpoints,
metrics, samples and exports on the store, a resume from them, the export loaded back)."""

from __future__ import annotations

import json
import os
import time

import pytest
import s3fs

from captioning.throughput import write_images
from shardkit import storage
from shardkit.config import load_config
from shardkit.shards import StageOutput
from training import checkpoint
from training.encoders import build_text_encoder, build_vae
from training.features import extract
from training.pipelines import generate
from training.layout import run_layout
from training.trainer import train


def test_folders_go_up_last_file_last_and_come_back_as_local_copies(s3_bucket, tmp_path):
    folder = tmp_path / "pipe"
    (folder / "unet").mkdir(parents=True)
    (folder / "unet" / "weights.bin").write_bytes(b"w" * 1000)
    (folder / "model_index.json").write_text("{}")
    (folder / "a.txt").write_text("a")
    uri = f"{s3_bucket}/pipe"
    sent = storage.put_folder(str(folder), uri, last="model_index.json")
    assert sent[-1] == "model_index.json" and sorted(sent) == ["a.txt", "model_index.json", "unet/weights.bin"]
    copy = storage.local_folder(uri)
    assert open(os.path.join(copy, "unet", "weights.bin"), "rb").read() == b"w" * 1000
    assert storage.local_folder(uri) == copy  # the same content: the same copy
    time.sleep(1.1)  # object stores stamp modification times to the second
    storage.atomic_write(f"{uri}/a.txt", "changed")
    again = storage.local_folder(uri)
    assert again != copy and open(os.path.join(again, "a.txt")).read() == "changed"
    storage.remove_tree(uri)
    assert not storage.exists(uri)
    with pytest.raises(FileNotFoundError):
        storage.local_folder(uri)


def test_a_file_named_by_uri_comes_back_alone(s3_bucket):
    """A weights file (an aesthetic head) beside big neighbours: only it is copied."""
    storage.atomic_write(f"{s3_bucket}/models/head.pth", b"h" * 100)
    storage.atomic_write(f"{s3_bucket}/models/other/huge.bin", b"x" * 10_000)
    copy = storage.local_path(f"{s3_bucket}/models/head.pth")
    assert os.path.basename(copy) == "head.pth" and open(copy, "rb").read() == b"h" * 100
    assert os.listdir(os.path.dirname(copy)) == ["head.pth"]
    assert storage.local_path(f"{s3_bucket}/models/head.pth") == copy
    assert storage.local_path("/a/local/file.pth") == "/a/local/file.pth"


def _config(write_config, bucket: str, models: str, **stage):
    return load_config(write_config(
        {"scenes": {"source": "folder", "path": models}},
        storage={"root": f"{bucket}/data"},
        cluster={"in_process": True},
        training={
            "text_encoders": {"t5": {"model": f"{models}/t5", "dtype": "float32"}},
            # the VAE is read from the object store: copied to a local cache where it is loaded
            "vaes": {"vae": {"model": f"{bucket}/models/vae"}},
            "features": {"f": {"dataset": "scenes", "caption": "txt", "text_encoder": "t5", "vae": "vae",
                               "resolution": 32, "batch_size": 8}},
            "stages": {"s": {"features": "f", "model": "PixArt-tiny/2", "steps": 4, "batch_size": 8, "lr": 1e-3,
                             "warmup_steps": 2, "checkpoint_every": 2, "sample_every": 2, "log_every": 1,
                             "export_every": 2, "validation_prompts": ["A large red circle in the center."],
                             "sample_steps": 2, **stage}},
        }))


def test_features_and_training_live_on_the_object_store_and_resume_from_it(s3_bucket, write_config, tmp_path):
    models = str(tmp_path / "models")
    build_text_encoder(f"{models}/t5", corpus=["a large red circle in the center of a plain white background"], seed=0)
    build_vae(f"{models}/vae", seed=0)
    storage.put_folder(f"{models}/vae", f"{s3_bucket}/models/vae")
    config = _config(write_config, s3_bucket, models)
    write_images(config.storage.root, 32, 32, per_shard=8, seed=1, dataset="scenes")

    features = extract(config, "f")
    assert features["samples_out"] == 32
    assert StageOutput.of(config.storage.root, "scenes", "features/f").uri.startswith("s3://")

    first = train(config, "s")
    layout = run_layout(config, "s")
    assert layout.root.startswith("s3://") and first["resumed_from"] == 0
    fs = s3fs.S3FileSystem()
    root = layout.root.removeprefix("s3://")
    names = {p.removeprefix(root + "/") for p in fs.find(root)}
    assert {"checkpoints/step_000004/meta.json", "checkpoints/step_000004/state.pt", "checkpoints/step_000004/rank0.pt",
            "metrics.jsonl", "start.json", "worker0.json", "pipeline/model_index.json",
            "exports/step_000002/model_index.json", "samples/step_000004.png"} <= names
    assert not any(n.startswith("checkpoints/step_000000") for n in names)
    assert checkpoint.latest(layout.checkpoints)[0] == 4

    # four more steps on another machine's fresh work folder: everything comes from the store
    import shutil

    shutil.rmtree(layout.work)
    longer = _config(write_config, s3_bucket, models, steps=8)
    second = train(longer, "s")
    assert second["resumed_from"] == 4
    metrics = [json.loads(line) for line in storage.read_text(layout.metrics).splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, 9))  # nothing lost, nothing twice
    assert checkpoint.latest(layout.checkpoints)[0] == 8
    assert "checkpoints/step_000002/meta.json" not in {p.removeprefix(root + "/") for p in fs.find(root)}  # kept 2

    images = generate(layout.export, ["A large red circle in the center."], height=32, width=32, steps=2)
    assert images[0].size == (32, 32)
    # a done stage is found done on the store, without training
    assert train(longer, "s")["seconds"] == 0.0
