"""Paths that may be local folders or URIs (s3://, gs://, ...), and atomic writes to both.

Local files are written under a temporary name in the same folder and renamed, so a killed
job never leaves a half-written file under a final name. Object stores already publish an
object only when its upload completes, so there the final name is written directly.
"""

from __future__ import annotations

import contextlib
import os
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
    return fs.exists(path)


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
