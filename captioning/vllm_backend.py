"""The `vllm` backend: vLLM's offline engine (`vllm.LLM`), continuous batching with paged
attention, the fast path for captioning millions of images (`pip install .[vllm]`).

The prompt is rendered by the model folder's own processor chat template, exactly as the
`hf` backend renders it, and vLLM's multi-modal processor expands `<image>` and resizes the
image, so the two backends see the same inputs. Each call hands the engine the whole batch
at once; the engine keeps up to `vllm.max_num_seqs` sequences running and starts a new one
as each caption ends, so set the stage's batch_size to a few times max_num_seqs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Sequence

from PIL import Image

from captioning import model as models
from captioning.backend import Generation, ModelInfo, ModelSpec, Sampling
from captioning.prompts import conversation
from shardkit.config import CaptionerConfig, VllmConfig

log = logging.getLogger(__name__)


def _import_vllm():  # noqa: ANN202
    try:
        import vllm
    except ImportError as exc:
        raise ImportError(
            "captioner backend 'vllm' needs vLLM: `pip install .[vllm]` (see docs/captioning.md); "
            f"importing it failed with: {exc}") from exc
    return vllm


VISION_TOWERS = ("clip_vision_model", "siglip_vision_model")
LEGACY_PREFIX = "vision_tower.vision_model."


def _weight_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def needs_legacy_layout(folder: Path) -> bool:
    """Whether this LLaVA-family folder stores its vision tower the way transformers 5 saves it
    (`vision_tower.embeddings...`). vLLM's loader expects the transformers-4 layout of the
    published llava-hf checkpoints (`vision_tower.vision_model.embeddings...`) and refuses
    the other ("no module or parameter named 'vision_tower.embeddings'")."""
    from safetensors import safe_open

    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False
    if config.get("vision_config", {}).get("model_type") not in VISION_TOWERS:
        return False
    for path in _weight_files(folder):
        with safe_open(str(path), "pt") as f:
            if any(k.startswith("vision_tower.") and not k.startswith(LEGACY_PREFIX) for k in f.keys()):
                return True
    return False


def legacy_layout_copy(folder: Path, cache_root: Path) -> Path:
    """A copy of `folder` with the vision tower's weights renamed to vLLM's layout, made once
    (atomically: built aside, then renamed) in a cache keyed by the folder's weight files."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    stamp = hashlib.sha256()
    for path in _weight_files(folder):
        info = path.stat()
        stamp.update(f"{path.resolve()}:{info.st_size}:{info.st_mtime_ns}".encode())
    target = cache_root / f"{folder.name}-{stamp.hexdigest()[:16]}"
    if (target / "config.json").is_file():
        return target
    cache_root.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=cache_root))
    try:
        for path in folder.iterdir():
            if path.is_file() and path.suffix != ".safetensors" and not path.name.endswith(".safetensors.index.json"):
                shutil.copy2(path, building / path.name)
        renamed: dict[str, str] = {}
        for path in _weight_files(folder):
            with safe_open(str(path), "pt") as f:
                tensors = {}
                for key in f.keys():
                    new = key
                    if key.startswith("vision_tower.") and not key.startswith(LEGACY_PREFIX):
                        new = LEGACY_PREFIX + key[len("vision_tower."):]
                    renamed[key] = new
                    tensors[new] = f.get_tensor(key).contiguous()
            save_file(tensors, str(building / path.name), metadata={"format": "pt"})
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            data = json.loads(index.read_text())
            data["weight_map"] = {renamed.get(k, k): v for k, v in data["weight_map"].items()}
            (building / index.name).write_text(json.dumps(data, indent=1))
        try:
            os.replace(building, target)
        except OSError:
            if not (target / "config.json").is_file():  # not another process's finished copy
                raise
    finally:
        shutil.rmtree(building, ignore_errors=True)
    log.info("%s: vision tower renamed to vLLM's layout in %s", folder, target)
    return target


