"""What every entry point shares: config arguments, logging set-up, one-line errors."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable, Sequence

from shardkit.config import ConfigError, PipelinesConfig, load_config
from shardkit.runner import StageError


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None,
                        help="config file (default: $CONFIG, else pipelines.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config value, e.g. --set datasets.sample-laion.generate.count=500")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def config_from_args(args: argparse.Namespace) -> PipelinesConfig:
    return load_config(args.config, args.overrides)


def dispatch(parser: argparse.ArgumentParser, subcommands: Sequence[argparse.ArgumentParser],
             argv: Sequence[str] | None) -> int:
    """Give every subcommand the config arguments, parse, set up logging, run its handler."""
    for sub in subcommands:
        add_config_arguments(sub)
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    return args.handler(args)


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def run_main(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
    """Run an entry point; config and stage problems end it with one line, not a traceback."""
    try:
        return main(argv)
    except (ConfigError, StageError) as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("interrupted; rerun the same command to resume\n")
        return 130
