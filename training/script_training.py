"""What the shipped models' training scripts share: the seeded, resumable step loop and the
command line.

The scripts (captioning/train_captioner.py, analysis/train_clip.py, training/train_vae.py,
training/train_text_encoder.py; analysis/train_aesthetic.py for the command line and the
write) train one small model in one process, a fixed number of steps of fresh data seeded by
step. A run (``ScriptRun``):

* seeds torch's global generator, then resumes model and optimizer from the state an
  interrupted run left in ``.<out>.training/`` beside the output (``training.checkpoint.ScriptState``);
* steps with a warm-up + cosine learning rate (``warmup_cosine``), gradients clipped to norm 1;
* logs every ``log_every`` steps (and at the last) with the throughput, appending the
  record to the run's log.jsonl, and saves the state every ``checkpoint_every`` steps;
* writes the output folder atomically (``write_model``: the model's files, training.json and
  the card README.md, through ``shardkit.folders.write_folder``), then drops the state.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from shardkit.folders import write_folder
from training.checkpoint import ScriptState, warmup_cosine

log = logging.getLogger(__name__)

SUMMARY = "training.json"
CARD = "README.md"


def write_model(out: str, save: Callable[[Path], None], summary: dict, card: str) -> None:
    """Write the folder ``out`` atomically: ``save(tmp)`` (the model's own files), then the
    run's ``summary`` as training.json and its ``card`` as README.md."""

    def write(tmp: Path) -> None:
        save(tmp)
        (tmp / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")
        (tmp / CARD).write_text(card)

    write_folder(Path(out), write)


def loss_report(loss: torch.Tensor) -> tuple[dict, str]:
    """The usual step record: the loss (5 decimals in the log, 4 on the console)."""
    return {"loss": round(loss.item(), 5)}, f"loss {loss.item():.4f}"


class ScriptRun:
    """One run of a training script writing the model folder ``out``. Create it first (it
    seeds torch), build the model and optimizer, then ``resume``, ``train`` and ``finish``."""

    def __init__(self, out: str, seed: int, logger: logging.Logger = log) -> None:
        torch.manual_seed(seed)
        self.out, self.log = out, logger
        self.step = 0
        self.state: ScriptState | None = None

    def resume(self, model: Any, optimizer: torch.optim.Optimizer) -> int:
        """Restore ``model`` and ``optimizer`` from an interrupted run; the step to go on from."""
        self.model, self.optimizer = model, optimizer
        self.state = ScriptState(self.out)
        self.step = self.state.resume(model, optimizer)
        if self.step:
            self.log.info("resumed at step %d", self.step)
        return self.step

    def train(self, step_loss: Callable[[int], Any], *, steps: int, batch_size: int, lr: float, warmup_steps: int,
              floor: float, log_every: int, checkpoint_every: int, unit: str = "images",
              report: Callable[[Any], tuple[dict, str]] = loss_report) -> float:
        """Train up to ``steps``; the seconds it took. ``step_loss(step)`` returns the step's
        loss, or a tuple starting with it; ``report`` turns that return into the record's
        fields and the log line's text. Throughput is ``batch_size`` ``unit`` a step."""
        model, optimizer = self.model, self.optimizer
        model.train()
        started, window, window_start = time.monotonic(), 0, time.monotonic()
        while self.step < steps:
            for group in optimizer.param_groups:
                group["lr"] = warmup_cosine(lr, self.step, steps, warmup_steps, floor=floor)
            result = step_loss(self.step)
            loss = result[0] if isinstance(result, tuple) else result
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            self.step += 1
            window += batch_size
            if self.step % log_every == 0 or self.step == steps:
                rate = window / (time.monotonic() - window_start)
                fields, text = report(result)
                self.state.record({"step": self.step, **fields, f"{unit}_per_s": round(rate, 1)})
                self.log.info("step %d/%d: %s, %.0f %s/s", self.step, steps, text, rate, unit)
                window, window_start = 0, time.monotonic()
            if self.step % checkpoint_every == 0 and self.step < steps:
                self.state.save(model, optimizer, self.step)
        return time.monotonic() - started

    def records(self) -> list[dict]:
        """The run's log records (every run of it, resumed ones included)."""
        return self.state.records()

    def median_rate(self, unit: str = "images") -> float | None:
        """The median throughput over the logged windows, None if none was logged."""
        curve = self.records()
        return float(np.median([c[f"{unit}_per_s"] for c in curve])) if curve else None

    def finish(self, save: Callable[[Path], None], summary: dict, card: str) -> None:
        """``write_model`` the output folder, then drop the resume state."""
        write_model(self.out, save, summary, card)
        self.state.done()


def script_parser(prog: str, doc: str, out_help: str, config: type) -> argparse.ArgumentParser:
    """A training script's parser: its docstring's first paragraph, the output folder, and
    ``--steps`` (where the run's ``config`` dataclass has steps) and ``--seed`` with its defaults."""
    parser = argparse.ArgumentParser(prog=prog, description=doc.split("\n\n")[0])
    parser.add_argument("out", help=out_help)
    for name in ("steps", "seed"):
        if hasattr(config, name):
            parser.add_argument(f"--{name}", type=int, default=getattr(config, name))
    return parser


def script_main(parser: argparse.ArgumentParser, argv: Sequence[str] | None,
                run: Callable[[argparse.Namespace], Any]) -> int:
    """Add ``-v``, parse, set up logging, ``run(args)``; exit status 0."""
    from shardkit.cli import setup_logging

    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    run(args)
    return 0
