"""Model folders, devices and loading a LLaVA-family captioner through transformers'
image-text-to-text classes (the `hf` backend; `vllm` shares the folder handling)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor
from transformers.utils import logging as transformers_logging

from shardkit import storage

if TYPE_CHECKING:
    from captioning.backend import ModelSpec

log = logging.getLogger(__name__)


def local_model_path(model: str) -> str:
    """A hub id or local folder as is; a URI (s3://...) copied to a local cache first,
    since from_pretrained reads local folders or the hub only."""
    return storage.local_folder(model)


def pick_device() -> str:
    """The GPU Ray assigned to this actor (Ray sets CUDA_VISIBLE_DEVICES), else the CPU."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(name: str, device: str) -> torch.dtype:
    dtype = getattr(torch, name)
    if device == "cpu" and dtype == torch.float16:
        # fp16 matmuls are slow or missing on CPUs; bf16 keeps the memory saving
        log.warning("float16 on CPU: using bfloat16 instead")
        return torch.bfloat16
    return dtype


def load_processor(spec: ModelSpec):  # -> a transformers ProcessorMixin
    transformers_logging.disable_progress_bar()  # per-actor bars interleave into noise in Ray's log
    processor = AutoProcessor.from_pretrained(local_model_path(spec.model), revision=spec.revision,
                                              trust_remote_code=spec.trust_remote_code)
    # batched generation of decoder-only models needs the padding on the left
    processor.tokenizer.padding_side = "left"
    return processor


def reserved_strings(processor) -> frozenset[str]:  # noqa: ANN001
    """Every string the processor's tokenizer turns into a special token: its special tokens,
    every added token (`<image>`, chat markers) and the processor's own image/video tokens."""
    tokenizer = processor.tokenizer
    found = set(tokenizer.all_special_tokens)
    found.update(t.content for t in tokenizer.added_tokens_decoder.values())
    found.update(getattr(processor, name, None) or "" for name in ("image_token", "video_token"))
    return frozenset(t for t in found if t and t.strip())


def load(spec: ModelSpec, device: str, attn_implementation: str | None = None):  # -> (processor, model)
    path = local_model_path(spec.model)
    dtype = resolve_dtype(spec.dtype, device)
    processor = load_processor(spec)
    options = {"revision": spec.revision, "trust_remote_code": spec.trust_remote_code}
    if attn_implementation:
        options["attn_implementation"] = attn_implementation
    if device != "cpu":  # straight onto the GPU: a 7B model is not staged through host memory
        options["device_map"] = device
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype, **options).to(device).eval()
    log.info("loaded %s (%s) on %s in %s", spec.model, type(model).__name__, device, dtype)
    return processor, model
