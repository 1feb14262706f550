"""Feature shards → training batches, with disjoint shards per worker and a resumable position.

Each epoch visits the shards in an order drawn from (seed, epoch); worker r of w takes every
w-th shard of that order, so workers never see the same sample in an epoch. Samples pass
through a seeded shuffle buffer, then into batches: one batch holds one latent size only (an
aspect-ratio bucket; a square feature set has a single one), and what is left in the buckets
at the end of an epoch goes out as smaller batches, so no sample is dropped.

The position is (epoch, batches this worker has yielded in the epoch). Batching depends only
on sizes, which are read from the stored arrays' headers, so on resume the worker replays the
epoch's batching without decoding anything and continues with the next batch it never trained
on: no sample is repeated or lost across a restart.
"""

from __future__ import annotations

import io
import json
import logging
import random
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from shardkit.shards import META, Sample, StageOutput, read_shard
from training.features import LABEL_FIELD, TEXT_FIELD, VAE_FIELD, from_stored, npy_array

log = logging.getLogger(__name__)


@dataclass
class Position:
    epoch: int = 0
    batches: int = 0
    """Batches this worker has yielded from the current epoch."""


def latent_size(npy: bytes) -> tuple[int, int]:
    """(h, w) of a stored posterior [2, C, h, w], from the .npy header alone."""
    buffer = io.BytesIO(npy)
    major, _ = np.lib.format.read_magic(buffer)
    read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
    shape = read_header(buffer)[0]
    return int(shape[-2]), int(shape[-1])


class FeatureReader:
    def __init__(self, stage: StageOutput, rank: int, world: int, seed: int, shuffle_buffer: int,
                 position: Position | None = None, needs_text: bool = True, needs_label: bool = False) -> None:
        self.stage, self.rank, self.world = stage, rank, world
        self.seed, self.shuffle_buffer = seed, shuffle_buffer
        self.position = position or Position()
        self.needed = [VAE_FIELD] + ([TEXT_FIELD] if needs_text else []) + ([LABEL_FIELD] if needs_label else [])
        self.skipped = 0
        """Samples without features (a damaged shard): skipped, counted in the logged metrics."""
        self.shards = sorted(stage.complete_shards())
        if len(self.shards) < world:
            raise ValueError(f"{stage.uri}: {len(self.shards)} shards cannot feed {world} workers disjointly")

    def _epoch_samples(self, epoch: int) -> Iterator[Sample]:
        order = list(self.shards)
        random.Random(f"{self.seed}:{epoch}").shuffle(order)
        rng = random.Random(f"{self.seed}:{epoch}:{self.rank}")
        buffer: list = []
        for shard in order[self.rank::self.world]:
            for sample in read_shard(self.stage.shard_uri(shard)):
                if any(field not in sample.fields for field in self.needed):
                    log.warning("%s: no features, skipped", sample.key)
                    self.skipped += 1
                    continue
                buffer.append(sample)
                if len(buffer) >= self.shuffle_buffer:
                    yield buffer.pop(rng.randrange(len(buffer)))
        rng.shuffle(buffer)
        yield from buffer

    def _epoch_batches(self, epoch: int, batch_size: int) -> Iterator[list[Sample]]:
        buckets: dict[tuple[int, int], list[Sample]] = {}
        for sample in self._epoch_samples(epoch):
            size = latent_size(sample.fields[VAE_FIELD])
            group = buckets.setdefault(size, [])
            group.append(sample)
            if len(group) == batch_size:
                yield group
                buckets[size] = []
        for size in sorted(buckets):
            if buckets[size]:
                yield buckets[size]

    def batches(self, batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
        """Endless: epoch after epoch, updating `position` as batches are handed out."""
        while True:
            skip, yielded = self.position.batches, False
            for index, raw in enumerate(self._epoch_batches(self.position.epoch, batch_size)):
                if index < skip:
                    continue  # trained on before the restart: replayed undecoded
                self.position.batches += 1
                yielded = True
                yield collate([decode(sample) for sample in raw])
            if not yielded and skip == 0:
                raise ValueError(f"{self.stage.uri}: worker {self.rank} has no usable samples")
            self.position = Position(self.position.epoch + 1, 0)


def decode(sample: Sample) -> dict[str, torch.Tensor]:
    posterior = from_stored(npy_array(sample.fields[VAE_FIELD]))
    item = {"mean": posterior[0], "std": posterior[1]}
    if TEXT_FIELD in sample.fields:
        item["text"] = from_stored(npy_array(sample.fields[TEXT_FIELD]))
    if LABEL_FIELD in sample.fields:
        item["label"] = torch.tensor(int(sample.fields[LABEL_FIELD]))
    meta = json.loads(sample.fields[META]) if META in sample.fields else {}
    height, width = posterior.shape[-2:]
    original = (meta.get("features") or {}).get("original_size") or [height, width]
    # PixArt-α's micro-conditions: the original image's (h, w) and the trained size's h/w
    item["resolution"] = torch.tensor([float(v) for v in original])
    item["aspect_ratio"] = torch.tensor([height / width])
    return item


def collate(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    batch = {key: torch.stack([i[key] for i in items]) for key in ("mean", "std", "label", "resolution", "aspect_ratio")
             if key in items[0]}
    if "text" in items[0]:
        longest = max(max(len(i["text"]) for i in items), 1)
        dim = items[0]["text"].shape[-1]
        text = torch.zeros(len(items), longest, dim)
        mask = torch.zeros(len(items), longest, dtype=torch.long)
        for row, item in enumerate(items):
            n = len(item["text"])
            text[row, :n], mask[row, :n] = item["text"], 1
        batch.update(text=text, mask=mask)
    return batch
