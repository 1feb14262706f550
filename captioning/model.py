"""Loading a LLaVA-family captioner through transformers' image-text-to-text classes."""

from __future__ import annotations

import logging
import os
import tempfile

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor
from transformers.utils import logging as transformers_logging

from shardkit import storage
from shardkit.config import CaptionerConfig

log = logging.getLogger(__name__)


def local_model_path(model: str) -> str:
    """A hub id or local folder as is; a URI (s3://...) copied to a local cache first,
    since from_pretrained reads local folders or the hub only."""
    if "://" not in model or model.startswith("file://"):
        return model.removeprefix("file://")
    cache = os.path.join(tempfile.gettempdir(), "pixart-data-models", model.replace("://", "/").strip("/"))
    if not os.path.exists(os.path.join(cache, "config.json")):
        fs, path = storage.filesystem(model)
        fs.get(path.rstrip("/") + "/", cache + "/", recursive=True)
    return cache


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


def load(cfg: CaptionerConfig, device: str):  # -> (processor, model)
    transformers_logging.disable_progress_bar()  # per-actor bars interleave into noise in Ray's log
    path = local_model_path(cfg.model)
    dtype = resolve_dtype(cfg.dtype, device)
    options = {"revision": cfg.revision, "trust_remote_code": cfg.trust_remote_code}
    processor = AutoProcessor.from_pretrained(path, **options)
    # batched generation of decoder-only models needs the padding on the left
    processor.tokenizer.padding_side = "left"
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype, **options).to(device).eval()
    log.info("loaded %s (%s) on %s in %s", cfg.model, type(model).__name__, device, dtype)
    return processor, model
