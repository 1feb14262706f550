"""The captioner interface: what the captioning stage asks of a model, whatever runs it.

A backend loads one model and captions batches of decoded images with their prompts. Work
that needs no accelerator (templating, resizing, tensor packing) is `prepare`, which the
stage runs in a thread ahead of `generate`, so the accelerator never waits on it. The stage
talks to backends only through this Protocol; backends register by name
(`captioners.<name>.backend` in pipelines.yaml) and are imported only when used, so a
machine without vLLM never imports it.
"""

from __future__ import annotations

import functools
import importlib
import logging
from dataclasses import dataclass
from typing import Any, Protocol, Sequence

from PIL import Image

from shardkit.config import CaptionerConfig

log = logging.getLogger(__name__)

BACKENDS = {
    "hf": "captioning.hf_backend:HfBackend",
    "vllm": "captioning.vllm_backend:VllmBackend",
}


@dataclass(frozen=True)
class Generation:
    text: str
    """The caption: generated text only, special tokens removed, stripped."""
    tokens: int
    """Generated tokens, the end-of-sequence token included if there was one."""
    finish_reason: str
    """"stop": the model ended the caption; "length": cut at max_new_tokens."""


@dataclass(frozen=True)
class Sampling:
    """How to decode one call: the captioner's generation settings, or a retry's."""
    max_new_tokens: int
    min_new_tokens: int = 0
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    num_beams: int = 1


@dataclass(frozen=True)
class ModelInfo:
    """Recorded in every caption's json."""
    backend: str
    model: str
    revision: str | None


class CaptionBackend(Protocol):
    info: ModelInfo

    def reserved_strings(self) -> frozenset[str]:
        """Strings the tokenizer turns into special tokens (`<image>`, `</s>`, ...): taken out
        of alt text before it goes into a prompt."""

    def prepare(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> Any:
        """Host-side work for one batch (chat template, image processing); thread-safe and
        free of accelerator work, so it can run ahead of `generate`."""

    def generate(self, prepared: Any, sampling: Sampling, seed: int) -> list[Generation]:
        """One caption per prepared sample, in order. With sampling, the same seed gives the
        same captions."""


def sampling_of(cfg: CaptionerConfig) -> Sampling:
    g = cfg.generation
    return Sampling(max_new_tokens=g.max_new_tokens, min_new_tokens=g.min_new_tokens, do_sample=g.do_sample,
                    temperature=g.temperature, top_p=g.top_p, num_beams=g.num_beams)


def retry_sampling(cfg: CaptionerConfig) -> Sampling:
    """A flagged caption's second try: sampled, since greedy decoding would repeat it."""
    q = cfg.quality
    return Sampling(max_new_tokens=cfg.generation.max_new_tokens, min_new_tokens=cfg.generation.min_new_tokens,
                    do_sample=True, temperature=q.retry_temperature, top_p=q.retry_top_p)


def _load_key(cfg: CaptionerConfig) -> str:
    """What a loaded model depends on: not the batch size, actors, prompt or quality checks."""
    return cfg.model_dump_json(include={"model", "backend", "revision", "dtype", "trust_remote_code", cfg.backend})


@functools.lru_cache(maxsize=1)
def _load(key: str, backend: str) -> CaptionBackend:
    module, _, name = BACKENDS[backend].partition(":")
    cfg = CaptionerConfig.model_validate_json(key)
    return getattr(importlib.import_module(module), name)(cfg)


def load_backend(cfg: CaptionerConfig) -> CaptionBackend:
    """The loaded backend for this captioner. One per process is kept: a process that
    captions several datasets (in_process runs, one Ray actor's life) loads the model once;
    asking for another model releases the last."""
    return _load(_load_key(cfg), cfg.backend)
