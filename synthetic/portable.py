"""A synthetic dataset's curated shards as their scenes alone, and back.

A curated synthetic image is a pure function of its scene: `render(scene)` saved as JPEG at
the resize quality (img2dataset re-encodes at it) is the stored image byte for byte, and each
sample's `sha256` says which bytes those were. `pack` keeps everything but the images (the
shards' other fields, the stage's plan, records and summary): 20,000 images of 64 px travel
as about 2 MB of xz instead of 91 MB of tars, to a machine that has this code but neither the
sources nor img2dataset (a rented GPU box). `unpack` renders the images again, checks each
against its sha256 and rebuilds the stage; images that come out different (another JPEG
library) are counted and reported, not hidden.

    python -m synthetic.portable pack STAGE_FOLDER ARCHIVE.tar.xz
    python -m synthetic.portable unpack ARCHIVE.tar.xz STAGE_FOLDER
"""

from __future__ import annotations

import argparse
import hashlib
import io
import logging
import os
import shutil
import tarfile
import tempfile
from typing import Callable, Sequence

from shardkit import storage
from shardkit.cli import dispatch, run_main
from shardkit.shards import IMAGE, Sample, StageOutput, read_shard, shard_name, write_shard
from synthetic.scenes import Scene, render

log = logging.getLogger(__name__)


class PortableError(ValueError):
    pass


def _quality(stage: StageOutput) -> int:
    plan = stage.read_plan()
    try:
        return int(plan.config["fetched"]["resize"]["quality"])
    except (AttributeError, KeyError, TypeError):
        raise PortableError(f"{stage.uri}: not a curated synthetic stage (its plan names no fetch resize quality)") from None


def image_bytes(meta: dict, quality: int) -> bytes:
    buffer = io.BytesIO()
    render(Scene.from_dict(meta["scene"])).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def pack(folder: str, archive: str) -> int:
    """Write `archive` from the complete curated stage in `folder`; returns the samples packed."""
    stage = StageOutput(folder)
    if not stage.is_complete():
        raise PortableError(f"{folder}: not a complete stage (plan and a record for every shard)")
    quality, count = _quality(stage), 0
    with tempfile.TemporaryDirectory() as scratch:
        for index in range(stage.read_plan().num_shards):
            samples = []
            for sample in read_shard(stage.shard_uri(index)):
                if "scene" not in sample.meta:
                    raise PortableError(f"{sample.key}: no scene in its metadata; only synthetic images can be re-rendered")
                if hashlib.sha256(image_bytes(sample.meta, quality)).hexdigest() != sample.meta.get("sha256"):
                    raise PortableError(f"{sample.key}: its image is not its scene's render at quality {quality}")
                samples.append(Sample(sample.key, {k: v for k, v in sample.fields.items() if k != IMAGE}))
            count += write_shard(os.path.join(scratch, shard_name(index)), samples)
        partial = archive + storage.TEMP_MARKER
        with tarfile.open(partial, "w:xz") as tar:
            for name in sorted(os.listdir(folder)):
                if not name.endswith(".tar") and storage.TEMP_MARKER not in name:
                    tar.add(os.path.join(folder, name), arcname=os.path.join("stage", name))
            tar.add(scratch, arcname="stripped")
        os.replace(partial, archive)
    log.info("%s: %d samples packed into %s (%.1f MB)", folder, count, archive, os.path.getsize(archive) / 1e6)
    return count


def unpack(archive: str, folder: str) -> dict[str, int]:
    """Rebuild the stage in `folder` from `archive`; returns samples rendered and mismatches."""
    if os.path.exists(folder):
        raise PortableError(f"{folder} exists; unpack makes a new stage folder")
    partial = folder + storage.TEMP_MARKER
    shutil.rmtree(partial, ignore_errors=True)
    with tempfile.TemporaryDirectory() as scratch:
        with tarfile.open(archive, "r:xz") as tar:
            tar.extractall(scratch, filter="data")  # refuses links and paths out of scratch
        shutil.copytree(os.path.join(scratch, "stage"), partial)
        stage = StageOutput(partial)
        quality, rendered, mismatched = _quality(stage), 0, 0
        for index in range(stage.read_plan().num_shards):
            samples = []
            for sample in read_shard(os.path.join(scratch, "stripped", shard_name(index))):
                image = image_bytes(sample.meta, quality)
                mismatched += hashlib.sha256(image).hexdigest() != sample.meta.get("sha256")
                samples.append(Sample(sample.key, {IMAGE: image, **sample.fields}))
            rendered += write_shard(stage.shard_uri(index), samples)
    os.replace(partial, folder)
    if mismatched:
        log.warning("%s: %d of %d images differ from the packed stage's bytes (another JPEG encoder); "
                    "same scenes, not the same pixels", folder, mismatched, rendered)
    log.info("%s: %d samples rendered, %d byte-identical", folder, rendered, rendered - mismatched)
    return {"samples": rendered, "mismatched": mismatched}


def _handler(run: Callable[[argparse.Namespace], object]) -> Callable[[argparse.Namespace], int]:
    def handle(args: argparse.Namespace) -> int:
        try:
            run(args)
        except PortableError as exc:
            log.error("%s", exc)
            return 2
        return 0
    return handle


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m synthetic.portable", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pack", parents=[common])
    p.add_argument("folder")
    p.add_argument("archive")
    p.set_defaults(handler=_handler(lambda args: pack(args.folder, args.archive)))
    u = sub.add_parser("unpack", parents=[common])
    u.add_argument("archive")
    u.add_argument("folder")
    u.set_defaults(handler=_handler(lambda args: unpack(args.archive, args.folder)))
    return dispatch(parser, [], argv)  # pack and unpack read no config


if __name__ == "__main__":
    raise SystemExit(run_main(main))
