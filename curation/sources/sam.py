"""The `sam` source: SA-1B tars (from its links file, or a folder of tars), one tar a shard.

Each tar is downloaded whole (resumable, size-checked) and then read as a stream: images
are never unpacked to disk, masks are never kept; from each annotation json only what helps
select data travels on (number of masks, mean predicted IoU and stability, image size).

A download goes through the guarded opener (curation/urls.py): the allowlist on every hop
and connected address, one deadline over the HEAD and the GET (`deadline_s`), and a cap on
the tar (`max_download_bytes`). Refusals that a rerun would meet again (an unsafe URL or
redirect, a tar over the cap) are recorded as the tar's failure and the shard completes
empty; a deadline fails the shard and keeps the partial file, which a rerun resumes.
Members over `max_member_bytes` are skipped unread and recorded.
"""

from __future__ import annotations

import json
import logging
import os
import tarfile
import urllib.request
from dataclasses import dataclass
from typing import IO, Iterator

from curation.fetch import Candidate, FetchStage, ShardBuilder
from curation.urls import (REASON_TOO_LARGE, DownloadLimitError, FetchLimits, PrivateAllowlist,
                           UnsafeURLError, build_guarded_opener, check_url)
from shardkit import storage
from shardkit.inputs import MissingInput, require_path
from shardkit.runner import ShardTask, StageError
from shardkit.shards import make_key

log = logging.getLogger(__name__)

LINKS_HEADER = ("file_name", "cdn_link")
CHUNK = 1 << 20


SA1B_LINKS_FROM = ("get it from https://ai.meta.com/datasets/segment-anything-downloads/ (accept the SA-1B licence, "
                   "then download the links file, a tab-separated file_name and cdn_link per tar) and put it there")


