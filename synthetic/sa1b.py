"""SA-1B's on-disk format: COCO compressed RLE masks and per-image annotation json.

The RLE string codec follows pycocotools' maskApi.c (rleToString / rleFrString)
bit for bit, so files written here are readable by pycocotools and vice versa.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)


def _runs(mask: np.ndarray) -> list[int]:
    """Column-major run lengths, starting with a (possibly empty) run of zeros."""
    flat = np.asarray(mask, dtype=bool).ravel(order="F")
    if flat.size == 0:
        return []
    edges = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    runs = np.diff(np.concatenate(([0], edges, [flat.size]))).tolist()
    return [0, *runs] if flat[0] else runs


def counts_to_string(cnts: list[int]) -> str:
    out = bytearray()
    for i, count in enumerate(cnts):
        x = int(count)
        # pycocotools deltas against cnts[i-2] only from i > 2 (not >= 2); kept for compatibility.
        if i > 2:
            x -= int(cnts[i - 2])
        more = True
        while more:
            c = x & 0x1F
            x >>= 5  # arithmetic shift on negatives, like C's long
            more = x != -1 if c & 0x10 else x != 0
            if more:
                c |= 0x20
            out.append(c + 48)
    return out.decode("ascii")


def string_to_counts(s: str) -> list[int]:
    cnts: list[int] = []
    data = s.encode("ascii")
    p = 0
    while p < len(data):
        x, k, more = 0, 0, True
        while more:
            c = data[p] - 48
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        if len(cnts) > 2:
            x += cnts[-2]
        cnts.append(x)
    return cnts


def rle_encode(mask: np.ndarray) -> dict[str, Any]:
    h, w = np.asarray(mask).shape
    return {"size": [int(h), int(w)], "counts": counts_to_string(_runs(mask))}


def rle_decode(rle: dict[str, Any]) -> np.ndarray:
    h, w = rle["size"]
    counts = rle["counts"]
    cnts = string_to_counts(counts) if isinstance(counts, str) else list(counts)
    if sum(cnts) != h * w:
        raise ValueError(f"RLE covers {sum(cnts)} pixels, expected {h * w}")
    values = np.arange(len(cnts)) % 2 == 1  # runs alternate zeros, ones, zeros, ...
    flat = np.repeat(values, cnts)
    return flat.reshape((w, h)).T.copy()


def mask_bbox(mask: np.ndarray) -> list[int]:
    ys, xs = np.nonzero(mask)
    if xs.size == 0:
        return [0, 0, 0, 0]
    return [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]


def annotation_for(mask: np.ndarray, ann_id: int, rng: np.random.Generator) -> dict[str, Any]:
    """One SA-1B annotation for a non-empty mask; scores are plausible, not computed."""
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        raise ValueError("SA-1B has no annotations for empty masks")
    h, w = mask.shape
    ys, xs = np.nonzero(mask)
    pick = int(rng.integers(xs.size))  # SAM's prompt point lies on the mask
    return {
        "id": int(ann_id),
        "segmentation": rle_encode(mask),
        "bbox": [float(v) for v in mask_bbox(mask)],
        "area": int(mask.sum()),
        "predicted_iou": round(float(rng.uniform(0.88, 1.02)), 6),
        "stability_score": round(float(rng.uniform(0.92, 0.995)), 6),
        "point_coords": [[float(xs[pick]), float(ys[pick])]],
        "crop_box": [0.0, 0.0, float(w), float(h)],
    }


def image_record(image_id: int, width: int, height: int, file_name: str) -> dict[str, Any]:
    return {"image_id": int(image_id), "width": int(width), "height": int(height), "file_name": file_name}
