"""One loaded captioner: batched, left-padded generation over PIL images."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
from PIL import Image

from captioning import model as models
from captioning.prompts import conversation
from shardkit.config import CaptionerConfig

log = logging.getLogger(__name__)


@dataclass
class Caption:
    text: str
    tokens: int
    """Generated tokens, up to and including the end-of-sequence token if there was one."""
    truncated: bool
    """Generation stopped at max_new_tokens before the model ended the caption."""


class Captioner:
    def __init__(self, cfg: CaptionerConfig, device: str | None = None) -> None:
        self.cfg = cfg
        self.device = device or models.pick_device()
        self.processor, self.model = models.load(cfg, self.device)
        tokenizer = self.processor.tokenizer
        generation = self.model.generation_config
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else generation.pad_token_id
        eos = generation.eos_token_id if generation.eos_token_id is not None else tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos])
        self.revision = cfg.revision or getattr(self.model.config, "_commit_hash", None)
        self.warm_up()
        self.generate_seconds = 0.0

    def warm_up(self) -> None:
        """One short generation at start-up: it proves the model, processor and template work
        together before any shard is claimed, and moves first-call allocation out of the
        shards' time."""
        image = Image.new("RGB", (32, 32), (127, 127, 127))
        inputs = self.prepare([image], ["Describe this image."])
        with torch.inference_mode():
            self.model.generate(**inputs, **{**self.generation_kwargs(), "max_new_tokens": 2})

    def generation_kwargs(self) -> dict:
        g = self.cfg.generation
        kwargs = {"max_new_tokens": g.max_new_tokens, "do_sample": g.do_sample, "num_beams": g.num_beams,
                  "pad_token_id": self.pad_id}
        if g.do_sample:
            kwargs.update(temperature=g.temperature, top_p=g.top_p)
        else:  # silence "temperature is set but do_sample is False" from model defaults
            kwargs.update(temperature=None, top_p=None, top_k=None)
        return kwargs

    def prepare(self, images: list[Image.Image], prompts: list[str]):
        """Processor inputs for a batch; the processor alone resizes the images."""
        texts = [self.processor.apply_chat_template(conversation(p), add_generation_prompt=True) for p in prompts]
        inputs = self.processor(images=images, text=texts, padding=True, return_tensors="pt")
        inputs = inputs.to(self.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        return inputs

    def generate(self, inputs, seed: int) -> list[Caption]:
        # seeded per batch from the shard and batch number, so sampling gives the same
        # captions whichever actor runs the shard, and a rerun repeats them
        torch.manual_seed(seed)
        started = time.perf_counter()
        with torch.inference_mode():
            output = self.model.generate(**inputs, **self.generation_kwargs())
        self.generate_seconds += time.perf_counter() - started
        new_tokens = output[:, inputs["input_ids"].shape[1]:].tolist()
        return [self._caption(row) for row in new_tokens]

    def _caption(self, row: list[int]) -> Caption:
        ended = next((i for i, t in enumerate(row) if t in self.eos_ids), None)
        kept = row if ended is None else row[: ended + 1]
        text = self.processor.tokenizer.decode(kept, skip_special_tokens=True).strip()
        truncated = ended is None and len(row) >= self.cfg.generation.max_new_tokens
        return Caption(text=text, tokens=len(kept), truncated=truncated)
