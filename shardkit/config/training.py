"""`training:`: encoders, feature sets and the training stages."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from shardkit.config.base import Strict

# ---- training ------------------------------------------------------------------------------


class TinyEncoderConfig(Strict):
    """Build a tiny random-weight model into `model` when that folder is empty."""
    seed: int = 0


class TextEncoderConfig(Strict):
    model: str
    """A folder (or hub id) with a T5 encoder and its tokenizer, e.g. google/flan-t5-xxl's encoder."""
    max_length: int = Field(120, gt=0)
    dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    tiny: TinyEncoderConfig | None = None


class VaeConfig(Strict):
    model: str
    """A diffusers AutoencoderKL folder (or hub id), e.g. stabilityai/sd-vae-ft-ema."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    tiny: TinyEncoderConfig | None = None


class LabelConfig(Strict):
    """Class labels for class-conditional training (stage 1): one class per sample, read from
    its json, as ImageNet's folder-per-class or a `cls` field would give it."""
    field: str
    """Dotted path into each sample's json: `scene.objects.0.kind` (the synthetic scenes'
    object), `folder` (the folder source's sub-folder), or any metadata key."""
    classes: list[str] | Literal["folders"] = Field(min_length=1)
    """Class names in index order: the model's class ids, and DiTPipeline's id2label. Or
    `folders`: the sorted names of a folder dataset's sub-folders, read when features are
    made (with `field: folder`; ImageNet's train layout gives DiT-XL/2's 1000 ids)."""

    @field_validator("classes")
    @classmethod
    def _unique(cls, value: list[str] | str) -> list[str] | str:
        if isinstance(value, list) and len(set(value)) != len(value):
            raise ValueError("class names must be unique")
        return value


class SelectCondition(Strict):
    """Keep a sample only if its json value at `field` (dotted path) is within [min, max];
    samples without the field are left out too. E.g. {field: AESTHETIC_SCORE, min: 5.5}."""
    field: str
    min: float | None = None
    max: float | None = None

    @model_validator(mode="after")
    def _bounded(self) -> "SelectCondition":
        if self.min is None and self.max is None:
            raise ValueError("give min, max or both")
        if self.min is not None and self.max is not None and self.max < self.min:
            raise ValueError("max must be >= min")
        return self


class BucketsConfig(Strict):
    """Multi-aspect training: every image goes to the bucket whose aspect ratio (h/w) is
    nearest its own, is resized to cover that bucket's size and centre-cropped to it."""
    ratios: Literal["pipeline", "paper"] | list[float] = "pipeline"
    """`pipeline`: the 33 bins PixArtAlphaPipeline maps sizes to at inference (exactly its
    sizes at 256, 512 and 1024); `paper`: 40 ratios, log-spaced from 0.25 to 4, as the paper
    describes; or a list of h/w ratios."""
    multiple: int = Field(16, gt=0)
    """Bucket sides are multiples of this: at least VAE factor x patch size (16 for SD's VAE
    and PixArt's patch 2)."""

    @field_validator("ratios")
    @classmethod
    def _positive(cls, value: Any) -> Any:
        if isinstance(value, list) and (not value or any(r <= 0 for r in value)):
            raise ValueError("ratios must be a non-empty list of positive h/w ratios")
        return value


class FeaturesConfig(Strict):
    """A `features/<name>/` stage: VAE posteriors and T5 embeddings of a captioned dataset."""
    dataset: str
    caption: str | None = None
    """`txt` (the source's alt text) or a captioner name (its dense captions); None for a
    class-conditional feature set (`label`), which stores no text embeddings."""
    alt_text_probability: float = Field(0.0, ge=0, le=1)
    """Per sample, use the alt text instead of `caption` with this probability (a mix)."""
    text_encoder: str | None = None
    vae: str
    label: LabelConfig | None = None
    """Store each sample's class id (`cls`): class-conditional training (stage 1)."""
    select: list[SelectCondition] = []
    """Keep only the samples meeting every condition: stage 3's high-quality selection."""
    scores: str | None = None
    """Read the dataset through this scorer's `scores/<scorer>/` stage, so `select` can name its
    scores (`scores.<scorer>.aesthetic`); the scorer must read the stage `caption` comes from."""
    buckets: BucketsConfig | None = None
    """Aspect-ratio buckets around `resolution` instead of square centre crops."""
    resolution: int = Field(256, gt=0)
    """Images are resized (smaller side) and centre-cropped to resolution x resolution."""
    dtype: Literal["float16", "bfloat16"] = "float16"
    batch_size: int = Field(32, gt=0)
    actors: int = Field(1, gt=0)
    num_gpus: float = Field(0.0, ge=0)
    num_cpus: float = Field(0.5, gt=0)
    seed: int = 0

    @model_validator(mode="after")
    def _conditioned(self) -> "FeaturesConfig":
        if self.caption is None and self.label is None:
            raise ValueError("give `caption` (text conditioning) or `label` (class conditioning)")
        if self.caption is not None and self.text_encoder is None:
            raise ValueError("`caption` needs a `text_encoder`")
        return self


