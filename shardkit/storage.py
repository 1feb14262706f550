"""Paths that may be local folders or URIs (s3://, gs://, ...), and atomic writes to both.

Local files are written under a temporary name in the same folder and renamed, so a killed
job never leaves a half-written file under a final name. Object stores already publish an
object only when its upload completes, so there the final name is written directly.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import posixpath
import shutil
import tempfile
import uuid
from typing import IO, Iterator

import fsspec
from fsspec.implementations.local import LocalFileSystem

TEMP_MARKER = ".tmp-"


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem for `uri` and the path inside it."""
    fs, path = fsspec.core.url_to_fs(uri)
    return fs, path


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])


def is_local(uri: str) -> bool:
    return isinstance(filesystem(uri)[0], LocalFileSystem)


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    _forget_listings(fs, path)
    return fs.exists(path)


def _forget_listings(fs, path: str) -> None:  # noqa: ANN001 - an fsspec filesystem
    """Object-store filesystems (s3fs, gcsfs) cache folder listings per process, and answer
    `exists` and `ls` from them; files that other processes (workers) wrote since are then
    missing, and a finished stage looks unfinished. Every look goes to the store."""
    fs.invalidate_cache(path)
    fs.invalidate_cache(path.rstrip("/").rsplit("/", 1)[0])


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    with fs.open(path, "rb") as f:
        return f.read()


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


def read_parquet(uri: str, columns: list[str] | None = None):  # -> pyarrow.Table
    import pyarrow.parquet as pq

    fs, path = filesystem(uri)
    return pq.read_table(path, columns=columns, filesystem=fs)


def list_names(uri: str) -> list[str]:
    """Base names of the entries of a folder; empty when it does not exist."""
    fs, path = filesystem(uri)
    _forget_listings(fs, path)
    if not fs.exists(path):
        return []
    return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False))


def makedirs(uri: str) -> None:
    fs, path = filesystem(uri)
    fs.makedirs(path, exist_ok=True)


@contextlib.contextmanager
def atomic_open(uri: str) -> Iterator[IO[bytes]]:
    """Open `uri` for binary writing; the file appears under its name only if the block ends
    without an exception."""
    fs, path = filesystem(uri)
    if not isinstance(fs, LocalFileSystem):
        with fs.open(path, "wb") as f:
            yield f
        return
    folder, name = os.path.split(path)
    os.makedirs(folder or ".", exist_ok=True)
    temp = os.path.join(folder, f".{name}{TEMP_MARKER}{uuid.uuid4().hex[:8]}")
    try:
        with open(temp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    finally:
        if os.path.exists(temp):
            os.remove(temp)


def atomic_write(uri: str, data: bytes | str) -> None:
    with atomic_open(uri) as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)


def remove_leftover_temporaries(folder_uri: str) -> int:
    """Delete temporary files a killed writer left in a local folder; returns how many."""
    if not is_local(folder_uri):
        return 0
    fs, path = filesystem(folder_uri)
    if not os.path.isdir(path):
        return 0
    removed = 0
    for name in os.listdir(path):
        if TEMP_MARKER in name:
            os.remove(os.path.join(path, name))
            removed += 1
    return removed


def remove_tree(uri: str) -> None:
    """Delete a folder (local) or every object under a prefix (object store), if present."""
    fs, path = filesystem(uri)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def put_folder(folder: str, uri: str, last: str | None = None, only: set[str] | None = None) -> list[str]:
    """Upload the files under a local `folder` to `uri` (same relative paths); `last` (a
    relative path) goes after every other file, so its presence means the rest arrived (a
    diffusers pipeline's model_index.json). `only` limits it to those relative paths.
    Returns the relative paths uploaded."""
    names = []
    for base, _, files in os.walk(folder):
        for name in files:
            rel = os.path.relpath(os.path.join(base, name), folder)
            if TEMP_MARKER not in name and (only is None or rel in only):
                names.append(rel)
    names.sort(key=lambda rel: (rel == last, rel))
    for rel in names:
        with open(os.path.join(folder, rel), "rb") as f:
            atomic_write(join(uri, rel), f.read())
    return names


def _listing_stamp(fs, path: str) -> str:  # noqa: ANN001 - an fsspec filesystem
    """A digest of what is under `path`: relative names, sizes and versions (mtime or etag)."""
    digest = hashlib.sha256()
    for name, info in sorted(fs.find(path, detail=True).items()):
        stamp = next((info[k] for k in ("ETag", "etag", "mtime", "LastModified", "updated") if info.get(k)), "")
        digest.update(f"{name[len(path):]}:{info.get('size')}:{stamp}".encode())
    return digest.hexdigest()[:16]


def local_folder(uri: str) -> str:
    """A folder to read with libraries that only read local paths (from_pretrained): a local
    path or hub id as it is; a URI (s3://...) copied once into a local cache, keyed by what
    is there (names, sizes, versions), so a folder replaced upstream is copied again. The copy
    is made aside and renamed into place: concurrent readers never see half of it."""
    return local_path(uri)


def local_path(uri: str) -> str:
    """`local_folder` for a folder or a single file: a file named by URI (a weights file) is
    copied alone, never the folder around it."""
    if "://" not in uri or uri.startswith("file://"):
        return uri.removeprefix("file://")
    fs, path = filesystem(uri)
    path = path.rstrip("/")
    fs.invalidate_cache()  # the whole tree is listed below: no listing of it may be stale
    if not fs.exists(path):
        raise FileNotFoundError(uri)
    single = fs.isfile(path)
    root = os.path.join(tempfile.gettempdir(), "pixart-data-models")
    target = os.path.join(root, uri.replace("://", "/").strip("/") + "@" + _listing_stamp(fs, path))
    name = posixpath.basename(path)
    if os.path.isdir(target):
        return os.path.join(target, name) if single else target
    os.makedirs(os.path.dirname(target), exist_ok=True)
    building = tempfile.mkdtemp(prefix=".copy-", dir=os.path.dirname(target))
    try:
        if single:
            fs.get(path, os.path.join(building, name))
        else:
            fs.get(path + "/", building + "/", recursive=True)
        try:
            os.replace(building, target)
        except OSError:
            if not os.path.isdir(target):  # not another process's finished copy
                raise
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return os.path.join(target, name) if single else target