def read_links(uri: str) -> list[tuple[str, str]]:
    """(file_name, url) pairs of an SA-1B links file (tab-separated, with a header)."""
    pairs = []
    for number, line in enumerate(storage.read_text(uri).splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if number == 1 and tuple(f.strip() for f in fields) == LINKS_HEADER:
            continue
        if len(fields) != 2 or not fields[0].strip() or "/" in fields[0]:
            raise ValueError(f"{uri}: line {number}: expected '<file_name>\\t<cdn_link>'")
        pairs.append((fields[0].strip(), fields[1].strip()))
    return pairs


def member_problem(member: tarfile.TarInfo) -> str | None:
    """Why a tar member must not be read, or None. Tars come from the internet: absolute
    paths, '..', links and device files are refused, never followed or created."""
    name = member.name
    if not (member.isfile()):
        return "not a regular file (link, directory or device)"
    if name.startswith(("/", "\\")) or ".." in name.replace("\\", "/").split("/"):
        return "path escapes the archive"
    return None


def _stats(annotation_json: bytes) -> dict:
    record = json.loads(annotation_json)
    image = record.get("image", {})
    annotations = record.get("annotations", [])

    def mean(field: str) -> float | None:
        values = [a[field] for a in annotations if isinstance(a.get(field), (int, float))]
        return round(sum(values) / len(values), 5) if values else None

    return {"sam_image_id": image.get("image_id"), "sam_width": image.get("width"), "sam_height": image.get("height"),
            "n_masks": len(annotations), "mean_predicted_iou": mean("predicted_iou"),
            "mean_stability_score": mean("stability_score")}


@dataclass
class _Pending:
    member: str
    image: bytes | None = None
    annotation: bytes | None = None


class SamStage(FetchStage):
    def __init__(self, dataset: str, cfg, download_dir: str) -> None:  # noqa: ANN001
        super().__init__(dataset, cfg)
        self.download_dir = cfg.download_dir or download_dir

    def slices(self) -> list[tuple[str, str]]:
        key = f"datasets.{self.dataset}"
        if self.cfg.links:
            require_path(f"{key}.links", self.cfg.links, "SA-1B's links file", SA1B_LINKS_FROM)
            try:
                return read_links(self.cfg.links)
            except ValueError as exc:
                raise StageError(f"{key}.links: {exc}") from None
        names = [n for n in storage.list_names(self.cfg.tars) if n.endswith(".tar")]
        if not names:
            raise MissingInput(f"{key}.tars", f"no .tar files in {self.cfg.tars}",
                               "download SA-1B's tars there (its links file, from "
                               "https://ai.meta.com/datasets/segment-anything-downloads/, lists them), "
                               f"or set {key}.links to the links file and they are downloaded")
        return [(n, storage.join(self.cfg.tars, n)) for n in names]

    def collect(self, task: ShardTask, builder: ShardBuilder) -> None:
        name, location = task.payload
        if self.cfg.links:
            try:
                path = self._download(name, location)
            except UnsafeURLError as exc:
                builder.fail(name, exc.reason, f"{location}: {exc.detail}")
                return
            except DownloadLimitError as exc:
                if exc.reason != REASON_TOO_LARGE:
                    raise OSError(f"{name}: {exc}; the part downloaded is kept, rerun to resume") from None
                builder.fail(name, exc.reason, f"{location}: {exc.detail}")
                return
        else:
            path = location
        fs, inner = storage.filesystem(path)
        with fs.open(inner, "rb") as stream:
            for index, (pending, stats) in enumerate(self._images(stream, name, builder)):
                candidate = Candidate(make_key(task.index, index), origin=f"{location}#{pending.member}",
                                      caption="", meta=stats, data=pending.image)
                builder.add(candidate)

    def _images(self, stream: IO[bytes], tar_name: str, builder: ShardBuilder) -> Iterator[tuple[_Pending, dict]]:
        """(image, annotation stats) in tar order; SA-1B stores sa_N.jpg then sa_N.json."""
        pending: dict[str, _Pending] = {}
        with tarfile.open(fileobj=stream, mode="r|") as tar:
            for member in tar:
                problem = member_problem(member)
                if problem:
                    builder.fail(f"{tar_name}:{member.name}", "unsafe_tar_member", problem)
                    continue
                stem, _, ext = os.path.basename(member.name).rpartition(".")
                if ext.lower() not in ("jpg", "jpeg", "json"):
                    builder.count("sam:other_member")
                    continue
                if member.size > self.cfg.max_member_bytes:  # skipped unread: tarfile seeks past it
                    builder.fail(f"{tar_name}:{member.name}", REASON_TOO_LARGE,
                                 f"{member.size} bytes; the limit is {self.cfg.max_member_bytes}")
                    continue
                entry = pending.setdefault(stem, _Pending(member.name))
                data = tar.extractfile(member).read()
                if ext.lower() == "json":
                    entry.annotation = data
                else:
                    entry.image, entry.member = data, member.name
                if entry.image is not None and entry.annotation is not None:
                    del pending[stem]
                    yield entry, self._parse_stats(entry, builder)
        for stem, entry in pending.items():  # an image whose json never came is still an image
            if entry.image is not None:
                builder.count("sam:missing_json")
                yield entry, {}

    @staticmethod
    def _parse_stats(entry: _Pending, builder: ShardBuilder) -> dict:
        try:
            return _stats(entry.annotation)
        except (ValueError, TypeError, AttributeError):
            builder.count("sam:bad_json")
            return {}

    def _download(self, name: str, url: str) -> str:
        """The tar on local disk: kept if already complete (size checked against the server),
        resumed with a Range request if partial, otherwise fetched from the start. Raises
        UnsafeURLError or DownloadLimitError (curation/urls.py) when refused or cut."""
        allowlist = PrivateAllowlist.parse(self.cfg.allowed_private, everything=self.cfg.allow_private_urls)
        unsafe = check_url(url, allow_private=allowlist)
        if unsafe:
            raise UnsafeURLError(*unsafe, url=url)
        os.makedirs(self.download_dir, exist_ok=True)
        dest = os.path.join(self.download_dir, name)
        partial = dest + ".part"
        timeout = self.cfg.timeout_s
        cap = self.cfg.max_download_bytes
        # one deadline over the HEAD and the GET; the cap bounds any one body and, below, the tar
        opener = build_guarded_opener(allowlist, FetchLimits(self.cfg.deadline_s, max_bytes=cap))
        try:
            with opener.one_fetch():
                with opener.open(urllib.request.Request(url, method="HEAD"), timeout=timeout) as head:
                    length = int(head.headers.get("Content-Length") or -1)
                if length > cap:
                    raise DownloadLimitError(REASON_TOO_LARGE, f"the server announces {length} bytes; the limit is {cap}")
                if os.path.exists(dest) and (length < 0 or os.path.getsize(dest) == length):
                    return dest
                offset = os.path.getsize(partial) if os.path.exists(partial) else 0
                headers = {"Range": f"bytes={offset}-"} if offset else {}
                with opener.open(urllib.request.Request(url, headers=headers), timeout=timeout) as response:
                    resumed = offset > 0 and response.status == 206
                    total = offset if resumed else 0
                    with open(partial, "ab" if resumed else "wb") as out:
                        while chunk := response.read1(CHUNK):  # what arrived is kept, even when cut
                            total += len(chunk)
                            if total > cap:
                                raise DownloadLimitError(REASON_TOO_LARGE, f"more than {cap} bytes received")
                            out.write(chunk)
        except DownloadLimitError as exc:
            if exc.reason == REASON_TOO_LARGE and os.path.exists(partial):
                os.remove(partial)  # never completable under this cap
            raise
        size = os.path.getsize(partial)
        if length >= 0 and size != length:
            raise OSError(f"{name}: downloaded {size} bytes, server announced {length}; rerun to resume")
        os.replace(partial, dest)
        log.info("downloaded %s (%d bytes%s)", name, size, ", resumed" if offset else "")
        return dest
