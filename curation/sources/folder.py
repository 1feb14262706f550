"""The `folder` source: a folder (or URI) of images with optional same-name .txt / .json."""

from __future__ import annotations

import json
import logging
import posixpath

from curation.fetch import Candidate, FetchStage, ShardBuilder
from shardkit import storage
from shardkit.runner import ShardTask
from shardkit.shards import REQUIRED_META, make_key

log = logging.getLogger(__name__)


class FolderStage(FetchStage):
    def slices(self) -> list[list[str]]:
        fs, root = storage.filesystem(self.cfg.path)
        if not fs.isdir(root):
            raise FileNotFoundError(f"folder source {self.cfg.path} does not exist")
        found = fs.find(root, maxdepth=None if self.cfg.recursive else 1)
        wanted = {e.lower().lstrip(".") for e in self.cfg.extensions}
        # sorted, so shard membership (and keys) are stable from run to run
        images = sorted(p for p in found if posixpath.splitext(p)[1].lower().lstrip(".") in wanted)
        per = self.cfg.samples_per_shard
        protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
        prefix = "" if protocol in ("file", "local") else f"{protocol}://"
        return [[prefix + p for p in images[i:i + per]] for i in range(0, len(images), per)]

    def collect(self, task: ShardTask, builder: ShardBuilder) -> None:
        for index, uri in enumerate(task.payload):
            key = make_key(task.index, index)
            try:
                data = storage.read_bytes(uri)
            except OSError as exc:
                builder.fail(key, "read_error", f"{uri}: {exc}")
                continue
            caption, meta = self._sidecars(uri, builder)
            # the sub-folder, ImageNet-style: `label: {field: folder}` makes it the class
            meta.setdefault("folder", self._subfolder(uri))
            candidate = Candidate(key, origin=uri, caption=caption, meta=meta, data=data)
            builder.add(candidate)

    def _subfolder(self, uri: str) -> str:
        root = storage.filesystem(self.cfg.path)[1].rstrip("/")
        parent = posixpath.dirname(storage.filesystem(uri)[1])
        return posixpath.relpath(parent, root) if parent != root else ""

    def _sidecars(self, uri: str, builder: ShardBuilder) -> tuple[str, dict]:
        stem = posixpath.splitext(uri)[0]
        caption, meta = "", {}
        if storage.exists(stem + ".txt"):
            raw = storage.read_bytes(stem + ".txt")
            try:
                caption = raw.decode("utf-8").strip()
            except UnicodeDecodeError:
                # a caption in another encoding should not cost the image: keep it, readable
                caption = raw.decode("utf-8", errors="replace").strip()
                builder.count("caption:not_utf8")
        if storage.exists(stem + ".json"):
            try:
                loaded = json.loads(storage.read_bytes(stem + ".json"))
                # the sidecar may carry a caption and any metadata, but never our own fields
                meta = {k: v for k, v in loaded.items() if k not in REQUIRED_META} if isinstance(loaded, dict) else {}
                caption = caption or str(meta.pop("caption", "") or "")
            except ValueError:
                builder.count("sidecar:bad_json")
        return caption, meta
