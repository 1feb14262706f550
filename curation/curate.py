"""Wires a dataset's source to its curation stage and runs it on Ray."""

from __future__ import annotations

import contextlib
import logging
from typing import Any

from curation import generated
from curation.sources.synthetic import SyntheticStage
from shardkit.config import PipelinesConfig, SyntheticSource
from shardkit.runner import StageError, run_stage
from shardkit.shards import StageOutput

log = logging.getLogger(__name__)

STAGE = "shards"
# source config type -> the stage that turns it into shards
SOURCE_STAGES: dict[type, type] = {
    SyntheticSource: SyntheticStage,
}


def shards_output(config: PipelinesConfig, dataset: str) -> StageOutput:
    return StageOutput.of(config.storage.root, dataset, STAGE)


def curate(config: PipelinesConfig, dataset: str, restart: bool = False) -> dict[str, Any]:
    """Make the dataset's `shards/` stage (skipping complete shards) and return its summary."""
    cfg = config.dataset(dataset)
    stage_type = SOURCE_STAGES.get(type(cfg))
    if stage_type is None:
        raise StageError(f"datasets.{dataset}: curation of source '{cfg.source}' is not available yet")
    serving = generated.serving(dataset, cfg) if generated.is_generated(cfg) else contextlib.nullcontext()
    with serving:
        summary = run_stage(stage_type(dataset, cfg), shards_output(config, dataset), config.cluster, restart=restart)
    log.info("%s: %d samples in %d shards, %d failures %s, %.1f s", dataset, summary["samples_out"],
             summary["shards_complete"], summary["failures"], summary["failures_by_reason"], summary["wall_seconds"])
    return summary


def ensure_curated(config: PipelinesConfig, dataset: str) -> StageOutput:
    """The dataset's shards, curated first when missing or incomplete (later stages call this)."""
    output = shards_output(config, dataset)
    if not output.is_complete():
        curate(config, dataset)
    return output
