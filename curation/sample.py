"""Building shard-format samples from an image and what a source knows about it."""

from __future__ import annotations

import hashlib
from typing import Any

from shardkit.shards import CAPTION, IMAGE, META, Sample, encode_meta


def make_sample(key: str, image_bytes: bytes, *, width: int, height: int, original_width: int,
                original_height: int, source: str, origin: str, caption: str = "",
                extra: dict[str, Any] | None = None) -> Sample:
    """A `shards/` sample: the image bytes as given (never re-encoded here), its metadata
    with the fields every stage relies on, and the source's own caption."""
    meta = dict(extra or {})
    meta.update(
        source=source, origin=origin, width=width, height=height,
        original_width=original_width, original_height=original_height,
        sha256=hashlib.sha256(image_bytes).hexdigest(),
    )
    return Sample(key, {IMAGE: image_bytes, META: encode_meta(meta), CAPTION: caption.encode("utf-8")})
