"""Per-dataset filters. Each returns the name of the filter that removed a sample (counted
as `filtered:<name>` in the shard record) or None to keep it."""

from __future__ import annotations

from typing import Any

from shardkit.config import FilterConfig

# filter option -> (metadata keys it reads, in order of preference; True if a maximum)
_METADATA_BOUNDS = {
    "max_pwatermark": (("pwatermark",), True),
    "max_punsafe": (("punsafe",), True),
    "min_aesthetic": (("AESTHETIC_SCORE", "aesthetic_score", "aesthetic"), False),
}


def _number(value: Any) -> float | None:
    try:
        return None if value is None else float(value)
    except (TypeError, ValueError):
        return None


def metadata_rejection(meta: dict[str, Any], filters: FilterConfig) -> str | None:
    """Filters on what the source says about a sample, applied before downloading it.
    A sample without the field passes: the filter applies only where the source has it."""
    for option, (keys, is_max) in _METADATA_BOUNDS.items():
        bound = getattr(filters, option)
        if bound is None:
            continue
        value = next((_number(meta[k]) for k in keys if _number(meta.get(k)) is not None), None)
        if value is not None and (value > bound if is_max else value < bound):
            return option.split("_", 1)[1]
    return None


def caption_rejection(caption: str, filters: FilterConfig) -> str | None:
    words = len(caption.split())
    if words < filters.min_caption_words:
        return "caption_too_short"
    if filters.max_caption_words is not None and words > filters.max_caption_words:
        return "caption_too_long"
    return None


def image_rejection(original_width: int, original_height: int, filters: FilterConfig) -> str | None:
    """Filters on the image itself, judged on its original (upright) size: the paper drops
    aspect ratios above 4 before any resizing."""
    if min(original_width, original_height) < filters.min_side:
        return "min_side"
    if filters.max_aspect_ratio is not None:
        ratio = max(original_width, original_height) / max(min(original_width, original_height), 1)
        if ratio > filters.max_aspect_ratio:
            return "aspect_ratio"
    return None
