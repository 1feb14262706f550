"""The captioner interface: what the captioning stage asks of a model, whatever runs it.

A backend loads one model and captions batches of decoded images with their prompts. Work
that needs no accelerator (templating, resizing, tensor packing) is `prepare`, which the
stage runs in a thread ahead of `generate`, so the accelerator never waits on it. The stage
talks to backends only through this Protocol; backends register by name
(`captioners.<name>.backend` in pipelines.yaml) and are imported only when used, so a
machine without vLLM never imports it.

A backend comes in two parts: the loaded model, built from a `ModelSpec` alone and cached per
process, and a cheap object over it with one captioner's settings (batch size, generation,
cache and compile options). Only the spec reaches the load, so no run setting can be frozen
in by whichever captioner happened to load the model first.
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


@dataclass(frozen=True)
class ModelSpec:
    """What loading a captioner's model depends on, and all that the load gets to read. Two
    captioners with the same spec share one loaded model in a process; their batch size,
    generation settings, prompt, quality checks and the backend's run options stay their own,
    because the load never sees them (a setting read at load time would come from whichever
    captioner loaded first)."""
    backend: str
    model: str
    revision: str | None
    dtype: str
    trust_remote_code: bool
    options: tuple[tuple[str, Any], ...] = ()
    """The backend's load-time options, (name, value) pairs of its block (`LOAD_OPTIONS`)."""

    def option(self, name: str) -> Any:
        return dict(self.options)[name]


class BackendClass(Protocol):
    LOAD_OPTIONS: tuple[str, ...]
    """Options of the backend's config block that the loaded model depends on."""

    @staticmethod
    def load_model(spec: ModelSpec) -> Any:
        """The expensive part (weights on the device, an engine, the processor), from the spec
        alone; cached per process."""

    def __call__(self, cfg: CaptionerConfig, loaded: Any) -> CaptionBackend:
        """A captioner over a loaded model, with this run's settings; cheap."""


def backend_class(name: str) -> BackendClass:
    module, _, attribute = BACKENDS[name].partition(":")
    return getattr(importlib.import_module(module), attribute)


def model_spec(cfg: CaptionerConfig) -> ModelSpec:
    block = getattr(cfg, cfg.backend)
    return ModelSpec(cfg.backend, cfg.model, cfg.revision, cfg.dtype, cfg.trust_remote_code,
                     tuple((name, getattr(block, name)) for name in backend_class(cfg.backend).LOAD_OPTIONS))


@functools.lru_cache(maxsize=1)
def loaded_model(spec: ModelSpec) -> Any:
    """One loaded model per process: a process that captions several datasets (in_process
    runs, one Ray actor's life) loads it once; asking for another model releases the last."""
    return backend_class(spec.backend).load_model(spec)


def load_backend(cfg: CaptionerConfig) -> CaptionBackend:
    """The captioner `cfg` describes: the process's loaded model for its spec, under this
    captioner's own settings."""
    return backend_class(cfg.backend)(cfg, loaded_model(model_spec(cfg)))
