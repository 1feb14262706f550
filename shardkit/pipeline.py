"""Stage dependencies: asked for stage X of dataset D, make sure X exists first.

Stage packages never import each other; they name the stage they read, and this registry
says which package makes it. Producers are named as "module:function" strings and imported
only when needed, so shardkit depends on none of them.
"""

from __future__ import annotations

import importlib
import logging

from shardkit.config import PipelinesConfig
from shardkit.shards import StageOutput

log = logging.getLogger(__name__)

# first path component of a stage -> "module:function(config, dataset, stage)" that makes it
PRODUCERS = {
    "shards": "curation.curate:make_stage",
    "captions": "captioning.stage:make_stage",
    "scores": "analysis.scoring:make_stage",
    "features": "training.features:make_stage",
}


def ensure(config: PipelinesConfig, dataset: str, stage: str) -> StageOutput:
    """The stage output, made first (with whatever it needs in turn) when it is incomplete."""
    config.dataset(dataset)
    output = StageOutput.of(config.storage.root, dataset, stage)
    if output.is_complete():
        return output
    producer = PRODUCERS.get(stage.split("/", 1)[0])
    if producer is None:
        raise ValueError(f"no package makes stage {stage!r}; known: {', '.join(PRODUCERS)}")
    module, function = producer.split(":")
    log.info("%s/%s is missing or incomplete: making it first", dataset, stage)
    getattr(importlib.import_module(module), function)(config, dataset, stage)
    return output
