"""Feature shards → training batches, with disjoint shards per worker and a resumable position.

Each epoch visits the shards in an order drawn from (seed, epoch); worker r of w takes every
w-th shard of that order, so workers never see the same sample in an epoch. Samples pass
through a seeded shuffle buffer. The position is (epoch, samples this worker has yielded in
the epoch): on resume the worker replays the same order and skips that many samples without
decoding them, then continues exactly where it stopped instead of replaying data.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import Iterator

import torch

from shardkit.shards import StageOutput, read_shard
from training.features import TEXT_FIELD, VAE_FIELD, from_stored, npy_array

log = logging.getLogger(__name__)


@dataclass
class Position:
    epoch: int = 0
    consumed: int = 0
    """Samples this worker has taken from the current epoch."""


class FeatureReader:
    def __init__(self, stage: StageOutput, rank: int, world: int, seed: int, shuffle_buffer: int,
                 position: Position | None = None) -> None:
        self.stage, self.rank, self.world = stage, rank, world
        self.seed, self.shuffle_buffer = seed, shuffle_buffer
        self.position = position or Position()
        self.skipped = 0
        """Samples without features (a damaged shard): skipped, counted in the logged metrics."""
        self.shards = sorted(stage.complete_shards())
        if len(self.shards) < world:
            raise ValueError(f"{stage.uri}: {len(self.shards)} shards cannot feed {world} workers disjointly")

    def _epoch_keys(self, epoch: int) -> Iterator[tuple[str, dict[str, bytes]]]:
        order = list(self.shards)
        random.Random(f"{self.seed}:{epoch}").shuffle(order)
        rng = random.Random(f"{self.seed}:{epoch}:{self.rank}")
        buffer: list = []
        for shard in order[self.rank::self.world]:
            for sample in read_shard(self.stage.shard_uri(shard)):
                buffer.append(sample)
                if len(buffer) >= self.shuffle_buffer:
                    yield buffer.pop(rng.randrange(len(buffer)))
        rng.shuffle(buffer)
        yield from buffer

    def samples(self) -> Iterator[dict[str, torch.Tensor]]:
        """Endless: epoch after epoch, updating `position` as samples are handed out."""
        while True:
            skip = self.position.consumed
            for index, sample in enumerate(self._epoch_keys(self.position.epoch)):
                if index < skip:
                    continue  # already trained on before the restart: skipped undecoded
                if VAE_FIELD not in sample.fields or TEXT_FIELD not in sample.fields:
                    log.warning("%s: no features, skipped", sample.key)
                    self.skipped += 1
                    self.position.consumed += 1
                    continue
                self.position.consumed += 1
                posterior = from_stored(npy_array(sample.fields[VAE_FIELD]))
                yield {"mean": posterior[0], "std": posterior[1], "text": from_stored(npy_array(sample.fields[TEXT_FIELD]))}
            self.position = Position(self.position.epoch + 1, 0)

    def batches(self, batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
        """Batches with T5 embeddings padded to the longest caption of the batch, and masks."""
        items = []
        for item in self.samples():
            items.append(item)
            if len(items) == batch_size:
                yield collate(items)
                items = []


def collate(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    longest = max(max(len(i["text"]) for i in items), 1)
    dim = items[0]["text"].shape[-1]
    text = torch.zeros(len(items), longest, dim)
    mask = torch.zeros(len(items), longest, dtype=torch.long)
    for row, item in enumerate(items):
        n = len(item["text"])
        text[row, :n], mask[row, :n] = item["text"], 1
    return {"mean": torch.stack([i["mean"] for i in items]), "std": torch.stack([i["std"] for i in items]),
            "text": text, "mask": mask}
