"""Write small LAION- and SA-1B-shaped sample sources built from synthetic scenes.

Each source folder holds `www/` (what a loopback HTTP server serves), the
source's own index (LAION parquet or SA-1B links file), `scenes.jsonl` with
the exact ground truth, and `source.json`, written last, which marks the folder
complete. Every row derives from (seed, row index) alone, so a larger count
keeps the rows of a smaller one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from synthetic import sa1b
from synthetic.scenes import (
    Scene,
    SceneOptions,
    describe,
    labelled_alt_text,
    render,
    render_masks,
    sample_scene,
)

logger = logging.getLogger(__name__)

DEFAULT_BASE_URL = "http://127.0.0.1:8000"
FORMAT_VERSION = 1

LAION_SCHEMA = pa.schema([
    ("URL", pa.string()),
    ("TEXT", pa.string()),
    ("WIDTH", pa.int64()),
    ("HEIGHT", pa.int64()),
    ("similarity", pa.float64()),
    ("punsafe", pa.float64()),
    ("pwatermark", pa.float64()),
    ("AESTHETIC_SCORE", pa.float64()),
    ("hash", pa.int64()),
    ("LICENSE", pa.string()),
])
LAION_OPTIONS = SceneOptions()
SAM_OPTIONS = SceneOptions(
    min_objects=3, max_objects=6,
    image_sizes=(
        (128, 128), (160, 128), (128, 160), (160, 160), (192, 128),
        (128, 192), (192, 160), (160, 192), (192, 192),
    ),
)
DEFECTS: tuple[str, ...] = ("missing", "truncated", "html", "empty")
_DEFECT_FRACTION = 0.03
_LICENSES = (
    "https://creativecommons.org/licenses/by/4.0/",
    "https://creativecommons.org/licenses/by-sa/3.0/",
    "https://creativecommons.org/licenses/by-nc-sa/3.0/",
)
_HTML_PAGE = (
    b"<!DOCTYPE html>\n<html><head><title>Image not available</title></head>\n"
    b"<body><h1>Sorry, this image has been removed.</h1></body></html>\n"
)
_LINKS_HEADER = "file_name\tcdn_link"


# --------------------------------------------------------------------------- atomic files

def _atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _atomic_write_json(path: Path, obj: Any) -> None:
    _atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def _atomic_write_parquet(path: Path, table: pa.Table) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def read_source(out_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The folder's source.json, or None while the folder is incomplete."""
    path = Path(out_dir) / "source.json"
    return json.loads(path.read_text()) if path.exists() else None


def _reuse_complete(out_dir: Path, identity: dict[str, Any], base_url: str | None) -> bool:
    """True when the folder already holds this source; only its base url is updated then."""
    current = read_source(out_dir)
    if current is None or any(current.get(k) != v for k, v in identity.items()):
        return False
    if base_url is not None and current["base_url"] != base_url.rstrip("/"):
        rewrite_base_url(out_dir, base_url)
    logger.info("sample source %s already complete", out_dir)
    return True


def _jpeg(scene: Scene, quality: int) -> bytes:
    buf = io.BytesIO()
    render(scene).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    _atomic_write_bytes(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows).encode())


# --------------------------------------------------------------------------- LAION

