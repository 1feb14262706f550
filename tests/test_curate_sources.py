"""Each source end to end on a real local Ray, real img2dataset and the loopback server."""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from curation.curate import curate, shards_output
from shardkit.config import load_config
from shardkit.shards import StageOutput, read_shard
from shardkit.validate import validate_stage
from synthetic.loopback import LoopbackServer


def _jpeg(colour, size=(64, 48), quality=90, mode="RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, colour).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def _pattern(seed: int, size=(64, 64)) -> Image.Image:
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    return Image.fromarray(blocks).resize(size, Image.NEAREST)


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_laion_sample_through_img2dataset(ray_session, write_config, tmp_path):
    path = write_config({"laion": {
        "source": "laion", "parquet": "${storage}/sources/laion/sample-laion.parquet", "allow_private_urls": True,
        "generate": {"count": 60, "seed": 5}, "samples_per_shard": 25, "resize": {"size": 48},
    }})
    config = load_config(path)
    summary = curate(config, "laion")
    truth = _jsonl(tmp_path / "data" / "sources" / "laion" / "scenes.jsonl")
    defects = Counter(t["defect"] for t in truth if t["defect"])
    assert summary["samples_in"] == 60
    # every broken row is recorded with the reason img2dataset / our decoder gave
    assert summary["failures_by_reason"] == {
        "http_404": defects["missing"], "decode_error": defects["truncated"],
        "not_an_image": defects["html"], "empty": defects["empty"]}
    assert summary["samples_out"] == 60 - sum(defects.values())
    output = shards_output(config, "laion")
    assert validate_stage(output.uri) == [] and validate_stage(output.uri.replace("/shards", "/fetched")) == []
    samples = list(output.samples())
    table = pq.read_table(tmp_path / "data" / "sources" / "laion" / "sample-laion.parquet").to_pylist()
    by_url = {row["URL"]: row for row in table}
    for sample in samples:
        meta, row = sample.meta, by_url[sample.meta["origin"]]
        assert sample.text() == row["TEXT"]
        assert meta["AESTHETIC_SCORE"] == row["AESTHETIC_SCORE"] and meta["LICENSE"] == row["LICENSE"]
        assert min(meta["width"], meta["height"]) == min(48, meta["original_width"], meta["original_height"])
    # shard i holds slice i of the parquet, in order
    first_keys = [s.key for s in read_shard(output.shard_uri(0))]
    assert first_keys == sorted(first_keys) and all(k.startswith("00000") for k in first_keys)


def test_laion_filters_count_what_they_remove(ray_session, write_config):
    path = write_config({"laion": {
        "source": "laion", "parquet": "${storage}/sources/laion/sample-laion.parquet", "allow_private_urls": True,
        "generate": {"count": 60, "seed": 5}, "samples_per_shard": 30,
        "filters": {"max_pwatermark": 0.5, "min_aesthetic": 5.0, "min_caption_words": 2},
    }})
    config = load_config(path)
    summary = curate(config, "laion")
    table = pq.read_table(config.datasets["laion"].parquet[0]).to_pylist()
    expected = Counter()
    for row in table:  # the same order of checks as the filters
        if row["pwatermark"] is not None and row["pwatermark"] > 0.5:
            expected["filtered:pwatermark"] += 1
        elif row["AESTHETIC_SCORE"] is not None and row["AESTHETIC_SCORE"] < 5.0:
            expected["filtered:aesthetic"] += 1
        elif len((row["TEXT"] or "").split()) < 2:
            expected["filtered:caption_too_short"] += 1
    assert {k: v for k, v in summary["removed"].items() if k.startswith("filtered:")} == +expected
    assert sum(expected.values()) > 0
    kept = list(shards_output(config, "laion").samples())
    assert all(s.meta["pwatermark"] is None or s.meta["pwatermark"] <= 0.5 for s in kept)


def test_unsafe_urls_are_recorded_and_never_fetched(ray_session, write_config, tmp_path):
    www = tmp_path / "www"
    www.mkdir()
    (www / "ok.jpg").write_bytes(_jpeg("red"))
    with LoopbackServer(www) as server:
        rows = {
            "file:///etc/passwd": "unsafe_url:scheme",
            "http://169.254.169.254/latest/meta-data/": "unsafe_url:private_address",
            "http://10.0.0.7/a.jpg": "unsafe_url:private_address",
            "http://[::1]/a.jpg": "unsafe_url:private_address",
            f"{server.base_url}/ok.jpg": "unsafe_url:private_address",  # loopback: not allowed by default
        }
        pq.write_table(pa.table({"URL": list(rows), "TEXT": ["x"] * len(rows)}), tmp_path / "urls.parquet")
        config = load_config(write_config({"bad": {"source": "laion", "parquet": str(tmp_path / "urls.parquet")}}))
        summary = curate(config, "bad")
    assert summary["samples_out"] == 0
    record = StageOutput.of(config.storage.root, "bad", "fetched").records()[0]
    assert [f.reason for f in record.failures] == list(rows.values())


def test_sam_sample_download_and_stream(ray_session, write_config, tmp_path):
    path = write_config({"sam": {
        "source": "sam", "links": "${storage}/sources/sam/sa1b_links.txt", "allow_private_urls": True,
        "generate": {"count": 30, "seed": 2}, "resize": {"size": 96},
    }})
    config = load_config(path)
    summary = curate(config, "sam")
    assert summary["samples_out"] == 30 and summary["failures"] == 0 and summary["shards"] == 2
    truth = {f"sa_{t['image_id']}.jpg": t for t in _jsonl(tmp_path / "data" / "sources" / "sam" / "scenes.jsonl")}
    output = shards_output(config, "sam")
    assert validate_stage(output.uri) == []
    for sample in output.samples():
        meta = sample.meta
        member = meta["origin"].rsplit("#", 1)[1]
        assert meta["n_masks"] == sum(a is not None for a in truth[member]["annotation_ids"])
        assert 0 < meta["mean_predicted_iou"] <= 1 and sample.text() == ""
        assert min(meta["width"], meta["height"]) == 96
    downloads = tmp_path / "data" / "sam" / "downloads"
    stamps = {p.name: p.stat().st_mtime_ns for p in downloads.iterdir()}
    assert sorted(stamps) == ["sa_000000.tar", "sa_000001.tar"]
    curate(load_config(path), "sam", restart=True)  # complete tars are not fetched again
    assert {p.name: p.stat().st_mtime_ns for p in downloads.iterdir()} == stamps


def _add(tar: tarfile.TarFile, name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE, link: str = "") -> None:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.size = kind, link, len(data) if kind == tarfile.REGTYPE else 0
    tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def test_sam_tar_with_hostile_members_keeps_the_good_samples(ray_session, write_config, tmp_path):
    folder = tmp_path / "tars"
    folder.mkdir()
    annotation = json.dumps({"image": {"image_id": 1, "width": 64, "height": 48},
                             "annotations": [{"predicted_iou": 0.9, "stability_score": 0.95}]}).encode()
    with tarfile.open(folder / "sa_000000.tar", "w") as tar:
        _add(tar, "sa_1.jpg", _jpeg("blue"))
        _add(tar, "sa_1.json", annotation)
        _add(tar, "../escape.jpg", _jpeg("red"))
        _add(tar, "/etc/cron.d/x.jpg", _jpeg("red"))
        _add(tar, "link.jpg", kind=tarfile.SYMTYPE, link="/etc/passwd")
        _add(tar, "dev.jpg", kind=tarfile.CHRTYPE)
        _add(tar, "sa_2.jpg", _jpeg("green")[:200])  # truncated
        _add(tar, "sa_2.json", annotation)
        _add(tar, "sa_3.jpg", _jpeg("yellow"))
        _add(tar, "sa_3.json", b"{not json")
    config = load_config(write_config({"sam": {"source": "sam", "tars": str(folder)}}))
    summary = curate(config, "sam")
    assert summary["failures_by_reason"] == {"unsafe_tar_member": 4, "decode_error": 1}
    samples = list(shards_output(config, "sam").samples())
    assert [s.meta["origin"].rsplit("#", 1)[1] for s in samples] == ["sa_1.jpg", "sa_3.jpg"]
    assert samples[0].meta["n_masks"] == 1 and "n_masks" not in samples[1].meta
    fetched = StageOutput.of(config.storage.root, "sam", "fetched").records()[0]
    assert fetched.counters.get("sam:bad_json") == 1


def test_folder_source_with_captions_filters_and_dedup(ray_session, write_config, tmp_path):
    root = tmp_path / "images"
    (root / "nested").mkdir(parents=True)
    _pattern(1).save(root / "a.png")
    (root / "a.txt").write_text("a patterned square")
    _pattern(1).save(root / "a_copy.png")  # same pixels, another file: exact duplicate
    _pattern(1).save(root / "nested" / "a_near.jpg", quality=70)  # re-encoded: near duplicate
    _pattern(2).save(root / "b.png")
    (root / "b.json").write_text(json.dumps({"caption": "from json", "licence": "cc-by", "sha256": "forged"}))
    _pattern(3).convert("CMYK").save(root / "c.jpg")
    (root / "c.txt").write_bytes("caf\xe9".encode("latin-1"))  # not UTF-8
    _pattern(4, size=(8, 8)).save(root / "tiny.png")
    _pattern(5, size=(200, 40)).save(root / "wide.png")
    (root / "broken.jpg").write_bytes(_jpeg("red")[:100])
    (root / "notes.md").write_text("not an image, not listed")
    config = load_config(write_config({"mine": {
        "source": "folder", "path": str(root), "samples_per_shard": 4,
        "filters": {"min_side": 16, "near_duplicate_distance": 8},
    }}))
    summary = curate(config, "mine")
    assert summary["samples_in"] == 8
    assert summary["failures_by_reason"] == {"decode_error": 1}
    assert summary["removed"] == {"filtered:min_side": 1, "filtered:aspect_ratio": 1,
                                  "duplicate:exact": 1, "duplicate:near": 1}
    samples = {Path(s.meta["origin"]).name: s for s in shards_output(config, "mine").samples()}
    assert sorted(samples) == ["a.png", "b.png", "c.jpg"]
    assert samples["a.png"].text() == "a patterned square"
    assert samples["b.png"].text() == "from json" and samples["b.png"].meta["licence"] == "cc-by"
    assert samples["b.png"].meta["sha256"] != "forged"
    assert samples["c.jpg"].text() == "caf\ufffd"
    assert validate_stage(shards_output(config, "mine").uri) == []
