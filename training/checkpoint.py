"""Atomic, resumable checkpoints: `checkpoints/step_000500/` appears only when complete.

Each worker writes its own data position and RNG state (they differ per rank); rank 0
writes the model, EMA, optimiser and scheduler, then renames the folder into place after
every rank has written, so a kill at any moment leaves either the old or the new checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

_STEP = re.compile(r"^step_(\d{6,})$")


def step_dir(root: str, step: int) -> str:
    return os.path.join(root, f"step_{step:06d}")


def staging_dir(root: str, step: int) -> str:
    return os.path.join(root, f".step_{step:06d}.partial")


def latest(root: str) -> tuple[int, str] | None:
    if not os.path.isdir(root):
        return None
    steps = sorted(int(m.group(1)) for m in map(_STEP.match, os.listdir(root)) if m)
    return (steps[-1], step_dir(root, steps[-1])) if steps else None


def save_rank_state(staging: str, rank: int, state: dict[str, Any]) -> None:
    os.makedirs(staging, exist_ok=True)
    path = os.path.join(staging, f"rank{rank}.pt")
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)


def save_shared_state(staging: str, state: dict[str, Any], meta: dict[str, Any]) -> None:
    os.makedirs(staging, exist_ok=True)
    torch.save(state, os.path.join(staging, "state.pt"))
    with open(os.path.join(staging, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)


def publish(root: str, step: int, keep: int = 2) -> str:
    """Rename the staged checkpoint into place and drop all but the newest `keep`."""
    final = step_dir(root, step)
    if os.path.exists(final):
        shutil.rmtree(final)
    os.replace(staging_dir(root, step), final)
    steps = sorted(int(m.group(1)) for m in map(_STEP.match, os.listdir(root)) if m)
    for old in steps[:-keep]:
        shutil.rmtree(step_dir(root, old), ignore_errors=True)
    return final


def load(folder: str, rank: int) -> tuple[dict[str, Any], dict[str, Any] | None, dict[str, Any]]:
    """(shared state, this rank's state or None, meta). weights_only: a checkpoint is data,
    never code."""
    shared = torch.load(os.path.join(folder, "state.pt"), map_location="cpu", weights_only=True)
    rank_path = os.path.join(folder, f"rank{rank}.pt")
    own = torch.load(rank_path, map_location="cpu", weights_only=True) if os.path.exists(rank_path) else None
    with open(os.path.join(folder, "meta.json")) as f:
        meta = json.load(f)
    return shared, own, meta


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
