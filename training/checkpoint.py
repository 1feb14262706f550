"""Atomic, resumable checkpoints: `checkpoints/step_000500/` counts only when complete.

Each worker writes its own data position and RNG state (they differ per rank); rank 0
writes the model, EMA, optimiser and scheduler and, after every rank has written, publishes
the checkpoint, so a kill at any moment leaves either the old or the new checkpoint. In a
local folder, publishing renames the staged folder into place. An object store has no
renaming: there every file is written straight into `step_N/`, and `meta.json`, written
last, is what makes it complete; a step folder without it is a kill's leftover and is
ignored, then replaced.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
from pathlib import Path
from typing import Any

import torch

from shardkit import storage

_STEP = re.compile(r"^step_(\d{6,})$")
META = "meta.json"


def step_dir(root: str, step: int) -> str:
    return storage.join(root, f"step_{step:06d}")


def staging_dir(root: str, step: int) -> str:
    if storage.is_local(root):
        return storage.join(root, f".step_{step:06d}.partial")
    return step_dir(root, step)


def _steps(root: str) -> list[int]:
    return sorted(int(m.group(1)) for m in map(_STEP.match, storage.list_names(root)) if m)


def latest(root: str) -> tuple[int, str] | None:
    """The newest complete checkpoint: (step, folder)."""
    for step in reversed(_steps(root)):
        if storage.exists(storage.join(step_dir(root, step), META)):
            return step, step_dir(root, step)
    return None


def _save(uri: str, state: dict[str, Any]) -> None:
    # streamed into the (temporary local, or multipart upload) file: a large model's
    # optimiser state is never a second copy in memory
    with storage.atomic_open(uri) as f:
        torch.save(state, f)


def save_rank_state(staging: str, rank: int, state: dict[str, Any]) -> None:
    storage.makedirs(staging)
    _save(storage.join(staging, f"rank{rank}.pt"), state)


def save_shared_state(staging: str, state: dict[str, Any]) -> None:
    storage.makedirs(staging)
    _save(storage.join(staging, "state.pt"), state)


def publish(root: str, step: int, meta: dict[str, Any], keep: int = 2) -> str:
    """Mark the staged checkpoint complete (meta.json, written last), move it into place in a
    local folder, and drop all but the newest `keep` complete ones."""
    staging, final = staging_dir(root, step), step_dir(root, step)
    storage.atomic_write(storage.join(staging, META), json.dumps(meta, indent=1))
    if staging != final:
        storage.remove_tree(final)
        os.replace(storage.filesystem(staging)[1], storage.filesystem(final)[1])
    older = [s for s in _steps(root) if s < step]
    for old in older[:max(len(older) - (keep - 1), 0)]:
        storage.remove_tree(step_dir(root, old))
    return final


def _load(uri: str) -> Any:
    # weights_only: a checkpoint is data, never code
    return torch.load(io.BytesIO(storage.read_bytes(uri)), map_location="cpu", weights_only=True)


def load(folder: str, rank: int) -> tuple[dict[str, Any], dict[str, Any] | None, dict[str, Any]]:
    """(shared state, this rank's state or None, meta)."""
    rank_uri = storage.join(folder, f"rank{rank}.pt")
    own = _load(rank_uri) if storage.exists(rank_uri) else None
    meta = json.loads(storage.read_text(storage.join(folder, META)))
    return _load(storage.join(folder, "state.pt")), own, meta


class ScriptState:
    """Resume state of a single-process training script (the shipped models' trainers):
    `.<out>.training/` beside the output folder holds the latest model + optimizer + step
    (replaced atomically) and the run's log; the state goes once the output is saved."""

    def __init__(self, out: str) -> None:
        self.work = Path(out).parent / f".{Path(out).name}.training"
        self.work.mkdir(parents=True, exist_ok=True)
        self.path, self.log = self.work / "state.pt", self.work / "log.jsonl"

    def resume(self, model, optimizer) -> int:  # noqa: ANN001
        """The step to continue from (0 for a fresh run), with `model` and `optimizer` restored."""
        if not self.path.exists():
            return 0
        state = torch.load(self.path, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        return state["step"]

    def save(self, model, optimizer, step: int) -> None:  # noqa: ANN001
        tmp = self.path.with_suffix(".tmp")
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step}, tmp)
        os.replace(tmp, self.path)

    def record(self, entry: dict) -> None:
        with open(self.log, "a") as f:
            f.write(json.dumps(entry) + "\n")

    def records(self) -> list[dict]:
        return [json.loads(line) for line in open(self.log)] if self.log.exists() else []

    def done(self) -> None:
        self.path.unlink(missing_ok=True)


def warmup_cosine(lr: float, step: int, steps: int, warmup_steps: int, floor: float) -> float:
    """The shipped models' trainers' schedule: linear warm-up, then cosine decay to
    ``floor`` x ``lr`` at the last step."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(steps - warmup_steps, 1)
    return lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))
