"""`python -m training {features NAME | train STAGE | ship STAGE OUT | samples FOLDER}`: feature
extraction, training, shipping a trained stage, sample grids from a pipeline folder."""

from __future__ import annotations

import argparse
import logging
import os
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


def _ship(args: argparse.Namespace) -> int:
    from training.shipped import ship

    ship(config_from_args(args), args.stage, args.out, scores=args.scores, step=args.step)
    return 0


def _samples(args: argparse.Namespace) -> int:
    from shardkit import storage
    from training.shipped import samples

    config = config_from_args(args)
    prompts = args.prompt or (config.training.stages[args.stage].validation_prompts if args.stage else [])
    if not prompts:
        log.error("no prompts: give --prompt or --stage (its validation prompts)")
        return 2
    out = args.out or storage.join(config.storage.root, "samples", os.path.basename(os.path.normpath(args.folder)))
    print(samples(args.folder, prompts, out, steps=args.steps))
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
    ship = commands.add_parser("ship", help="a trained stage's export as a folder to commit (float16, card)")
    ship.add_argument("stage")
    ship.add_argument("out")
    ship.add_argument("--scores", help="make eval's scores.json of the export, for the card")
    ship.add_argument("--step", type=int, help="ship the run's export at this step (runs/<stage>/exports/step_N)")
    ship.set_defaults(handler=_ship)
    sample = commands.add_parser("samples", help="one grid of prompts from a PixArt pipeline folder")
    sample.add_argument("folder")
    sample.add_argument("--stage", help="use this stage's validation prompts")
    sample.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    sample.add_argument("--steps", type=int, default=20)
    sample.add_argument("--out", help="default: <storage>/samples/<folder name>")
    sample.set_defaults(handler=_samples)
    return dispatch(parser, [features, train, ship, sample], argv)


if __name__ == "__main__":
    sys.exit(run_main(main))