def _stable_hash(*parts: str) -> int:
    digest = hashlib.blake2b("\t".join(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def _laion_metadata(rng: np.random.Generator, label: str, text: str, width: int, height: int) -> dict[str, Any]:
    # Scores correlate with caption quality the way LAION's do, so filters have real work to do.
    sim_mean = {"true": 0.33, "wrong": 0.29, "noise": 0.28, "empty": 0.22}[label]
    if "stock" in text or rng.random() < 0.1:
        pwatermark = rng.uniform(0.7, 0.99)
    else:
        pwatermark = rng.beta(0.8, 8.0)
    punsafe = rng.uniform(0.5, 0.99) if rng.random() < 0.05 else rng.beta(0.6, 30.0)
    known_size = rng.random() >= 0.05
    return {
        "WIDTH": width if known_size else None,
        "HEIGHT": height if known_size else None,
        "similarity": round(float(np.clip(rng.normal(sim_mean, 0.03), 0.1, 0.45)), 6),
        "punsafe": round(float(punsafe), 6),
        "pwatermark": round(float(pwatermark), 6),
        "AESTHETIC_SCORE": round(float(np.clip(rng.normal(5.2, 0.9), 2.5, 8.0)), 6),
        "LICENSE": "?" if rng.random() < 0.85 else str(rng.choice(_LICENSES)),
    }


def _defect_rows(seed: int, count: int) -> dict[int, str]:
    n_bad = min(count, max(len(DEFECTS), round(_DEFECT_FRACTION * count)))
    rows = np.random.default_rng((seed, count, 99)).choice(count, size=n_bad, replace=False)
    return {int(r): DEFECTS[i % len(DEFECTS)] for i, r in enumerate(sorted(rows))}


def _defective_bytes(defect: str, good: bytes) -> bytes | None:
    return {"missing": None, "truncated": good[: len(good) // 2], "html": _HTML_PAGE, "empty": b""}[defect]


def _laion_table(rows: list[dict[str, Any]], base_url: str) -> pa.Table:
    columns = {name: [r[name] for r in rows] for name in LAION_SCHEMA.names if name != "URL"}
    columns["URL"] = [f"{base_url}/{r['file_name']}" for r in rows]
    return pa.table(columns, schema=LAION_SCHEMA)


def write_sample_laion(
    out_dir: str | os.PathLike, count: int = 200, seed: int = 0, base_url: str | None = None,
) -> dict[str, Any]:
    """Write a LAION-like source (parquet + served JPEGs, ~3% broken rows); returns source.json."""
    out = Path(out_dir)
    identity = {"kind": "laion", "count": count, "seed": seed, "format_version": FORMAT_VERSION}
    if _reuse_complete(out, identity, base_url):
        return read_source(out)  # type: ignore[return-value]
    (out / "source.json").unlink(missing_ok=True)
    base = (base_url or DEFAULT_BASE_URL).rstrip("/")
    (out / "www" / "images").mkdir(parents=True, exist_ok=True)
    defects = _defect_rows(seed, count)
    rows, truth = [], []
    for i in range(count):
        scene = sample_scene(np.random.default_rng((seed, i, 0)), LAION_OPTIONS)
        text, label = labelled_alt_text(scene, np.random.default_rng((seed, i, 1)))
        meta_rng = np.random.default_rng((seed, i, 2))
        file_name = f"images/{i:06d}.jpg"
        data: bytes | None = _jpeg(scene, quality=int(meta_rng.integers(75, 96)))
        if i in defects:
            data = _defective_bytes(defects[i], data)
        if data is not None:
            _atomic_write_bytes(out / "www" / file_name, data)
        else:
            (out / "www" / file_name).unlink(missing_ok=True)
        row = {"file_name": file_name, "TEXT": text, "hash": _stable_hash(file_name, text)}
        rows.append(row | _laion_metadata(meta_rng, label, text, scene.width, scene.height))
        truth.append({
            "row": i, "file_name": file_name, "scene": scene.to_dict(), "description": describe(scene),
            "alt_text_label": label, "defect": defects.get(i),
        })
    _write_jsonl(out / "scenes.jsonl", truth)
    _atomic_write_parquet(out / "sample-laion.parquet", _laion_table(rows, base))
    source = identity | {"base_url": base, "parquet": "sample-laion.parquet", "defects": len(defects)}
    _atomic_write_json(out / "source.json", source)
    logger.info("wrote LAION sample: %d rows (%d defective) to %s", count, len(defects), out)
    return source


# --------------------------------------------------------------------------- SA-1B

def _tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 1_680_000_000  # fixed mtime keeps tars byte-identical
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _links_text(tars: list[str], base_url: str) -> str:
    return "".join(f"{line}\n" for line in [_LINKS_HEADER, *(f"{t}\t{base_url}/{t}" for t in tars)])


def write_sample_sam(
    out_dir: str | os.PathLike, count: int = 60, seed: int = 0, images_per_tar: int = 20, base_url: str | None = None,
    image_sizes: tuple[tuple[int, int], ...] | None = None,
) -> dict[str, Any]:
    """Write an SA-1B-like source (tars of jpg + annotation json, links file); returns source.json.
    `image_sizes` overrides the small default sizes (e.g. SA-1B's ~1500x2250 for benchmarks)."""
    out = Path(out_dir)
    identity = {
        "kind": "sam", "count": count, "seed": seed, "images_per_tar": images_per_tar, "format_version": FORMAT_VERSION,
    }
    options = SAM_OPTIONS
    if image_sizes is not None:
        identity["image_sizes"] = [list(size) for size in image_sizes]
        options = dataclasses.replace(SAM_OPTIONS, image_sizes=tuple(tuple(size) for size in image_sizes))
    if _reuse_complete(out, identity, base_url):
        return read_source(out)  # type: ignore[return-value]
    (out / "source.json").unlink(missing_ok=True)
    base = (base_url or DEFAULT_BASE_URL).rstrip("/")
    tars: list[str] = []
    truth: list[dict[str, Any]] = []
    for start in range(0, count, images_per_tar):
        tar_name = f"sa_{len(tars):06d}.tar"
        members: list[tuple[str, bytes]] = []
        for i in range(start, min(count, start + images_per_tar)):
            image_id = i + 1  # SA-1B image ids start at 1
            scene = sample_scene(np.random.default_rng((seed, i, 0)), options)
            ann_rng = np.random.default_rng((seed, i, 1))
            annotations, ann_ids = [], []
            for k, mask in enumerate(render_masks(scene)):
                if not mask.any():
                    ann_ids.append(None)
                    continue
                ann_ids.append(image_id * 1000 + k)
                annotations.append(sa1b.annotation_for(mask, ann_ids[-1], ann_rng))
            file_name = f"sa_{image_id}.jpg"
            image = sa1b.image_record(image_id, scene.width, scene.height, file_name)
            record = {"image": image, "annotations": annotations}
            members += [(file_name, _jpeg(scene, quality=90)), (f"sa_{image_id}.json", json.dumps(record).encode())]
            truth.append({
                "image_id": image_id, "tar": tar_name, "file_name": file_name, "scene": scene.to_dict(),
                "description": describe(scene), "annotation_ids": ann_ids,
            })
        _atomic_write_bytes(out / "www" / tar_name, _tar_bytes(members))
        tars.append(tar_name)
    _write_jsonl(out / "scenes.jsonl", truth)
    _atomic_write_bytes(out / "sa1b_links.txt", _links_text(tars, base).encode())
    source = identity | {"base_url": base, "links": "sa1b_links.txt", "tars": tars}
    _atomic_write_json(out / "source.json", source)
    logger.info("wrote SA-1B sample: %d images in %d tars to %s", count, len(tars), out)
    return source


# --------------------------------------------------------------------------- base url

def rewrite_base_url(out_dir: str | os.PathLike, new_base_url: str) -> None:
    """Point a complete source at a new server address (e.g. a loopback server on another port).

    URLs are rebuilt from the relative paths in scenes.jsonl / source.json rather
    than by string replacement, so a rewrite interrupted between files heals on retry.
    """
    out = Path(out_dir)
    source = read_source(out)
    if source is None:
        raise FileNotFoundError(f"{out} is not a complete sample source (no source.json)")
    base = new_base_url.rstrip("/")
    if source["kind"] == "laion":
        path = out / source["parquet"]
        table = pq.read_table(path, schema=LAION_SCHEMA)
        names = [r["file_name"] for r in _read_jsonl(out / "scenes.jsonl")]
        urls = pa.array([f"{base}/{n}" for n in names], type=pa.string())
        _atomic_write_parquet(path, table.set_column(LAION_SCHEMA.get_field_index("URL"), "URL", urls))
    elif source["kind"] == "sam":
        _atomic_write_bytes(out / source["links"], _links_text(source["tars"], base).encode())
    else:
        raise ValueError(f"unknown source kind {source['kind']!r}")
    _atomic_write_json(out / "source.json", source | {"base_url": base})
    logger.info("rewrote %s base url to %s", out, base)
