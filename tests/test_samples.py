import io
import json
import tarfile
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from synthetic.loopback import LoopbackServer
from synthetic.sa1b import rle_decode
from synthetic.samples import DEFAULT_BASE_URL, rewrite_base_url, write_sample_laion, write_sample_sam
from synthetic.scenes import Scene, describe, render_masks

LAION_COLUMNS = [
    ("URL", pa.string()), ("TEXT", pa.string()), ("WIDTH", pa.int64()), ("HEIGHT", pa.int64()),
    ("similarity", pa.float64()), ("punsafe", pa.float64()), ("pwatermark", pa.float64()),
    ("AESTHETIC_SCORE", pa.float64()), ("hash", pa.int64()), ("LICENSE", pa.string()),
]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def mtimes(root: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def laion(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("laion")
    write_sample_laion(out, seed=3)
    return out


@pytest.fixture(scope="module")
def sam(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sam")
    write_sample_sam(out, count=12, seed=1, images_per_tar=5)
    return out


def test_laion_parquet_has_laion_columns(laion):
    table = pq.read_table(laion / "sample-laion.parquet")
    assert [(f.name, f.type) for f in table.schema] == LAION_COLUMNS
    assert table.num_rows == 200
    rows = table.to_pylist()
    assert [r["URL"] for r in rows] == [f"{DEFAULT_BASE_URL}/images/{i:06d}.jpg" for i in range(200)]
    assert len({r["hash"] for r in rows}) == 200
    assert 0 < sum(r["WIDTH"] is None for r in rows) < 30
    assert {r["LICENSE"] for r in rows} >= {"?"} and any(r["LICENSE"].startswith("https://creativecommons") for r in rows)
    # Filters downstream need something to remove.
    assert any(r["punsafe"] > 0.5 for r in rows) and any(r["pwatermark"] > 0.8 for r in rows)
    assert any(r["AESTHETIC_SCORE"] < 4.5 for r in rows) and any(r["similarity"] < 0.28 for r in rows)
    assert any(r["TEXT"] == "" for r in rows)
    assert all(0 <= r[c] <= 1 for r in rows for c in ("punsafe", "pwatermark", "similarity"))
    assert json.loads((laion / "source.json").read_text())["base_url"] == DEFAULT_BASE_URL


def test_laion_images_and_bad_rows(laion):
    table = pq.read_table(laion / "sample-laion.parquet").to_pylist()
    truth = read_jsonl(laion / "scenes.jsonl")
    assert [t["row"] for t in truth] == list(range(200))
    defects = {t["row"]: t["defect"] for t in truth if t["defect"]}
    assert sorted(set(defects.values())) == ["empty", "html", "missing", "truncated"]
    assert 4 <= len(defects) <= 10
    for t, row in zip(truth, table):
        path = laion / "www" / t["file_name"]
        scene = Scene.from_dict(t["scene"])
        assert t["description"] == describe(scene)
        defect = t["defect"]
        if defect == "missing":
            assert not path.exists()
        elif defect == "empty":
            assert path.stat().st_size == 0
        elif defect == "html":
            assert path.read_bytes().startswith(b"<!DOCTYPE html>")
        elif defect == "truncated":
            with pytest.raises(OSError):
                Image.open(path).load()
        else:
            with Image.open(path) as img:
                assert img.format == "JPEG" and img.size == (scene.width, scene.height)
                img.load()
            if row["WIDTH"] is not None:
                assert (row["WIDTH"], row["HEIGHT"]) == (scene.width, scene.height)


def test_laion_served_over_loopback(laion, tmp_path):
    copy = tmp_path / "laion"
    write_sample_laion(copy, count=30, seed=3)
    with LoopbackServer(copy / "www") as server:
        write_sample_laion(copy, count=30, seed=3, base_url=server.base_url)  # complete folder: only URLs move
        rows = pq.read_table(copy / "sample-laion.parquet").to_pylist()
        truth = read_jsonl(copy / "scenes.jsonl")
        for row, t in zip(rows, truth):
            assert row["URL"].startswith(server.base_url + "/images/")
            if t["defect"] == "missing":
                with pytest.raises(urllib.error.HTTPError):
                    urllib.request.urlopen(row["URL"], timeout=5)
                continue
            with urllib.request.urlopen(row["URL"], timeout=5) as resp:
                assert resp.read() == (copy / "www" / t["file_name"]).read_bytes()
    # Rows depend only on (seed, index): the small sample is a prefix of the big one.
    big = pq.read_table(laion / "sample-laion.parquet").to_pylist()[:30]
    assert [r["TEXT"] for r in rows] == [r["TEXT"] for r in big]


def test_sam_tars_follow_sa1b_layout(sam):
    tars = sorted((sam / "www").glob("*.tar"))
    assert [t.name for t in tars] == ["sa_000000.tar", "sa_000001.tar", "sa_000002.tar"]
    truth = {t["image_id"]: t for t in read_jsonl(sam / "scenes.jsonl")}
    assert sorted(truth) == list(range(1, 13))
    seen = []
    for tar_path in tars:
        with tarfile.open(tar_path) as tar:
            names = tar.getnames()
            ids = [int(n[3:-4]) for n in names if n.endswith(".jpg")]
            assert names == [f"sa_{i}.{ext}" for i in ids for ext in ("jpg", "json")]
            for image_id in ids:
                seen.append(image_id)
                t = truth[image_id]
                assert t["tar"] == tar_path.name
                scene = Scene.from_dict(t["scene"])
                assert 3 <= len(scene.objects) <= 6
                img = Image.open(io.BytesIO(tar.extractfile(f"sa_{image_id}.jpg").read()))
                assert img.size == (scene.width, scene.height)
                record = json.loads(tar.extractfile(f"sa_{image_id}.json").read())
                assert record["image"] == {
                    "image_id": image_id, "width": scene.width, "height": scene.height, "file_name": f"sa_{image_id}.jpg",
                }
                masks = [m for m in render_masks(scene) if m.any()]
                assert len(record["annotations"]) == len(masks)
                for ann, mask, ann_id in zip(record["annotations"], masks, t["annotation_ids"]):
                    assert ann["id"] == ann_id
                    assert ann["segmentation"]["size"] == [scene.height, scene.width]
                    assert (rle_decode(ann["segmentation"]) == mask).all()
                    assert ann["area"] == int(mask.sum())
    assert seen == list(range(1, 13))


def test_sam_links_file(sam):
    lines = (sam / "sa1b_links.txt").read_text().splitlines()
    assert lines[0] == "file_name\tcdn_link"
    assert lines[1:] == [f"sa_{i:06d}.tar\t{DEFAULT_BASE_URL}/sa_{i:06d}.tar" for i in range(3)]


def test_idempotent_and_deterministic(laion, sam, tmp_path):
    before = mtimes(laion) | mtimes(sam)
    write_sample_laion(laion, seed=3)
    write_sample_sam(sam, count=12, seed=1, images_per_tar=5)
    assert mtimes(laion) | mtimes(sam) == before
    other = tmp_path / "sam"
    write_sample_sam(other, count=12, seed=1, images_per_tar=5)
    for name in ("sa_000000.tar", "sa_000001.tar", "sa_000002.tar"):
        assert (other / "www" / name).read_bytes() == (sam / "www" / name).read_bytes()
    assert (other / "scenes.jsonl").read_text() == (sam / "scenes.jsonl").read_text()
    write_sample_sam(other, count=12, seed=2, images_per_tar=5)  # different arguments regenerate
    assert (other / "scenes.jsonl").read_text() != (sam / "scenes.jsonl").read_text()


def test_rewrite_base_url(tmp_path):
    laion, sam = tmp_path / "laion", tmp_path / "sam"
    write_sample_laion(laion, count=10, seed=0)
    write_sample_sam(sam, count=4, seed=0, images_per_tar=2)
    images_before = mtimes(laion / "www") | mtimes(sam / "www")
    old = pq.read_table(laion / "sample-laion.parquet")

    rewrite_base_url(laion, "http://127.0.0.1:5555/")
    rewrite_base_url(sam, "http://127.0.0.1:5555")
    new = pq.read_table(laion / "sample-laion.parquet")
    assert new.schema == old.schema
    assert new.column("URL").to_pylist() == [f"http://127.0.0.1:5555/images/{i:06d}.jpg" for i in range(10)]
    assert new.drop_columns(["URL"]).equals(old.drop_columns(["URL"]))
    assert (sam / "sa1b_links.txt").read_text() == (
        "file_name\tcdn_link\n"
        "sa_000000.tar\thttp://127.0.0.1:5555/sa_000000.tar\n"
        "sa_000001.tar\thttp://127.0.0.1:5555/sa_000001.tar\n"
    )
    for folder in (laion, sam):
        assert json.loads((folder / "source.json").read_text())["base_url"] == "http://127.0.0.1:5555"
        assert not list(folder.glob(".*tmp*"))
    assert mtimes(laion / "www") | mtimes(sam / "www") == images_before

    write_sample_sam(sam, count=4, seed=0, images_per_tar=2, base_url="http://localhost:1")
    assert (sam / "sa1b_links.txt").read_text().splitlines()[1] == "sa_000000.tar\thttp://localhost:1/sa_000000.tar"
    with pytest.raises(FileNotFoundError):
        rewrite_base_url(tmp_path / "empty", "http://x")


def test_sam_scenes_are_dense(sam):
    counts = [len(t["scene"]["objects"]) for t in read_jsonl(sam / "scenes.jsonl")]
    assert np.mean(counts) >= 3.5
