"""The `synthetic` source: scenes drawn directly into shards, no download involved."""

from __future__ import annotations

import io
import math
import time
from dataclasses import dataclass

import numpy as np

from curation.sample import make_sample
from curation.synthetic import scenes
from shardkit.config import SyntheticSource
from shardkit.runner import ShardTask
from shardkit.shards import ShardRecord, StagePlan, make_key, write_shard

JPEG_QUALITY = 95


@dataclass
class SyntheticStage:
    dataset: str
    config: SyntheticSource
    task_cpus: float = 0.5

    def plan(self) -> StagePlan:
        return StagePlan(
            dataset=self.dataset, stage="shards", num_shards=math.ceil(self.config.count / self.config.samples_per_shard),
            config=self.config.model_dump(mode="json"),
        )

    def tasks(self) -> list[ShardTask]:
        per = self.config.samples_per_shard
        return [ShardTask(i, (i * per, min((i + 1) * per, self.config.count))) for i in range(self.plan().num_shards)]

    def run_shard(self, task: ShardTask, shard_uri: str) -> ShardRecord:
        start_time = time.monotonic()
        first, stop = task.payload
        options = scenes.SceneOptions(min_objects=self.config.min_objects, max_objects=self.config.max_objects)
        samples = [self._sample(task.index, n - first, n, options) for n in range(first, stop)]
        written = write_shard(shard_uri, samples)
        return ShardRecord(task.index, samples_in=stop - first, samples_out=written,
                           seconds=time.monotonic() - start_time)

    def _sample(self, shard: int, index: int, number: int, options: scenes.SceneOptions):
        # seeded per sample, not per shard, so a scene does not depend on the shard size
        rng = np.random.default_rng([self.config.seed, number])
        scene = scenes.sample_scene(rng, options)
        buffer = io.BytesIO()
        scenes.render(scene).save(buffer, format="JPEG", quality=JPEG_QUALITY)
        caption = {
            "alt_text": lambda: scenes.alt_text(scene, rng),
            "description": lambda: scenes.describe(scene),
            "none": lambda: "",
        }[self.config.caption]()
        return make_sample(
            make_key(shard, index), buffer.getvalue(), width=scene.width, height=scene.height,
            original_width=scene.width, original_height=scene.height, source="synthetic",
            origin=f"synthetic://{self.config.seed}/{number}", caption=caption,
            extra={"scene": scene.to_dict(), "description": scenes.describe(scene)},
        )
