"""The `folder` source: a folder (or URI) of images with optional same-name .txt / .json.

A local folder is walked without following symlinked directories, and every listed entry
is judged before it is opened: a symlink whose target lies outside the folder is recorded
as `symlink_outside` (never read), anything that is not a regular file (a named pipe, which
would block the read forever, a socket, a device) as `not_regular_file`, and a file above
`max_file_bytes` as `too_large`. The file is then opened with O_NOFOLLOW | O_NONBLOCK and
judged again on the open descriptor, so an entry swapped for a link or a pipe after the
check is caught too. Sidecars get the same checks; one refused is counted
(`sidecar:<reason>`) and treated as absent. Object stores have neither links nor pipes:
there only the size is bounded.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import posixpath
import stat

from curation.fetch import Candidate, FetchStage, ShardBuilder
from shardkit import storage
from shardkit.inputs import IMAGE_FOLDER_FROM, MissingInput, require_path
from shardkit.runner import ShardTask
from shardkit.shards import REQUIRED_META, make_key

log = logging.getLogger(__name__)

SYMLINK_OUTSIDE = "symlink_outside"
NOT_REGULAR_FILE = "not_regular_file"
TOO_LARGE = "too_large"
READ_ERROR = "read_error"


class Refused(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "named pipe"), (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device"), (stat.S_ISDIR, "directory")):
        if test(mode):
            return name
    return "not a regular file"


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def read_local_file(path: str, root_real: str, max_bytes: int) -> bytes:
    """The bytes of `path`, a regular file inside the folder whose real path is `root_real`,
    or Refused with the reason. Never follows a link out of the folder, never opens what is
    not a regular file (opening a pipe for reading blocks until a writer comes)."""
    real = os.path.realpath(path)
    if not _inside(real, root_real):
        raise Refused(SYMLINK_OUTSIDE, f"{path} -> {real}")
    try:
        info = os.stat(real)
    except OSError as exc:
        raise Refused(READ_ERROR, f"{path}: {exc}") from None
    if not stat.S_ISREG(info.st_mode):
        raise Refused(NOT_REGULAR_FILE, f"{path}: {_kind(info.st_mode)}")
    if info.st_size > max_bytes:
        raise Refused(TOO_LARGE, f"{path}: {info.st_size} bytes; the limit is {max_bytes}")
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(real, flags)
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # became a link after the check
            raise Refused(SYMLINK_OUTSIDE, f"{path}: replaced by a link while being read") from None
        raise Refused(READ_ERROR, f"{path}: {exc}") from None
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode):  # swapped after the check
            raise Refused(NOT_REGULAR_FILE, f"{path}: {_kind(info.st_mode)}")
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise Refused(TOO_LARGE, f"{path}: more than {max_bytes} bytes")
    return data


def _list_local(root: str, recursive: bool) -> list[str]:
    """Every entry under `root` but directories: files, links, pipes... (judged when read).
    Symlinked directories are listed as entries, not descended into."""
    found = []
    for base, dirs, files in os.walk(root, followlinks=False):
        names = files + [d for d in dirs if os.path.islink(os.path.join(base, d))]
        found += [posixpath.join(base, name) for name in names]
        if not recursive:
            break
    return found


class FolderStage(FetchStage):
    def slices(self) -> list[list[str]]:
        fs, root = storage.filesystem(self.cfg.path)
        if not fs.isdir(root):
            require_path(f"datasets.{self.dataset}.path", self.cfg.path, "the image folder", IMAGE_FOLDER_FROM)
            raise MissingInput(f"datasets.{self.dataset}.path", f"{self.cfg.path} is not a folder",
                               f"set datasets.{self.dataset}.path to the folder the images are in")
        if storage.is_local(self.cfg.path):
            found = _list_local(root, self.cfg.recursive)
        else:
            found = fs.find(root, maxdepth=None if self.cfg.recursive else 1)
        wanted = {e.lower().lstrip(".") for e in self.cfg.extensions}
        # sorted, so shard membership (and keys) are stable from run to run
        images = sorted(p for p in found if posixpath.splitext(p)[1].lower().lstrip(".") in wanted)
        per = self.cfg.samples_per_shard
        protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
        prefix = "" if protocol in ("file", "local") else f"{protocol}://"
        return [[prefix + p for p in images[i:i + per]] for i in range(0, len(images), per)]

    def collect(self, task: ShardTask, builder: ShardBuilder) -> None:
        local = storage.is_local(self.cfg.path)
        root_real = os.path.realpath(storage.filesystem(self.cfg.path)[1]) if local else ""
        for index, uri in enumerate(task.payload):
            key = make_key(task.index, index)
            try:
                data = self._read(uri, local, root_real)
            except Refused as exc:
                builder.fail(key, exc.reason, exc.detail)
                continue
            caption, meta = self._sidecars(uri, builder, local, root_real)
            # the sub-folder, ImageNet-style: `label: {field: folder}` makes it the class
            meta.setdefault("folder", self._subfolder(uri))
            candidate = Candidate(key, origin=uri, caption=caption, meta=meta, data=data)
            builder.add(candidate)

    def _read(self, uri: str, local: bool, root_real: str) -> bytes:
        limit = self.cfg.max_file_bytes
        if local:
            return read_local_file(storage.filesystem(uri)[1], root_real, limit)
        try:
            fs, path = storage.filesystem(uri)
            with fs.open(path, "rb") as f:
                data = f.read(limit + 1)
        except OSError as exc:
            raise Refused(READ_ERROR, f"{uri}: {exc}") from None
        if len(data) > limit:
            raise Refused(TOO_LARGE, f"{uri}: more than {limit} bytes")
        return data

    def _sidecar(self, uri: str, builder: ShardBuilder, local: bool, root_real: str) -> bytes | None:
        """A sidecar's bytes, or None when there is none or it is refused (counted)."""
        if local:
            path = storage.filesystem(uri)[1]
            if not os.path.lexists(path):
                return None
        elif not storage.exists(uri):
            return None
        try:
            return self._read(uri, local, root_real)
        except Refused as exc:
            builder.count(f"sidecar:{exc.reason}")
            log.warning("sidecar refused: %s", exc)
            return None

    def _subfolder(self, uri: str) -> str:
        root = storage.filesystem(self.cfg.path)[1].rstrip("/")
        parent = posixpath.dirname(storage.filesystem(uri)[1])
        return posixpath.relpath(parent, root) if parent != root else ""

    def _sidecars(self, uri: str, builder: ShardBuilder, local: bool, root_real: str) -> tuple[str, dict]:
        stem = posixpath.splitext(uri)[0]
        caption, meta = "", {}
        raw = self._sidecar(stem + ".txt", builder, local, root_real)
        if raw is not None:
            try:
                caption = raw.decode("utf-8").strip()
            except UnicodeDecodeError:
                # a caption in another encoding should not cost the image: keep it, readable
                caption = raw.decode("utf-8", errors="replace").strip()
                builder.count("caption:not_utf8")
        raw = self._sidecar(stem + ".json", builder, local, root_real)
        if raw is not None:
            try:
                loaded = json.loads(raw)
                # the sidecar may carry a caption and any metadata, but never our own fields
                meta = {k: v for k, v in loaded.items() if k not in REQUIRED_META} if isinstance(loaded, dict) else {}
                caption = caption or str(meta.pop("caption", "") or "")
            except ValueError:
                builder.count("sidecar:bad_json")
        return caption, meta
