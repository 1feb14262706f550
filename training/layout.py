"""Where a training run's files live: `<storage>/runs/<stage>/`, every path of it named here.

The trainer writes these, and the reports (analysis/) read them; both ask a `RunLayout`
rather than rebuild the paths from strings, so a file moved here moves for all of them.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from typing import TYPE_CHECKING

from shardkit import storage

if TYPE_CHECKING:
    from shardkit.config import PipelinesConfig

METRICS, SAMPLES, TENSORBOARD = "metrics.jsonl", "samples", "tensorboard"
SYNCED = (METRICS, TENSORBOARD, SAMPLES)
"""What rank 0 writes in `work` and syncs to a remote root (training.trainer.RunSync)."""


def runs_root(storage_root: str) -> str:
    """The folder of every stage's run."""
    return storage.join(storage_root, "runs")


def run_layout(config: PipelinesConfig, stage: str) -> "RunLayout":
    return RunLayout.of(storage.join(runs_root(config.storage.root), stage))


@dataclass(frozen=True)
class RunLayout:
    """Where a run lives, `root`: a local folder, or a URI on an object store (nodes of a
    cluster share no disk). What cannot be written there directly (appended metrics,
    TensorBoard's event files, sample grids, an export being built) is written in `work`, a
    folder of this process's machine, and synced to `root` (RunSync). For a local root the
    two are the same folder."""
    root: str

    @classmethod
    def of(cls, root: str) -> "RunLayout":
        return cls(os.path.abspath(root) if storage.is_local(root) else root.rstrip("/"))

    @property
    def remote(self) -> bool:
        return not storage.is_local(self.root)

    @property
    def work(self) -> str:
        if not self.remote:
            return self.root
        return os.path.join(tempfile.gettempdir(), "pixart-data-runs", self.root.replace("://", "/"))

    # ---- in `root`: what the run publishes

    @property
    def checkpoints(self) -> str:
        return storage.join(self.root, "checkpoints")

    @property
    def export(self) -> str:
        """The run's pipeline, exported when it ends."""
        return storage.join(self.root, "pipeline")

    @property
    def exports(self) -> str:
        return storage.join(self.root, "exports")

    def snapshot(self, step: int) -> str:
        """The pipeline exported at `step` (stage.export_every)."""
        return storage.join(self.exports, f"step_{step:06d}")

    @property
    def metrics(self) -> str:
        return storage.join(self.root, METRICS)

    @property
    def samples(self) -> str:
        """The sample grids, as synced to the root."""
        return storage.join(self.root, SAMPLES)

    @property
    def start(self) -> str:
        """How the run's model started (training/start.py's note)."""
        return storage.join(self.root, "start.json")

    def worker_note(self, rank: int) -> str:
        """What a worker ended with: its step, parameters' digest and data position."""
        return storage.join(self.root, f"worker{rank}.json")

    @property
    def curve(self) -> str:
        """The learning curve's scores of each snapshot (analysis/reproduce.py)."""
        return storage.join(self.root, "curve")

    # ---- in `work`: written on this machine, synced or left behind

    @property
    def local_metrics(self) -> str:
        return os.path.join(self.work, METRICS)

    @property
    def local_samples(self) -> str:
        """Grids are drawn here, then synced."""
        return os.path.join(self.work, SAMPLES)

    @property
    def tensorboard(self) -> str:
        return os.path.join(self.work, TENSORBOARD)

    @property
    def lock(self) -> str:
        return os.path.join(self.work, ".lock")

    @property
    def export_staging(self) -> str:
        """Where an export to a remote root is built before it is uploaded."""
        return os.path.join(self.work, ".export")

    @property
    def ray_storage(self) -> str:
        """Ray Train's own storage: it holds no checkpoints of ours."""
        return os.path.join(self.work, "ray")
