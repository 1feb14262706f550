"""`datasets:`: one entry per source, a union discriminated by `source:`."""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union, get_args

from pydantic import Field, PositiveInt, field_validator, model_validator

from shardkit.addresses import PrivateAllowlist
from shardkit.config.base import Strict


LAION_METADATA_COLUMNS = (
    "WIDTH", "HEIGHT", "similarity", "punsafe", "pwatermark", "AESTHETIC_SCORE", "hash", "LICENSE",
)


# ---- datasets ------------------------------------------------------------------------------

class ResizeConfig(Strict):
    """img2dataset's semantics: keep_ratio makes the smaller side `size`; center_crop then
    crops size x size; none keeps the pixels (and the bytes, for plain JPEGs)."""
    mode: Literal["keep_ratio", "center_crop", "none"] = "keep_ratio"
    size: int = Field(256, gt=0)
    upscale: bool = False
    """Enlarge images smaller than `size` (img2dataset's resize_only_if_bigger, inverted)."""
    quality: int = Field(95, ge=1, le=100)
    """JPEG quality used when an image has to be re-encoded."""
    max_pixels: int = Field(100_000_000, gt=0)
    """Decompression-bomb bound, checked from the header before decoding."""


class FilterConfig(Strict):
    min_side: int = Field(0, ge=0)
    max_aspect_ratio: float | None = Field(4.0, gt=0)
    max_pwatermark: float | None = None
    max_punsafe: float | None = None
    min_aesthetic: float | None = None
    min_caption_words: int = Field(0, ge=0)
    max_caption_words: int | None = Field(None, ge=0)
    dedup_exact: bool = True
    near_duplicate_distance: int | None = Field(None, ge=0, le=64)
    """Hamming distance between 64-bit perceptual hashes; None disables near-dup removal."""


class GenerateConfig(Strict):
    """Build this source with the synthetic scene generator and serve it from a loopback HTTP
    server for the duration of the job: the embedded default that needs no network."""
    count: int = Field(200, gt=0)
    seed: int = 0


def _check_allowlist(entries: list[str]) -> list[str]:
    PrivateAllowlist.parse(entries)  # the one parser of these entries, also the downloaders'
    return entries


def _one_private_setting(source: Any) -> Any:
    if source.allow_private_urls and source.allowed_private:
        raise ValueError("give allowed_private (the hosts and networks that may be private) or "
                         "allow_private_urls (every private address), not both")
    return source


class SourceBase(Strict):
    samples_per_shard: int = Field(1000, gt=0)
    resize: ResizeConfig = ResizeConfig()
    filters: FilterConfig = FilterConfig()


