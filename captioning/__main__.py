"""`python -m captioning caption DATASET [--captioner NAME]`: dense captions on Ray."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence

from captioning.stage import caption
from shardkit.cli import config_from_args, dispatch, run_main
from shardkit.config import ConfigError

log = logging.getLogger("captioning")


def _caption(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    if not config.captioners:
        raise ConfigError("captioners: none defined")
    name = args.captioner or next(iter(config.captioners))
    config.captioner(name)
    for dataset in args.datasets:
        config.dataset(dataset)
    for dataset in args.datasets:
        caption(config, dataset, name, restart=args.restart)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m captioning", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("caption", help="make the captions/<captioner> stage of datasets")
    run.add_argument("datasets", nargs="+")
    run.add_argument("--captioner", default=None, help="default: the first captioner in the config")
    run.add_argument("--restart", action="store_true", help="discard existing captions and start over")
    run.set_defaults(handler=_caption)
    return dispatch(parser, [run], argv)


if __name__ == "__main__":
    sys.exit(run_main(main))
