"""Aspect-ratio buckets for multi-aspect training (the paper's stage 3).

Each image goes to the bucket whose aspect ratio (height / width) is nearest its own, is
resized to cover the bucket and centre-cropped to it; a training batch then holds one bucket
only, so no image is padded or squashed. Two named ratio sets:

* ``pipeline``: the 33 bins ``PixArtAlphaPipeline`` snaps a requested size to at inference
  (``use_resolution_binning``). At 256, 512 and 1024 px the sizes are the pipeline's own, so a
  model is trained at exactly the sizes it will be asked for.
* ``paper``: 40 ratios log-spaced from 0.25 to 4, as the paper describes its buckets.

Any other resolution, or a list of ratios, gets sizes of about ``resolution²`` pixels:
h = R·√r, w = R/√r, rounded to ``multiple`` (which must cover VAE factor × patch size).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from PIL import Image

PAPER_BUCKETS = 40
PAPER_RANGE = (0.25, 4.0)


@dataclass(frozen=True)
class Bucket:
    ratio: float
    """height / width"""
    height: int
    width: int

    @property
    def size(self) -> tuple[int, int]:
        return self.height, self.width


def _pipeline_tables() -> dict[int, dict[str, list[float]]]:
    from diffusers.pipelines.pixart_alpha import pipeline_pixart_alpha as tables

    return {256: tables.ASPECT_RATIO_256_BIN, 512: tables.ASPECT_RATIO_512_BIN, 1024: tables.ASPECT_RATIO_1024_BIN}


def ratios(name_or_list: str | Sequence[float]) -> list[float]:
    if not isinstance(name_or_list, str):
        return sorted(float(r) for r in name_or_list)
    if name_or_list == "pipeline":
        return sorted(float(r) for r in _pipeline_tables()[1024])
    if name_or_list == "paper":
        low, high = (math.log(x) for x in PAPER_RANGE)
        return [round(math.exp(low + (high - low) * i / (PAPER_BUCKETS - 1)), 4) for i in range(PAPER_BUCKETS)]
    raise ValueError(f"unknown bucket set {name_or_list!r}; expected 'pipeline', 'paper' or a list of ratios")


def _round(value: float, multiple: int) -> int:
    return max(multiple, int(round(value / multiple)) * multiple)


def buckets(resolution: int, ratio_set: str | Sequence[float] = "pipeline", multiple: int = 16) -> list[Bucket]:
    """The buckets around ``resolution``, by ratio; sizes that coincide after rounding (small
    resolutions) are kept once, under the ratio nearest the size's own."""
    table = _pipeline_tables().get(resolution) if ratio_set == "pipeline" else None
    by_size: dict[tuple[int, int], Bucket] = {}
    for ratio in ratios(ratio_set):
        if table is not None:
            height, width = (int(v) for v in table[next(k for k in table if float(k) == ratio)])
        else:
            height = _round(resolution * math.sqrt(ratio), multiple)
            width = _round(resolution / math.sqrt(ratio), multiple)
        if height % multiple or width % multiple:
            raise ValueError(f"bucket {height}x{width} (ratio {ratio}) is not a multiple of {multiple}")
        bucket = Bucket(ratio, height, width)
        kept = by_size.get(bucket.size)
        if kept is None or abs(ratio - height / width) < abs(kept.ratio - height / width):
            by_size[bucket.size] = bucket
    return sorted(by_size.values(), key=lambda b: b.ratio)


def nearest(options: Sequence[Bucket], height: int, width: int) -> Bucket:
    """PixArt's rule: the bucket with the nearest h/w ratio (linear distance)."""
    ratio = height / width
    return min(options, key=lambda b: abs(b.ratio - ratio))


def fit(image: Image.Image, bucket: Bucket) -> Image.Image:
    """Resize to cover the bucket (no side shorter than the bucket's), then centre-crop."""
    scale = max(bucket.height / image.height, bucket.width / image.width)
    resized = image.resize((max(bucket.width, round(image.width * scale)), max(bucket.height, round(image.height * scale))),
                           Image.BICUBIC)
    left, top = (resized.width - bucket.width) // 2, (resized.height - bucket.height) // 2
    return resized.crop((left, top, left + bucket.width, top + bucket.height))
