"""Checks a stage output against the shard format and reports everything that is wrong."""

from __future__ import annotations

import hashlib
import io
import json
import logging
from dataclasses import dataclass

from PIL import Image

from shardkit import storage
from shardkit.shards import (
    IMAGE, MAX_PIXELS, META, RECORDS, REQUIRED_META, SUMMARY, ShardFormatError, StageOutput, read_shard,
)

log = logging.getLogger(__name__)


@dataclass
class Problem:
    where: str
    what: str

    def __str__(self) -> str:
        return f"{self.where}: {self.what}"


def _check_image(where: str, data: bytes, meta: dict) -> list[Problem]:
    problems = []
    if meta.get("sha256") != hashlib.sha256(data).hexdigest():
        problems.append(Problem(where, "sha256 in json does not match the image bytes"))
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.width * image.height > MAX_PIXELS:
                return problems + [Problem(where, f"image of {image.width}x{image.height} exceeds the pixel bound")]
            image.load()
            size = image.size
    except Exception as exc:  # noqa: BLE001 - any decoder error is a finding, not a crash
        return problems + [Problem(where, f"image does not decode: {exc}")]
    if (meta.get("width"), meta.get("height")) != size:
        problems.append(Problem(where, f"json says {meta.get('width')}x{meta.get('height')}, image is {size[0]}x{size[1]}"))
    return problems


def _check_sample(where: str, sample, fields: list[str], decode: bool) -> list[Problem]:
    problems = [Problem(where, f"missing field .{f}") for f in fields if f not in sample.fields]
    if META not in sample.fields:
        return problems
    try:
        meta = json.loads(sample.fields[META])
    except ValueError as exc:
        return problems + [Problem(where, f"json does not parse: {exc}")]
    if not isinstance(meta, dict):
        return problems + [Problem(where, "json is not an object")]
    if IMAGE in sample.fields:
        problems += [Problem(where, f"json lacks {k!r}") for k in REQUIRED_META if k not in meta]
        if decode:
            problems += _check_image(where, sample.fields[IMAGE], meta)
    for name, data in sample.fields.items():
        if name.endswith("txt"):
            try:
                data.decode("utf-8")
            except UnicodeDecodeError:
                problems.append(Problem(where, f".{name} is not UTF-8"))
    return problems


def _input_keys(source: StageOutput, index: int) -> list[str] | None:
    if not storage.exists(source.shard_uri(index)):
        return None
    return [s.key for s in read_shard(source.shard_uri(index))]


def _is_subsequence(keys: list[str], of: list[str]) -> bool:
    it = iter(of)
    return all(k in it for k in keys)


def validate_stage(uri: str, decode: bool = True) -> list[Problem]:
    """Every problem found in the stage output at `uri` (empty when it is valid)."""
    output = StageOutput(uri)
    plan = output.read_plan()
    if plan is None:
        return [Problem(uri, "no _plan.json: not a stage output (or never started)")]
    problems: list[Problem] = []
    records = output.records()
    present = set(output.shard_indices())
    for index in range(plan.num_shards):
        if index not in records:
            problems.append(Problem(output.shard_uri(index), "incomplete: no record"))
    for index in sorted(present - set(range(plan.num_shards))):
        problems.append(Problem(output.shard_uri(index), f"outside the plan's {plan.num_shards} shards"))
    if not storage.exists(storage.join(uri, SUMMARY)):
        problems.append(Problem(uri, "no _summary.json"))
    leftovers = [n for n in storage.list_names(uri) if storage.TEMP_MARKER in n]
    leftovers += [n for n in storage.list_names(storage.join(uri, RECORDS)) if storage.TEMP_MARKER in n]
    if leftovers:
        problems.append(Problem(uri, f"temporary files left by an interrupted run: {leftovers}"))

    seen_keys: set[str] = set()
    source = None
    if plan.input_stage:
        # the stage lives at <storage>/<dataset>/<stage>, and its stage name may hold '/'
        dataset_root = uri.rstrip("/").rsplit("/", len(plan.stage.split("/")))[0]
        source = StageOutput(storage.join(dataset_root, plan.input_stage))
    for index, record in sorted(records.items()):
        shard_uri = output.shard_uri(index)
        if index not in present:
            problems.append(Problem(shard_uri, "record exists but the tar is missing"))
            continue
        keys = []
        try:
            for sample in read_shard(shard_uri):
                keys.append(sample.key)
                problems += _check_sample(f"{shard_uri}:{sample.key}", sample, plan.fields, decode)
        except (ShardFormatError, OSError, EOFError) as exc:
            problems.append(Problem(shard_uri, f"unreadable: {exc}"))
            continue
        if len(keys) != record.samples_out:
            problems.append(Problem(shard_uri, f"record says {record.samples_out} samples, tar has {len(keys)}"))
        if record.samples_out + len(record.failures) > record.samples_in:
            problems.append(Problem(shard_uri, "record counts more samples out and failed than in"))
        duplicates = seen_keys.intersection(keys)
        if duplicates:
            problems.append(Problem(shard_uri, f"keys also in another shard: {sorted(duplicates)[:5]}"))
        seen_keys.update(keys)
        if source is not None:
            expected = _input_keys(source, index)
            if expected is None:
                problems.append(Problem(shard_uri, f"input shard of stage {plan.input_stage!r} is missing"))
            elif not _is_subsequence(keys, expected):
                problems.append(Problem(shard_uri, f"keys are not those of input stage {plan.input_stage!r} in order"))
    return problems
