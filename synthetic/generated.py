"""Sample sources made by the scene generator and served over loopback: the embedded
default that lets the LAION and SA-1B paths run for real without a network."""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Callable, Iterator
from urllib.parse import urlparse

from shardkit.config import LaionSource, SamSource
from synthetic import samples
from synthetic.loopback import LoopbackServer

log = logging.getLogger(__name__)


def _laion_index(cfg: LaionSource) -> str:
    return cfg.parquet[0]


def _sam_index(cfg: SamSource) -> str:
    return cfg.links or ""


def _write_laion(folder: str, cfg: LaionSource) -> dict:
    return samples.write_sample_laion(folder, count=cfg.generate.count, seed=cfg.generate.seed)


def _write_sam(folder: str, cfg: SamSource) -> dict:
    return samples.write_sample_sam(folder, count=cfg.generate.count, seed=cfg.generate.seed)


# source config type -> (the index file the config names, the writer of its folder)
_GENERATORS: dict[type, tuple[Callable, Callable]] = {
    LaionSource: (_laion_index, _write_laion),
    SamSource: (_sam_index, _write_sam),
}


def is_generated(cfg) -> bool:  # noqa: ANN001 - any dataset config
    return type(cfg) in _GENERATORS and getattr(cfg, "generate", None) is not None


def source_folder(cfg) -> str:  # noqa: ANN001
    index, _ = _GENERATORS[type(cfg)]
    return os.path.dirname(os.path.abspath(index(cfg)))


def ensure_generated(name: str, cfg) -> dict:  # noqa: ANN001
    """Write the sample source the dataset config names, unless it is already complete."""
    index, write = _GENERATORS[type(cfg)]
    folder = source_folder(cfg)
    source = write(folder, cfg)
    written = os.path.join(folder, source.get("parquet") or source.get("links"))
    if os.path.abspath(index(cfg)) != written:
        raise ValueError(
            f"datasets.{name}: the generator writes {written}, but the config names {index(cfg)}"
        )
    return source


@contextlib.contextmanager
def serving(name: str, cfg) -> Iterator[LoopbackServer]:  # noqa: ANN001
    """Generate the source if needed and serve it on 127.0.0.1 for the duration of the
    block, pointing its URLs at the port the server got."""
    source = ensure_generated(name, cfg)
    folder = source_folder(cfg)
    preferred = urlparse(source["base_url"]).port or 0
    with LoopbackServer(os.path.join(folder, "www"), port=preferred) as server:
        if server.base_url != source["base_url"]:
            samples.rewrite_base_url(folder, server.base_url)
        log.info("%s: serving its sample source at %s", name, server.base_url)
        yield server
