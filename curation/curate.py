"""Wires a dataset's source to its stages and runs them on Ray:
source → `fetched/` (policy, filters, hashes) → `shards/` (dataset-wide dedup)."""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Callable

from curation.dedup import DedupStage, find_drops
from curation.fetch import STAGE as FETCHED, FetchStage
from curation.sources.folder import FolderStage
from curation.sources.laion import LaionStage
from curation.sources.sam import SamStage
from curation.sources.synthetic import SyntheticStage
from shardkit import cluster, storage
from shardkit.config import FolderSource, LaionSource, PipelinesConfig, SamSource, SyntheticSource
from shardkit.runner import run_stage
from shardkit.shards import StageOutput
from synthetic import generated

log = logging.getLogger(__name__)

STAGE = "shards"

# source config type -> the stage that fetches it (given the dataset name, its config and the
# storage root)
SOURCE_STAGES: dict[type, Callable[[str, Any, str], FetchStage]] = {
    LaionSource: lambda name, cfg, root: LaionStage(name, cfg),
    SamSource: lambda name, cfg, root: SamStage(name, cfg, download_dir=_local_downloads(root, name)),
    FolderSource: lambda name, cfg, root: FolderStage(name, cfg),
    SyntheticSource: lambda name, cfg, root: SyntheticStage(name, cfg),
}


def _local_downloads(root: str, dataset: str) -> str:
    """SA-1B tars are read from local disk; with remote storage they go to a local cache."""
    if storage.is_local(root):
        return storage.join(root, dataset, "downloads")
    import tempfile

    return f"{tempfile.gettempdir()}/pixart-data-downloads/{dataset}"


def shards_output(config: PipelinesConfig, dataset: str) -> StageOutput:
    return StageOutput.of(config.storage.root, dataset, STAGE)


def curate(config: PipelinesConfig, dataset: str, restart: bool = False) -> dict[str, Any]:
    """Make the dataset's `fetched/` and `shards/` stages (skipping complete shards) and
    return a summary of both."""
    cfg = config.dataset(dataset)
    fetched = StageOutput.of(config.storage.root, dataset, FETCHED)
    serving = generated.serving(dataset, cfg) if generated.is_generated(cfg) else contextlib.nullcontext()
    with serving:
        stage = SOURCE_STAGES[type(cfg)](dataset, cfg, config.storage.root)
        fetch_summary = run_stage(stage, fetched, config.cluster, restart=restart)
    shards = shards_output(config, dataset)
    if restart or not shards.is_complete():
        cluster.connect(config.cluster)
        drops = find_drops(fetched, cfg.filters)
    else:
        drops = None  # every shard is made (run_stage still refuses a changed plan): no Ray, no index scan
    dedup = DedupStage(dataset, fetched, cfg.filters, drops=drops)
    summary = run_stage(dedup, shards, config.cluster, restart=restart)
    if drops is not None:
        drops.remove_scratch()  # the decisions are in the shards now (a failed run leaves them to the next find_drops)
    combined = {
        "dataset": dataset, "shards": summary["shards_complete"], "samples_in": fetch_summary["samples_in"],
        "samples_out": summary["samples_out"], "failures": fetch_summary["failures"],
        "failures_by_reason": fetch_summary["failures_by_reason"],
        "removed": {k: v for k, v in {**fetch_summary["counters"], **summary["counters"]}.items()
                    if k.startswith(("filtered:", "duplicate:"))},
        "seconds": round(fetch_summary["wall_seconds"] + summary["wall_seconds"], 2),
    }
    log.info("%s: %d in, %d out in %d shards; failures %s; removed %s; %.1f s", dataset, combined["samples_in"],
             combined["samples_out"], combined["shards"], combined["failures_by_reason"] or "none",
             combined["removed"] or "none", combined["seconds"])
    return combined


def make_stage(config: PipelinesConfig, dataset: str, stage: str) -> None:
    """shardkit.pipeline's hook: later stages ask for `shards` through it."""
    curate(config, dataset)
