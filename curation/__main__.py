"""`python -m curation {sources,curate,serve}`: sample sources and the curation stage."""

from __future__ import annotations

import argparse
import logging
import sys
import time
import urllib.request
from typing import Sequence

import pyarrow.parquet as pq

from curation.curate import curate
from shardkit.cli import config_from_args, dispatch, run_main
from shardkit.config import LaionSource
from synthetic import generated

log = logging.getLogger("curation")


def _check_served(name: str, cfg, server) -> None:  # noqa: ANN001
    """Fetch a few of the source's own URLs through the live server: proof that what the
    downloaders will see is really served."""
    if isinstance(cfg, LaionSource):
        urls = pq.read_table(cfg.parquet[0], columns=[cfg.url_column]).column(0).to_pylist()
    else:
        lines = open(cfg.links, encoding="utf-8").read().splitlines()[1:]
        urls = [line.split("\t")[1] for line in lines]
    fetched = bytes_total = 0
    for url in urls[:5]:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                bytes_total += len(response.read())
                fetched += 1
        except OSError as exc:
            log.info("%s: %s -> %s (a deliberately broken row)", name, url, exc)
    log.info("%s: fetched %d of the first %d URLs (%d bytes) from %s",
             name, fetched, min(5, len(urls)), bytes_total, server.base_url)


def _sources(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    names = args.datasets or [n for n, c in config.datasets.items() if generated.is_generated(c)]
    for name in names:
        cfg = config.dataset(name)
        if not generated.is_generated(cfg):
            log.warning("%s: has no 'generate' section; nothing to make", name)
            continue
        started = time.monotonic()
        with generated.serving(name, cfg) as server:
            _check_served(name, cfg, server)
        log.info("%s: sample source ready in %s (%.1f s)", name, generated.source_folder(cfg), time.monotonic() - started)
    return 0


def _curate(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    for name in args.datasets:
        config.dataset(name)  # every name checked before anything starts
    for name in args.datasets:
        curate(config, name, restart=args.restart)
    return 0


def _serve(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    cfg = config.dataset(args.dataset)
    with generated.serving(args.dataset, cfg) as server:
        log.info("serving %s at %s; Ctrl-C stops", args.dataset, server.base_url)
        while True:
            time.sleep(3600)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m curation", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    sources = commands.add_parser("sources", help="generate the sample sources and check they are served")
    sources.add_argument("datasets", nargs="*", help="default: every dataset with a 'generate' section")
    sources.set_defaults(handler=_sources)
    run = commands.add_parser("curate", help="make the shards/ stage of datasets")
    run.add_argument("datasets", nargs="+")
    run.add_argument("--restart", action="store_true", help="discard existing output and start over")
    run.set_defaults(handler=_curate)
    serve = commands.add_parser("serve", help="serve a generated sample source until interrupted")
    serve.add_argument("dataset")
    serve.set_defaults(handler=_serve)
    return dispatch(parser, [sources, run, serve], argv)


if __name__ == "__main__":
    sys.exit(run_main(main))
