"""`python -m training {features NAME | train STAGE}`: feature extraction and training."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence

from shardkit.cli import config_from_args, dispatch, run_main

log = logging.getLogger("training")


def _features(args: argparse.Namespace) -> int:
    from training.features import extract

    config = config_from_args(args)
    names = args.names or [n for n, f in config.training.features.items() if not args.dataset or f.dataset == args.dataset]
    if not names:
        log.error("no feature set%s in training.features", f" for dataset {args.dataset}" if args.dataset else "")
        return 2
    for name in names:
        extract(config, name, restart=args.restart)
    return 0


def _train(args: argparse.Namespace) -> int:
    from training.trainer import train

    config = config_from_args(args)
    train(config, args.stage, restart=args.restart)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    features = commands.add_parser("features", help="extract VAE + T5 features (training.features)")
    features.add_argument("names", nargs="*", help="feature sets (default: all, or those of --dataset)")
    features.add_argument("--dataset", help="only the feature sets of this dataset")
    features.add_argument("--restart", action="store_true")
    features.set_defaults(handler=_features)
    train = commands.add_parser("train", help="train a stage (training.stages), resuming if possible")
    train.add_argument("stage")
    train.add_argument("--restart", action="store_true", help="discard the run's checkpoints and start over")
    train.set_defaults(handler=_train)
    return dispatch(parser, [features, train], argv)


if __name__ == "__main__":
    sys.exit(run_main(main))