class VllmEngine:
    """The expensive part, from a ModelSpec alone: vLLM's engine over the model (its whole
    `vllm` block is engine construction) and the folder's processor for the chat template."""

    def __init__(self, spec: ModelSpec) -> None:
        if spec.option("kv_cache_gb") is not None:
            # read by vLLM's CPU build when the engine starts; without it a CPU build takes
            # a fixed default that a small box may not have
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = f"{spec.option('kv_cache_gb'):g}"
        vllm = _import_vllm()
        self.sampling_params = vllm.SamplingParams
        path = models.local_model_path(spec.model)
        if os.path.isdir(path) and needs_legacy_layout(Path(path)):
            path = str(legacy_layout_copy(Path(path), Path(tempfile.gettempdir()) / "pixart-data-models" / "vllm-layout"))
        self.processor = models.load_processor(spec)
        tensor_parallel = spec.option("tensor_parallel_size")
        options = dict(
            model=path, tokenizer=path, revision=spec.revision, trust_remote_code=spec.trust_remote_code,
            # the engine's own seed decides nothing here: every request carries its seed, made
            # from the captioner's generation.seed, the shard and the batch (VllmBackend.generate)
            dtype=spec.dtype, seed=0, limit_mm_per_prompt={"image": 1},
            max_num_seqs=spec.option("max_num_seqs"), gpu_memory_utilization=spec.option("gpu_memory_utilization"),
            tensor_parallel_size=tensor_parallel, max_model_len=spec.option("max_model_len"),
            enforce_eager=spec.option("enforce_eager"),
        )
        if tensor_parallel > 1:
            # inside a Ray actor that holds the GPUs: worker processes on those GPUs, rather
            # than a second placement on the cluster
            options["distributed_executor_backend"] = "mp"
        self.llm = vllm.LLM(**options)
        self.info = ModelInfo("vllm", spec.model, spec.revision)
        self.reserved = models.reserved_strings(self.processor)
        log.info("vLLM %s engine for %s (max_num_seqs %d, tensor parallel %d)", vllm.__version__, spec.model,
                 spec.option("max_num_seqs"), tensor_parallel)


class VllmBackend:
    """One captioner's calls into a VllmEngine: its sampling and seeds."""

    LOAD_OPTIONS = tuple(VllmConfig.model_fields)
    load_model = staticmethod(VllmEngine)

    def __init__(self, cfg: CaptionerConfig, engine: VllmEngine) -> None:
        self.cfg, self.engine = cfg, engine
        self.processor, self.llm, self.info = engine.processor, engine.llm, engine.info

    def reserved_strings(self) -> frozenset[str]:
        return self.engine.reserved

    def prepare(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> list[dict]:
        return [{"prompt": self.processor.apply_chat_template(conversation(p), add_generation_prompt=True),
                 "multi_modal_data": {"image": image}} for image, p in zip(images, prompts)]

    def _params(self, sampling: Sampling, seed: int):  # noqa: ANN202 - vllm.SamplingParams
        return self.engine.sampling_params(
            max_tokens=sampling.max_new_tokens, min_tokens=sampling.min_new_tokens,
            temperature=sampling.temperature if sampling.do_sample else 0.0,
            top_p=sampling.top_p if sampling.do_sample else 1.0, seed=seed, skip_special_tokens=True)

    def generate(self, prepared: list[dict], sampling: Sampling, seed: int) -> list[Generation]:
        # one seed per request, from the batch's: a request's sample does not depend on what
        # else the engine happens to be running
        params = [self._params(sampling, seed * 1009 + i) for i in range(len(prepared))]
        outputs = self.llm.generate(prepared, params, use_tqdm=False)
        return [Generation(text=o.outputs[0].text.strip(), tokens=len(o.outputs[0].token_ids),
                           finish_reason="length" if o.outputs[0].finish_reason == "length" else "stop")
                for o in outputs]
