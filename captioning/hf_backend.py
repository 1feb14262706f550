"""The `hf` backend: transformers' `generate` over batches, left-padded."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from PIL import Image

from captioning import model as models
from captioning.backend import Generation, ModelInfo, ModelSpec, Sampling
from captioning.prompts import conversation, user_prompt
from shardkit.config import CaptionerConfig

log = logging.getLogger(__name__)


PAD_PROMPTS_TO = 64
"""With a static cache, prompts are padded to a multiple of this many tokens: a few prompt
shapes, each compiled once, instead of one per alt-text length."""


@dataclass
class _Prepared:
    inputs: Any
    """The processor's BatchFeature, on the host."""
    count: int
    """Samples asked for; rows after these are padding (static shapes)."""


@dataclass(frozen=True)
class WarmUp:
    """One start-up generation: the shapes it ran at (with a static cache and compiled
    decoding, the shapes it compiled)."""
    rows: int
    prompt_tokens: int
    max_new_tokens: int
    seconds: float


class HfModel:
    """The expensive part, loaded from a ModelSpec alone and shared by every captioner of that
    spec in the process: the processor, the weights on the device, the token ids generation
    needs, and the warm-ups already run on it."""

    def __init__(self, spec: ModelSpec) -> None:
        self.device = models.pick_device()
        self.processor, self.model = models.load(spec, self.device, attn_implementation=spec.option("attn_implementation"))
        tokenizer = self.processor.tokenizer
        generation = self.model.generation_config
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else generation.pad_token_id
        eos = generation.eos_token_id if generation.eos_token_id is not None else tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos])
        self.info = ModelInfo("hf", spec.model, spec.revision or getattr(self.model.config, "_commit_hash", None))
        self.reserved = models.reserved_strings(self.processor)
        # prepare runs in the stage's prefetch thread and, for retries, in its own: a fast
        # tokenizer mutated from two threads at once fails ("Already borrowed")
        self.prepare_lock = threading.Lock()
        self.warm_ups: dict[tuple, WarmUp] = {}
        """By (fixed shapes, batch size, new tokens, prompt): a second captioner with the same
        settings finds its shapes already run."""


class HfBackend:
    """transformers' generate over an HfModel, with one captioner's settings: its batch size,
    generation length and cache/compile options act here, never at load time."""

    LOAD_OPTIONS = ("attn_implementation",)
    load_model = staticmethod(HfModel)

    def __init__(self, cfg: CaptionerConfig, loaded: HfModel) -> None:
        self.cfg, self.loaded = cfg, loaded
        self.processor, self.model, self.device, self.info = loaded.processor, loaded.model, loaded.device, loaded.info
        # a static cache has a fixed shape per batch: every batch padded to batch_size, so a
        # shard's last, short batch does not start another compilation
        self.fixed_shapes = cfg.hf.cache_implementation == "static" or cfg.hf.compile
        self.warm_up()

    def warm_up(self) -> WarmUp:
        """One generation before any shard is claimed, once per loaded model and set of shapes:
        it proves the model, processor and template work together, and moves first-call
        allocation (and, with fixed shapes, the compilation of the decoding step at the
        configured batch size, prompt and caption length) out of the shards' time."""
        prompt = user_prompt(self.cfg.prompt, "", self.cfg.max_alt_text_chars).text
        # with fixed shapes, at the real length: the static cache's size is prompt + new tokens
        tokens = self.cfg.generation.max_new_tokens if self.fixed_shapes else 2
        key = (self.fixed_shapes, self.cfg.batch_size if self.fixed_shapes else 1, tokens, prompt,
               self.cfg.hf.cache_implementation, self.cfg.hf.compile)
        if key not in self.loaded.warm_ups:
            started = time.perf_counter()
            prepared = self.prepare([Image.new("RGB", (32, 32), (127, 127, 127))], [prompt])
            self.generate(prepared, Sampling(max_new_tokens=tokens), seed=0)
            rows, length = prepared.inputs["input_ids"].shape
            self.loaded.warm_ups[key] = WarmUp(rows, length, tokens, round(time.perf_counter() - started, 2))
            log.info("%s: warmed up at batch %d, %d prompt tokens, %d new tokens in %.1f s", self.info.model, rows,
                     length, tokens, self.loaded.warm_ups[key].seconds)
        return self.loaded.warm_ups[key]

    def reserved_strings(self) -> frozenset[str]:
        return self.loaded.reserved

    def prepare(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> _Prepared:
        """Processor inputs for a batch, on the host; the processor alone resizes the images."""
        count = len(images)
        images, prompts = list(images), list(prompts)
        if self.fixed_shapes and count < self.cfg.batch_size:
            images += [images[-1]] * (self.cfg.batch_size - count)
            prompts += [prompts[-1]] * (self.cfg.batch_size - count)
        texts = [self.processor.apply_chat_template(conversation(p), add_generation_prompt=True) for p in prompts]
        padding = {"pad_to_multiple_of": PAD_PROMPTS_TO} if self.fixed_shapes else {}
        with self.loaded.prepare_lock:
            inputs = self.processor(images=images, text=texts, padding=True, return_tensors="pt", **padding)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        return _Prepared(inputs, count)

    def _generate_kwargs(self, sampling: Sampling) -> dict:
        kwargs = {"max_new_tokens": sampling.max_new_tokens, "do_sample": sampling.do_sample,
                  "num_beams": sampling.num_beams, "pad_token_id": self.loaded.pad_id}
        if sampling.min_new_tokens:
            kwargs["min_new_tokens"] = sampling.min_new_tokens
        if sampling.do_sample:
            kwargs.update(temperature=sampling.temperature, top_p=sampling.top_p)
        else:  # silence "temperature is set but do_sample is False" from model defaults
            kwargs.update(temperature=None, top_p=None, top_k=None)
        if self.cfg.hf.cache_implementation == "static":
            kwargs["cache_implementation"] = "static"
        kwargs["disable_compile"] = not self.cfg.hf.compile
        return kwargs

    def generate(self, prepared: _Prepared, sampling: Sampling, seed: int) -> list[Generation]:
        # seeded per call from the shard and batch number, so sampling gives the same
        # captions whichever actor runs the shard, and a rerun repeats them
        torch.manual_seed(seed)
        inputs = prepared.inputs.to(self.device)
        with torch.inference_mode():
            output = self.model.generate(**inputs, **self._generate_kwargs(sampling))
        new_tokens = output[:prepared.count, inputs["input_ids"].shape[1]:].tolist()
        return [self._generation(row, sampling.max_new_tokens) for row in new_tokens]

    def _generation(self, row: list[int], max_new_tokens: int) -> Generation:
        ended = next((i for i, t in enumerate(row) if t in self.loaded.eos_ids), None)
        kept = row if ended is None else row[: ended + 1]
        text = self.processor.tokenizer.decode(kept, skip_special_tokens=True).strip()
        finish = "length" if ended is None and len(row) >= max_new_tokens else "stop"
        return Generation(text=text, tokens=len(kept), finish_reason=finish)
