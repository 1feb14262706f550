"""`captioners:`: the models that write dense captions, and how they run."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from shardkit.config.base import Strict


PAPER_PROMPT = "Describe this image and its style in a very detailed manner"
ALT_TEXT_PROMPT = 'Given the caption of this image "{}", describe this image in a very detailed manner'


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
