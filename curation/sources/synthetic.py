"""The `synthetic` source: scenes drawn directly, no download involved."""

from __future__ import annotations

import io

import numpy as np

from curation.fetch import Candidate, FetchStage, ShardBuilder
from shardkit.config import SyntheticSource
from shardkit.runner import ShardTask
from shardkit.shards import make_key
from synthetic import scenes

JPEG_QUALITY = 95


def scene_options(cfg: SyntheticSource) -> scenes.SceneOptions:
    """The generator's options from a dataset's config; unset values keep the generator's own."""
    extra: dict = {"image_sizes": tuple(map(tuple, cfg.image_sizes))} if cfg.image_sizes else {}
    if cfg.textured_fraction is not None:
        extra["textured_fraction"] = cfg.textured_fraction
    return scenes.SceneOptions(min_objects=cfg.min_objects, max_objects=cfg.max_objects, **extra)


class SyntheticStage(FetchStage):
    def slices(self) -> list[tuple[int, int]]:
        per, count = self.cfg.samples_per_shard, self.cfg.count
        return [(first, min(first + per, count)) for first in range(0, count, per)]

    def collect(self, task: ShardTask, builder: ShardBuilder) -> None:
        first, stop = task.payload
        options = scene_options(self.cfg)
        for number in range(first, stop):
            builder.add(self._candidate(make_key(task.index, number - first), number, options))

    def _candidate(self, key: str, number: int, options: scenes.SceneOptions) -> Candidate:
        # seeded per sample, not per shard, so a scene does not depend on the shard size
        rng = np.random.default_rng([self.cfg.seed, number])
        scene = scenes.sample_scene(rng, options)
        buffer = io.BytesIO()
        scenes.render(scene).save(buffer, format="JPEG", quality=JPEG_QUALITY)
        caption = {
            "alt_text": lambda: scenes.alt_text(scene, rng),
            "description": lambda: scenes.describe(scene),
            "none": lambda: "",
        }[self.cfg.caption]()
        return Candidate(key, origin=f"synthetic://{self.cfg.seed}/{number}", caption=caption,
                         meta={"scene": scene.to_dict(), "description": scenes.describe(scene)},
                         data=buffer.getvalue())