class LaionSource(SourceBase):
    source: Literal["laion"]
    parquet: list[str]
    url_column: str = "URL"
    caption_column: str = "TEXT"
    metadata_columns: list[str] = list(LAION_METADATA_COLUMNS)
    allow_private_urls: bool = False
    """Every private address allowed, redirects included (all or nothing; kept for old
    configs). Prefer `allowed_private`."""
    allowed_private: list[str] = []
    """Non-public hosts that may be fetched: addresses, CIDR networks and exact host names
    (["127.0.0.1", "10.0.0.0/8", "mirror.internal"]), checked on every redirect hop and on
    the address actually connected to. A name admits whatever private addresses its DNS
    gives, except link-local ones (cloud metadata), which only a network entry admits."""
    timeout_s: float = Field(10.0, gt=0)
    """Per socket operation (connect, each read): img2dataset's timeout."""
    deadline_s: float = Field(60.0, gt=0)
    """One image's whole fetch, redirects and body included (each retry gets its own);
    past it the row fails as `deadline`."""
    max_download_bytes: int = Field(64 * 2**20, gt=0)
    """Largest response body fetched (64 MiB); a larger one fails as `too_large`, refused
    from its Content-Length or cut as it arrives. Worst-case download memory of one shard
    task is about 2 x threads x this."""
    retries: int = Field(0, ge=0)
    threads: int = Field(16, gt=0)
    """Download threads per shard task (img2dataset's thread_count)."""
    generate: GenerateConfig | None = None

    @field_validator("parquet", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("allowed_private")
    @classmethod
    def _allowlist(cls, value: list[str]) -> list[str]:
        return _check_allowlist(value)

    @model_validator(mode="after")
    def _private_one_way(self) -> "LaionSource":
        return _one_private_setting(self)


class SamSource(SourceBase):
    source: Literal["sam"]
    links: str | None = None
    """SA-1B links file: tab-separated file_name, cdn_link (with a header line)."""
    tars: str | None = None
    """Or a folder (URI) of SA-1B tars already downloaded."""
    download_dir: str | None = None
    """Where downloaded tars are kept (default: <storage>/<dataset>/downloads)."""
    allow_private_urls: bool = False
    """As the laion source's: every private address; prefer `allowed_private`."""
    allowed_private: list[str] = []
    """As the laion source's: addresses, CIDR networks and host names that may be private."""
    timeout_s: float = Field(60.0, gt=0)
    """Per socket operation (connect, each read) of a tar download."""
    deadline_s: float = Field(4 * 3600.0, gt=0)
    """One tar's download (4 h: an SA-1B tar is ~11 GB). Past it the shard fails and keeps
    its partial `.part` file; a rerun resumes it."""
    max_download_bytes: int = Field(32 * 2**30, gt=0)
    """Largest tar downloaded (32 GiB, about three times SA-1B's largest); a larger one is
    not fetched and is recorded as `too_large`."""
    max_member_bytes: int = Field(64 * 2**20, gt=0)
    """Largest tar member read (64 MiB; SA-1B's images are ~0.5-1.5 MB, their annotation
    json a few MB); a larger one is skipped unread and recorded as `too_large`."""
    generate: GenerateConfig | None = None

    @field_validator("allowed_private")
    @classmethod
    def _allowlist(cls, value: list[str]) -> list[str]:
        return _check_allowlist(value)

    @model_validator(mode="after")
    def _links_or_tars(self) -> "SamSource":
        if (self.links is None) == (self.tars is None):
            raise ValueError("give exactly one of 'links' or 'tars'")
        return _one_private_setting(self)


class FolderSource(SourceBase):
    source: Literal["folder"]
    path: str
    recursive: bool = True
    extensions: list[str] = ["jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff"]
    max_file_bytes: int = Field(64 * 2**20, gt=0)
    """Largest image (or .txt/.json sidecar) read (64 MiB); a larger image is recorded as
    `too_large`. Symlinks leading out of the folder (`symlink_outside`) and anything that
    is not a regular file (`not_regular_file`: pipes, sockets, devices) are never opened."""


class SyntheticSource(SourceBase):
    source: Literal["synthetic"]
    count: int = Field(200, gt=0)
    seed: int = 0
    min_objects: int = Field(1, ge=1)
    max_objects: int = Field(3, ge=1)
    caption: Literal["alt_text", "description", "none"] = "alt_text"
    """What `<key>.txt` holds: LAION-like alt text, the exact scene description, or nothing."""
    image_sizes: list[tuple[PositiveInt, PositiveInt]] | None = None
    """(width, height) choices; None: the generator's mix of 64-160 px. [[64, 64]] gives
    square scenes a 64 px feature set uses whole, so every caption stays true of its crop."""
    textured_fraction: float | None = Field(None, ge=0, le=1)
    """Share of textured backgrounds; None: the generator's 0.3."""

    @model_validator(mode="after")
    def _object_bounds(self) -> "SyntheticSource":
        if self.max_objects < self.min_objects:
            raise ValueError("max_objects must be >= min_objects")
        return self


SOURCES = (LaionSource, SamSource, FolderSource, SyntheticSource)
SOURCE_KINDS = tuple(get_args(kind.model_fields["source"].annotation)[0] for kind in SOURCES)
"""Each source's `source:` value, read from its Literal: the union below is the one list."""
DatasetConfig = Annotated[Union[SOURCES], Field(discriminator="source")]