class StageConfig(Strict):
    """One training stage. The three stages of the paper differ by these values only:
    stage 1 `conditioning: class` (a DiT), stage 2 `init_stage: stage1` on dense captions,
    stage 3 `init_stage: stage2` on a selected, bucketed, higher-resolution feature set."""
    features: str
    """The feature set (training.features) to train on."""
    conditioning: Literal["text", "class"] = "text"
    """`text`: PixArtTransformer2DModel on T5 embeddings; `class`: DiTTransformer2DModel on the
    feature set's class labels (DiT's class embedding, the null class for guidance)."""
    model: str = "PixArt-tiny/2"
    """A size from training/architectures.py's registry (PixArt-XL/2 and DiT-XL/2 are the same blocks)."""
    init: str | None = None
    """Start from a diffusers PixArt folder (another stage's export, or a released model), a
    diffusers DiT folder (imported by reparameterisation, see training/dit_import.py), or one
    of our checkpoints (runs/<stage>/checkpoints/step_N: its EMA weights)."""
    init_stage: str | None = None
    """Start from another stage's exported pipeline (runs/<stage>/pipeline): `stage1` for
    stage 2, `stage2` for stage 3. That stage must have been trained first."""
    use_additional_conditions: bool | None = None
    """PixArt-α 1024's resolution and aspect-ratio micro-conditions. None: the starting
    model's setting (the registry's default for a new model: on only at sample size 128)."""
    interpolation_scale: float | None = Field(None, gt=0)
    """Positional interpolation when this stage's resolution differs from its starting
    model's. None: old scale x new/old size, so the larger grid spans exactly the positions
    the model was trained on (512 -> 1024 gives PixArt's 1 -> 2). PixArt's own table keeps 1
    from 256 to 512 (extrapolating); set 1 here to follow it."""
    sample_sizes: list[tuple[int, int]] = []
    """(height, width) of the validation grids; default: the feature set's square resolution."""
    learned_sigma: bool = True
    snr_gamma: float | None = Field(None, gt=0)
    """Min-SNR-γ weighting of the epsilon loss (5 in its paper); None: uniform, as PixArt-α."""
    steps: int = Field(1000, gt=0)
    batch_size: int = Field(32, gt=0)
    """Per worker, per micro-step."""
    grad_accum: int = Field(1, gt=0)
    lr: float = Field(2e-5, gt=0)
    weight_decay: float = Field(0.03, ge=0)
    adam_eps: float = Field(1e-10, gt=0)
    warmup_steps: int = Field(1000, ge=0)
    grad_clip: float = Field(0.01, gt=0)
    ema_decay: float = Field(0.9999, ge=0, lt=1)
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"
    grad_checkpointing: bool = False
    caption_dropout: float = Field(0.1, ge=0, le=1)
    """Share of samples trained with the empty caption: what classifier-free guidance needs."""
    seed: int = 0
    shuffle_buffer: int = Field(1000, gt=0)
    checkpoint_every: int = Field(500, gt=0)
    sample_every: int = Field(500, gt=0)
    export_every: int | None = Field(None, gt=0)
    """Also export the EMA weights as a pipeline every this many steps and at the last one
    (runs/<stage>/exports/step_N): the points of a learning curve (make reproduce)."""
    validation_prompts: list[str] = ["A large red circle in the center, on a plain blue background."]
    """Prompts of the sample grids; for a class stage, class names."""
    sample_steps: int = Field(20, gt=0)
    guidance_scale: float = Field(4.5, ge=1)
    log_every: int = Field(10, gt=0)
    workers: int = Field(1, gt=0)
    gpus_per_worker: float = Field(0.0, ge=0)
    cpus_per_worker: float = Field(1.0, gt=0)
    peak_flops: float | None = None
    """Peak FLOP/s of one device, for MFU; None: looked up for known GPUs, not shown on CPU."""

    @model_validator(mode="after")
    def _one_start(self) -> "StageConfig":
        if self.init and self.init_stage:
            raise ValueError("give `init` or `init_stage`, not both")
        return self


class TrainingConfig(Strict):
    text_encoders: dict[str, TextEncoderConfig] = {}
    vaes: dict[str, VaeConfig] = {}
    features: dict[str, FeaturesConfig] = {}
    stages: dict[str, StageConfig] = {}
